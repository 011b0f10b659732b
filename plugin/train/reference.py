"""The reference model's side of the plugin's two trainers (``MinorSFTTrainer`` for the SFT stages,
``MinorDPOTrainer`` for ``stage: dpo``): its logits, the precomputed reference pass, the release of the model
afterwards, and the run record that says which of them a run used; and what both do alike: their metric sums
(each trainer's ``_pop_metrics`` turns them into means) and the guard against a step past the last on resume.

``ReferenceMixin`` is mixed in before LLaMA-Factory's trainer class. A trainer using it provides
``_model_inputs(batch)`` (the batch without the keys the model does not take) and ``_reference_results(rows,
batch)`` (the pass's ``(row, logps, num_tokens)`` entries of one collated batch of dataset rows), sets
``precompute_ref_logps`` and ``keeps_reference`` (the reference must outlive the pass), and calls
``_open_reference_cache`` before ``Trainer.__init__`` when precomputing.

With ``precompute_ref_logps`` the pass (``compute_reference_table``) runs once at the start of training (once the
model is prepared for DDP/DeepSpeed, on every rank, before the first update) or of an evaluation-only run; it
returns a ``ref_cache.ReferenceTable``, which the loss reads by dataset row, and the reference model is then
released. ``ref_cache`` keys, stores and loads the table.
"""

import contextlib
import gc
import inspect
import time

import torch
from llamafactory.extras import logging
from llamafactory.train.trainer_utils import create_ref_model
from peft import PeftModel
from transformers import TrainerCallback
from typing_extensions import override

from . import losses, ref_cache, run_record

# Under LLaMA-Factory's library logger, so that its handlers (console, LLaMA-Board) show the lines.
logger = logging.get_logger("llamafactory." + __name__)


def positions_to_keep(labels: torch.Tensor) -> int:
    """How many trailing positions' logits predict every label of the batch (labels are shifted by one)."""
    labelled = (labels != losses.IGNORE_INDEX).any(0).nonzero()
    first = int(labelled[0]) if labelled.numel() else 0
    return labels.size(1) - max(first - 1, 0)


def _accepts_logits_to_keep(model) -> bool:
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def on_every_rank(flag: bool) -> bool:
    """True only if ``flag`` is true on every data-parallel rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    from accelerate import PartialState

    value = torch.tensor(int(flag), device=PartialState().device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def sums_over_ranks(accelerator, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metric sums of this rank added over all ranks (a collective: every rank calls it with the same names)."""
    names = sorted(sums)
    totals = torch.stack([sums[name] for name in names])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return dict(zip(names, totals.tolist()))


class OnTrainBegin(TrainerCallback):
    """Calls ``function`` at ``on_train_begin``: the Trainer's one hook after the model is prepared (DDP/DeepSpeed,
    a resumed checkpoint loaded) and before the first update, reached on every rank."""

    def __init__(self, function) -> None:
        self.function = function

    def on_train_begin(self, args, state, control, **kwargs):
        self.function()


class ReferenceMixin:
    precompute_ref_logps: bool = False
    keeps_reference: bool = False
    # With precompute_ref_logps: log π_ref(y|x) by dataset row, loaded on a cache hit, else computed by
    # `compute_reference_table` at the start of training; the numbered rows and the cache file it covers.
    reference_table: ref_cache.ReferenceTable | None = None
    _reference_rows: ref_cache.NumberedRows | None = None
    _reference_cache: ref_cache.CacheFile | None = None
    _reference_pass: str | None = None  # "computed" or "loaded" once the table is on the device
    _reference_seconds: tuple[float, float] | None = None  # the pass's wall and CPU seconds on rank 0

    # --- the metrics both trainers log: sums per split ("train", "eval") since the last log, means over all ranks ---

    def _add_metrics(self, split: str, values: dict) -> None:
        sums = self._metric_sums.setdefault(split, {})
        for name, value in values.items():
            sums[name] = sums[name] + value.float() if name in sums else value.float()

    @override
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self._pop_metrics("train", prefix=""))
        return super().log(logs, *args, **kwargs)

    @override
    def evaluation_loop(self, *args, **kwargs):
        if self.precompute_ref_logps:  # evaluation without training, or before the first step
            self._prepare_reference_table()
        self._metric_sums.pop("eval", None)
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        output.metrics.update(self._pop_metrics("eval", prefix=f"{prefix}_"))
        return output

    @override
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.state.global_step >= self.state.max_steps > 0:
            # Resumed from the checkpoint of the last step (a run killed after it, e.g. in the final evaluation): the
            # Trainer (transformers 5.6) would train one step more before it checks that training is over.
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _open_reference_cache(self, model_args, data_args, finetuning_args, args, train_dataset, eval_dataset):
        """Number the rows of the train and eval sets, key the cache on them and load it where every rank finds it.
        Returns the numbered ``(train_dataset, eval_dataset)`` to hand to the Trainer."""
        rows = ref_cache.number_rows(
            train_dataset,
            eval_dataset,
            with_train=args.do_train,  # LLaMA-Factory loads `dataset` for evaluation-only runs too
            with_eval=not getattr(args, "predict_with_generate", False),  # generation computes no loss
        )
        key = ref_cache.cache_key(model_args, data_args, finetuning_args, rows.splits)
        cache_dir = finetuning_args.ref_logps_cache_dir or args.output_dir
        self._reference_rows = rows
        self._reference_cache = ref_cache.CacheFile.for_key(cache_dir, key, rows.num_rows)
        table = self._reference_cache.load()
        self.reference_table = table if on_every_rank(table is not None) else None
        return rows.train_dataset, rows.eval_dataset

    def _reference_model_for_pass(self, model_args, finetuning_args, args, keep: bool):
        """The separate reference to load when precomputing, or None. The pass needs one only on a cache miss, and
        then only for a given `ref_model` or a resumed full/freeze run (whose policy is no longer the starting
        model); ``keep``: the run needs it after the pass (None for LoRA without `ref_model`: the policy with its
        adapters disabled)."""
        resuming = args.resume_from_checkpoint is not None
        needs_copy = finetuning_args.ref_model is not None or (resuming and finetuning_args.finetuning_type != "lora")
        if (self.reference_table is None and needs_copy) or keep:
            return create_ref_model(model_args, finetuning_args)
        return None

    # --- the reference's forward -------------------------------------------------------------------------

    @torch.no_grad()
    def reference_logits(self, model, inputs) -> tuple[torch.Tensor, int]:
        """The reference's logits of the last ``keep`` positions, and ``keep``.

        Without a ``ref_model`` the reference is the policy with its LoRA adapters disabled, or (only
        in the precompute pass, before the first update) the policy itself. Logits are computed only
        from the position before the batch's first label on: earlier prompt positions predict nothing.
        """
        labels = inputs["labels"]
        keep = positions_to_keep(labels)
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

    # --- the precomputed reference -----------------------------------------------------------------------

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
                results += self._reference_results(batch_rows, batch)
        finally:
            policy.train(was_training)
        return ref_cache.table_from_rows(gather_object(results), rows.num_rows)

    def _prepare_reference_table(self) -> None:
        """Load or compute the table, put it on the device, and release the reference unless the run still needs
        it (``keeps_reference``). Every rank calls it, at the start of training or of an evaluation-only run."""
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
        logger.info_rank0("Released the reference model: the precomputed log-probs stand in for it.")

    # --- the run record ----------------------------------------------------------------------------------

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
