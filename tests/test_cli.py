"""The stages through LLaMA-Factory's training entry point, in subprocesses, on a tiny local model and on SmolLM2.

Bad input goes through the real ``llamafactory-cli train`` (its exit status and message). The training runs share
one process (``train_in_one_process``: LLaMA-Factory's ``run_exp``, which the CLI runs), trained once per module;
the torchrun, ZeRO-3 and LLaMA-Board tests launch the real CLI for training.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import read_log_history, run_llamafactory_train, tiny_train_config, train_in_one_process, write_sft_dataset

# Refused before any work: {case: (keys, the message)}.
BAD_INPUT = {
    "ranking": ({"dataset": "tiny_pairs"}, "`dataset: tiny_pairs` is a preference (ranking) dataset"),
    "packing": ({"packing": True}, "Use `neat_packing: true`"),
    "stage": ({"stage": "minor_sft"}, "Valid stages: pt, sft, rm, ppo, dpo, kto, minorsft, sft_dpo, sft_sample"),
    "pref_beta": ({"pref_beta": 0}, "`pref_beta` must be finite and > 0 for `stage: minorsft`"),
    "pref_beta-inf": ({"pref_beta": float("inf")}, "`pref_beta` must be finite and > 0 for `stage: minorsft`"),
    "kl-no-eval": ({"kl_metric": True}, "`kl_metric: true` logs the KL on the evaluation sets, and there is none"),
    "kl-stage": ({"stage": "pt", "kl_metric": True}, "`kl_metric: true` is for the SFT stages"),
    "kl-streaming": (
        {"kl_metric": True, "streaming": True, "max_steps": 2, "val_size": 2},
        "`kl_metric: true` with `streaming: true` is not supported",
    ),
}
STAGES = {
    "sft": ("sft", "full", {"deviation_metric": True}),
    "sft_dpo": ("sft_dpo", "full", {}),
    "minorsft": ("minorsft", "full", {}),
    # LoRA: the exact KL against the policy with its adapters disabled, 0 before the first update.
    "minorsft-lora": ("minorsft", "lora", {"lora_rank": 4, "learning_rate": 5.0e-3, "kl_metric": True}),
    "sft_sample": ("sft_sample", "full", {}),
}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_sft_dataset(directory, "tiny_sft")
    write_sft_dataset(directory, "tiny_pairs", ranking=True)
    write_sft_dataset(directory, "tiny_eval", num_samples=4)
    return directory


def train(tmp_path, model_dir, dataset_dir, name="run", env=None, **overrides):
    output_dir = tmp_path / name / "out"
    result = run_llamafactory_train(
        tiny_train_config(model_dir, dataset_dir, output_dir, **overrides), tmp_path / name, env
    )
    return result, output_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, smollm2_dir, dataset_dir, policy_and_reference) -> dict:
    """Every training run of this module, trained once, in one process."""
    workdir = tmp_path_factory.mktemp("runs")

    def config(name, model_dir=tiny_model_dir, **overrides):
        return tiny_train_config(model_dir, dataset_dir, workdir / name / "out", **overrides)

    configs = {
        name: config(
            name,
            stage=stage,
            finetuning_type=finetuning_type,
            plot_loss=True,
            val_size=4,
            eval_strategy="steps",
            eval_steps=4,
            per_device_eval_batch_size=2,
            **extra,
        )
        for name, (stage, finetuning_type, extra) in STAGES.items()
    }
    # A run of 2 steps, then resumed from its checkpoint-2 to step 4 in the same output_dir.
    resume = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "overwrite_output_dir": False}
    configs["resume-first"] = config("resume", **{**resume, "max_steps": 2})
    configs["resume-second"] = config(
        "resume", resume_from_checkpoint=str(workdir / "resume" / "out" / "checkpoint-2"), **resume
    )
    # Evaluation only, packed and unpacked, against the model itself (a same-dtype copy: KL exactly 0) and against
    # another reference (a noisy copy of the model: KL > 0, the same packed and unpacked).
    for name, extra in [("unpacked", {}), ("packed", {"neat_packing": True})]:
        for reference, ref_model in (("", None), ("-other-reference", str(policy_and_reference[1]))):
            configs[name + reference] = config(
                name + reference,
                do_train=False,
                do_eval=True,
                eval_dataset="tiny_sft",
                per_device_eval_batch_size=2,
                cutoff_len=128,
                kl_metric=True,
                ref_model=ref_model,
                **extra,
            )
    # `stage: sft` with only `kl_metric`: LLaMA-Factory's SFT steps, no reference in training, the KL at evaluation.
    configs["sft-kl"] = config(
        "sft-kl",
        stage="sft",
        kl_metric=True,
        eval_dataset="tiny_eval,tiny_sft",
        eval_on_each_dataset=True,
        eval_strategy="steps",
        eval_steps=4,
        per_device_eval_batch_size=2,
    )
    # SmolLM2 is stored in bf16, which this CPU computes slowly (LoRA keeps the base weights in it): one step each.
    for finetuning_type, extra in [("lora", {"lora_rank": 8}), ("full", {})]:
        configs[f"smollm2-{finetuning_type}"] = config(
            f"smollm2-{finetuning_type}",
            model_dir=smollm2_dir,
            template="smollm2",
            max_steps=1,
            learning_rate=1.0e-4,
            pref_beta=0.04,
            finetuning_type=finetuning_type,
            per_device_train_batch_size=1,
            plot_loss=True,
            **extra,
        )
    for case, (overrides, _) in BAD_INPUT.items():
        configs[f"bad-{case}"] = config(f"bad-{case}", **overrides)
    return dict(zip(configs, train_in_one_process(list(configs.values()), workdir)))


def trained(run) -> Path:
    return run.check().output_dir


def train_logs(output_dir):
    return [entry for entry in read_log_history(output_dir) if "loss" in entry]


# --- bad input: refused before any work, nothing written --------------------------------------------


def test_bad_input_exits_non_zero_with_the_message_and_writes_nothing(tmp_path, tiny_model_dir, dataset_dir):
    """Through the real ``llamafactory-cli train``; every case of ``BAD_INPUT``: below."""
    overrides, message = BAD_INPUT["ranking"]
    result, output_dir = train(tmp_path, tiny_model_dir, dataset_dir, **overrides)
    assert result.returncode != 0
    assert message in result.stderr
    assert not output_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_before_any_work(runs, case):
    run = runs[f"bad-{case}"]
    assert run.error is not None and BAD_INPUT[case][1] in run.error
    assert not run.output_dir.exists()


# --- end to end --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGES))
def test_stage_trains_logs_deviation_and_saves_a_loadable_checkpoint(runs, tiny_model_dir, name):
    stage, finetuning_type, _ = STAGES[name]
    output_dir = trained(runs[name])
    logs = train_logs(output_dir)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    # step 0: the policy is the reference (the reference forward keeps only labelled positions: fp32 noise)
    assert abs(logs[0]["deviation"]) < 1e-5
    assert abs(logs[-1]["deviation"]) > 1e-4
    assert logs[0]["logps/policy"] == pytest.approx(logs[0]["logps/ref"], abs=1e-4)
    if stage in ("minorsft", "sft_dpo"):
        assert logs[0]["coef_mean"] == pytest.approx(1.0, abs=1e-4)
    evaluations = [entry for entry in read_log_history(output_dir) if "eval_loss" in entry]
    assert evaluations and "eval_deviation" in evaluations[-1]
    assert "eval_deviation" in json.loads((output_dir / "all_results.json").read_text())

    jsonl = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
    keys = ["deviation", "token_deviation", "logps/policy", "logps/ref"]
    keys += ["coef_mean"] if stage in ("minorsft", "sft_dpo") else []
    assert [{key: line[key] for key in keys} for line in jsonl if "loss" in line] == [
        {key: entry[key] for key in keys} for entry in logs
    ]
    assert [line["eval_deviation"] for line in jsonl if "eval_loss" in line] == [
        entry["eval_deviation"] for entry in evaluations
    ]
    assert (output_dir / "training_deviation.png").stat().st_size > 0
    assert (output_dir / "training_loss.png").stat().st_size > 0
    if STAGES[name][2].get("kl_metric"):
        assert [line["eval_kl"] for line in jsonl if "eval_loss" in line] == [entry["eval_kl"] for entry in evaluations]
        assert evaluations[-1]["eval_kl"] > 1e-6  # trained adapters move the distributions

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
    weight_name = "model.layers.0.self_attn.q_proj.weight"
    loaded = dict(model.named_parameters())
    weight = next(value for key, value in loaded.items() if key.endswith(weight_name) and "lora" not in key)
    if finetuning_type == "lora":
        model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        weight = dict(model.named_parameters())[weight_name]
    assert not torch.allclose(weight.float(), base[weight_name].float())


@pytest.mark.slow
def test_resume_from_checkpoint_continues_the_log(runs):
    output_dir = trained(runs["resume-first"])
    assert trained(runs["resume-second"]) == output_dir
    logs = train_logs(output_dir)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    assert all("deviation" in entry for entry in logs)
    assert abs(logs[2]["deviation"]) > 1e-4  # the reference is still the starting model after resuming
    lines = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
    assert [line["current_steps"] for line in lines if "deviation" in line] == [1, 2, 3, 4]


# --- a real model -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_minorsft_on_smollm2(runs, finetuning_type):
    # SmolLM2 is stored in bf16 and trained in fp32 on the CPU: a full fine-tuning reference copy must
    # compute in the policy's precision, or the deviation before the first update is -0.02, not 0.
    output_dir = trained(runs[f"smollm2-{finetuning_type}"])
    logs = train_logs(output_dir)
    assert len(logs) == 1 and abs(logs[0]["deviation"]) < 1e-5
    assert logs[0]["loss"] < 6.0  # a real instruct model: mean NLL of short answers, far below log(49152) = 10.8
    weights = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    assert (output_dir / weights).is_file()
    assert (output_dir / "training_deviation.png").is_file()


@pytest.mark.slow
def test_neat_packing_gives_per_sample_log_probs(runs):
    """The same evaluation set, packed and unpacked: the per-sample means must agree exactly."""
    metrics = {}
    for name in ("unpacked", "packed"):
        output_dir = trained(runs[name])
        metrics[name] = json.loads((output_dir / "eval_results.json").read_text())
        lines = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
        if name == "unpacked":  # 8 batches: LLaMA-Factory writes a progress line every 5 (LLaMA-Board reads it)
            assert [line["current_steps"] for line in lines[:-1]] == [5]
        assert lines[-1]["eval_deviation"] == metrics[name]["eval_deviation"]
    assert metrics["packed"]["eval_logps/ref"] == pytest.approx(metrics["unpacked"]["eval_logps/ref"], rel=1e-5)
    assert metrics["packed"]["eval_deviation"] == pytest.approx(0.0, abs=1e-6)
    # The reference is a copy of the same weights in the same dtype: every position's KL is clamped rounding, 0.
    assert metrics["unpacked"]["eval_kl"] == 0.0 and metrics["packed"]["eval_kl"] == 0.0
    other = {
        name: json.loads((trained(runs[f"{name}-other-reference"]) / "eval_results.json").read_text())
        for name in ("unpacked", "packed")
    }
    assert other["unpacked"]["eval_kl"] > 1e-3
    assert other["packed"]["eval_kl"] == pytest.approx(other["unpacked"]["eval_kl"], rel=1e-5)
    assert other["packed"]["eval_deviation"] == pytest.approx(other["unpacked"]["eval_deviation"], rel=1e-4)


@pytest.mark.slow
def test_kl_metric_alone_keeps_llamafactory_sft_steps_and_logs_the_kl_at_evaluation(runs):
    output_dir = trained(runs["sft-kl"])
    history = read_log_history(output_dir)
    train_entries = [entry for entry in history if "loss" in entry]
    assert train_entries and not any("deviation" in entry or "kl" in entry for entry in train_entries)
    final = {key: value for entry in history if entry.get("step") == 4 for key, value in entry.items()}
    assert final["eval_tiny_eval_kl"] > 0 and final["eval_tiny_sft_kl"] > 0
    # trainer_log.jsonl (LLaMA-Board's live view) carries each eval set's plugin metrics too.
    lines = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
    assert {line.get("eval_tiny_eval_kl") for line in lines} >= {final["eval_tiny_eval_kl"]}
    assert {line.get("eval_tiny_sft_token_deviation") for line in lines} >= {final["eval_tiny_sft_token_deviation"]}
    assert json.loads((output_dir / "minorsft_run.json").read_text())["method"]["stage"] == "sft"
