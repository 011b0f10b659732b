"""The plugin is invisible to LLaMA-Factory's own stages: every file a stock run writes is the same with the
plugin active as with ``MINORSFT_DISABLE=1``, timing aside.

The stock runs train one after another in one process with the plugin off, then in one with it on
(``train_in_one_process``); both runs of a pair write to the same ``output_dir`` (the first is moved aside),
so paths inside the files agree too; the same seed on the same CPU gives the same numbers, so values are
compared exactly. That ``ON`` activates the plugin and ``OFF`` does not: ``test_integration``.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_train_config, train_in_one_process, write_sft_dataset

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


# The stock runs: LLaMA-Factory's SFT training with an eval set, its SFT evaluation alone, and DPO training.
STOCK_RUNS = {
    "sft": {
        "stage": "sft",
        "pref_beta": None,
        "max_steps": 2,
        "val_size": 2,
        "per_device_eval_batch_size": 2,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "do_eval": True,
    },
    "sft-evaluation": {
        "stage": "sft",
        "pref_beta": None,
        "do_train": False,
        "do_eval": True,
        "eval_dataset": "tiny_sft",
        "per_device_eval_batch_size": 1,
    },
    "dpo": {"stage": "dpo", "pref_beta": 0.1, "dataset": "tiny_pairs", "max_steps": 2},
}


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_model_dir) -> dict:
    """``{run: (files written with the plugin off, files written with it on)}``."""
    workdir = tmp_path_factory.mktemp("stock")
    dataset_dir = workdir / "data"
    write_sft_dataset(dataset_dir, "tiny_sft", num_samples=EVAL_SAMPLES)
    write_sft_dataset(dataset_dir, "tiny_pairs", num_samples=8, ranking=True)
    configs = [
        tiny_train_config(tiny_model_dir, dataset_dir, workdir / name / "out", **overrides)
        for name, overrides in STOCK_RUNS.items()
    ]
    files = {name: {} for name in STOCK_RUNS}
    for side, env in (("off", OFF), ("on", ON)):
        for name, run in zip(STOCK_RUNS, train_in_one_process(configs, workdir / side, env)):
            run.check()
            files[name][side] = written_files(run.output_dir)
            run.output_dir.rename(run.output_dir.with_name(f"out_{side}"))
    return {name: (sides["off"], sides["on"]) for name, sides in files.items()}


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


def assert_same(off, on):
    assert on["names"] == off["names"]
    for name in off.keys() - {"model.safetensors"}:
        assert on[name] == off[name], name
    for name, tensor in off.get("model.safetensors", {}).items():
        assert torch.equal(on["model.safetensors"][name], tensor), name


@pytest.mark.slow
def test_sft_training_writes_the_same_files(written):
    off, on = written["sft"]
    assert set(JSON_FILES) | {"model.safetensors"} <= set(off["names"])
    assert len(off["trainer_log.jsonl"]) == 4  # two training steps, one evaluation, the end-of-training summary
    assert {"train_loss", "eval_loss"} <= off["all_results.json"].keys()
    assert_same(off, on)


@pytest.mark.slow
def test_sft_evaluation_only_writes_the_same_progress_lines(written):
    off, on = written["sft-evaluation"]
    assert {"all_results.json", "eval_results.json"} <= set(off["names"])
    # LLaMA-Board's progress bar for Evaluate & Predict reads these lines.
    progress = [line["current_steps"] for line in off["trainer_log.jsonl"] if "eval_loss" not in line]
    assert progress == [5, 10]
    assert_same(off, on)


@pytest.mark.slow
def test_dpo_training_writes_the_same_files(written):
    off, on = written["dpo"]
    assert {"all_results.json", "train_results.json", "trainer_state.json", "model.safetensors"} <= set(off["names"])
    assert "rewards/accuracies" in off["trainer_state.json"]["log_history"][0]
    assert_same(off, on)
