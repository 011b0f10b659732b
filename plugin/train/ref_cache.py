"""Precomputed reference log-probs (``precompute_ref_logps: true``).

The reference is frozen, so ``log π_ref(y|x)`` of every sample can be computed once, before the first
optimizer step, and the reference released. Every row of the train and eval sets gets a global
``dataset_row`` number (a dataset column that LLaMA-Factory's collator turns into a ``[B]`` tensor);
the trainer looks each batch's values up by that number, so shuffling, gradient accumulation,
data-parallel ranks and resume cannot hand a sample another sample's value. Each looked-up value
carries its token count, which is checked against the batch.

A packed row (``neat_packing``) holds several samples: the table keeps one value per labelled
segment, in the order ``losses.sequence_logps`` returns them.

The file ``ref_logps-<key hash>.pt`` in the cache directory is keyed on the reference model (path,
config and weight files), the tokenised datasets (content hash), the template and ``cutoff_len``.
A changed key computes a new file; the full key is stored and compared on load.
"""

import contextlib
import gc
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from .. import __version__
from . import losses

DATASET_ROW_KEY = "dataset_row"
CACHE_FORMAT = 1
CACHE_FILE_PREFIX = "ref_logps-"


# --- the table ------------------------------------------------------------------------------------


@dataclass
class ReferenceTable:
    """Per-sample ``log π_ref(y|x)`` and token counts; the samples of dataset row r are ``offsets[r]:offsets[r+1]``."""

    logps: torch.Tensor  # [S] float32
    num_tokens: torch.Tensor  # [S] int64
    offsets: torch.Tensor  # [R + 1] int64

    def to(self, device) -> "ReferenceTable":
        return ReferenceTable(self.logps.to(device), self.num_tokens.to(device), self.offsets.to(device))

    def _sample_index(self, rows: torch.Tensor) -> torch.Tensor:
        starts = self.offsets[rows]
        counts = self.offsets[rows + 1] - starts
        first_of_row = torch.cumsum(counts, 0) - counts
        position_in_row = torch.arange(int(counts.sum()), device=rows.device) - first_of_row.repeat_interleave(counts)
        return starts.repeat_interleave(counts) + position_in_row

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """The samples of ``rows`` in batch order (as ``losses.sequence_logps`` orders them)."""
        return self.logps[self._sample_index(rows)]

    def check_num_tokens(self, rows: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """Raise if the batch's samples do not have the token counts recorded for these rows."""
        expected = self.num_tokens[self._sample_index(rows)]
        if expected.shape != num_tokens.shape or not torch.equal(expected, num_tokens.to(expected.dtype)):
            raise RuntimeError(
                f"Precomputed reference log-probs do not match the batch of dataset rows {rows.tolist()}: "
                f"token counts {expected.tolist()} recorded, {num_tokens.tolist()} in the batch. The datasets "
                "changed after the cache was keyed; delete the ref_logps-*.pt file and re-run."
            )


# --- the cache key ---------------------------------------------------------------------------------


def _file_identity(path: str) -> list:
    stat = os.stat(path)
    return [os.path.basename(path), os.path.realpath(path), stat.st_size, stat.st_mtime_ns]


def _local_model_dir(name_or_path: str, revision: str | None, cache_dir: str | None) -> str | None:
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "adapter_config.json"):
        found = try_to_load_from_cache(name_or_path, filename, cache_dir=cache_dir, revision=revision or "main")
        if isinstance(found, str):
            return os.path.dirname(found)
    return None


def model_identity(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> dict:
    """Path, config content and every top-level file's (name, real path, size, mtime) of a model or adapter."""
    directory = _local_model_dir(name_or_path, revision, cache_dir)
    if directory is None:
        raise FileNotFoundError(
            f"Cannot key the reference log-probs on `{name_or_path}`: it is neither a local directory nor in the "
            "Hugging Face cache. Give a local path, or load the model once without `precompute_ref_logps`."
        )
    files = sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if not name.startswith(".") and os.path.isfile(os.path.join(directory, name))
    )
    configs = {}
    for name in ("config.json", "adapter_config.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                configs[name] = hashlib.sha256(f.read()).hexdigest()
    return {"path": os.path.realpath(directory), "configs": configs, "files": [_file_identity(f) for f in files]}


def _adapter_list(adapters) -> list[str]:
    if not adapters:
        return []
    return [a.strip() for a in adapters.split(",")] if isinstance(adapters, str) else list(adapters)


def reference_identity(model_args, finetuning_args) -> dict:
    """What the reference is: ``ref_model`` if given, else the starting model (for LoRA, with adapters off)."""
    if finetuning_args.ref_model is not None:
        name, adapters, bits = (
            finetuning_args.ref_model,
            finetuning_args.ref_model_adapters,
            finetuning_args.ref_model_quantization_bit,
        )
        source = "ref_model"
    else:
        name, adapters, bits = (
            model_args.model_name_or_path,
            model_args.adapter_name_or_path,
            model_args.quantization_bit,
        )
        source = "starting model, adapters disabled" if finetuning_args.finetuning_type == "lora" else "starting model"
    revision, cache_dir = model_args.model_revision, model_args.cache_dir
    return {
        "source": source,
        "model": model_identity(name, revision, cache_dir),
        "adapters": [model_identity(a, None, cache_dir) for a in _adapter_list(adapters)],
        "quantization_bit": bits,
        "compute_dtype": str(model_args.compute_dtype),
    }


def dataset_digest(dataset) -> str:
    """Content hash of a tokenised dataset (every column, in row order, honouring an indices mapping)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    digest = hashlib.blake2b(digest_size=20)
    digest.update(str(len(dataset)).encode())
    arrow = dataset.with_format("arrow")
    columns = sorted(name for name in dataset.column_names if name != DATASET_ROW_KEY)
    for start in range(0, len(dataset), 4096):
        table = arrow[start : start + 4096]
        for name in columns:
            column = table.column(name)
            digest.update(name.encode())
            if pa.types.is_list(column.type) and pa.types.is_integer(column.type.value_type):
                digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype("int64").tobytes())
                digest.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).astype("int64").tobytes())
            else:
                digest.update(json.dumps(column.to_pylist(), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(model_args, data_args, finetuning_args, splits: dict) -> dict:
    return {
        "format": CACHE_FORMAT,
        "plugin": __version__,
        "reference": reference_identity(model_args, finetuning_args),
        "template": data_args.template,
        "cutoff_len": data_args.cutoff_len,
        "neat_packing": bool(data_args.neat_packing),
        "datasets": {
            name: {"rows": len(dataset), "content": dataset_digest(dataset)} for name, dataset in splits.items()
        },
    }


def _key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def cache_path(cache_dir: str, key: dict) -> str:
    return os.path.join(cache_dir, CACHE_FILE_PREFIX + hashlib.sha256(_key_text(key).encode()).hexdigest()[:16] + ".pt")


# --- the file ---------------------------------------------------------------------------------------


def load_table(path: str, key: dict, num_rows: int) -> ReferenceTable | None:
    """The table stored at ``path`` for exactly this key, or None (a missing, foreign or broken file)."""
    if not os.path.isfile(path):
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file is recomputed, never trusted
        _logger().warning_rank0(f"Ignoring unreadable reference log-prob cache {path}: {error}")
        return None
    if stored.get("key") != _key_text(key):
        _logger().warning_rank0(f"Ignoring reference log-prob cache {path}: it was written for another key.")
        return None
    table = ReferenceTable(stored["logps"], stored["num_tokens"], stored["offsets"])
    if table.offsets.numel() != num_rows + 1 or int(table.offsets[-1]) != table.logps.numel():
        _logger().warning_rank0(f"Ignoring reference log-prob cache {path}: its shape does not fit the datasets.")
        return None
    return table


def save_table(path: str, key: dict, table: ReferenceTable, seconds: float, cpu_seconds: float = 0.0) -> None:
    """Write atomically: a temporary file in the same directory, renamed over ``path``."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    payload = {
        "key": _key_text(key),
        "logps": table.logps.cpu(),
        "num_tokens": table.num_tokens.cpu(),
        "offsets": table.offsets.cpu(),
        "seconds": torch.tensor(seconds, dtype=torch.float64),  # how long the pass took, for the record
        "cpu_seconds": torch.tensor(cpu_seconds, dtype=torch.float64),
    }
    handle, staging = tempfile.mkstemp(prefix=".tmp-" + CACHE_FILE_PREFIX, dir=directory)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)
        raise


# --- the one-off pass ------------------------------------------------------------------------------


def number_rows(train_dataset, eval_dataset, with_eval: bool):
    """Give every row of the train and eval sets a global ``dataset_row``; returns the new sets and
    ``{split name: dataset}`` in row order (the sets without the column, as they were tokenised)."""
    from datasets import Dataset

    splits = {}
    if train_dataset is not None:
        splits["train"] = train_dataset
    if eval_dataset is not None and with_eval:
        if isinstance(eval_dataset, dict):
            splits.update({f"eval_{name}": dataset for name, dataset in eval_dataset.items()})
        else:
            splits["eval"] = eval_dataset
    for name, dataset in splits.items():
        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"`precompute_ref_logps: true` needs map-style datasets; the {name} set is a "
                f"{type(dataset).__name__} (turn off `streaming`)."
            )
        if DATASET_ROW_KEY in dataset.column_names:
            raise ValueError(
                f"The {name} set already has a `{DATASET_ROW_KEY}` column, which precompute_ref_logps uses."
            )

    numbered, start = {}, 0
    for name, dataset in splits.items():
        numbered[name] = dataset.add_column(DATASET_ROW_KEY, list(range(start, start + len(dataset))))
        start += len(dataset)
    new_train = numbered.get("train", train_dataset)
    if not with_eval or eval_dataset is None:
        new_eval = eval_dataset
    elif isinstance(eval_dataset, dict):
        new_eval = {name: numbered[f"eval_{name}"] for name in eval_dataset}
    else:
        new_eval = numbered["eval"]
    return new_train, new_eval, splits


def _rows_of_this_rank(lengths: list[int], rank: int, world: int) -> list[int]:
    """Longest first (so an out-of-memory shows at once, and batches hold similar lengths), strided over
    ranks, padded with repeats so that every rank runs the same number of forwards (ZeRO-3 needs that)."""
    order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
    if not order:
        return []
    mine = order[rank::world]
    per_rank = -(-len(order) // world)
    return mine + [mine[-1] if mine else order[0]] * (per_rank - len(mine))


@torch.no_grad()
def compute_table(trainer, model, splits: dict) -> ReferenceTable:
    """One batched, no-grad forward of the reference over every row; each rank takes a share of the
    rows and every rank receives all of them."""
    from accelerate.utils import gather_object

    sources = [(dataset, index) for dataset in splits.values() for index in range(len(dataset))]
    lengths = [
        length
        for dataset in splits.values()
        for length in dataset.with_format("arrow")["input_ids"].combine_chunks().value_lengths().to_pylist()
    ]
    accelerator = trainer.accelerator
    rows = _rows_of_this_rank(lengths, accelerator.process_index, accelerator.num_processes)
    batch_size = trainer.args.per_device_eval_batch_size
    results = []
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start : start + batch_size]
        features = [dict(sources[row][0][sources[row][1]]) for row in batch_rows]
        batch = trainer._prepare_inputs(trainer.data_collator(features))
        logps, num_tokens = trainer.reference_forward(model, batch)
        segment_ids = trainer._segment_ids(batch)
        counts = [
            int(
                losses.count_samples(
                    batch["labels"][i : i + 1], None if segment_ids is None else segment_ids[i : i + 1]
                )
            )
            for i in range(len(batch_rows))
        ]
        logps, num_tokens = logps.float().cpu().tolist(), num_tokens.cpu().tolist()
        first = 0
        for row, count in zip(batch_rows, counts):
            results.append((row, logps[first : first + count], num_tokens[first : first + count]))
            first += count

    by_row = {row: (row_logps, row_tokens) for row, row_logps, row_tokens in gather_object(results)}
    if sorted(by_row) != list(range(len(sources))):
        raise RuntimeError(f"Reference pass covered {len(by_row)} of {len(sources)} dataset rows.")
    counts = [len(by_row[row][0]) for row in range(len(sources))]
    return ReferenceTable(
        logps=torch.tensor([value for row in range(len(sources)) for value in by_row[row][0]], dtype=torch.float32),
        num_tokens=torch.tensor([value for row in range(len(sources)) for value in by_row[row][1]], dtype=torch.long),
        offsets=torch.tensor([0] + counts, dtype=torch.long).cumsum(0),
    )


# --- wiring for MinorSFTTrainer ---------------------------------------------------------------------


def _logger():
    from llamafactory.extras import logging

    # Under LLaMA-Factory's library logger, so that its handlers (console, LLaMA-Board) show the lines.
    return logging.get_logger("llamafactory." + __name__)


def _on_every_rank(flag: bool) -> bool:
    """True only if ``flag`` is true on every data-parallel rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    from accelerate import PartialState

    value = torch.tensor(int(flag), device=PartialState().device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


class PrecomputedReference:
    """The trainer's handle on the precomputed reference: datasets with row numbers, the cache file,
    and the table once loaded or computed."""

    def __init__(self, model_args, data_args, finetuning_args, training_args, train_dataset, eval_dataset):
        with_eval = not training_args.predict_with_generate  # generation computes no loss, needs no reference
        with_train = training_args.do_train  # LLaMA-Factory loads `dataset` for evaluation-only runs too
        self.train_dataset, self.eval_dataset, self.splits = number_rows(
            train_dataset if with_train else None, eval_dataset, with_eval
        )
        if not with_train:
            self.train_dataset = train_dataset
        self.key = cache_key(model_args, data_args, finetuning_args, self.splits)
        cache_dir = finetuning_args.ref_logps_cache_dir or training_args.output_dir
        self.path = cache_path(cache_dir, self.key)
        self.num_rows = sum(len(dataset) for dataset in self.splits.values())
        table = load_table(self.path, self.key, self.num_rows)
        self.table: ReferenceTable | None = table if _on_every_rank(table is not None) else None
        self.computed_seconds: float | None = None
        self.computed_cpu_seconds: float | None = None
        self.ready = False  # the table is on the training device and the reference is released

    def needs_reference_copy(self, finetuning_args, resuming: bool) -> bool:
        """Whether a separate reference model must be loaded: a cache miss with a given ``ref_model``, or
        a resumed full/freeze run, whose policy is no longer the starting model."""
        if self.table is not None:
            return False
        return finetuning_args.ref_model is not None or (resuming and finetuning_args.finetuning_type != "lora")

    def ensure(self, trainer, model) -> None:
        """Load or compute the table (a collective on multi-rank runs), then release the reference unless the
        trainer's loss still runs it every step (ASFT)."""
        if self.ready:
            return
        if self.table is None:
            started, started_cpu = time.perf_counter(), time.process_time()
            policy = trainer.accelerator.unwrap_model(model)
            was_training = policy.training
            policy.eval()
            try:
                table = compute_table(trainer, model, self.splits)
            finally:
                policy.train(was_training)
            self.computed_seconds = time.perf_counter() - started
            cpu_seconds = self.computed_cpu_seconds = time.process_time() - started_cpu
            if trainer.accelerator.is_main_process:
                save_table(self.path, self.key, table, self.computed_seconds, cpu_seconds)
            trainer.accelerator.wait_for_everyone()
            num_tokens = int(table.num_tokens.sum())
            _logger().info_rank0(
                f"Computed reference log-probs of {table.logps.numel()} samples ({num_tokens} label tokens) in "
                f"{self.computed_seconds:.1f} s ({cpu_seconds:.1f} s CPU time on rank 0) on "
                f"{trainer.accelerator.num_processes} rank(s); saved to {self.path}."
            )
            self.table = table
        else:
            _logger().info_rank0(f"Loaded reference log-probs of {self.table.logps.numel()} samples from {self.path}.")
        self.table = self.table.to(trainer.args.device)
        if not trainer.keeps_reference:
            release_reference(trainer)
        self.ready = True

    def record(self) -> dict:
        """This run's reference pass, for ``minorsft_run.json``."""
        computed = self.computed_seconds is not None
        return {
            "mode": "precomputed",
            "pass": "computed" if computed else "loaded" if self.ready else None,
            "seconds": self.computed_seconds,
            "cpu_seconds": self.computed_cpu_seconds,
            "cache_file": os.path.abspath(self.path),
        }

    def lookup(self, inputs) -> torch.Tensor:
        if not self.ready or DATASET_ROW_KEY not in inputs:
            raise RuntimeError(
                "`precompute_ref_logps: true` covers only the train and eval sets given to the trainer at start; "
                "this batch has no precomputed reference log-probs."
            )
        return self.table.lookup(inputs[DATASET_ROW_KEY])

    def check_num_tokens(self, inputs, num_tokens: torch.Tensor) -> None:
        self.table.check_num_tokens(inputs[DATASET_ROW_KEY], num_tokens)


def release_reference(trainer) -> None:
    """Drop the reference model (also from the accelerator's list of prepared models) and its memory."""
    reference = trainer.ref_model
    if reference is None:
        return
    trainer.ref_model = None
    trainer.accelerator._models[:] = [m for m in trainer.accelerator._models if m is not reference]
    del reference
    gc.collect()
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache()


class PrecomputeOnTrainBegin(TrainerCallback):
    """Runs the one-off pass once the model is prepared (DDP/DeepSpeed) and before the first update."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.prepare_precomputed_reference()
