"""MinorDPO (Eq. 2) as ``pref_loss: minor_dpo`` of LLaMA-Factory's own ``stage: dpo``, the deviation (Eq. 8) and the
exact KL in DPO runs, and the precomputed DPO reference.

The optimizer step of the real training entry point is compared with the step computed independently in float64
from Eq. 2 (``independent_step.expected_pair_step``, which imports nothing of the plugin), on the tokenised pairs
LLaMA-Factory saved: 8 pairs as micro-batches of 3 + 3 + 2 (one process, ``train_in_one_process``), and 2 ranks ×
2 pairs × accumulation 2 under ZeRO-3 (``llamafactory-cli train`` under torchrun). The policy and the
reference are two noisy copies of the tiny model, so that some pairs have ``r_l > 0`` and others ``r_l < 0``
(asserted), none near the tie. Plain SGD, constant learning rate, no clipping: the update is ``−lr · ∇E``.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (
    read_log_history,
    train_in_one_process,
    write_pair_dataset,
    write_sft_dataset,
    zero3_overrides,
)
from independent_step import (
    assert_step_as_expected,
    expected_lora_first_step,
    expected_pair_step,
    load_tokenized_pairs,
    pair_ratios,
    relative_distance,
    run_training,
    sgd_step_config,
    vocabulary_kl,
)

NUM_PAIRS = 8
NUM_EVAL_PAIRS = 4
BETA = 1.0
LEARNING_RATE = 1.0
STEP_RTOL = 1e-4  # fp32 training against float64; a per-micro-batch mean is off by far more (asserted)
CACHED_RTOL = 1e-5  # the cached step against the online one: the same fp32 values, rounded differently
RELEASED = "Released the reference model"


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pairs")
    write_pair_dataset(directory, "tiny_pairs", NUM_PAIRS)
    write_pair_dataset(directory, "tiny_pairs_eval", NUM_EVAL_PAIRS, first=NUM_PAIRS)
    write_sft_dataset(directory, "tiny_sft")
    return directory


def dpo_config(policy, reference, data_dir, workdir, learning_rate=LEARNING_RATE, **overrides) -> dict:
    """One plain-SGD step of ``stage: dpo`` on the 8 pairs (micro-batches of 3 + 3 + 2 unless overridden)."""
    settings = {"stage": "dpo", "dataset": "tiny_pairs", **overrides}
    return sgd_step_config(policy, reference, data_dir, workdir, BETA, learning_rate, **settings)


EVAL_SET = {"do_eval": True, "eval_dataset": "tiny_pairs_eval", "per_device_eval_batch_size": 3}
ONE_RANK_RUNS = {
    # Eq. 2 with its deviation, and the exact KL on the chosen eval responses (the reference run at evaluation).
    "minor_dpo": {"pref_loss": "minor_dpo", "deviation_metric": True, "kl_metric": True, **EVAL_SET},
    # The same from the reference pass; the eval set's reference values from the table too.
    "minor_dpo-cached": {"pref_loss": "minor_dpo", "precompute_ref_logps": True, "deviation_metric": True, **EVAL_SET},
    "sigmoid": {},  # LLaMA-Factory's own DPO (no plugin key)
    "sigmoid-deviation": {"deviation_metric": True},
    "sigmoid-cached": {"precompute_ref_logps": True},
}
# Refused before any work, nothing written: {case: (keys, the message)}.
BAD_INPUT = {
    "minor_dpo-sft": ({"stage": "sft", "dataset": "tiny_sft"}, "`pref_loss: minor_dpo` is a loss of `stage: dpo`"),
    "minor_dpo-minorsft": ({"stage": "minorsft", "dataset": "tiny_sft"}, "`stage: minorsft` does not use `pref_loss`"),
    "sft-data": ({"dataset": "tiny_sft"}, "`dataset: tiny_sft` is not a preference dataset"),
    "streaming": ({"precompute_ref_logps": True, "streaming": True}, "`streaming: true` does not have"),
    "precompute-orpo": (
        {"pref_loss": "orpo", "precompute_ref_logps": True},
        "`precompute_ref_logps: true` compares the policy with the reference model, and `pref_loss: orpo` uses none",
    ),
    "precompute-simpo": ({"pref_loss": "simpo", "precompute_ref_logps": True}, "`pref_loss: simpo` uses none"),
    "deviation-orpo": ({"pref_loss": "orpo", "deviation_metric": True}, "`pref_loss: orpo` uses none"),
    "deviation-simpo": ({"pref_loss": "simpo", "deviation_metric": True}, "`pref_loss: simpo` uses none"),
    "label-smoothing": ({"dpo_label_smoothing": 0.1}, "`dpo_label_smoothing` cannot be combined with"),
    "ld_alpha": ({"ld_alpha": 0.5}, "`ld_alpha` cannot be combined with `pref_loss: minor_dpo`"),
}


@pytest.fixture(scope="module")
def one_rank_runs(tmp_path_factory, policy_and_reference, pairs_dir) -> dict:
    """The one-rank runs and the bad input of this module, in one process: ``{name: (workdir, FinishedRun)}``."""
    policy, reference = policy_and_reference
    root = tmp_path_factory.mktemp("one-rank")
    configs = {
        name: dpo_config(policy, reference, pairs_dir, root / name, **extra) for name, extra in ONE_RANK_RUNS.items()
    }
    for case, (overrides, _) in BAD_INPUT.items():
        configs[f"bad-{case}"] = dpo_config(
            policy, reference, pairs_dir, root / f"bad-{case}", **{"pref_loss": "minor_dpo", **overrides}
        )
    finished = train_in_one_process(list(configs.values()), root)
    return {name: (root / name, run) for name, run in zip(configs, finished)}


def first_step(output_dir: Path) -> dict:
    logs = [entry for entry in read_log_history(output_dir) if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1]
    return logs[0]


def per_micro_batch_weights(sizes: list[int]) -> torch.Tensor:
    """LLaMA-Factory's reduction: the mean within each micro-batch, averaged over the micro-batches."""
    return torch.cat([torch.full((size,), 1.0 / (size * len(sizes)), dtype=torch.float64) for size in sizes])


def assert_pair_metrics_logged(entry: dict, expected, prefix: str = "") -> None:
    """Eq. 8 on each side and the fraction of active rejected terms, as means over the pairs."""
    chosen = expected.chosen_ratios / expected.chosen_tokens
    rejected = expected.rejected_ratios / expected.rejected_tokens
    assert entry[f"{prefix}deviation/chosen"] == pytest.approx(float(chosen.mean()), rel=1e-4, abs=1e-6)
    assert entry[f"{prefix}deviation/rejected"] == pytest.approx(float(rejected.mean()), rel=1e-4, abs=1e-6)
    if f"{prefix}rejected_active" in entry:
        assert entry[f"{prefix}rejected_active"] == pytest.approx(float((expected.rejected_ratios > 0).double().mean()))


def update_distance(start: Path, left: Path, right: Path) -> float:
    """‖update_left − update_right‖ / ‖update_right‖ over all weights."""
    start_weights = load_file(start / "model.safetensors")
    updates = [
        {
            name: load_file(run / "model.safetensors")[name].double() - value.double()
            for name, value in start_weights.items()
        }
        for run in (left, right)
    ]
    return relative_distance(*updates)


# --- one rank ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minor_dpo_step_is_eq2_over_the_global_batch(policy_and_reference, one_rank_runs):
    """8 pairs as micro-batches of 3 + 3 + 2 in one step: the update is −lr · ∇ of Eq. 2's mean over the 8 pairs."""
    policy, reference = policy_and_reference
    workdir, run = one_rank_runs["minor_dpo"]
    run.check()
    assert "Gradient Accumulation steps = 3" in run.log
    pairs = load_tokenized_pairs(workdir / "tokenized")
    assert len(pairs["chosen"]) == NUM_PAIRS
    expected = expected_pair_step(policy, reference, pairs, "minor_dpo", BETA, LEARNING_RATE)
    # Both branches of max(0, r_l), none near the tie.
    assert (expected.rejected_ratios > 0.05).any() and (expected.rejected_ratios < -0.05).any()
    assert expected.rejected_ratios.abs().min() > 0.05
    wrong = expected_pair_step(
        policy, reference, pairs, "minor_dpo", BETA, LEARNING_RATE, pair_weights=per_micro_batch_weights([3, 3, 2])
    )
    assert relative_distance(wrong.deltas, expected.deltas) > 100 * STEP_RTOL
    dpo = expected_pair_step(policy, reference, pairs, "sigmoid", BETA, LEARNING_RATE)
    assert relative_distance(dpo.deltas, expected.deltas) > 100 * STEP_RTOL  # the clamp acted

    assert_step_as_expected(policy, workdir / "out", expected, STEP_RTOL)
    entry = first_step(workdir / "out")
    assert entry["loss"] == pytest.approx(float(expected.losses.mean()), rel=1e-5)
    assert_pair_metrics_logged(entry, expected)
    assert entry["rewards/chosen"] == pytest.approx(
        float(BETA * (per_micro_batch_weights([3, 3, 2]) * expected.chosen_ratios).sum()), rel=1e-4
    )

    # After the step: the exact KL on the chosen eval responses, against the float64 computation.
    eval_pairs = load_tokenized_pairs(workdir / "tokenized", split="validation")
    kl, _ = vocabulary_kl(workdir / "out", reference, eval_pairs["chosen"])
    metrics = json.loads((workdir / "out" / "eval_results.json").read_text())
    assert metrics["eval_kl/chosen"] == pytest.approx(kl, rel=1e-5)
    assert RELEASED not in run.log


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["minor_dpo", "sigmoid"])
def test_cached_step_equals_the_online_step(policy_and_reference, one_rank_runs, loss):
    """The reference pass's table in place of the reference forward: the same update, for Eq. 2 and for
    LLaMA-Factory's sigmoid; the reference is released after the pass, and every train and eval pair is in the
    table (chosen and rejected)."""
    policy, reference = policy_and_reference
    online_dir, online = one_rank_runs[loss]
    cached_dir, cached = one_rank_runs[f"{loss}-cached"]
    online.check(), cached.check()
    assert update_distance(policy, cached_dir / "out", online_dir / "out") < CACHED_RTOL
    assert first_step(cached_dir / "out")["loss"] == pytest.approx(
        first_step(online_dir / "out")["loss"], rel=CACHED_RTOL
    )
    assert RELEASED in cached.log
    recorded = json.loads((cached_dir / "out" / "minorsft_run.json").read_text())
    assert (recorded["method"]["stage"], recorded["method"]["pref_loss"]) == ("dpo", loss)
    assert (recorded["reference"]["mode"], recorded["reference"]["pass"]) == ("precomputed", "computed")
    table = torch.load(recorded["reference"]["cache_file"], weights_only=True)
    rows = NUM_PAIRS + (NUM_EVAL_PAIRS if loss == "minor_dpo" else 0)
    assert table["offsets"].tolist() == list(range(0, 2 * rows + 1, 2))
    if loss == "minor_dpo":  # the eval set looked up too: Eq. 8 after the step against float64
        eval_pairs = load_tokenized_pairs(cached_dir / "tokenized", split="validation")
        chosen, rejected, chosen_tokens, rejected_tokens = pair_ratios(cached_dir / "out", reference, eval_pairs)
        metrics = json.loads((cached_dir / "out" / "eval_results.json").read_text())
        assert metrics["eval_deviation/chosen"] == pytest.approx(float((chosen / chosen_tokens).mean()), rel=1e-4)
        assert metrics["eval_deviation/rejected"] == pytest.approx(float((rejected / rejected_tokens).mean()), rel=1e-4)


@pytest.mark.slow
def test_deviation_metric_leaves_llamafactory_dpo_unchanged(policy_and_reference, one_rank_runs):
    """`deviation_metric` on LLaMA-Factory's sigmoid DPO: the same loss, rewards, gradient norm and weights, bit for
    bit, and Eq. 8 on both responses logged beside them."""
    policy, reference = policy_and_reference
    plain_dir, plain = one_rank_runs["sigmoid"]
    with_dir, with_key = one_rank_runs["sigmoid-deviation"]
    plain.check(), with_key.check()
    plain_weights, with_weights = (
        load_file(plain_dir / "out" / "model.safetensors"),
        load_file(with_dir / "out" / "model.safetensors"),
    )
    assert all(torch.equal(plain_weights[name], with_weights[name]) for name in plain_weights)
    plain_entry, with_entry = first_step(plain_dir / "out"), first_step(with_dir / "out")
    assert {key: with_entry[key] for key in plain_entry} == plain_entry
    assert "deviation/chosen" not in plain_entry and "rejected_active" not in with_entry
    expected = expected_pair_step(
        policy, reference, load_tokenized_pairs(with_dir / "tokenized"), "sigmoid", BETA, LEARNING_RATE
    )
    assert_pair_metrics_logged(with_entry, expected)
    # LLaMA-Factory's sigmoid reduction: the mean within each micro-batch.
    llamafactory = expected_pair_step(
        policy,
        reference,
        load_tokenized_pairs(with_dir / "tokenized"),
        "sigmoid",
        BETA,
        LEARNING_RATE,
        pair_weights=per_micro_batch_weights([3, 3, 2]),
    )
    assert_step_as_expected(policy, plain_dir / "out", llamafactory, STEP_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_before_any_work(one_rank_runs, case):
    workdir, run = one_rank_runs[f"bad-{case}"]
    assert run.error is not None and BAD_INPUT[case][1] in run.error, run.error
    assert "UsageError" in run.error
    assert not (workdir / "out").exists()


# --- two ranks -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_give_the_global_batch_step(tmp_path, policy_and_reference, pairs_dir):
    """2 gloo ranks × 2 pairs × accumulation 2 = the 8 pairs in one step (accelerate repeats nothing), from the
    reference pass shared by the ranks, under ZeRO-3; full fine-tuning: the reference copy is released after the
    pass. DDP runs the same pass (``compute_reference_table``, the same for both) and the same mean over the global
    batch: test_invariance's two-rank DDP step checks it."""
    policy, reference = policy_and_reference
    parallel = zero3_overrides()
    config = dpo_config(
        policy,
        reference,
        pairs_dir,
        tmp_path,
        pref_loss="minor_dpo",
        precompute_ref_logps=True,
        deviation_metric=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **parallel,
    )
    log = run_training(config, tmp_path, ranks=2)
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in log
    assert RELEASED in log and "Detected DeepSpeed ZeRO-3" in log
    pairs = load_tokenized_pairs(tmp_path / "tokenized")
    expected = expected_pair_step(policy, reference, pairs, "minor_dpo", BETA, LEARNING_RATE)
    assert (expected.rejected_ratios > 0.05).any() and (expected.rejected_ratios < -0.05).any()
    assert_step_as_expected(policy, tmp_path / "out", expected, STEP_RTOL)
    entry = first_step(tmp_path / "out")
    assert entry["loss"] == pytest.approx(float(expected.losses.mean()), rel=1e-5)
    assert_pair_metrics_logged(entry, expected)


@pytest.mark.slow
def test_zero3_lora_first_step_is_at_the_tie(tmp_path, tiny_model_dir, pairs_dir):
    """LoRA under ZeRO-3 on 2 ranks × 2 pairs × accumulation 2, precomputed: the pass runs the policy with its
    adapters disabled and no copy is loaded. The first step starts at the reference, every log-ratio exactly 0 as
    online (the table, computed in other batches, differs from the policy's own values by rounding): Eq. 2's rejected
    terms are all inactive, and B moves by the float64 step of the chosen terms alone."""
    config = dpo_config(
        tiny_model_dir,
        tiny_model_dir,
        pairs_dir,
        tmp_path,
        ref_model=None,
        pref_loss="minor_dpo",
        precompute_ref_logps=True,
        deviation_metric=True,
        finetuning_type="lora",
        lora_target="all",
        learning_rate=10.0,  # B moves from 0 by lr · gradient: large enough to compare in fp32
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **zero3_overrides(),
    )
    log = run_training(config, tmp_path, ranks=2)
    assert "Created reference model" not in log
    assert (
        "Detected DeepSpeed ZeRO-3" in log
        and "Total train batch size (w. parallel, distributed & accumulation) = 8" in log
    )
    recorded = json.loads((tmp_path / "out" / "minorsft_run.json").read_text())["reference"]
    assert (recorded["mode"], recorded["pass"]) == ("precomputed", "computed")
    entry = first_step(tmp_path / "out")
    assert entry["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert entry["deviation/chosen"] == entry["deviation/rejected"] == entry["rejected_active"] == 0

    pairs = load_tokenized_pairs(tmp_path / "tokenized")
    expected, rejected_ratios = expected_lora_first_step(
        tiny_model_dir, tmp_path / "out", pairs, "minor_dpo", BETA, 10.0
    )
    assert torch.equal(rejected_ratios, torch.zeros_like(rejected_ratios))
    both_terms, _ = expected_lora_first_step(tiny_model_dir, tmp_path / "out", pairs, "sigmoid", BETA, 10.0)
    assert relative_distance(both_terms, expected) > 0.1  # an active rejected term would move B elsewhere
    trained = load_file(tmp_path / "out" / "adapter_model.safetensors")
    actual = {name: trained[name].double() for name in expected}
    assert relative_distance(actual, expected) < STEP_RTOL


@pytest.mark.parametrize("pref_loss", ["hinge", "ipo", "kto_pair"])
def test_llamafactory_trains_sigmoid_for_other_pref_losses(pref_loss):
    """What docs/behaviour.md says of LLaMA-Factory 0.9.5 with TRL 0.24: its preference loss calls TRL's `dpo_loss`
    without `loss_type`, whose default is "sigmoid", so these values train the sigmoid loss (ipo on log-probs
    averaged per token, which LLaMA-Factory's forward does for it)."""
    from types import MethodType, SimpleNamespace

    import torch.nn.functional as F
    from llamafactory.train.dpo.trainer import CustomDPOTrainer
    from trl import DPOTrainer

    trainer = SimpleNamespace(
        finetuning_args=SimpleNamespace(use_ref_model=True),
        loss_type=pref_loss,
        beta=0.5,
        label_smoothing=0.0,
        f_divergence_type="reverse_kl",
        reference_free=False,
        bco_gemma=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    trainer.dpo_loss = MethodType(DPOTrainer.dpo_loss, trainer)
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    losses, _, _ = CustomDPOTrainer.compute_preference_loss(trainer, chosen, rejected, torch.zeros(2), torch.zeros(2))
    assert torch.allclose(losses, -F.logsigmoid(0.5 * (chosen - rejected)))
    assert not torch.allclose(losses, torch.relu(1 - 0.5 * (chosen - rejected)))  # what hinge would be
