"""What every ``minorsft`` subcommand shares: paths typed by the user, existing output folders, the version."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from llamafactory_minorsft import __version__
from llamafactory_minorsft.files import UsageError, local_path, local_path_or_hub_id

from helpers import OFFLINE_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_paths_resolve_against_the_starting_folder_and_missing_ones_are_named(tmp_path, monkeypatch):
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert local_path("models/m", "--model_name_or_path") == str(tmp_path / "models" / "m")
    assert local_path_or_hub_id("models/m", "--model_name_or_path") == str(tmp_path / "models" / "m")
    # Not here and shaped like owner/name: a Hub id, left as typed for the flags that accept one.
    assert local_path_or_hub_id("Qwen/Qwen2-7B-Instruct", "--model_name_or_path") == "Qwen/Qwen2-7B-Instruct"
    with pytest.raises(UsageError, match=re.escape(f"--prompts p.json: no such file or folder ({tmp_path}/p.json)")):
        local_path("p.json", "--prompts")
    with pytest.raises(UsageError, match="--model_name_or_path ./models/gone: no such file or folder .*Hub id"):
        local_path_or_hub_id("./models/gone", "--model_name_or_path")


def _model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # every refusal below comes before anything reads it
    return model


# subcommand -> (its arguments, given the tmp folder; the file in the output that must survive the refusal)
COMMANDS = {
    "bench": (
        lambda tmp: ["--model_name_or_path", str(_model_dir(tmp)), "--output_dir", str(tmp / "out")],
        "out/kept.txt",
    ),
    "eval": (
        lambda tmp: ["--task", "ceval", "--model_name_or_path", str(_model_dir(tmp)), "--output_dir", str(tmp / "out")],
        "out/kept.txt",
    ),
    "report": (lambda tmp: [str(_model_dir(tmp)), "--output_dir", str(tmp / "out")], "out/kept.txt"),
    "demo-model": (lambda tmp: ["--output_dir", str(tmp / "out")], "out/kept.txt"),
    # A dataset folder is shared with other datasets: the file the command adds is what --overwrite is about.
    "drift-set": (
        lambda tmp: [
            "--model_name_or_path",
            str(_model_dir(tmp)),
            "--template",
            "default",
            "--prompts",
            str(REPO_ROOT / "data" / "general_prompts.json"),
            "--output_dir",
            str(tmp / "out"),
        ],
        "out/general_drift.json",
    ),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_existing_output_is_refused_without_overwrite(command, tmp_path):
    arguments, kept = COMMANDS[command]
    argv = arguments(tmp_path)
    (tmp_path / kept).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / kept).write_text("earlier results")
    refused = subprocess.run(
        [Path(sys.executable).parent / "minorsft", command, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV},
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr
    assert re.search(rf"^minorsft {command}: .* exists.*; pass --overwrite to replace it$", refused.stderr, re.M)
    assert str(tmp_path / "out") in refused.stderr
    assert (tmp_path / kept).read_text() == "earlier results"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_the_version_is_written_once():
    built = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    assert built == __version__ == importlib.metadata.version("llamafactory-minorsft")
    assert len(re.findall(re.escape(__version__), (REPO_ROOT / "setup.py").read_text())) == 0
