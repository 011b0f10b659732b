"""End to end in a real headless Chromium: ``llamafactory-cli webui`` with the plugin installed (nothing else),
a user configures MinorSFT on a tiny local model, previews the command, starts training, sees the deviation,
then saves and reloads the arguments. Needs Debian's ``chromium`` (skipped without it, as scripts/install.sh
announces) and the ``playwright`` Python client from ``.[test]``; Playwright downloads no browser."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import write_sft_dataset

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")  # Debian's /usr/bin/chromium; scripts/install.sh installs it
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BETA = "0.04"
SERVER_START_S = 180
TRAINING_S = 420


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@pytest.fixture
def board_server(tmp_path):
    """``llamafactory-cli webui`` on 127.0.0.1, run from its own directory (it writes saves/ and
    llamaboard_*/ there); yields (url, that directory); the whole process group is stopped afterwards."""
    workdir = tmp_path / "board"
    workdir.mkdir()
    log_path = tmp_path / "webui.log"
    port = _free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "BROWSER": "true",  # launch(inbrowser=True) must not open a browser of its own
        "OMP_NUM_THREADS": "1",
    }
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            ["llamafactory-cli", "webui"],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"llamafactory-cli webui exited with {server.returncode}:\n{_tail(log_path)}")
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"llamafactory-cli webui not up after {SERVER_START_S}s:\n{_tail(log_path)}")
                time.sleep(1)
        yield url, workdir, log_path
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the board's training subprocess is in the same group
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: `apt-get install -y chromium` (scripts/install.sh does it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python client is missing: `pip install -e .[test]`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class BoardPage:
    """What a user does on LLaMA-Board, addressed by the labels the user reads."""

    QUIET_S = 0.5

    def __init__(self, page):
        self.page = page
        self._pending = set()
        page.on("request", self._sent)
        page.on("requestfinished", self._answered)
        page.on("requestfailed", self._answered)

    def _sent(self, request):
        if "/gradio_api/run/" in request.url:  # Gradio's unqueued events
            self._pending.add(request)

    def _answered(self, request):
        self._pending.discard(request)

    def settle(self, timeout_s=30):
        """Wait until the board has answered the events sent so far, chained ones included. LLaMA-Board
        answers a choice by resetting other boxes (a model name resets the path, a stage the datasets)."""
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < self.QUIET_S:
            self.page.wait_for_timeout(100)  # Playwright delivers request events while it waits
            if self._pending:
                quiet_since = time.monotonic()
            if time.monotonic() > deadline:
                pytest.fail(f"the board did not answer {len(self._pending)} event(s) in {timeout_s}s")

    def choose(self, label, option):
        box = self.page.get_by_label(label, exact=True)
        box.click()
        box.fill(option)  # filters long option lists down to the wanted one
        self.page.get_by_role("option", name=option, exact=True).click()
        self.settle()

    def choose_dataset(self, name):
        """The list is filled when the box gets focus (from the data dir and the stage)."""
        self.page.get_by_label("Dataset", exact=True).first.click()
        self.page.get_by_role("option", name=name, exact=True).click()

    def type_text(self, label, text):
        """Gradio textboxes carry their info line in the label, hence the prefix match."""
        box = self.page.get_by_label(label).locator("visible=true")
        box.fill(text)
        box.blur()

    def set_number(self, label, value):
        box = self.page.get_by_label(f"number input for {label}", exact=True)
        box.fill(str(value))
        box.press("Enter")

    def open_section(self, name):
        self.page.get_by_text(name, exact=True).click()

    def click(self, button):
        self.page.get_by_role("button", name=button, exact=True).click()

    def live_plot_image(self):
        """The board's loss plot, as the image it shows (the monitor redraws it every 2 s while training)."""
        image = self.page.locator("[data-testid=matplotlib] img")
        image.wait_for(timeout=60_000)
        return image.get_attribute("src")

    def command_text(self):
        return self.page.locator("pre").filter(has_text="llamafactory-cli train").inner_text()

    def failure_text(self):
        failed = self.page.locator(".prose").filter(has_text=re.compile(r"^Failed\. Exit code"))
        return failed.first.inner_text() if failed.count() else ""

    def wait_for_output(self, pattern, timeout_s=60):
        self.page.get_by_text(re.compile(pattern)).first.wait_for(timeout=timeout_s * 1000)


def _configure_minorsft(board, model_dir, dataset_dir):
    board.choose("Model name", "Custom")
    board.type_text("Model path", str(model_dir))
    board.choose("Chat template", "smollm2")
    board.page.get_by_label("Stage", exact=True).click()
    assert board.page.get_by_role("option", name="SFT using DPO", exact=True).is_visible()
    board.page.get_by_role("option", name="MinorSFT", exact=True).click()
    board.settle()
    board.type_text("Data dir", str(dataset_dir))
    board.choose_dataset("tiny_sft")
    board.type_text("Epochs", "1.0")
    board.choose("Compute type", "fp32")
    board.set_number("Gradient accumulation", 1)
    board.open_section("Extra configurations")
    board.set_number("Logging steps", 1)
    board.type_text("Extra arguments", '{"optim": "adamw_torch", "preprocessing_num_workers": 1}')
    board.open_section("RLHF configurations")
    board.set_number("Beta value", BETA)


def _orange_pixels(data_url: str) -> int:
    """Pixels of the deviation curve's orange (red well above blue; Gradio's lossy WebP shifts exact colours).
    LLaMA-Factory draws the loss in blue on white, black and grey."""
    import base64
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")
    return sum(1 for r, _, b in image.getdata() if r - b > 100)


def _wait_for_file(path: Path, timeout_s: float) -> None:
    """LLaMA-Board writes training_args.yaml when it launches the run, after its own checks passed."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            pytest.fail(f"LLaMA-Board did not launch a run into {path.parent} (see the screenshot)")
        time.sleep(1)


def _wait_for_line(path: Path, key: str, timeout_s: float, failed) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().split("\n")[:-1]:  # the last piece may be a line still being written
                entry = json.loads(line)
                if key in entry:
                    return entry
        failure = failed()
        if failure:
            pytest.fail(f"training failed in the board:\n{failure}")
        time.sleep(2)
    pytest.fail(f"no line with {key!r} in {path} after {timeout_s}s")


def test_minorsft_from_the_board(chromium, board_server, tiny_model_dir, tmp_path):
    from playwright.sync_api import expect

    url, workdir, server_log = board_server
    dataset_dir = write_sft_dataset(tmp_path / "data", "tiny_sft", num_samples=16)
    page = chromium.new_page(viewport={"width": 1600, "height": 2400})
    board = BoardPage(page)
    try:
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_label("Stage", exact=True).wait_for(timeout=120_000)
        _configure_minorsft(board, tiny_model_dir, dataset_dir)

        board.click("Preview command")
        board.wait_for_output(r"--stage minorsft")
        command = board.command_text()
        assert re.search(r"--stage minorsft\s", command), command
        assert re.search(rf"--pref_beta {re.escape(BETA)}\s", command), command
        assert re.search(rf"--model_name_or_path {re.escape(str(tiny_model_dir))}\s", command), command
        assert re.search(r"--template smollm2\s", command), command
        output_dir = workdir / re.search(r"--output_dir (\S+)", command).group(1)

        board.click("Start")
        _wait_for_file(output_dir / "training_args.yaml", 60)
        entry = _wait_for_line(output_dir / "trainer_log.jsonl", "deviation", TRAINING_S, board.failure_text)
        # Step 1, before any update: the policy is the reference, the deviation is fp32 rounding of either sign.
        assert entry["current_steps"] == 1 and abs(entry["deviation"]) < 1e-5 and "coef_mean" in entry
        # Even a plot of the first logged step has the orange deviation line in its legend (about 50 pixels).
        assert _orange_pixels(board.live_plot_image()) > 20, "the live plot shows no deviation series"
        board.wait_for_output(r"'deviation': ", timeout_s=60)  # the log panel shows the deviation too

        board.wait_for_output(r"^Finished\.", timeout_s=TRAINING_S)
        training_args = (output_dir / "training_args.yaml").read_text()
        assert "stage: minorsft" in training_args and f"pref_beta: {BETA}" in training_args
        assert (output_dir / "training_deviation.png").is_file()

        # After the run: LLaMA-Board empties the dataset box whenever the stage changes, loading included.
        board.click("Save arguments")
        board.wait_for_output("Arguments have been saved")
        board.choose("Stage", "SFT using DPO")
        board.set_number("Beta value", "0.2")
        board.click("Load arguments")
        board.wait_for_output("Arguments have been restored")
        expect(page.get_by_label("Stage", exact=True)).to_have_value("MinorSFT")
        expect(page.get_by_label("number input for Beta value", exact=True)).to_have_value(BETA)

    except BaseException:
        page.screenshot(path=str(tmp_path / "board-failure.png"), full_page=True)
        print(f"screenshot: {tmp_path / 'board-failure.png'}\nserver log:\n{_tail(server_log)}")
        raise
