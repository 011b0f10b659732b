"""DeepSpeed ZeRO-3, the paper's setting, on the CPU: 2 gloo ranks through the real ``llamafactory-cli train``
with the repository's own ``examples/deepspeed/ds_z3_config.json``; the recipes that name that file parsed by
LLaMA-Factory; a broken ``deepspeed:`` input refused before any work.

Each torchrun + DeepSpeed launch costs tens of seconds on 2 cores, so each launch carries every assertion it can.
Dataset sizes divide over the 2 ranks (accelerate's ``even_batches`` would repeat samples otherwise). The online
reference under ZeRO-3 (a reference model prepared by DeepSpeed, run every step): ``test_invariance``.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import (
    OFFLINE_ENV,
    REPO_ROOT,
    ZERO3_CONFIG,
    read_log_history,
    run_llamafactory_train,
    tiny_train_config,
    torchrun_env,
    train_in_one_process,
    write_sft_dataset,
    zero3_overrides,
)

HERE = Path(__file__).resolve()
LAUNCH_TIMEOUT = 900  # a rank that runs one forward more than the other hangs ZeRO-3 until this timeout
# Before the first update the policy is the reference, so the deviation is 0 up to fp32 rounding: the reference
# computes logits only from the first labelled position on (another matmul shape), and the precomputed values
# come from batches of another composition. Sums of ~100 nats carry ~1e-5 of rounding (eps 1.2e-7), divided by
# the m >= 1 label tokens of Eq. 8; measured: 3e-7. A reference that is not the starting model gives > 1e-3.
FP32_NOISE = 1e-5


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_sft_dataset(directory, "tiny_sft", num_samples=10)  # the bad-input runs
    write_sft_dataset(directory, "tiny_sft9", num_samples=9)  # val_size 1: 8 train rows + 1 eval row
    return directory


def train_zero3(tmp_path, model_dir, dataset_dir, name, **overrides):
    """``llamafactory-cli train`` with the ZeRO-3 config on 2 torchrun ranks."""
    output_dir = tmp_path / name / "out"
    config = tiny_train_config(model_dir, dataset_dir, output_dir, **{**zero3_overrides(), **overrides})
    result = run_llamafactory_train(config, tmp_path / name, torchrun_env(2), timeout=LAUNCH_TIMEOUT)
    return result, output_dir


def one_rank_env() -> dict:
    """The environment torchrun gives its one rank, without torchrun (a user with one device runs so)."""
    env = {**OFFLINE_ENV, **torchrun_env(1)}  # its thread count, a free port, DeepSpeed's build cache
    for key in ("FORCE_TORCHRUN", "NNODES", "NPROC_PER_NODE"):
        del env[key]
    return {
        **env,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
    }


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def train_logs(output_dir):
    return [entry for entry in read_log_history(output_dir) if "loss" in entry]


def assert_deviation_starts_at_zero_and_moves(logs):
    assert abs(logs[0]["deviation"]) < FP32_NOISE
    assert logs[0]["logps/policy"] == pytest.approx(logs[0]["logps/ref"], abs=1e-4)
    assert abs(logs[-1]["deviation"]) > 1e-3


# --- training under ZeRO-3 ----------------------------------------------------------------------------


@pytest.mark.slow
def test_precomputed_reference_trains_saves_and_resumes_under_zero3(tmp_path, tiny_model_dir, dataset_dir):
    """``stage: sft`` with ``deviation_metric`` and ``precompute_ref_logps``: 4 steps with checkpoints at 2 and 4;
    then a run resumed from checkpoint-2, which loads the first run's reference log-probs, must repeat steps 3
    and 4. 9 rows (8 train, 1 eval) for the reference pass: ZeRO-3 gathers the weights in every forward, so both
    ranks must run the same number of forwards (5 at batch 1, one of them a repeat) or the run hangs."""
    common = {
        "stage": "sft",
        "deviation_metric": True,
        "precompute_ref_logps": True,
        "dataset": "tiny_sft9",
        "val_size": 1,
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "per_device_eval_batch_size": 1,
    }
    result, output_dir = train_zero3(tmp_path, tiny_model_dir, dataset_dir, "whole", **common)
    assert_ok(result)
    history = read_log_history(output_dir)
    logs = train_logs(output_dir)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    # Looked up by dataset row: a value from another row (or a repeat) would not cancel the policy's at step 1.
    assert_deviation_starts_at_zero_and_moves(logs)
    evaluations = [entry for entry in history if "eval_deviation" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    assert abs(evaluations[-1]["eval_deviation"]) > 1e-3
    (cache_file,) = output_dir.glob("ref_logps-*.pt")
    reference = json.loads((output_dir / "minorsft_run.json").read_text())["reference"]
    assert (reference["mode"], reference["pass"], reference["cache_file"]) == (
        "precomputed",
        "computed",
        str(cache_file),
    )
    assert reference["seconds"] > 0 and reference["cpu_seconds"] > 0
    table = torch.load(cache_file, weights_only=True)
    assert table["offsets"].tolist() == list(range(10))  # one sample per row, every row covered

    # A ZeRO-3 checkpoint: each rank's optimizer partition, and the weights gathered for saving.
    checkpoint = output_dir / "checkpoint-2"
    assert sorted(path.name for path in (checkpoint / "global_step2").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    base = load_file(tiny_model_dir / "model.safetensors")
    final = load_file(output_dir / "model.safetensors")
    assert {name: value.shape for name, value in final.items()} == {name: value.shape for name, value in base.items()}
    assert any(not torch.equal(final[name], base[name]) for name in base)

    resumed, resumed_dir = train_zero3(
        tmp_path,
        tiny_model_dir,
        dataset_dir,
        "resumed",
        resume_from_checkpoint=str(checkpoint),
        ref_logps_cache_dir=str(output_dir),
        **common,
    )
    assert_ok(resumed)
    reference = json.loads((resumed_dir / "minorsft_run.json").read_text())["reference"]
    assert (reference["pass"], reference["cache_file"]) == ("loaded", str(cache_file))
    resumed_history = read_log_history(resumed_dir)
    assert [entry["step"] for entry in train_logs(resumed_dir)] == [1, 2, 3, 4]
    # The resumed steps equal the uninterrupted ones: same reference values (the starting model's, not
    # checkpoint-2's), same optimizer state and data order. logps/ref would move with wrong ones, loss and
    # deviation too.
    keys = (
        "loss",
        "grad_norm",
        "deviation",
        "logps/ref",
        "logps/policy",
        "eval_loss",
        "eval_deviation",
        "eval_logps/ref",
    )
    for before, after in zip(history, resumed_history, strict=True):
        assert after["step"] == before["step"]
        for key in keys:
            if key in before:
                assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), (before["step"], key)
    lines = [json.loads(line) for line in (resumed_dir / "trainer_log.jsonl").read_text().splitlines()]
    assert [line["current_steps"] for line in lines if "deviation" in line] == [3, 4]


# --- the recipes that name the repository's ZeRO-3 config --------------------------------------------


def _recipes_with_deepspeed() -> list[Path]:
    return sorted(
        path
        for path in (REPO_ROOT / "examples").rglob("*.yaml")
        if "deepspeed" in (yaml.safe_load(path.read_text()) or {})
    )


def _parse_recipes(recipe_paths: list[str], output_dir: str) -> None:
    """Parse each recipe with LLaMA-Factory's ``get_train_args`` (run as a subprocess: parsing starts a
    distributed process group and sets transformers' global DeepSpeed config) and print what it resolved."""
    from llamafactory.hparams import get_train_args

    parsed = {}
    for path in recipe_paths:
        args = yaml.safe_load(Path(path).read_text())
        args["output_dir"] = output_dir
        if not torch.cuda.is_available():
            # transformers refuses `bf16: true` without a bf16 GPU unless `use_cpu` is set; the recipe's bf16
            # still reaches the DeepSpeed config ("auto" -> enabled). Only a GPU checks that bf16 itself runs,
            # and DeepSpeed's engine on NCCL with the recipe's 8 ranks (here: 1 rank, so train_batch_size is
            # micro batch x GA x 1).
            args["use_cpu"] = True
        _, _, training_args, finetuning_args, _ = get_train_args(args)
        config = training_args.hf_deepspeed_config.config
        parsed[path] = {
            "stage": finetuning_args.to_dict()["stage"],
            "zero_stage": config["zero_optimization"]["stage"],
            "micro_batch": config["train_micro_batch_size_per_gpu"],
            "accumulation": config["gradient_accumulation_steps"],
            "train_batch_size": config["train_batch_size"],
            "world_size": training_args.world_size,
            "bf16": config["bf16"]["enabled"],
            "fp16": config["fp16"]["enabled"],
            "gradient_clipping": config["gradient_clipping"],
            "max_grad_norm": training_args.max_grad_norm,
        }
    print("PARSED " + json.dumps(parsed))


@pytest.mark.slow
def test_recipes_naming_the_zero3_config_parse(tmp_path):
    recipes = _recipes_with_deepspeed()
    assert {path.name for path in recipes} >= {"minorsft_qwen2.yaml", "sft_dpo_qwen2.yaml", "sft_qwen2.yaml"}
    env = {**os.environ, **one_rank_env()}
    # From the repository root, as the recipes say: their `deepspeed:` path is relative to it.
    proc = subprocess.run(
        [sys.executable, str(HERE), *(str(path.relative_to(REPO_ROOT)) for path in recipes), str(tmp_path / "out")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    parsed = json.loads(proc.stdout.split("PARSED ", 1)[1])
    assert not (tmp_path / "out").exists()  # parsing wrote nothing
    for path in recipes:
        recipe, resolved = yaml.safe_load(path.read_text()), parsed[str(path.relative_to(REPO_ROOT))]
        assert Path(recipe["deepspeed"]).resolve() == ZERO3_CONFIG, path.name
        assert resolved["stage"] == recipe["stage"] and resolved["zero_stage"] == 3, path.name
        # The "auto" values are filled from the recipe, so the config and the recipe cannot disagree.
        assert resolved["micro_batch"] == recipe["per_device_train_batch_size"], path.name
        assert resolved["accumulation"] == recipe["gradient_accumulation_steps"], path.name
        assert resolved["train_batch_size"] == (
            recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] * resolved["world_size"]
        )
        assert resolved["bf16"] is bool(recipe.get("bf16")) and resolved["fp16"] is False, path.name
        assert resolved["gradient_clipping"] == resolved["max_grad_norm"], path.name
        # The paper's global batch: 64 on its 8 GPUs.
        assert recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] * 8 == 64, path.name


# --- bad input: a clear error before any work, nothing written ----------------------------------------


def _broken_json(directory: Path) -> str:
    path = directory / "broken_ds.json"
    path.write_text('{"zero_optimization": {"stage": 3,}\n', encoding="utf-8")
    return str(path)


REFUSED = {
    "missing": "`deepspeed: {path}` is not a file (a relative path is resolved against the working directory",
    "not_json": "`deepspeed: {path}` is not valid JSON: Expecting property name enclosed in double quotes: line 1",
    "streaming": (
        "`precompute_ref_logps: true` looks samples up by their row in the dataset, which "
        "`streaming: true` does not have"
    ),
}


@pytest.fixture(scope="module")
def refused(tmp_path_factory, tiny_model_dir, dataset_dir) -> dict:
    """The cases of ``REFUSED``, one rank each, in one process: ``{case: (the deepspeed value, FinishedRun)}``."""
    workdir = tmp_path_factory.mktemp("refused")
    paths = {
        "missing": str(workdir / "missing_ds.json"),
        "not_json": _broken_json(workdir),
        "streaming": str(ZERO3_CONFIG),
    }
    configs = [
        tiny_train_config(
            tiny_model_dir,
            dataset_dir,
            workdir / case / "out",
            **{**zero3_overrides(), "deepspeed": paths[case]},
            **({"precompute_ref_logps": True, "streaming": True} if case == "streaming" else {}),
        )
        for case in REFUSED
    ]
    return dict(zip(REFUSED, zip(paths.values(), train_in_one_process(configs, workdir, one_rank_env()))))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_zero3_input_is_refused_before_any_work(refused, case):
    path, run = refused[case]
    assert run.error is not None and REFUSED[case].format(path=path) in run.error
    assert "loading weights file" not in run.log  # refused before the model is loaded
    assert not run.output_dir.exists()


def test_deepspeed_config_check_leaves_what_transformers_accepts(tmp_path):
    """Only a missing file or a broken one is refused: transformers also takes a dict, inline JSON and base64."""
    import base64

    from llamafactory_minorsft.hooks.arguments import check_deepspeed_config

    config = ZERO3_CONFIG.read_text()
    for value in (
        None,
        json.loads(config),
        config,
        base64.urlsafe_b64encode(config.encode()).decode(),
        str(ZERO3_CONFIG),
    ):
        check_deepspeed_config(value)
    not_an_object = tmp_path / "list.json"
    not_an_object.write_text("[1, 2]")
    for value, message in [
        (str(tmp_path), "is not a file"),
        ("no/such/ds.json", "is not a file"),
        (str(not_an_object), "must hold a JSON object, found a list"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"`deepspeed: {value}` {message}")):
            check_deepspeed_config(value)


if __name__ == "__main__":
    _parse_recipes(sys.argv[1:-1], sys.argv[-1])
