"""The stages through the real ``llamafactory-cli train``, as subprocesses, on a tiny local model."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import read_log_history, run_llamafactory_train, tiny_train_config, write_sft_dataset


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_sft_dataset(directory, "tiny_sft")
    write_sft_dataset(directory, "tiny_pairs", ranking=True)
    return directory


def train(tmp_path, model_dir, dataset_dir, name="run", env=None, **overrides):
    output_dir = tmp_path / name / "out"
    result = run_llamafactory_train(
        tiny_train_config(model_dir, dataset_dir, output_dir, **overrides), tmp_path / name, env
    )
    return result, output_dir


def assert_ok(result):
    assert result.returncode == 0, result.stderr[-4000:]


def train_logs(output_dir):
    return [entry for entry in read_log_history(output_dir) if "loss" in entry]


# --- bad input: refused before any work, nothing written --------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dataset": "tiny_pairs"}, "`dataset: tiny_pairs` is a preference (ranking) dataset"),
        ({"packing": True}, "Use `neat_packing: true`"),
        ({"stage": "minor_sft"}, "Valid stages: pt, sft, rm, ppo, dpo, kto, minorsft, sft_dpo"),
        ({"pref_beta": 0}, "`pref_beta` must be > 0 for `stage: minorsft`"),
    ],
)
def test_bad_input_exits_non_zero_with_the_message_and_writes_nothing(
    tmp_path, tiny_model_dir, dataset_dir, overrides, message
):
    result, output_dir = train(tmp_path, tiny_model_dir, dataset_dir, **overrides)
    assert result.returncode != 0
    assert message in result.stderr
    assert not output_dir.exists()


# --- end to end --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, finetuning_type, extra",
    [
        ("sft", "full", {"deviation_metric": True}),
        ("sft_dpo", "full", {}),
        ("minorsft", "full", {}),
        ("minorsft", "lora", {"lora_rank": 4, "learning_rate": 5.0e-3}),
    ],
)
def test_stage_trains_logs_deviation_and_saves_a_loadable_checkpoint(
    tmp_path, tiny_model_dir, dataset_dir, stage, finetuning_type, extra
):
    result, output_dir = train(
        tmp_path,
        tiny_model_dir,
        dataset_dir,
        stage=stage,
        finetuning_type=finetuning_type,
        plot_loss=True,
        val_size=4,
        eval_strategy="steps",
        eval_steps=4,
        per_device_eval_batch_size=2,
        **extra,
    )
    assert_ok(result)
    logs = train_logs(output_dir)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    # step 0: the policy is the reference (the reference forward keeps only labelled positions: fp32 noise)
    assert abs(logs[0]["deviation"]) < 1e-5
    assert abs(logs[-1]["deviation"]) > 1e-4
    assert logs[0]["logps/policy"] == pytest.approx(logs[0]["logps/ref"], abs=1e-4)
    if stage != "sft":
        assert logs[0]["coef_mean"] == pytest.approx(1.0, abs=1e-4)
    evaluations = [entry for entry in read_log_history(output_dir) if "eval_loss" in entry]
    assert evaluations and "eval_deviation" in evaluations[-1]
    assert "eval_deviation" in json.loads((output_dir / "all_results.json").read_text())

    jsonl = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
    keys = ["deviation", "logps/policy", "logps/ref"] + (["coef_mean"] if stage != "sft" else [])
    assert [{key: line[key] for key in keys} for line in jsonl if "loss" in line] == [
        {key: entry[key] for key in keys} for entry in logs
    ]
    assert [line["eval_deviation"] for line in jsonl if "eval_loss" in line] == [
        entry["eval_deviation"] for entry in evaluations
    ]
    assert (output_dir / "training_deviation.png").stat().st_size > 0
    assert (output_dir / "training_loss.png").stat().st_size > 0

    # LLaMA-Factory loads the result back, and it is the trained model, not the base.
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_model, load_tokenizer

    args = {"model_name_or_path": str(tiny_model_dir), "template": "default", "finetuning_type": finetuning_type}
    if finetuning_type == "lora":
        args["adapter_name_or_path"] = str(output_dir)
    else:
        args["model_name_or_path"] = str(output_dir)
    model_args, _, finetuning_args, _ = get_infer_args(args)
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False)
    base = load_file(tiny_model_dir / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    loaded = dict(model.named_parameters())
    weight = next(value for key, value in loaded.items() if key.endswith(name) and "lora" not in key)
    if finetuning_type == "lora":
        model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        weight = dict(model.named_parameters())[name]
    assert not torch.allclose(weight.float(), base[name].float())


@pytest.mark.slow
def test_sft_with_deviation_metric_keeps_llamafactory_sft_loss(tmp_path, tiny_model_dir, dataset_dir):
    plain, plain_dir = train(tmp_path, tiny_model_dir, dataset_dir, name="plain", stage="sft", pref_beta=None)
    metric, metric_dir = train(tmp_path, tiny_model_dir, dataset_dir, name="metric", stage="sft", deviation_metric=True)
    assert_ok(plain)
    assert_ok(metric)
    plain_losses = [entry["loss"] for entry in train_logs(plain_dir)]
    metric_logs = train_logs(metric_dir)
    assert [entry["loss"] for entry in metric_logs] == pytest.approx(plain_losses, rel=1e-6)
    assert "deviation" not in train_logs(plain_dir)[0] and "deviation" in metric_logs[0]
    plain_weights = load_file(plain_dir / "model.safetensors")
    metric_weights = load_file(metric_dir / "model.safetensors")
    for name, value in plain_weights.items():
        torch.testing.assert_close(metric_weights[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_from_checkpoint_continues_the_log(tmp_path, tiny_model_dir, dataset_dir):
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "overwrite_output_dir": False}
    first, output_dir = train(tmp_path, tiny_model_dir, dataset_dir, name="run", **{**common, "max_steps": 2})
    assert_ok(first)
    assert (output_dir / "checkpoint-2").is_dir()
    second, _ = train(
        tmp_path,
        tiny_model_dir,
        dataset_dir,
        name="run",
        resume_from_checkpoint=str(output_dir / "checkpoint-2"),
        **common,
    )
    assert_ok(second)
    logs = train_logs(output_dir)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    assert all("deviation" in entry for entry in logs)
    assert abs(logs[2]["deviation"]) > 1e-4  # the reference is still the starting model after resuming
    lines = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
    assert [line["current_steps"] for line in lines if "deviation" in line] == [1, 2, 3, 4]


# --- a real model -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_minorsft_on_smollm2(tmp_path, smollm2_dir, dataset_dir, finetuning_type):
    # SmolLM2 is stored in bf16 and trained in fp32 on the CPU: a full fine-tuning reference copy must
    # compute in the policy's precision, or the deviation before the first update is -0.02, not 0.
    lora = {"lora_rank": 8} if finetuning_type == "lora" else {}
    result, output_dir = train(
        tmp_path,
        smollm2_dir,
        dataset_dir,
        template="smollm2",
        max_steps=3 if lora else 2,
        learning_rate=1.0e-4,
        pref_beta=0.04,
        finetuning_type=finetuning_type,
        plot_loss=True,
        **lora,
    )
    assert_ok(result)
    logs = train_logs(output_dir)
    assert len(logs) == (3 if lora else 2) and abs(logs[0]["deviation"]) < 1e-5
    assert logs[0]["loss"] < 6.0  # a real instruct model: mean NLL of short answers, far below log(49152) = 10.8
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert (output_dir / weights).is_file()
    assert (output_dir / "training_deviation.png").is_file()


@pytest.mark.slow
def test_neat_packing_gives_per_sample_log_probs(tmp_path, tiny_model_dir, dataset_dir):
    """The same evaluation set, packed and unpacked: the per-sample means must agree exactly."""
    metrics = {}
    for name, extra in [("unpacked", {}), ("packed", {"neat_packing": True})]:
        result, output_dir = train(
            tmp_path,
            tiny_model_dir,
            dataset_dir,
            name=name,
            do_train=False,
            do_eval=True,
            eval_dataset="tiny_sft",
            per_device_eval_batch_size=2,
            cutoff_len=128,
            **extra,
        )
        assert_ok(result)
        metrics[name] = json.loads((output_dir / "eval_results.json").read_text())
        lines = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
        if name == "unpacked":  # 8 batches: LLaMA-Factory writes a progress line every 5 (LLaMA-Board reads it)
            assert [line["current_steps"] for line in lines[:-1]] == [5]
        assert lines[-1]["eval_deviation"] == metrics[name]["eval_deviation"]
    assert metrics["packed"]["eval_logps/ref"] == pytest.approx(metrics["unpacked"]["eval_logps/ref"], rel=1e-5)
    assert metrics["packed"]["eval_deviation"] == pytest.approx(0.0, abs=1e-6)
