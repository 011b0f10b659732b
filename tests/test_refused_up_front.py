"""Every check that can run before the expensive part does: bad values a user met only after the model loaded (or
after the whole reference pass) are refused while LLaMA-Factory parses the arguments, in one line that names the
key; ``minorsft sweep`` and ``minorsft eval`` likewise. And what decides where a re-run resumes: which checkpoints
are complete, and which lines of ``trainer_log.jsonl`` a resumed run logs again."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from llamafactory_minorsft import cli

from helpers import BENCHMARK_FIXTURES, REPO_ROOT, tiny_train_config, train_in_one_process, write_sft_dataset

# --- training: refused while the arguments are parsed ----------------------------------------------------------


@pytest.mark.slow
def test_an_infinite_beta_as_yaml_reads_it_is_refused_in_one_last_line(tmp_path, tiny_model_dir):
    """YAML as LLaMA-Factory reads the file (OmegaConf) turns ``1e400`` into inf; through the real command line."""
    data = write_sft_dataset(tmp_path / "data")
    config = tiny_train_config(tiny_model_dir, data, tmp_path / "out", pref_beta=0.5)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config).replace("pref_beta: 0.5", "pref_beta: 1e400"))
    refused = subprocess.run(
        ["llamafactory-cli", "train", str(tmp_path / "train.yaml")], capture_output=True, text=True, timeout=300
    )
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1] == (
        "llamafactory_minorsft.errors.UsageError: `pref_beta` must be finite and > 0 for `stage: minorsft` (it is "
        "beta of Eq. 3/7; the paper's best is 0.04), got inf."
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_paths_and_lengths_are_refused_before_anything_loads(tmp_path, tiny_model_dir):
    """In one process, as ``llamafactory-cli train`` runs them; each refusal comes from LLaMA-Factory's
    ``get_train_args``, before the tokenizer, the data or the model is loaded, and writes nothing."""
    data = write_sft_dataset(tmp_path / "data")
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    cases = {
        "cache-under-a-file": (
            {"precompute_ref_logps": True, "ref_logps_cache_dir": "/dev/null/cache"},
            "llamafactory_minorsft.errors.UsageError: `ref_logps_cache_dir`: /dev/null/cache cannot be created, "
            "/dev/null is not a folder",
        ),
        "output_dir-a-file": (
            {"output_dir": str(a_file)},
            f"llamafactory_minorsft.errors.UsageError: `output_dir`: {a_file} is a file, not a folder",
        ),
        "cutoff_len-0": (
            {"cutoff_len": 0},
            "llamafactory_minorsft.errors.UsageError: `cutoff_len` must be at least 1 (got 0): samples are cut to "
            "that many tokens.",
        ),
        "cutoff_len-0-deviation_metric": ({"stage": "sft", "deviation_metric": True, "cutoff_len": 0}, "`cutoff_len`"),
    }
    configs = [
        tiny_train_config(tiny_model_dir, data, tmp_path / name / "out") | overrides
        for name, (overrides, _) in cases.items()
    ]
    for (name, (_, message)), run in zip(cases.items(), train_in_one_process(configs, tmp_path / "runs")):
        assert run.error is not None, name
        assert message in run.error.strip().splitlines()[-1], name
        assert "in get_train_args" in run.error, name
        assert not (tmp_path / name).exists(), name
    assert a_file.read_text() == "kept"


def test_a_cache_folder_is_checked_without_creating_it(tmp_path):
    from llamafactory.hparams import FinetuningArguments

    creatable = tmp_path / "not" / "yet"
    FinetuningArguments(stage="minorsft", precompute_ref_logps=True, ref_logps_cache_dir=str(creatable))
    assert not (tmp_path / "not").exists()
    with pytest.raises(ValueError, match=r"^`ref_logps_cache_dir`: .* cannot be created, .*/a_file is not a folder$"):
        (tmp_path / "a_file").write_text("")
        FinetuningArguments(
            stage="minorsft", precompute_ref_logps=True, ref_logps_cache_dir=str(tmp_path / "a_file" / "cache")
        )


# --- minorsft sweep and minorsft eval --------------------------------------------------------------------------


def test_a_sweep_into_a_file_is_refused_in_the_dry_run_too(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OUTPUT_ROOT", raising=False)
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    for dry_run in (["--dry-run"], []):
        assert cli.main(["sweep", "--repo_root", str(REPO_ROOT), "--demo", *dry_run, "--output_root", str(a_file)]) == 2
        assert capsys.readouterr().err == f"minorsft sweep: --output_root: {a_file} is a file, not a folder\n"
    assert a_file.read_text() == "kept"


class SilentHub:
    """A Hub endpoint that reads each request's first line and closes the connection without an answer."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.requests = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def _serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed
                return
            with connection:
                self.requests.append(connection.recv(65536).decode(errors="replace").split("\r\n")[0])

    def close(self):
        self.socket.close()


@pytest.mark.parametrize("offline", [True, False])
def test_an_unreachable_model_is_named_in_one_line_after_one_attempt(tmp_path, offline):
    """Offline mode: no request for the model at all. A Hub that does not answer: one request, then exit 3 (loading
    the model would have retried for about a minute). A child process: the Hub client reads its settings at import."""
    server = SilentHub()
    try:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_ENDPOINT": server.url,
            "HF_HOME": str(tmp_path / "hf"),
            "NO_PROXY": "127.0.0.1",
        }
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            env.pop(name, None)
        result = subprocess.run(
            [sys.executable, "-m", "llamafactory_minorsft.cli", "eval", "--task", "ceval"]
            + ["--data_dir", str(BENCHMARK_FIXTURES / "ceval-exam"), "--output_dir", str(tmp_path / "out")]
            + ["--subjects", "law", "--model_name_or_path", "nosuchorg/nosuchmodel"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        server.close()
    assert result.returncode == 3, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(
        "minorsft eval: --model_name_or_path nosuchorg/nosuchmodel: not a local folder nor in the Hugging Face cache, "
        "and the Hugging Face Hub cannot be reached ("
    )
    # (huggingface_hub also asks the endpoint for something of its own when its client starts)
    attempts = [request for request in server.requests if "nosuchorg/nosuchmodel" in request]
    assert attempts == ([] if offline else ["HEAD /nosuchorg/nosuchmodel/resolve/main/config.json HTTP/1.1"])
    assert not (tmp_path / "out").exists()


# --- resuming: complete checkpoints, replayed log lines --------------------------------------------------------


def write_checkpoint(path: Path, step: int, **files: str) -> Path:
    """A checkpoint folder as the Trainer leaves it after a full save of a one-file model; ``files`` replace (None:
    leave out) its files."""
    contents = {
        "model.safetensors": "w",
        "optimizer.pt": "o",
        "scheduler.pt": "s",
        "rng_state.pth": "r",
        "trainer_state.json": json.dumps({"global_step": step, "log_history": []}),
    }
    contents.update(files)
    path.mkdir(parents=True)
    for name, text in contents.items():
        if text is not None:
            (path / name).write_text(text)
    return path


def test_which_checkpoints_can_be_resumed(tmp_path):
    from llamafactory_minorsft.hooks.resume import checkpoint_problem

    def problem(save_only_model=False, **files):
        path = write_checkpoint(tmp_path / str(len(list(tmp_path.iterdir()))), 2, **files)
        return checkpoint_problem(str(path), save_only_model)

    assert problem() is None
    assert problem(**{"trainer_state.json": None}).startswith("it has no trainer_state.json")
    assert problem(**{"trainer_state.json": '{"global_st'}) == "its trainer_state.json is cut short"
    assert problem(**{"optimizer.pt": None}) == "it has no optimizer state (optimizer.pt)"
    assert problem(save_only_model=True, **{"optimizer.pt": None, "scheduler.pt": None}) is None
    assert problem(**{"scheduler.pt": None}) == "it has no scheduler.pt"
    assert problem(**{"model.safetensors": None}) == "it has no weights file"
    assert problem(**{"model.safetensors": None, "adapter_model.safetensors": "a"}) is None
    index = json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}})
    shards = {"model.safetensors": None, "model.safetensors.index.json": index, "model-1.safetensors": "1"}
    assert problem(**shards) == "it has no weights file"
    assert problem(**shards, **{"model-2.safetensors": "2"}) is None
    # DeepSpeed: weights and optimizer state in global_step<N>/ (here with weights gathered for saving, or not)
    deepspeed = write_checkpoint(tmp_path / "deepspeed", 2, **{"optimizer.pt": None, "scheduler.pt": None})
    (deepspeed / "global_step2").mkdir()
    assert checkpoint_problem(str(deepspeed), False) is None
    (deepspeed / "model.safetensors").unlink()
    assert checkpoint_problem(str(deepspeed), False) is None


def test_an_incomplete_checkpoint_to_resume_from_is_refused_and_the_last_ones_are_moved_aside(tmp_path):
    from llamafactory_minorsft.errors import UsageError
    from llamafactory_minorsft.hooks.resume import prepare_resume

    output_dir = tmp_path / "out"
    write_checkpoint(output_dir / "checkpoint-2", 2)
    write_checkpoint(output_dir / "checkpoint-4", 4, **{"trainer_state.json": None})
    write_checkpoint(output_dir / "checkpoint-6", 6, **{"optimizer.pt": None})
    (output_dir / "incomplete-checkpoint-6").mkdir()  # left by an earlier kill at the same save

    def args(**values):
        defaults = dict(
            output_dir=str(output_dir),
            resume_from_checkpoint=None,
            do_train=True,
            overwrite_output_dir=False,
            save_only_model=False,
        )
        return SimpleNamespace(**{**defaults, **values})

    with pytest.raises(UsageError, match=r"^`resume_from_checkpoint: .*/checkpoint-4` cannot be resumed: it has no "):
        prepare_resume(args(resume_from_checkpoint=str(output_dir / "checkpoint-4")))
    prepare_resume(args(overwrite_output_dir=True))  # a fresh start: nothing to move
    assert sorted(os.listdir(output_dir)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "incomplete-checkpoint-6"]
    prepare_resume(args())
    assert sorted(os.listdir(output_dir)) == [
        "checkpoint-2",
        "incomplete-checkpoint-4",
        "incomplete-checkpoint-6",
        "incomplete-checkpoint-6.2",
    ]
    assert not (output_dir / "incomplete-checkpoint-6.2" / "optimizer.pt").exists()


def test_a_resumed_run_keeps_the_log_lines_up_to_its_checkpoint(tmp_path):
    """Step 2 was logged twice there (a step and an evaluation); the run-end summary at step 2 came after the
    save, and so did step 3 and a line that the kill cut short."""
    from llamafactory_minorsft.hooks.resume import drop_replayed_log_lines

    history = [{"loss": 1.0, "step": 1}, {"loss": 0.9, "step": 2}, {"eval_loss": 0.8, "step": 2}]
    checkpoint = write_checkpoint(
        tmp_path / "out" / "checkpoint-2",
        2,
        **{"trainer_state.json": json.dumps({"global_step": 2, "log_history": history})},
    )
    kept = [
        {"current_steps": 1, "loss": 1.0},
        {"current_steps": 2, "loss": 0.9},
        {"current_steps": 2, "eval_loss": 0.8},
    ]
    replayed = [{"current_steps": 2, "epoch": 0.5}, {"current_steps": 3, "loss": 0.7}]
    log = tmp_path / "out" / "trainer_log.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in kept + replayed) + '{"current_steps": 4, "lo')
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), resume_from_checkpoint=str(checkpoint), should_save=True)
    drop_replayed_log_lines(args)
    assert [json.loads(line) for line in log.read_text().splitlines()] == kept
    drop_replayed_log_lines(args)  # nothing more to drop
    assert [json.loads(line) for line in log.read_text().splitlines()] == kept
