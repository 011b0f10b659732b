"""The plugin is invisible to LLaMA-Factory's own stages: every file a stock run writes is the same with the
plugin active as with ``MINORSFT_DISABLE=1``, timing aside.

Both runs of a pair write to the same ``output_dir`` (the first is moved aside), so paths inside the files
agree too; the same seed on the same CPU gives the same numbers, so values are compared exactly.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_llamafactory_train, tiny_train_config, write_sft_dataset

# Fields that measure wall-clock time; every other field is compared exactly.
TIMING_KEYS = frozenset(
    {
        # trainer_log.jsonl (LLaMA-Factory's LogCallback)
        "elapsed_time",
        "remaining_time",
        "throughput",
        # the Trainer's speed metrics (all_results.json, *_results.json, trainer_state.json log_history)
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "eval_runtime",
        "eval_samples_per_second",
        "eval_steps_per_second",
        "eval_model_preparation_time",
    }
)
JSON_FILES = ("all_results.json", "train_results.json", "eval_results.json", "trainer_state.json")

ON = {"MINORSFT_DISABLE": "0"}
OFF = {"MINORSFT_DISABLE": "1"}

EVAL_SAMPLES = 10  # batch 1: LLaMA-Factory writes an evaluation progress line every 5 steps


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_sft_dataset(directory, "tiny_sft", num_samples=EVAL_SAMPLES)
    write_sft_dataset(directory, "tiny_pairs", num_samples=8, ranking=True)
    return directory


def test_the_plugin_run_has_the_plugin_and_the_disabled_run_has_not():
    """The comparison means nothing unless ``ON`` really activates the plugin and ``OFF`` really does not."""
    code = "import llamafactory.train.tuner as tuner; print(tuner.LogCallback.__module__)"
    modules = {}
    for name, env in (("on", ON), ("off", OFF)):
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, **env},
        )
        assert result.returncode == 0, result.stderr[-4000:]
        modules[name] = result.stdout.strip()
    assert modules == {"on": "llamafactory_minorsft.hooks.training", "off": "llamafactory.train.callbacks"}


def without_timing(value):
    if isinstance(value, dict):
        return {key: without_timing(item) for key, item in value.items() if key not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timing(item) for item in value]
    return value


def written_files(output_dir):
    """What a run wrote, timing removed: json files parsed, the jsonl as a list of lines, weights as tensors."""
    files = {"names": sorted(path.relative_to(output_dir).as_posix() for path in output_dir.rglob("*"))}
    for name in JSON_FILES:
        if (output_dir / name).is_file():
            files[name] = without_timing(json.loads((output_dir / name).read_text()))
    log_path = output_dir / "trainer_log.jsonl"
    files["trainer_log.jsonl"] = [without_timing(json.loads(line)) for line in log_path.read_text().splitlines()]
    if (output_dir / "model.safetensors").is_file():
        files["model.safetensors"] = load_file(output_dir / "model.safetensors")
    return files


def run_with_and_without_plugin(tmp_path, model_dir, dataset_dir, **overrides):
    workdir = tmp_path / "run"
    output_dir = workdir / "out"
    config = tiny_train_config(model_dir, dataset_dir, output_dir, **overrides)
    written = {}
    for name, env in (("off", OFF), ("on", ON)):
        result = run_llamafactory_train(config, workdir, env)
        assert result.returncode == 0, f"{name}: {result.stderr[-4000:]}"
        written[name] = written_files(output_dir)
        output_dir.rename(workdir / f"out_{name}")
    return written["off"], written["on"]


def assert_same(off, on):
    assert on["names"] == off["names"]
    for name in off.keys() - {"model.safetensors"}:
        assert on[name] == off[name], name
    for name, tensor in off.get("model.safetensors", {}).items():
        assert torch.equal(on["model.safetensors"][name], tensor), name


@pytest.mark.slow
def test_sft_training_writes_the_same_files(tmp_path, tiny_model_dir, dataset_dir):
    off, on = run_with_and_without_plugin(
        tmp_path,
        tiny_model_dir,
        dataset_dir,
        stage="sft",
        pref_beta=None,
        max_steps=2,
        val_size=2,
        per_device_eval_batch_size=2,
        eval_strategy="steps",
        eval_steps=2,
        do_eval=True,
    )
    assert set(JSON_FILES) | {"model.safetensors"} <= set(off["names"])
    assert len(off["trainer_log.jsonl"]) == 4  # two training steps, one evaluation, the end-of-training summary
    assert {"train_loss", "eval_loss"} <= off["all_results.json"].keys()
    assert_same(off, on)


@pytest.mark.slow
def test_sft_evaluation_only_writes_the_same_progress_lines(tmp_path, tiny_model_dir, dataset_dir):
    off, on = run_with_and_without_plugin(
        tmp_path,
        tiny_model_dir,
        dataset_dir,
        stage="sft",
        pref_beta=None,
        do_train=False,
        do_eval=True,
        eval_dataset="tiny_sft",
        per_device_eval_batch_size=1,
    )
    assert {"all_results.json", "eval_results.json"} <= set(off["names"])
    # LLaMA-Board's progress bar for Evaluate & Predict reads these lines.
    progress = [line["current_steps"] for line in off["trainer_log.jsonl"] if "eval_loss" not in line]
    assert progress == [5, 10]
    assert_same(off, on)


@pytest.mark.slow
def test_dpo_training_writes_the_same_files(tmp_path, tiny_model_dir, dataset_dir):
    off, on = run_with_and_without_plugin(
        tmp_path,
        tiny_model_dir,
        dataset_dir,
        stage="dpo",
        pref_beta=0.1,
        dataset="tiny_pairs",
        max_steps=2,
    )
    assert {"all_results.json", "train_results.json", "trainer_state.json", "model.safetensors"} <= set(off["names"])
    assert "rewards/accuracies" in off["trainer_state.json"]["log_history"][0]
    assert_same(off, on)
