"""One plain-SGD step of the real ``llamafactory-cli train``, and the same step computed independently.

The expected step is computed from the paper's equations in float64 without the plugin's code. It is written
from MINORSFT.md (Eq. 3, Eq. 7, Eq. 8), on LLaMA-Factory's own tokenised samples
(the ``tokenized_path`` a run saved), with a float64 copy of the model loaded by transformers and a plain
``log_softmax`` + ``gather``: nothing of ``llamafactory_minorsft`` is imported, so a mistake there cannot
hide in the expected values. A run trained with plain SGD at a constant learning rate moves every weight by
``−lr · ∇E[loss]``, ``E`` the mean over the samples of the global batch; the tests compare that with the
weights the run saved.
"""

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from helpers import (
    TRAIN_ENV,
    one_torch_thread,
    read_log_history,
    run_llamafactory_train,
    tiny_train_config,
    torchrun_env,
)

IGNORE_INDEX = -100  # LLaMA-Factory's label for positions without a target
KL_RTOL = 1e-5  # float32 evaluation against float64


def write_perturbed_model(source: Path, target: Path, noise: float, seed: int) -> Path:
    """A copy of ``source`` with Gaussian noise of std ``noise`` added to every weight (seeded, so fixed)."""
    if (target / "model.safetensors").is_file():
        return target
    shutil.copytree(source, target, dirs_exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weights = load_file(source / "model.safetensors")
    noisy = {
        name: value + noise * torch.randn(value.shape, generator=generator, dtype=value.dtype)
        for name, value in sorted(weights.items())
    }
    save_file(noisy, target / "model.safetensors", metadata={"format": "pt"})
    return target


def load_tokenized_samples(tokenized_path: Path, split: str = "train") -> list[dict]:
    """The tokenised rows that LLaMA-Factory saved (and trained on), in row order."""
    from datasets import load_from_disk

    rows = load_from_disk(str(tokenized_path))[split]
    return [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in rows]


def load_float64_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")


def sequence_logps(model, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) (sum over the labelled tokens) and m per sample, one unpadded sample at a time."""
    logps, counts = [], []
    for sample in samples:
        input_ids = torch.tensor(sample["input_ids"]).unsqueeze(0)
        targets = torch.tensor(sample["labels"][1:])  # the logit at t predicts the label at t + 1
        labelled = targets != IGNORE_INDEX
        token_logps = model(input_ids=input_ids).logits[0, :-1].log_softmax(-1)
        logps.append(token_logps[labelled].gather(-1, targets[labelled].unsqueeze(-1)).sum())
        counts.append(labelled.sum())
    return torch.stack(logps), torch.stack(counts).to(torch.float64)


def per_sample_objective(stage: str, policy_logps, ref_logps, num_tokens, beta: float) -> torch.Tensor:
    """Eq. 7 in its closed form ``−(2/(β·m)) · log σ(β·r)`` for minorsft (the plugin uses the surrogate:
    same gradient, other formula), Eq. 3 ``−log σ(β·r)`` for sft_dpo, Eq. 5 ``−log π_θ(y|x) / m`` for
    sft_sample."""
    r = policy_logps - ref_logps
    if stage == "sft_sample":
        return -policy_logps / num_tokens
    if stage == "minorsft":
        return -(2.0 / (beta * num_tokens)) * F.logsigmoid(beta * r)
    if stage == "sft_dpo":
        return -F.logsigmoid(beta * r)
    raise ValueError(stage)


@dataclass
class ExpectedStep:
    stage: str
    deltas: dict[str, torch.Tensor]  # −lr · gradient, float64, per saved weight name
    policy_logps: torch.Tensor
    ref_logps: torch.Tensor
    num_tokens: torch.Tensor
    coefficients: torch.Tensor  # 2σ(−β·r) per sample, before the step
    deviations: torch.Tensor  # Eq. 8's per-sample term r/m, before the step


@one_torch_thread()
def expected_step(
    policy_dir: Path,
    ref_dir: Path,
    samples: list[dict],
    stage: str,
    beta: float,
    learning_rate: float,
    sample_weights: torch.Tensor | None = None,
    trainable: Callable[[str], bool] = lambda name: True,
) -> ExpectedStep:
    """One SGD step from ``policy_dir``: ``−lr · ∇ Σ_i w_i · loss_i`` with ``w_i = 1/N`` (the global mean)
    unless ``sample_weights`` says otherwise; weights that are not ``trainable`` do not move."""
    policy, reference = load_float64_model(policy_dir), load_float64_model(ref_dir)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(reference, samples)
    policy_logps, num_tokens = sequence_logps(policy, samples)
    if sample_weights is None:
        sample_weights = torch.full((len(samples),), 1.0 / len(samples), dtype=torch.float64)
    loss = (sample_weights * per_sample_objective(stage, policy_logps, ref_logps, num_tokens, beta)).sum()
    parameters = dict(policy.named_parameters())  # tied embeddings appear once, as the checkpoint stores them
    gradients = dict(zip(parameters, torch.autograd.grad(loss, list(parameters.values()))))
    deltas = {
        name: -learning_rate * gradient if trainable(name) else torch.zeros_like(gradient)
        for name, gradient in gradients.items()
    }
    r = (policy_logps - ref_logps).detach()
    return ExpectedStep(
        stage=stage,
        deltas=deltas,
        policy_logps=policy_logps.detach(),
        ref_logps=ref_logps,
        num_tokens=num_tokens,
        coefficients=2.0 * torch.sigmoid(-beta * r),
        deviations=r / num_tokens,
    )


@one_torch_thread()
def step_errors(start_dir: Path, trained_dir: Path, expected: ExpectedStep) -> dict[str, float]:
    """Per weight: ‖actual update − expected update‖ / ‖expected update‖ (0 expected: the largest |update|)."""
    start = load_file(start_dir / "model.safetensors")
    trained = load_file(trained_dir / "model.safetensors")
    assert set(trained) == set(expected.deltas), sorted(set(trained) ^ set(expected.deltas))
    errors = {}
    for name, delta in expected.deltas.items():
        actual = trained[name].double() - start[name].double()
        norm = delta.norm()
        errors[name] = float((actual - delta).norm() / norm) if norm > 0 else float(actual.abs().max())
    return errors


def relative_distance(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    """‖left − right‖ / ‖right‖ over all weights together."""
    difference = sum(float((left[name] - value).square().sum()) for name, value in right.items())
    size = sum(float(value.square().sum()) for value in right.values())
    return (difference / size) ** 0.5


# --- the run under test -------------------------------------------------------------------------------


def sgd_step_config(
    policy: Path, reference: Path, data_dir: Path, workdir: Path, beta: float, learning_rate: float, **overrides
) -> dict:
    """One plain-SGD step (default: 8 rows as micro-batches of 3 + 3 + 2); LLaMA-Factory saves its tokenised
    rows to ``workdir/tokenized``, so the expected step is computed on exactly what it trained on."""
    settings = {
        "stage": "minorsft",
        "ref_model": str(reference),
        "pref_beta": beta,
        "max_steps": 1,
        "optim": "sgd",  # Adam's update would hide the gradient's scale, which is what is checked
        "learning_rate": learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_grad_norm": 0.0,
        "weight_decay": 0.0,
        "disable_shuffling": True,
        "tokenized_path": str(workdir / "tokenized"),
        "per_device_train_batch_size": 3,
        "gradient_accumulation_steps": 3,
        **overrides,
    }
    return tiny_train_config(policy, data_dir, workdir / "out", **settings)


def run_training(config: dict, workdir: Path, ranks: int = 1) -> str:
    """Train; returns the console output (also kept in ``workdir/train.log``)."""
    result = run_llamafactory_train(config, workdir, env=torchrun_env(ranks) if ranks > 1 else TRAIN_ENV)
    output = result.stdout + result.stderr
    (workdir / "train.log").write_text(output)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return output


def assert_step_as_expected(start: Path, output_dir: Path, expected: ExpectedStep, rtol: float) -> None:
    errors = step_errors(start, output_dir, expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] < rtol, f"{worst}: relative error {errors[worst]:.2e} of the update (all: {errors})"


def first_step_log(output_dir: Path) -> dict:
    logs = [entry for entry in read_log_history(output_dir) if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1]
    return logs[0]


def assert_logged_as_expected(output_dir: Path, expected: ExpectedStep) -> None:
    """Step 1's logged means over the global batch (README, "What is logged"), all taken before the update."""
    entry = first_step_log(output_dir)
    assert entry["logps/ref"] == pytest.approx(float(expected.ref_logps.mean()), rel=1e-5)
    assert entry["logps/policy"] == pytest.approx(float(expected.policy_logps.mean()), rel=1e-5)
    assert entry["deviation"] == pytest.approx(float(expected.deviations.mean()), rel=1e-4, abs=1e-6)
    token_gain = float((expected.policy_logps - expected.ref_logps).sum() / expected.num_tokens.sum())
    assert entry["token_deviation"] == pytest.approx(token_gain, rel=1e-4, abs=1e-6)
    if "coef_mean" in entry or expected.stage != "sft_sample":  # Eq. 5 has no coefficient to log
        assert entry["coef_mean"] == pytest.approx(float(expected.coefficients.mean()), rel=1e-5)


@one_torch_thread()
def assert_eval_ref_logps_as_expected(workdir: Path, reference: Path) -> None:
    """``eval_logps/ref`` is the mean over the eval samples of the (fixed) reference's log-prob."""
    samples = load_tokenized_samples(workdir / "tokenized", split="validation")
    with torch.no_grad():
        ref_logps, _ = sequence_logps(load_float64_model(reference), samples)
    metrics = json.loads((workdir / "out" / "eval_results.json").read_text())
    assert metrics["eval_logps/ref"] == pytest.approx(float(ref_logps.mean()), rel=1e-5)


@one_torch_thread()
def vocabulary_kl(policy_dir: Path, ref_dir: Path, samples: list[dict]) -> tuple[float, float]:
    """The exact drift measure of MINORSFT.md in float64: per sample the mean over its label positions of
    ``Σ_v p_ref(v) · (log p_ref(v) − log p_θ(v))``, then the mean over the samples; and, to show the weighting
    matters, the mean over all label positions of all samples."""
    policy, reference = load_float64_model(policy_dir), load_float64_model(ref_dir)
    per_sample, every_position = [], []
    with torch.no_grad():
        for sample in samples:
            input_ids = torch.tensor(sample["input_ids"]).unsqueeze(0)
            labelled = torch.tensor(sample["labels"][1:]) != IGNORE_INDEX
            log_p = policy(input_ids=input_ids).logits[0, :-1][labelled].log_softmax(-1)
            log_q = reference(input_ids=input_ids).logits[0, :-1][labelled].log_softmax(-1)
            kl = (log_q.exp() * (log_q - log_p)).sum(-1)
            per_sample.append(kl.mean())
            every_position.append(kl)
    return float(torch.stack(per_sample).mean()), float(torch.cat(every_position).mean())


def assert_eval_kl_as_expected(workdir: Path, reference: Path) -> float:
    """``eval_kl`` after training equals the float64 computation on the saved weights, on eval samples of
    unequal length whose per-sample and per-position means differ by far more than the tolerance."""
    samples = load_tokenized_samples(workdir / "tokenized", split="validation")
    assert len({sum(label != IGNORE_INDEX for label in sample["labels"]) for sample in samples}) > 1
    expected, token_mean = vocabulary_kl(workdir / "out", reference, samples)
    metrics = json.loads((workdir / "out" / "eval_results.json").read_text())
    print(f"eval_kl {metrics['eval_kl']!r}, float64 {expected!r}, per position {token_mean!r}")
    assert abs(expected - token_mean) > 3 * KL_RTOL * expected
    assert metrics["eval_kl"] == pytest.approx(expected, rel=KL_RTOL)
    return metrics["eval_kl"]


# --- preference pairs: DPO (Eq. 1) and MinorDPO (Eq. 2) ----------------------------------------------------


def load_tokenized_pairs(tokenized_path: Path, split: str = "train") -> dict[str, list[dict]]:
    """The tokenised pairs LLaMA-Factory saved (and trained on), in row order: ``{"chosen": [...], "rejected": [...]}``
    with each response as a sample of ``sequence_logps``."""
    from datasets import load_from_disk

    rows = load_from_disk(str(tokenized_path))[split]
    return {
        side: [{"input_ids": row[f"{side}_input_ids"], "labels": row[f"{side}_labels"]} for row in rows]
        for side in ("chosen", "rejected")
    }


def per_pair_objective(loss: str, chosen_ratio, rejected_ratio, beta: float) -> torch.Tensor:
    """Eq. 2 ``−log σ(β·(r_w − max(0, r_l)))``, its rejected term counted only where ``r_l > 0`` (the gradient
    ``1{r_l > 0}`` of MINORSFT.md), for ``minor_dpo``; Eq. 1 ``−log σ(β·(r_w − r_l))`` for ``sigmoid``."""
    if loss == "minor_dpo":
        rejected_term = torch.where(rejected_ratio > 0, rejected_ratio, torch.zeros_like(rejected_ratio))
    elif loss == "sigmoid":
        rejected_term = rejected_ratio
    else:
        raise ValueError(loss)
    return -F.logsigmoid(beta * (chosen_ratio - rejected_term))


@dataclass
class ExpectedPairStep:
    deltas: dict[str, torch.Tensor]  # −lr · gradient, float64, per saved weight name
    chosen_ratios: torch.Tensor  # r_w per pair, before the step
    rejected_ratios: torch.Tensor  # r_l per pair, before the step
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    losses: torch.Tensor  # per pair, before the step


@one_torch_thread()
def pair_ratios(policy_dir: Path, ref_dir: Path, pairs: dict) -> tuple:
    """(r_w, r_l, m_w, m_l) per pair in float64, without gradients."""
    policy, reference = load_float64_model(policy_dir), load_float64_model(ref_dir)
    with torch.no_grad():
        values = {
            side: (sequence_logps(policy, pairs[side]), sequence_logps(reference, pairs[side])[0])
            for side in ("chosen", "rejected")
        }
    (chosen, chosen_tokens), chosen_ref = values["chosen"]
    (rejected, rejected_tokens), rejected_ref = values["rejected"]
    return chosen - chosen_ref, rejected - rejected_ref, chosen_tokens, rejected_tokens


@one_torch_thread()
def expected_pair_step(
    policy_dir: Path,
    ref_dir: Path,
    pairs: dict,
    loss: str,
    beta: float,
    learning_rate: float,
    pair_weights: torch.Tensor | None = None,
) -> ExpectedPairStep:
    """One SGD step from ``policy_dir``: ``−lr · ∇ Σ_i w_i · loss_i`` over the pairs, ``w_i = 1/N`` (the mean over
    the global batch) unless ``pair_weights`` says otherwise."""
    policy, reference = load_float64_model(policy_dir), load_float64_model(ref_dir)
    with torch.no_grad():
        chosen_ref, _ = sequence_logps(reference, pairs["chosen"])
        rejected_ref, _ = sequence_logps(reference, pairs["rejected"])
    chosen, chosen_tokens = sequence_logps(policy, pairs["chosen"])
    rejected, rejected_tokens = sequence_logps(policy, pairs["rejected"])
    chosen_ratio, rejected_ratio = chosen - chosen_ref, rejected - rejected_ref
    per_pair = per_pair_objective(loss, chosen_ratio, rejected_ratio, beta)
    if pair_weights is None:
        pair_weights = torch.full((per_pair.numel(),), 1.0 / per_pair.numel(), dtype=torch.float64)
    parameters = dict(policy.named_parameters())
    gradients = torch.autograd.grad((pair_weights * per_pair).sum(), list(parameters.values()))
    return ExpectedPairStep(
        deltas={name: -learning_rate * gradient for name, gradient in zip(parameters, gradients)},
        chosen_ratios=chosen_ratio.detach(),
        rejected_ratios=rejected_ratio.detach(),
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        losses=per_pair.detach(),
    )


@one_torch_thread()
def expected_lora_first_step(
    base_dir: Path, adapter_dir: Path, pairs: dict, loss: str, beta: float, learning_rate: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The first SGD step of fresh LoRA adapters, ``{saved lora_B name: −lr · gradient}``, and r_l per pair.

    PEFT starts B at 0, so before the step the policy is the base model, which is also the reference (the adapters
    disabled): every log-ratio is exactly 0, the tie of Eq. 2. A's gradient is 0 while B = 0, so the trained A is
    the initial A and the start is rebuilt from the saved adapter with B set to 0.
    """
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_float64_model(base_dir), str(adapter_dir), is_trainable=True)
    lora_b = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    with torch.no_grad():
        for parameter in lora_b.values():
            parameter.zero_()
        with model.disable_adapter():
            ref = {side: sequence_logps(model, pairs[side])[0] for side in ("chosen", "rejected")}
    policy = {side: sequence_logps(model, pairs[side])[0] for side in ("chosen", "rejected")}
    ratios = {side: policy[side] - ref[side] for side in policy}
    per_pair = per_pair_objective(loss, ratios["chosen"], ratios["rejected"], beta)
    gradients = torch.autograd.grad(per_pair.mean(), list(lora_b.values()))
    deltas = {name.replace(".default", ""): -learning_rate * g for name, g in zip(lora_b, gradients)}
    return deltas, ratios["rejected"].detach()
