"""``MinorSFTTrainer``: LLaMA-Factory's ``CustomSeq2SeqTrainer`` with the losses of ``losses.py``.

One class serves four objectives (``FinetuningArguments.sft_objective``):

- ``minorsft``: Eq. 7; ``sft_dpo``: Eq. 3; both need log π_ref(y|x) per batch.
- ``sft_sample``: raw SFT per sample, Eq. 5; the reference only feeds the logged deviation (Eq. 8).
- ``sft`` with ``deviation_metric``: LLaMA-Factory's own SFT loss, untouched (also its variants
  ``use_dft_loss``, ``use_eaft_loss``, ``use_asft_loss``); the reference forward only feeds the logged
  deviation (Eq. 8). ASFT's own reference (the starting model, which LLaMA-Factory loads for its KL
  term) is the deviation's reference too: one copy, one reference forward per batch, kept for the whole
  run even with ``precompute_ref_logps``. ``sft`` with only ``kl_metric`` runs no reference in training.

With ``kl_metric`` every evaluation batch also runs the reference's forward and logs the exact KL of the
next-token distributions (``losses.exact_kl``); the reference model is then kept for the whole run.

The reference is a frozen model (``ref_model``, or a copy of the starting model made by LLaMA-Factory's
``create_ref_model``), or for LoRA the policy with its adapters disabled. DeepSpeed/FSDP preparation of
the reference is ``CustomSeq2SeqTrainer``'s.

With ``precompute_ref_logps`` the reference runs once instead (``reference.ReferenceMixin``, shared with
``MinorDPOTrainer``): a pass before the first update, whose table the loss reads by dataset row.

Batch semantics: ``E[...]`` is the mean over the samples of the global batch (all gradient-accumulation
micro-batches on all data-parallel ranks). ``get_batch_samples`` counts them once per optimizer step;
``compute_loss`` returns ``sum(per-sample loss) / N_global``, rescaled so that the Trainer's division by
the accumulation steps and the data-parallel gradient average cancel out (docs/method.md, "What E[...] means").
"""

import torch
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from llamafactory.train.trainer_utils import create_ref_model
from typing_extensions import override

from . import BETA_STAGES, losses, ref_cache
from .reference import OnTrainBegin, ReferenceMixin, sums_over_ranks

# Batch keys that are not model inputs.
NON_MODEL_KEYS = ("labels", ref_cache.DATASET_ROW_KEY)


def _match_policy_precision(ref_model: torch.nn.Module, model: torch.nn.Module, args) -> None:
    """Give a separate reference the dtype of the policy's trainable weights when training without autocast.

    LLaMA-Factory loads the reference in the checkpoint's compute dtype (bf16 for most checkpoints) but
    upcasts the policy's trainable weights to fp32. Without bf16/fp16 autocast (a CPU run) the two would
    then compute the same weights in different precisions and Eq. 8 would not be 0 before the first update
    (-0.02 per token on SmolLM2). With autocast, or under DeepSpeed/FSDP, or for a quantised reference,
    LLaMA-Factory's own choice stands.
    """
    if args.bf16 or args.fp16 or args.deepspeed or args.fsdp or getattr(ref_model, "hf_quantizer", None) is not None:
        return
    policy_dtype = next((p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()), None)
    if policy_dtype is not None and any(
        p.dtype != policy_dtype for p in ref_model.parameters() if p.is_floating_point()
    ):
        ref_model.to(policy_dtype)


class MinorSFTTrainer(ReferenceMixin, CustomSeq2SeqTrainer):
    def __init__(
        self,
        finetuning_args,
        processor,
        model_args=None,
        ref_model: torch.nn.Module | None = None,
        neat_packing: bool = False,
        data_args=None,
        **kwargs,
    ) -> None:
        self.data_args = data_args
        self.precompute_ref_logps = getattr(finetuning_args, "precompute_ref_logps", False)
        # LLaMA-Factory's ASFT loss runs the reference every step and the exact KL at every evaluation, so a
        # precomputed table cannot free it.
        self.keeps_reference = finetuning_args.use_asft_loss or finetuning_args.kl_metric
        if self.precompute_ref_logps:
            args = kwargs["args"]
            kwargs["train_dataset"], kwargs["eval_dataset"] = self._open_reference_cache(
                model_args, data_args, finetuning_args, args, kwargs.get("train_dataset"), kwargs.get("eval_dataset")
            )
            if ref_model is None:
                # The exact KL needs the reference's whole distributions at every evaluation.
                ref_model = self._reference_model_for_pass(
                    model_args, finetuning_args, args, keep=finetuning_args.kl_metric
                )
        elif ref_model is None:
            # None for LoRA without `ref_model`: the reference is then the policy with adapters disabled.
            ref_model = create_ref_model(model_args, finetuning_args)
        # ASFT's KL term runs on this very model: its precision stays LLaMA-Factory's choice.
        if ref_model is not None and not finetuning_args.use_asft_loss:
            _match_policy_precision(ref_model, kwargs["model"], kwargs["args"])
        super().__init__(finetuning_args, processor, model_args=model_args, ref_model=ref_model, **kwargs)
        if self.precompute_ref_logps:
            self.add_callback(OnTrainBegin(self._prepare_reference_table))
        self.objective = finetuning_args.sft_objective
        self.beta = finetuning_args.pref_beta
        self.kl_metric = finetuning_args.kl_metric
        # Whether training steps need log π_ref(y|x): for the loss, or for the logged deviation.
        self.trains_with_reference = self.objective != "sft" or finetuning_args.deviation_metric
        self.neat_packing = neat_packing
        if self.objective != "sft":
            # The loss is normalised by samples (see get_batch_samples), not by the model's token count.
            self.model_accepts_loss_kwargs = False
        self._global_num_samples: torch.Tensor | None = None
        self._metric_sums: dict[str, dict[str, torch.Tensor]] = {}

    # --- per-sample log-probs -------------------------------------------------------------------------

    def _segment_ids(self, inputs) -> torch.Tensor | None:
        """Packed samples (neat_packing) restart their position ids at 0; that marks a new segment."""
        if not self.neat_packing:
            return None
        return (inputs["position_ids"] == 0).long().cumsum(-1)

    def _model_inputs(self, inputs):
        return {key: value for key, value in inputs.items() if key not in NON_MODEL_KEYS}

    def _sequence_logps(self, logits, inputs):
        return losses.sequence_logps(logits, inputs["labels"], segment_ids=self._segment_ids(inputs))

    @torch.no_grad()
    def reference_logps(self, model, inputs) -> torch.Tensor:
        """log π_ref(y|x) per sample: looked up when precomputed, else one reference forward."""
        if not self.precompute_ref_logps:
            return self.reference_forward(model, inputs)[0]
        if self._reference_pass is None or ref_cache.DATASET_ROW_KEY not in inputs:
            raise RuntimeError(
                "`precompute_ref_logps: true` covers only the train and eval sets given to the trainer at start; "
                "this batch has no precomputed reference log-probs."
            )
        return self.reference_table.lookup(inputs[ref_cache.DATASET_ROW_KEY])

    @torch.no_grad()
    def reference_forward(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π_ref(y|x), m) per sample; the reference's logits live only inside this call."""
        logits, keep = self.reference_logits(model, inputs)
        return self._tail_sequence_logps(logits, inputs, keep)

    def _tail_sequence_logps(self, tail_logits, inputs, keep: int):
        """``sequence_logps`` of logits that cover only the last ``keep`` positions."""
        segment_ids = self._segment_ids(inputs)
        return losses.sequence_logps(
            tail_logits, inputs["labels"][:, -keep:], None if segment_ids is None else segment_ids[:, -keep:]
        )

    # --- the precomputed reference -------------------------------------------------------------------

    def _reference_results(self, batch_rows: list[int], batch) -> list[tuple]:
        """The reference pass's ``(row, logps, num_tokens)`` entries of one collated batch of dataset rows."""
        logps, num_tokens = self.reference_forward(self.model_wrapped, batch)
        return ref_cache.split_by_row(
            batch_rows, self._samples_per_row(batch), logps.float().cpu().tolist(), num_tokens.cpu().tolist()
        )

    def _samples_per_row(self, batch) -> list[int]:
        segment_ids = self._segment_ids(batch)
        labels = batch["labels"]
        return [
            int(losses.count_samples(labels[i : i + 1], None if segment_ids is None else segment_ids[i : i + 1]))
            for i in range(labels.size(0))
        ]

    # --- loss -----------------------------------------------------------------------------------------

    @override
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.objective != "sft" and batch_samples:
            count = sum(
                losses.count_samples(batch["labels"], self._segment_ids(batch)).to(device) for batch in batch_samples
            )
            if self.accelerator.num_processes > 1:
                count = self.accelerator.reduce(count, reduction="sum")
            self._global_num_samples = count
        return batch_samples, num_items_in_batch

    def _reduce_over_global_batch(self, per_sample_loss: torch.Tensor, training: bool) -> torch.Tensor:
        if not training or self._global_num_samples is None:
            return per_sample_loss.mean()
        # The Trainer divides by the accumulation steps and DDP averages over ranks; undo both.
        scale = self.current_gradient_accumulation_steps * self.accelerator.num_processes
        return per_sample_loss.sum() * scale / self._global_num_samples

    def _asft_reference_is_reused(self) -> bool:
        """ASFT's loss forwards the reference on every batch; its logits then give log π_ref(y|x) too.

        Not with ``neat_packing``: LLaMA-Factory's ASFT forward passes no position ids to the reference,
        which the deviation's reference forward does (each packed segment restarts at position 0).
        """
        return (
            self.objective == "sft"
            and self.finetuning_args.use_asft_loss
            and not self.precompute_ref_logps
            and not self.neat_packing
        )

    def _llamafactory_sft_loss(self, model, inputs, num_items_in_batch):
        """LLaMA-Factory's SFT loss (or its DFT/EAFT/ASFT variant), its model outputs, and the extra arguments
        its ``compute_loss_func`` received (ASFT: the reference logits), from its one policy forward.

        ``CustomSeq2SeqTrainer.compute_loss`` returns only the loss under ASFT, so the outputs are taken
        from the call to ``compute_loss_func`` (the loss function itself is LLaMA-Factory's, unchanged).
        """
        lf_loss_func = self.compute_loss_func
        if lf_loss_func is None:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            return loss, outputs, ()
        seen = {}

        def recording_loss_func(outputs, labels, *args, **kwargs):
            seen["outputs"], seen["args"] = outputs, args
            return lf_loss_func(outputs, labels, *args, **kwargs)

        self.compute_loss_func = recording_loss_func
        try:
            result = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        finally:
            self.compute_loss_func = lf_loss_func
        loss = result[0] if isinstance(result, tuple) else result
        return loss, seen["outputs"], seen["args"]

    @override
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with_kl = self.kl_metric and not model.training
        ref_logps = ref_logits = None
        # The reference first: in training its logits are freed before the policy's activations are built; the
        # exact KL of an evaluation needs both at once.
        if with_kl:
            ref_logits, keep = self.reference_logits(model, inputs)
            ref_logps = self._tail_sequence_logps(ref_logits, inputs, keep)[0]
        elif (self.trains_with_reference or not model.training) and not self._asft_reference_is_reused():
            ref_logps = self.reference_logps(model, inputs)
        if self.objective == "sft":
            lf_inputs = {key: value for key, value in inputs.items() if key != ref_cache.DATASET_ROW_KEY}
            loss, outputs, loss_func_args = self._llamafactory_sft_loss(model, lf_inputs, num_items_in_batch)
            with torch.no_grad():
                policy_logps, num_tokens = self._sequence_logps(outputs.logits.detach(), inputs)
                if ref_logps is None and loss_func_args:
                    ref_logps = self._sequence_logps(loss_func_args[0], inputs)[0]
            del loss_func_args
        else:
            outputs = model(**self._model_inputs(inputs))
            policy_logps, num_tokens = self._sequence_logps(outputs.logits, inputs)
            if self.objective == "minorsft":
                per_sample_loss = losses.minorsft_loss(policy_logps, ref_logps, num_tokens, self.beta)
            elif self.objective == "sft_dpo":
                per_sample_loss = losses.sft_dpo_loss(policy_logps, ref_logps, self.beta)
            else:
                per_sample_loss = losses.raw_sft_loss(policy_logps, num_tokens)
            loss = self._reduce_over_global_batch(per_sample_loss, training=model.training)

        kl = None
        if with_kl:
            segment_ids = self._segment_ids(inputs)
            kl = losses.exact_kl(
                outputs.logits.detach()[:, -keep:],
                ref_logits,
                inputs["labels"][:, -keep:],
                None if segment_ids is None else segment_ids[:, -keep:],
            )
            del ref_logits
        if ref_logps is not None:
            if self.precompute_ref_logps:
                self.reference_table.check_num_tokens(inputs[ref_cache.DATASET_ROW_KEY], num_tokens)
            split = "train" if model.training else "eval"
            self._record_metrics(split, policy_logps.detach(), ref_logps, num_tokens, kl)
        return (loss, outputs) if return_outputs else loss

    # --- metrics ----------------------------------------------------------------------------------------

    def _record_metrics(self, split, policy_logps, ref_logps, num_tokens, kl=None) -> None:
        batch = {
            "deviation": losses.deviation(policy_logps, ref_logps, num_tokens).sum(),
            "logps/policy": policy_logps.sum(),
            "logps/ref": ref_logps.sum(),
            "num_samples": torch.tensor(float(policy_logps.numel()), device=policy_logps.device),
            "num_tokens": num_tokens.sum(),
            # Summed per sample, not as Σ log π_θ − Σ log π_ref: the difference of two large float32 sums cancels.
            "log_ratio": losses.log_ratio(policy_logps, ref_logps).sum(),
        }
        if self.objective in BETA_STAGES:
            batch["coef_mean"] = losses.minorsft_coefficient(policy_logps, ref_logps, self.beta).sum()
        if kl is not None:
            batch["kl"] = kl.sum()
        self._add_metrics(split, batch)

    def _pop_metrics(self, split: str, prefix: str) -> dict[str, float]:
        """Means over all samples since the last call, over all ranks (a collective: every rank calls it)."""
        sums = self._metric_sums.pop(split, None)
        if not sums:
            return {}
        totals = sums_over_ranks(self.accelerator, sums)
        num_samples, num_tokens = totals.pop("num_samples"), totals.pop("num_tokens")
        # Over all tokens rather than samples: losses.token_deviation, from the sums over the samples.
        token_deviation = totals.pop("log_ratio") / num_tokens
        means = {prefix + name: value / num_samples for name, value in totals.items()}
        return {**means, prefix + "token_deviation": token_deviation}
