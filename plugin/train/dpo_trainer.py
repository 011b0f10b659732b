"""``MinorDPOTrainer``: LLaMA-Factory's ``CustomDPOTrainer`` for ``stage: dpo`` with the plugin's keys.

LLaMA-Factory's trainer (its forward, rewards, ``pref_ftx``, ``pref_bco_weight``, LoRA with disabled adapters as
the reference, ``ref_model``, DeepSpeed) runs unchanged; this subclass overrides four of its steps:

- ``compute_preference_loss``: ``pref_loss: minor_dpo`` is MinorDPO, Eq. 2 (``losses.minor_dpo_loss``), with
  LLaMA-Factory's ``rewards/*`` from the same log-ratios; every other ``pref_loss`` is LLaMA-Factory's own.
- ``compute_reference_log_probs``: with ``precompute_ref_logps`` the chosen and rejected log-probs are looked up in
  the table of the reference pass (``reference.ReferenceMixin``: one pass over both responses of every train and
  eval pair, cached with the same keying as for SFT data); with ``kl_metric`` an evaluation batch runs the
  reference itself, for the exact KL on the chosen responses (``losses.exact_kl``, as for the SFT stages).
- ``get_batch_samples`` / ``compute_loss`` (``minor_dpo`` only): ``E[...]`` is the mean over the pairs of the global
  batch. LLaMA-Factory returns the mean over a micro-batch's pairs and the Trainer divides it by the accumulation
  steps (and DDP averages over ranks); the loss is rescaled by ``pairs · accumulation · ranks / N_global`` so that the
  gradient is that of ``Σ_global loss / N_global`` (docs/method.md, "What E[...] means"). The stock losses keep
  LLaMA-Factory's reduction, which equals it when the micro-batches are of equal size.

Metrics, summed per pair and averaged over all pairs since the last log (over all ranks): with
``deviation_metric`` Eq. 8 on the chosen and on the rejected responses (``deviation/chosen``,
``deviation/rejected``); for ``minor_dpo`` the fraction of pairs whose rejected term is active (``rejected_active``,
``r_l > 0``); with ``kl_metric``, on evaluation, ``kl/chosen``. The ``eval_`` prefix (or the eval set's) marks
evaluation values.

While LLaMA-Factory's ``get_batch_loss_metrics`` runs on a batch, ``_pair_batch`` holds what the overridden steps
share about it (its dataset rows, token counts, the policy's chosen logits for the KL); it exists only for that call.
"""

from dataclasses import dataclass

import torch
from llamafactory.train.dpo.trainer import CustomDPOTrainer
from typing_extensions import override

from . import MINOR_DPO, losses, ref_cache
from .reference import OnTrainBegin, ReferenceMixin, sums_over_ranks

# LLaMA-Factory's DPO averages the log-probs over the response tokens for these losses (the others sum them).
LENGTH_AVERAGED_LOSSES = ("ipo", "orpo", "simpo")
METRIC_KEYS = ("deviation/chosen", "deviation/rejected", "rejected_active", "kl/chosen")


class RowNumberCollator:
    """LLaMA-Factory's pairwise collator keeps only the columns it knows; this one carries each row's
    ``dataset_row`` (``precompute_ref_logps``) past it, as a ``[pairs]`` tensor."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, features):
        features = [dict(feature) for feature in features]
        rows = [feature.pop(ref_cache.DATASET_ROW_KEY) for feature in features if ref_cache.DATASET_ROW_KEY in feature]
        batch = self.collator(features)
        if rows:
            batch[ref_cache.DATASET_ROW_KEY] = torch.tensor(rows, dtype=torch.long)
        return batch


@dataclass
class PairBatch:
    """What the steps of one ``get_batch_loss_metrics`` call share: rows are ``[chosen..., rejected...]``."""

    split: str  # "train" or "eval"
    num_tokens: torch.Tensor  # [2 · pairs] response tokens per row
    dataset_rows: torch.Tensor | None  # [pairs] with precompute_ref_logps
    with_kl: bool
    at_reference: bool  # a training batch before the first update of a policy that is its own reference
    policy_chosen_logits: torch.Tensor | None = None
    policy_logps: tuple[torch.Tensor, torch.Tensor] | None = None  # (chosen, rejected), detached, when at_reference

    @property
    def num_pairs(self) -> int:
        return self.num_tokens.numel() // 2


class MinorDPOTrainer(ReferenceMixin, CustomDPOTrainer):
    def __init__(self, model, ref_model, finetuning_args, processor, model_args=None, data_args=None, **kwargs):
        self.data_args = data_args
        self.precompute_ref_logps = finetuning_args.precompute_ref_logps
        # The exact KL needs the reference's whole distributions at every evaluation.
        self.keeps_reference = finetuning_args.kl_metric
        if self.precompute_ref_logps:
            args = kwargs["args"]
            if ref_model is model:  # an evaluation-only run: LLaMA-Factory's reference is the model itself
                ref_model = None
            kwargs["train_dataset"], kwargs["eval_dataset"] = self._open_reference_cache(
                model_args, data_args, finetuning_args, args, kwargs.get("train_dataset"), kwargs.get("eval_dataset")
            )
            kwargs["data_collator"] = RowNumberCollator(kwargs["data_collator"])
            if ref_model is None:  # the workflow loads none when precomputing (hooks.training)
                ref_model = self._reference_model_for_pass(
                    model_args, finetuning_args, args, keep=finetuning_args.kl_metric
                )
        super().__init__(model, ref_model, finetuning_args, processor, **kwargs)
        if self.precompute_ref_logps:
            self.add_callback(OnTrainBegin(self._prepare_reference_table))
        # The reference is the starting policy itself: no `ref_model`, for LoRA a fresh adapter (disabled, the policy
        # is the model it started from; given adapters are merged first with `create_new_adapter`), and no
        # `ld_alpha` (which weights the policy's log-probs only). Before the first update online DPO then computes
        # r = 0 exactly, which Eq. 2's tie rule needs; the table, computed in other batches, differs from the
        # policy's own log-probs by rounding, so those steps take the policy's own.
        fresh_adapter = model_args is None or not model_args.adapter_name_or_path or finetuning_args.create_new_adapter
        self.starts_at_reference = (
            finetuning_args.ref_model is None
            and finetuning_args.ld_alpha is None
            and (finetuning_args.finetuning_type != "lora" or fresh_adapter)
        )
        self.deviation_metric = finetuning_args.deviation_metric
        self.kl_metric = finetuning_args.kl_metric
        self._global_num_pairs: torch.Tensor | None = None
        self._pair_batch: PairBatch | None = None
        self._metric_sums: dict[str, dict[str, torch.Tensor]] = {}

    def _model_inputs(self, inputs):
        return {key: value for key, value in inputs.items() if key not in ("labels", ref_cache.DATASET_ROW_KEY)}

    def _llamafactory_logps(self, logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """Sequence sums as LLaMA-Factory's DPO uses them for this ``pref_loss``."""
        return logps / num_tokens if self.loss_type in LENGTH_AVERAGED_LOSSES else logps

    # --- the reference pass -------------------------------------------------------------------------------

    def _reference_results(self, batch_rows: list[int], batch) -> list[tuple]:
        """``(row, [chosen, rejected] log-probs, their token counts)`` of one collated batch of pairs."""
        logits, keep = self.reference_logits(self.model_wrapped, batch)
        logps, num_tokens = losses.row_logps(logits, batch["labels"][:, -keep:])
        logps, num_tokens = logps.float().cpu().view(2, -1), num_tokens.cpu().view(2, -1)
        return [(row, logps[:, i].tolist(), num_tokens[:, i].tolist()) for i, row in enumerate(batch_rows)]

    # --- LLaMA-Factory's steps --------------------------------------------------------------------------

    @override
    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        self._pair_batch = PairBatch(
            split=train_eval,
            num_tokens=losses.label_counts(batch["labels"]),
            dataset_rows=batch.get(ref_cache.DATASET_ROW_KEY),
            with_kl=self.kl_metric and train_eval == "eval",
            at_reference=self.precompute_ref_logps
            and self.starts_at_reference
            and train_eval == "train"
            and self.state.global_step == 0,
        )
        lf_batch = {key: value for key, value in batch.items() if key != ref_cache.DATASET_ROW_KEY}
        try:
            return super().get_batch_loss_metrics(model, lf_batch, train_eval)
        finally:
            self._pair_batch = None

    @override
    def concatenated_forward(self, model, batch, is_ref_model=False):
        output = super().concatenated_forward(model, batch, is_ref_model=is_ref_model)
        pairs = self._pair_batch
        if not is_ref_model and pairs is not None:
            if pairs.with_kl:
                pairs.policy_chosen_logits = output["chosen_logits"].detach()
            if pairs.at_reference:
                pairs.policy_logps = (output["chosen_logps"].detach(), output["rejected_logps"].detach())
        return output

    @override
    def compute_reference_log_probs(self, model, batch):
        pairs = self._pair_batch
        if pairs is not None and pairs.with_kl:
            return self._reference_with_kl(model, batch, pairs)
        if self.precompute_ref_logps:
            return self._looked_up_reference(pairs)
        return super().compute_reference_log_probs(model, batch)

    @torch.no_grad()
    def _looked_up_reference(self, pairs: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self._reference_pass is None or pairs is None or pairs.dataset_rows is None:
            raise RuntimeError(
                "`precompute_ref_logps: true` covers only the train and eval sets given to the trainer at start; "
                "this batch has no precomputed reference log-probs."
            )
        rows = pairs.dataset_rows
        # The table holds each row's (chosen, rejected); the batch holds all chosen rows, then all rejected ones.
        self.reference_table.check_num_tokens(rows, pairs.num_tokens.view(2, -1).T.reshape(-1))
        if pairs.policy_logps is not None:
            return pairs.policy_logps
        logps = self._llamafactory_logps(self.reference_table.lookup(rows).view(-1, 2).T, pairs.num_tokens.view(2, -1))
        return logps[0], logps[1]

    @torch.no_grad()
    def _reference_with_kl(self, model, batch, pairs: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One reference forward: its log-probs, and the exact KL on the chosen responses (recorded)."""
        logits, keep = self.reference_logits(model, batch)
        labels = batch["labels"][:, -keep:]
        logps, num_tokens = losses.row_logps(logits, labels)
        chosen = slice(0, pairs.num_pairs)
        kl = losses.exact_kl(pairs.policy_chosen_logits[:, -keep:], logits[chosen], labels[chosen])
        pairs.policy_chosen_logits = None
        self._add_metrics(pairs.split, {"kl/chosen": kl.sum()})
        logps = self._llamafactory_logps(logps.float(), num_tokens).view(2, -1)
        return logps[0], logps[1]

    @override
    def compute_preference_loss(
        self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    ):
        if self.loss_type == MINOR_DPO:
            chosen_ratio = losses.log_ratio(policy_chosen_logps, reference_chosen_logps)
            rejected_ratio = losses.log_ratio(policy_rejected_logps, reference_rejected_logps)
            pair_losses = losses.minor_dpo_loss(chosen_ratio, rejected_ratio, self.beta)
            if self.bco_gemma > 1e-6:  # LLaMA-Factory's weighting of its BCO term, as for its own losses
                bco_losses = self.bco_loss(
                    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
                )
                pair_losses = (pair_losses + bco_losses * self.bco_gemma) / (1.0 + self.bco_gemma)
            chosen_rewards, rejected_rewards = self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach()
        else:
            pair_losses, chosen_rewards, rejected_rewards = super().compute_preference_loss(
                policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
            )
        if self._pair_batch is not None:
            self._record_pair_metrics(
                self._pair_batch,
                losses.log_ratio(policy_chosen_logps, reference_chosen_logps).detach(),
                losses.log_ratio(policy_rejected_logps, reference_rejected_logps).detach(),
            )
        return pair_losses, chosen_rewards, rejected_rewards

    # --- E[...] over the global batch (minor_dpo) --------------------------------------------------------

    @override
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.loss_type == MINOR_DPO and batch_samples:
            count = torch.tensor(sum(batch["input_ids"].size(0) // 2 for batch in batch_samples), device=device)
            if self.accelerator.num_processes > 1:
                count = self.accelerator.reduce(count, reduction="sum")
            self._global_num_pairs = count
        return batch_samples, num_items_in_batch

    @override
    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.loss_type != MINOR_DPO or not model.training or self._global_num_pairs is None:
            return result
        loss, outputs = result if return_outputs else (result, None)
        pairs = inputs["input_ids"].size(0) // 2
        scale = pairs * self.current_gradient_accumulation_steps * self.accelerator.num_processes
        loss = loss * scale / self._global_num_pairs
        return (loss, outputs) if return_outputs else loss

    # --- metrics ----------------------------------------------------------------------------------------

    def _record_pair_metrics(self, pairs: PairBatch, chosen_ratio, rejected_ratio) -> None:
        values = {"num_pairs": torch.tensor(float(pairs.num_pairs), device=chosen_ratio.device)}
        if self.loss_type == MINOR_DPO:
            values["rejected_active"] = losses.rejected_term_active(rejected_ratio).sum()
        if self.deviation_metric:
            # Length-averaged log-probs (ipo) are already per token: r/m of Eq. 8.
            num_tokens = pairs.num_tokens.view(2, -1) if self.loss_type not in LENGTH_AVERAGED_LOSSES else None
            for side, ratio in (("chosen", chosen_ratio), ("rejected", rejected_ratio)):
                per_token = ratio if num_tokens is None else ratio / num_tokens[0 if side == "chosen" else 1]
                values[f"deviation/{side}"] = per_token.sum()
        self._add_metrics(pairs.split, values)

    def _pop_metrics(self, split: str, prefix: str) -> dict[str, float]:
        """Means over all pairs since the last call, over all ranks (a collective: every rank calls it)."""
        sums = self._metric_sums.pop(split, None)
        if not sums:
            return {}
        totals = sums_over_ranks(self.accelerator, sums)
        num_pairs = totals.pop("num_pairs")
        return {prefix + name: value / num_pairs for name, value in totals.items()}
