"""``MinorSFTTrainer``: LLaMA-Factory's ``CustomSeq2SeqTrainer`` with the losses of ``losses.py``.

One class serves three objectives (``FinetuningArguments.sft_objective``):

- ``minorsft``: Eq. 7; ``sft_dpo``: Eq. 3; both need a reference forward per batch.
- ``sft`` with ``deviation_metric``: LLaMA-Factory's own SFT loss, untouched (also its variants
  ``use_dft_loss``, ``use_eaft_loss``, ``use_asft_loss``); the reference forward only feeds the logged
  deviation (Eq. 8). ASFT's own reference (the starting model, which LLaMA-Factory loads for its KL
  term) is the deviation's reference too: one copy, one reference forward per batch, kept for the whole
  run even with ``precompute_ref_logps``.

The reference is a frozen model (``ref_model``, or a copy of the starting model made by LLaMA-Factory's
``create_ref_model``), or for LoRA the policy with its adapters disabled. DeepSpeed/FSDP preparation of
the reference is ``CustomSeq2SeqTrainer``'s.

Batch semantics: ``E[...]`` is the mean over the samples of the global batch (all gradient-accumulation
micro-batches on all data-parallel ranks). ``get_batch_samples`` counts them once per optimizer step;
``compute_loss`` returns ``sum(per-sample loss) / N_global``, rescaled so that the Trainer's division by
the accumulation steps and the data-parallel gradient average cancel out (docs/method.md, "What E[...] means").
"""

import contextlib
import inspect

import torch
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from llamafactory.train.trainer_utils import create_ref_model
from peft import PeftModel
from typing_extensions import override

from . import losses, ref_cache, run_record

# Batch keys that are not model inputs.
NON_MODEL_KEYS = ("labels", ref_cache.DATASET_ROW_KEY)


def _positions_to_keep(labels: torch.Tensor) -> int:
    """How many trailing positions' logits predict every label of the batch (labels are shifted by one)."""
    labelled = (labels != losses.IGNORE_INDEX).any(0).nonzero()
    first = int(labelled[0]) if labelled.numel() else 0
    return labels.size(1) - max(first - 1, 0)


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


def _accepts_logits_to_keep(model) -> bool:
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class MinorSFTTrainer(CustomSeq2SeqTrainer):
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
        self.precomputed_ref: ref_cache.PrecomputedReference | None = None
        self.data_args = data_args
        if getattr(finetuning_args, "precompute_ref_logps", False):
            self.precomputed_ref = ref_cache.PrecomputedReference(
                model_args,
                data_args,
                finetuning_args,
                kwargs["args"],
                kwargs.get("train_dataset"),
                kwargs.get("eval_dataset"),
            )
            kwargs["train_dataset"] = self.precomputed_ref.train_dataset
            kwargs["eval_dataset"] = self.precomputed_ref.eval_dataset
            resuming = kwargs["args"].resume_from_checkpoint is not None
            if ref_model is None and self.precomputed_ref.needs_reference_copy(finetuning_args, resuming):
                ref_model = create_ref_model(model_args, finetuning_args)
        elif ref_model is None:
            # None for LoRA without `ref_model`: the reference is then the policy with adapters disabled.
            ref_model = create_ref_model(model_args, finetuning_args)
        # ASFT's KL term runs on this very model: its precision stays LLaMA-Factory's choice.
        if ref_model is not None and not finetuning_args.use_asft_loss:
            _match_policy_precision(ref_model, kwargs["model"], kwargs["args"])
        # LLaMA-Factory's ASFT loss runs the reference every step, so a precomputed table cannot free it.
        self.keeps_reference = finetuning_args.use_asft_loss
        super().__init__(finetuning_args, processor, model_args=model_args, ref_model=ref_model, **kwargs)
        if self.precomputed_ref is not None:
            self.add_callback(ref_cache.PrecomputeOnTrainBegin(self))
        self.objective = finetuning_args.sft_objective
        self.beta = finetuning_args.pref_beta
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
        if self.precomputed_ref is not None:
            return self.precomputed_ref.lookup(inputs)
        return self.reference_forward(model, inputs)[0]

    @torch.no_grad()
    def reference_forward(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π_ref(y|x), m) per sample; the reference's logits live only inside this call.

        Without a ``ref_model`` the reference is the policy with its LoRA adapters disabled, or (only
        in the precompute pass, before the first update) the policy itself. Logits are computed only
        from the position before the batch's first label on: earlier prompt positions predict nothing.
        """
        labels = inputs["labels"]
        keep = _positions_to_keep(labels)
        reference = self.ref_model if self.ref_model is not None else self.accelerator.unwrap_model(model)
        model_inputs = self._model_inputs(inputs)
        if _accepts_logits_to_keep(self.accelerator.unwrap_model(reference)):
            model_inputs["logits_to_keep"] = keep
        if self.ref_model is not None:
            logits = self.ref_model(**model_inputs).logits
        else:
            with reference.disable_adapter() if isinstance(reference, PeftModel) else contextlib.nullcontext():
                logits = reference(**model_inputs).logits
        segment_ids = self._segment_ids(inputs)
        return losses.sequence_logps(
            logits[:, -keep:], labels[:, -keep:], None if segment_ids is None else segment_ids[:, -keep:]
        )

    def prepare_precomputed_reference(self) -> None:
        """Load or compute the precomputed reference log-probs, then free the reference (every rank calls it)."""
        if self.precomputed_ref.table is None and self.ref_model is None and self.state.global_step > 0:
            if not isinstance(self.accelerator.unwrap_model(self.model), PeftModel):
                raise RuntimeError(
                    f"Resuming at step {self.state.global_step} without the reference log-prob cache "
                    f"{self.precomputed_ref.path}: the policy is no longer the reference. Restore the file, or set "
                    "`ref_model` to the starting model."
                )
        self.precomputed_ref.ensure(self, self.model_wrapped)

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
            and self.precomputed_ref is None
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
        # Reference first: its logits are freed before the policy's activations are built.
        ref_logps = None if self._asft_reference_is_reused() else self.reference_logps(model, inputs)
        if self.objective == "sft":
            lf_inputs = {key: value for key, value in inputs.items() if key != ref_cache.DATASET_ROW_KEY}
            loss, outputs, loss_func_args = self._llamafactory_sft_loss(model, lf_inputs, num_items_in_batch)
            with torch.no_grad():
                policy_logps, num_tokens = self._sequence_logps(outputs.logits.detach(), inputs)
                if ref_logps is None:
                    ref_logps = self._sequence_logps(loss_func_args[0], inputs)[0]
            del loss_func_args
        else:
            outputs = model(**self._model_inputs(inputs))
            policy_logps, num_tokens = self._sequence_logps(outputs.logits, inputs)
            if self.objective == "minorsft":
                per_sample_loss = losses.minorsft_loss(policy_logps, ref_logps, num_tokens, self.beta)
            else:
                per_sample_loss = losses.sft_dpo_loss(policy_logps, ref_logps, self.beta)
            loss = self._reduce_over_global_batch(per_sample_loss, training=model.training)

        if self.precomputed_ref is not None:
            self.precomputed_ref.check_num_tokens(inputs, num_tokens)
        self._record_metrics("train" if model.training else "eval", policy_logps.detach(), ref_logps, num_tokens)
        return (loss, outputs) if return_outputs else loss

    # --- metrics ----------------------------------------------------------------------------------------

    def _record_metrics(self, split, policy_logps, ref_logps, num_tokens) -> None:
        batch = {
            "deviation": losses.deviation(policy_logps, ref_logps, num_tokens).sum(),
            "logps/policy": policy_logps.sum(),
            "logps/ref": ref_logps.sum(),
            "num_samples": torch.tensor(float(policy_logps.numel()), device=policy_logps.device),
        }
        if self.objective != "sft":
            batch["coef_mean"] = losses.minorsft_coefficient(policy_logps, ref_logps, self.beta).sum()
        sums = self._metric_sums.setdefault(split, {})
        for name, value in batch.items():
            sums[name] = sums[name] + value.float() if name in sums else value.float()

    def _pop_metrics(self, split: str, prefix: str) -> dict[str, float]:
        """Means over all samples since the last call, over all ranks (a collective: every rank calls it)."""
        sums = self._metric_sums.pop(split, None)
        if not sums:
            return {}
        names = sorted(sums)
        totals = torch.stack([sums[name] for name in names])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        totals = dict(zip(names, totals.tolist()))
        num_samples = totals.pop("num_samples")
        return {prefix + name: value / num_samples for name, value in totals.items()}

    @override
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self._pop_metrics("train", prefix=""))
        return super().log(logs, *args, **kwargs)

    @override
    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.is_world_process_zero():
            reference = self.precomputed_ref.record() if self.precomputed_ref is not None else {"mode": "online"}
            record = run_record.build(self.finetuning_args, self.args, self.data_args, reference)
            run_record.write(self.args.output_dir, record)
        return output

    @override
    def evaluation_loop(self, *args, **kwargs):
        if self.precomputed_ref is not None and not self.precomputed_ref.ready:  # evaluation without training
            self.prepare_precomputed_reference()
        self._metric_sums.pop("eval", None)
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        output.metrics.update(self._pop_metrics("eval", prefix=f"{prefix}_"))
        return output
