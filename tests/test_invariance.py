"""``E[...]`` is the mean over the global batch: the optimizer step of the real ``llamafactory-cli train``
equals the step computed independently in float64 from Eq. 7 / Eq. 3 (``independent_step.py``), however
the global batch is split: unequal micro-batches under gradient accumulation (3 + 3 + 2), two gloo ranks
(with the precomputed reference), ZeRO-3; and under freeze fine-tuning. The one-rank runs train in one process
(``train_in_one_process``), the two-rank runs through the real ``llamafactory-cli train`` under torchrun.

The policy and the reference are two different noisy copies of the tiny model, so ``r ≠ 0`` and the
sample coefficients ``2σ(−β·r)`` spread from about 0.3 to 1.9 (asserted): a wrong reduction (a
per-micro-batch mean, a missing rank factor) moves the weights elsewhere. Plain SGD, constant learning
rate, no clipping: the update is ``−lr · ∇E``, the gradient itself.
"""

import json
from pathlib import Path

import pytest
import torch

from helpers import train_in_one_process, write_sft_dataset, zero3_overrides
from independent_step import (
    assert_eval_kl_as_expected,
    assert_eval_ref_logps_as_expected,
    assert_logged_as_expected,
    assert_step_as_expected,
    expected_step,
    load_tokenized_samples,
    relative_distance,
    run_training,
    sgd_step_config,
)

NUM_ROWS = 8
BETA = 1.0
LEARNING_RATE = 1.0
# fp32 training against the float64 computation; a per-micro-batch mean is off by ~1e-1 (asserted below).
STEP_RTOL = 1e-4


@pytest.fixture(scope="module")
def eight_rows(tmp_path_factory) -> Path:
    """8 training rows of unequal lengths and a 4-row eval set."""
    directory = tmp_path_factory.mktemp("data")
    write_sft_dataset(directory, "tiny_sft", num_samples=NUM_ROWS)
    write_sft_dataset(directory, "tiny_eval", num_samples=4)
    return directory


@pytest.fixture(scope="module")
def one_rank_runs(tmp_path_factory, policy_and_reference, eight_rows) -> dict:
    """The one-rank runs of this module, in one process: ``{name: (workdir, FinishedRun)}``."""
    policy, reference = policy_and_reference
    root = tmp_path_factory.mktemp("one-rank")
    eval_set = {"do_eval": True, "eval_dataset": "tiny_eval", "per_device_eval_batch_size": 3}
    overrides = {
        # 8 rows as micro-batches of 3 + 3 + 2 in one optimizer step (batch 3, accumulation 3); an eval set of
        # 4 rows in batches of 3 + 1.
        # The exact KL after the step: online (a reference forward at the evaluation), and kept for the evaluation
        # although the training steps read the precomputed table (sft_sample, Eq. 5).
        "minorsft": {"stage": "minorsft", "kl_metric": True, **eval_set},
        "sft_dpo": {"stage": "sft_dpo", **eval_set},
        "sft_sample": {"stage": "sft_sample", "kl_metric": True, "precompute_ref_logps": True, **eval_set},
        "freeze": {"finetuning_type": "freeze", "freeze_trainable_layers": 1},
    }
    configs = {
        name: sgd_step_config(policy, reference, eight_rows, root / name, BETA, LEARNING_RATE, **extra)
        for name, extra in overrides.items()
    }
    finished = train_in_one_process(list(configs.values()), root)
    return {name: (root / name, run.check()) for name, run in zip(configs, finished)}


def per_micro_batch_weights(sizes: list[int]) -> torch.Tensor:
    """The wrong reduction: the mean within each micro-batch, averaged over the micro-batches."""
    return torch.cat([torch.full((size,), 1.0 / (size * len(sizes)), dtype=torch.float64) for size in sizes])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["minorsft", "sft_dpo", "sft_sample"])
def test_unequal_micro_batches_give_the_global_batch_step(policy_and_reference, one_rank_runs, stage):
    """8 rows as micro-batches of 3 + 3 + 2 in one optimizer step (batch 3, accumulation 3); an eval set of
    4 rows in batches of 3 + 1."""
    policy, reference = policy_and_reference
    workdir, run = one_rank_runs[stage]
    assert "Gradient Accumulation steps = 3" in run.log
    samples = load_tokenized_samples(workdir / "tokenized")
    assert len(samples) == NUM_ROWS
    expected = expected_step(policy, reference, samples, stage, BETA, LEARNING_RATE)
    # r ≠ 0 and the coefficients spread, so a per-micro-batch mean would move the weights elsewhere.
    assert float(expected.coefficients.min()) < 0.4 and float(expected.coefficients.max()) > 1.5
    per_micro_batch = per_micro_batch_weights([3, 3, 2])
    wrong = expected_step(policy, reference, samples, stage, BETA, LEARNING_RATE, sample_weights=per_micro_batch)
    assert relative_distance(wrong.deltas, expected.deltas) > 100 * STEP_RTOL

    assert_step_as_expected(policy, workdir / "out", expected, STEP_RTOL)
    assert_logged_as_expected(workdir / "out", expected)
    assert_eval_ref_logps_as_expected(workdir, reference)
    if stage != "sft_dpo":
        assert_eval_kl_as_expected(workdir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "zero3"])
def test_two_ranks_give_the_global_batch_step(tmp_path, policy_and_reference, eight_rows, parallelism):
    """2 ranks × batch 2 × accumulation 2 = the 8 rows in one step. The sizes divide over the ranks: with a
    remainder, accelerate's even_batches would repeat rows to even the ranks out (for plain SFT too).

    DDP runs with ``precompute_ref_logps``: the ranks share the reference pass over the train and eval rows and
    look each row's value up, for the step and for ``eval_logps/ref``. ZeRO-3 runs the reference every step."""
    policy, reference = policy_and_reference
    # Both evaluate the exact KL after the step over the ranks (ZeRO-3: the reference partitioned too).
    extra = {"do_eval": True, "eval_dataset": "tiny_eval", "per_device_eval_batch_size": 1, "kl_metric": True}
    if parallelism == "zero3":
        extra.update(zero3_overrides())
    else:
        extra.update(ddp_backend="gloo", precompute_ref_logps=True)
    config = sgd_step_config(
        policy,
        reference,
        eight_rows,
        tmp_path,
        BETA,
        LEARNING_RATE,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **extra,
    )
    log = run_training(config, tmp_path, ranks=2)
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in log
    if parallelism == "zero3":
        assert "Detected DeepSpeed ZeRO-3" in log
    samples = load_tokenized_samples(tmp_path / "tokenized")
    assert len(samples) == NUM_ROWS
    expected = expected_step(policy, reference, samples, "minorsft", BETA, LEARNING_RATE)
    assert_step_as_expected(policy, tmp_path / "out", expected, STEP_RTOL)
    assert_logged_as_expected(tmp_path / "out", expected)
    assert_eval_kl_as_expected(tmp_path, reference)
    if parallelism == "ddp":
        assert_eval_ref_logps_as_expected(tmp_path, reference)
        recorded = json.loads((tmp_path / "out" / "minorsft_run.json").read_text())["reference"]
        assert (recorded["mode"], recorded["pass"]) == ("precomputed", "computed")
        table = torch.load(recorded["cache_file"], weights_only=True)
        assert table["offsets"].tolist() == list(range(NUM_ROWS + 4 + 1))  # every train and eval row, once


@pytest.mark.slow
def test_freeze_trains_only_the_unfrozen_layer(policy_and_reference, one_rank_runs):
    """finetuning_type freeze with the last of the 2 layers trainable: that layer takes exactly Eq. 7's step,
    every other weight is bit-for-bit unchanged, the deviation is logged, and LLaMA-Factory loads the result."""
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_model, load_tokenizer
    from safetensors.torch import load_file

    policy, reference = policy_and_reference
    workdir, _ = one_rank_runs["freeze"]
    samples = load_tokenized_samples(workdir / "tokenized")
    in_last_layer = lambda name: ".layers.1." in name  # noqa: E731
    expected = expected_step(policy, reference, samples, "minorsft", BETA, LEARNING_RATE, trainable=in_last_layer)
    assert_step_as_expected(policy, workdir / "out", expected, STEP_RTOL)
    start, trained = load_file(policy / "model.safetensors"), load_file(workdir / "out" / "model.safetensors")
    changed = {name for name in start if not torch.equal(start[name], trained[name])}
    assert changed == {name for name in start if in_last_layer(name)}
    assert_logged_as_expected(workdir / "out", expected)

    model_args, _, finetuning_args, _ = get_infer_args(
        {"model_name_or_path": str(workdir / "out"), "template": "default", "finetuning_type": "freeze"}
    )
    model = load_model(load_tokenizer(model_args)["tokenizer"], model_args, finetuning_args, is_trainable=False)
    loaded = dict(model.named_parameters())
    for name, value in trained.items():
        assert torch.equal(loaded[name].float(), value.float()), name
