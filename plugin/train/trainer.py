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

With ``precompute_ref_logps`` the reference runs once instead: ``compute_reference_table`` is that pass, at the
start of training (once the model is prepared for DDP/DeepSpeed, on every rank, before the first update) or of
an evaluation-only run; it returns a ``ref_cache.ReferenceTable``, which the loss reads by dataset row, and
the reference model is then released. ``ref_cache`` keys, stores and loads the table.

Batch semantics: ``E[...]`` is the mean over the samples of the global batch (all gradient-accumulation
micro-batches on all data-parallel ranks). ``get_batch_samples`` counts them once per optimizer step;
``compute_loss`` returns ``sum(per-sample loss) / N_global``, rescaled so that the Trainer's division by
the accumulation steps and the data-parallel gradient average cancel out (docs/method.md, "What E[...] means").
"""

import contextlib
import gc
import inspect
import time

import torch
from llamafactory.extras import logging
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from llamafactory.train.trainer_utils import create_ref_model
from peft import PeftModel
from transformers import TrainerCallback
from typing_extensions import override

from . import losses, ref_cache, run_record

# Under LLaMA-Factory's library logger, so that its handlers (console, LLaMA-Board) show the lines.
logger = logging.get_logger("llamafactory." + __name__)

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


def _on_every_rank(flag: bool) -> bool:
    """True only if ``flag`` is true on every data-parallel rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    from accelerate import PartialState

    value = torch.tensor(int(flag), device=PartialState().device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


class _OnTrainBegin(TrainerCallback):
    """Calls ``function`` at ``on_train_begin``: the Trainer's one hook after the model is prepared (DDP/DeepSpeed,
    a resumed checkpoint loaded) and before the first update, reached on every rank."""

    def __init__(self, function) -> None:
        self.function = function

    def on_train_begin(self, args, state, control, **kwargs):
        self.function()


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
        self.data_args = data_args
        self.precompute_ref_logps = getattr(finetuning_args, "precompute_ref_logps", False)
        # With precompute_ref_logps: log π_ref(y|x) by dataset row, loaded here on a cache hit, else computed by
        # `compute_reference_table` at the start of training; the numbered rows and the cache file it covers.
        self.reference_table: ref_cache.ReferenceTable | None = None
        self._reference_rows: ref_cache.NumberedRows | None = None
        self._reference_cache: ref_cache.CacheFile | None = None
        self._reference_pass: str | None = None  # "computed" or "loaded" once the table is on the device
        self._reference_seconds: tuple[float, float] | None = None  # the pass's wall and CPU seconds on rank 0
        if self.precompute_ref_logps:
            args = kwargs["args"]
            rows = ref_cache.number_rows(
                kwargs.get("train_dataset"),
                kwargs.get("eval_dataset"),
                with_train=args.do_train,  # LLaMA-Factory loads `dataset` for evaluation-only runs too
                with_eval=not args.predict_with_generate,  # generation computes no loss, needs no reference
            )
            kwargs["train_dataset"], kwargs["eval_dataset"] = rows.train_dataset, rows.eval_dataset
            key = ref_cache.cache_key(model_args, data_args, finetuning_args, rows.splits)
            cache_dir = finetuning_args.ref_logps_cache_dir or args.output_dir
            self._reference_rows = rows
            self._reference_cache = ref_cache.CacheFile.for_key(cache_dir, key, rows.num_rows)
            table = self._reference_cache.load()
            self.reference_table = table if _on_every_rank(table is not None) else None
            # A separate reference is needed for the pass only on a cache miss: a given `ref_model`, or a resumed
            # full/freeze run, whose policy is no longer the starting model.
            resuming = args.resume_from_checkpoint is not None
            needs_copy = finetuning_args.ref_model is not None or (
                resuming and finetuning_args.finetuning_type != "lora"
            )
            # The exact KL needs the reference's whole distributions at every evaluation (None for LoRA without
            # `ref_model`: the policy with its adapters disabled).
            if ref_model is None and ((self.reference_table is None and needs_copy) or finetuning_args.kl_metric):
                ref_model = create_ref_model(model_args, finetuning_args)
        elif ref_model is None:
            # None for LoRA without `ref_model`: the reference is then the policy with adapters disabled.
            ref_model = create_ref_model(model_args, finetuning_args)
        # ASFT's KL term runs on this very model: its precision stays LLaMA-Factory's choice.
        if ref_model is not None and not finetuning_args.use_asft_loss:
            _match_policy_precision(ref_model, kwargs["model"], kwargs["args"])
        # LLaMA-Factory's ASFT loss runs the reference every step and the exact KL at every evaluation, so a
        # precomputed table cannot free it.
        self.keeps_reference = finetuning_args.use_asft_loss or finetuning_args.kl_metric
        super().__init__(finetuning_args, processor, model_args=model_args, ref_model=ref_model, **kwargs)
        if self.precompute_ref_logps:
            self.add_callback(_OnTrainBegin(self._prepare_reference_table))
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

    @torch.no_grad()
    def reference_logits(self, model, inputs) -> tuple[torch.Tensor, int]:
        """The reference's logits of the last ``keep`` positions, and ``keep``.

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
        return logits[:, -keep:], keep

    # --- the precomputed reference -------------------------------------------------------------------

    @torch.no_grad()
    def compute_reference_table(self) -> ref_cache.ReferenceTable:
        """The reference pass: log π_ref(y|x) of every numbered row, in batched no-grad forwards, each rank taking
        a share of the rows; every rank returns the whole table. A collective: every rank calls it, after the
        model is prepared (under ZeRO-3 each forward gathers the weights from all ranks)."""
        from accelerate.utils import gather_object

        rows = self._reference_rows
        mine = ref_cache.rows_of_this_rank(
            rows.lengths(), self.accelerator.process_index, self.accelerator.num_processes
        )
        batch_size = self.args.per_device_eval_batch_size
        policy = self.accelerator.unwrap_model(self.model_wrapped)
        was_training = policy.training
        policy.eval()
        results = []
        try:
            for start in range(0, len(mine), batch_size):
                batch_rows = mine[start : start + batch_size]
                batch = self._prepare_inputs(self.data_collator([rows.features(row) for row in batch_rows]))
                logps, num_tokens = self.reference_forward(self.model_wrapped, batch)
                results += ref_cache.split_by_row(
                    batch_rows, self._samples_per_row(batch), logps.float().cpu().tolist(), num_tokens.cpu().tolist()
                )
        finally:
            policy.train(was_training)
        return ref_cache.table_from_rows(gather_object(results), rows.num_rows)

    def _samples_per_row(self, batch) -> list[int]:
        segment_ids = self._segment_ids(batch)
        labels = batch["labels"]
        return [
            int(losses.count_samples(labels[i : i + 1], None if segment_ids is None else segment_ids[i : i + 1]))
            for i in range(labels.size(0))
        ]

    def _prepare_reference_table(self) -> None:
        """Load or compute the table, put it on the device, and release the reference unless the loss still runs
        it every step (ASFT). Every rank calls it, at the start of training or of an evaluation-only run."""
        if self._reference_pass is not None:
            return
        cache = self._reference_cache
        if self.reference_table is None:
            if self.ref_model is None and self.state.global_step > 0:
                if not isinstance(self.accelerator.unwrap_model(self.model), PeftModel):
                    raise RuntimeError(
                        f"Resuming at step {self.state.global_step} without the reference log-prob cache "
                        f"{cache.path}: the policy is no longer the reference. Restore the file, or set "
                        "`ref_model` to the starting model."
                    )
            started, started_cpu = time.perf_counter(), time.process_time()
            table = self.compute_reference_table()
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
            if self.accelerator.is_main_process:
                cache.save(table, seconds, cpu_seconds)
            self.accelerator.wait_for_everyone()
            logger.info_rank0(
                f"Computed reference log-probs of {table.logps.numel()} samples ({int(table.num_tokens.sum())} label "
                f"tokens) in {seconds:.1f} s ({cpu_seconds:.1f} s CPU time on rank 0) on "
                f"{self.accelerator.num_processes} rank(s); saved to {cache.path}."
            )
            self.reference_table, self._reference_pass = table, "computed"
            self._reference_seconds = (seconds, cpu_seconds)
        else:
            logger.info_rank0(
                f"Loaded reference log-probs of {self.reference_table.logps.numel()} samples from {cache.path}."
            )
            self._reference_pass = "loaded"
        self.reference_table = self.reference_table.to(self.args.device)
        if not self.keeps_reference:
            self._release_reference_model()

    def _release_reference_model(self) -> None:
        """Drop the reference model (also from the accelerator's list of prepared models) and its memory."""
        reference = self.ref_model
        if reference is None:
            return
        self.ref_model = None
        self.accelerator._models[:] = [model for model in self.accelerator._models if model is not reference]
        del reference
        gc.collect()
        from accelerate.utils.memory import clear_device_cache

        clear_device_cache()

    # --- loss -----------------------------------------------------------------------------------------

    @override
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.state.global_step >= self.state.max_steps > 0:
            # Resumed from the checkpoint of the last step (a run killed after it, e.g. in the final evaluation): the
            # Trainer (transformers 5.6) would train one step more before it checks that training is over.
            return [], None
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
        if self.objective in ("minorsft", "sft_dpo"):
            batch["coef_mean"] = losses.minorsft_coefficient(policy_logps, ref_logps, self.beta).sum()
        if kl is not None:
            batch["kl"] = kl.sum()
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
        num_samples, num_tokens = totals.pop("num_samples"), totals.pop("num_tokens")
        # Over all tokens rather than samples: losses.token_deviation, from the sums over the samples.
        token_deviation = totals.pop("log_ratio") / num_tokens
        means = {prefix + name: value / num_samples for name, value in totals.items()}
        return {**means, prefix + "token_deviation": token_deviation}

    @override
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self._pop_metrics("train", prefix=""))
        return super().log(logs, *args, **kwargs)

    @override
    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.is_world_process_zero():
            if self.precompute_ref_logps:
                seconds, cpu_seconds = self._reference_seconds or (None, None)
                reference = run_record.precomputed_reference(
                    self._reference_pass, seconds, cpu_seconds, self._reference_cache.path
                )
            else:
                reference = run_record.ONLINE_REFERENCE
            record = run_record.build(self.finetuning_args, self.args, self.data_args, reference)
            run_record.write(self.args.output_dir, record)
        return output

    @override
    def evaluation_loop(self, *args, **kwargs):
        if self.precompute_ref_logps:  # evaluation without training, or before the first step
            self._prepare_reference_table()
        self._metric_sums.pop("eval", None)
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        output.metrics.update(self._pop_metrics("eval", prefix=f"{prefix}_"))
        return output
