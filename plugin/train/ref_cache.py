"""Precomputed reference log-probs (``precompute_ref_logps: true``): the table, its file, and the rows.

The reference is frozen, so ``log π_ref(y|x)`` of every sample can be computed once, before the first
optimizer step, and the reference released. The pass itself is ``ReferenceMixin.compute_reference_table``
(``reference.py``); this module holds only data and files, and calls neither the trainer nor the model.

Every row of the train and eval sets gets a global ``dataset_row`` number (a dataset column that
LLaMA-Factory's collator turns into a ``[B]`` tensor); the trainer looks each batch's values up by that
number, so shuffling, gradient accumulation, data-parallel ranks and resume cannot hand a sample another
sample's value. Each looked-up value carries its token count, which is checked against the batch.

A packed row (``neat_packing``) holds several samples: the table keeps one value per labelled
segment, in the order ``losses.sequence_logps`` returns them. A preference pair (``stage: dpo``) holds two: its
chosen response, then its rejected one.

The file ``ref_logps-<key hash>.pt`` in the cache directory is keyed on the reference model (path,
config and weight files), the tokenised datasets (content hash), the template and ``cutoff_len``.
A changed key computes a new file; the full key is stored and compared on load.
"""

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import torch

from .. import __version__
from ..errors import Unreachable, UsageError

DATASET_ROW_KEY = "dataset_row"
CACHE_FORMAT = 1
CACHE_FILE_PREFIX = "ref_logps-"
# The token columns of a row: one sequence (SFT) or a preference pair (LLaMA-Factory's pairwise rows).
TOKEN_COLUMNS = ("input_ids", "chosen_input_ids", "rejected_input_ids")


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
        raise Unreachable(
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


@dataclass(frozen=True)
class CacheFile:
    """``ref_logps-<key hash>.pt`` in a cache directory: the table of exactly one key."""

    path: str
    key: dict
    num_rows: int

    @classmethod
    def for_key(cls, cache_dir: str, key: dict, num_rows: int) -> "CacheFile":
        return cls(cache_path(cache_dir, key), key, num_rows)

    def load(self) -> ReferenceTable | None:
        """The stored table, or None for a missing, foreign or broken file (recomputed, never trusted)."""
        if not os.path.isfile(self.path):
            return None
        try:
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            _logger().warning_rank0(f"Ignoring unreadable reference log-prob cache {self.path}: {error}")
            return None
        if stored.get("key") != _key_text(self.key):
            _logger().warning_rank0(f"Ignoring reference log-prob cache {self.path}: it was written for another key.")
            return None
        table = ReferenceTable(stored["logps"], stored["num_tokens"], stored["offsets"])
        if table.offsets.numel() != self.num_rows + 1 or int(table.offsets[-1]) != table.logps.numel():
            _logger().warning_rank0(
                f"Ignoring reference log-prob cache {self.path}: its shape does not fit the datasets."
            )
            return None
        return table

    def save(self, table: ReferenceTable, seconds: float, cpu_seconds: float) -> None:
        """Write atomically: a temporary file in the same directory, renamed over ``path``."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        payload = {
            "key": _key_text(self.key),
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
            os.replace(staging, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(staging)
            raise


# --- the rows ---------------------------------------------------------------------------------------


@dataclass
class NumberedRows:
    """The train and eval sets given to the trainer, with a global ``dataset_row`` column; ``splits`` holds
    the sets that have rows in the table (as they were tokenised, without the column), in row order."""

    train_dataset: object
    eval_dataset: object
    splits: dict

    @property
    def num_rows(self) -> int:
        return sum(len(dataset) for dataset in self.splits.values())

    def lengths(self) -> list[int]:
        """Token count of every row, in row order (of a preference pair: its chosen and rejected sequence)."""
        lengths = []
        for dataset in self.splits.values():
            arrow = dataset.with_format("arrow")
            columns = [name for name in TOKEN_COLUMNS if name in dataset.column_names]
            per_column = [arrow[name].combine_chunks().value_lengths().to_pylist() for name in columns]
            lengths += [sum(row) for row in zip(*per_column)]
        return lengths

    def features(self, row: int) -> dict:
        """Row ``row`` as the collator takes it."""
        for dataset in self.splits.values():
            if row < len(dataset):
                return dict(dataset[row])
            row -= len(dataset)
        raise IndexError(f"dataset row {row} is past the last row")


def number_rows(train_dataset, eval_dataset, with_train: bool = True, with_eval: bool = True) -> NumberedRows:
    """Give every row of the train set (if ``with_train``) and the eval sets (if ``with_eval``) a global
    ``dataset_row``; a set left out is passed through unchanged."""
    from datasets import Dataset

    splits = {}
    if train_dataset is not None and with_train:
        splits["train"] = train_dataset
    if eval_dataset is not None and with_eval:
        if isinstance(eval_dataset, dict):
            splits.update({f"eval_{name}": dataset for name, dataset in eval_dataset.items()})
        else:
            splits["eval"] = eval_dataset
    for name, dataset in splits.items():
        if not isinstance(dataset, Dataset):
            raise UsageError(
                f"`precompute_ref_logps: true` needs map-style datasets; the {name} set is a "
                f"{type(dataset).__name__} (turn off `streaming`)."
            )
        if DATASET_ROW_KEY in dataset.column_names:
            raise UsageError(
                f"The {name} set already has a `{DATASET_ROW_KEY}` column, which precompute_ref_logps uses."
            )

    numbered, start = {}, 0
    for name, dataset in splits.items():
        numbered[name] = dataset.add_column(DATASET_ROW_KEY, list(range(start, start + len(dataset))))
        start += len(dataset)
    new_train = numbered.get("train", train_dataset)
    if "eval" in numbered:
        new_eval = numbered["eval"]
    elif isinstance(eval_dataset, dict) and with_eval:
        new_eval = {name: numbered[f"eval_{name}"] for name in eval_dataset}
    else:
        new_eval = eval_dataset
    return NumberedRows(new_train, new_eval, splits)


def rows_of_this_rank(lengths: list[int], rank: int, world: int) -> list[int]:
    """Longest first (so an out-of-memory shows at once, and batches hold similar lengths), strided over
    ranks, padded with repeats so that every rank runs the same number of forwards (ZeRO-3 needs that)."""
    order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
    if not order:
        return []
    mine = order[rank::world]
    per_rank = -(-len(order) // world)
    return mine + [mine[-1] if mine else order[0]] * (per_rank - len(mine))


def split_by_row(rows: list[int], samples_per_row: list[int], logps: list, num_tokens: list) -> list[tuple]:
    """A batch's per-sample values (in batch order) as ``(row, logps, num_tokens)``, one entry per row."""
    results, first = [], 0
    for row, count in zip(rows, samples_per_row):
        results.append((row, logps[first : first + count], num_tokens[first : first + count]))
        first += count
    return results


def table_from_rows(results: list[tuple], num_rows: int) -> ReferenceTable:
    """The table from ``(row, logps, num_tokens)`` entries gathered over all ranks (a repeated row is
    the same row again); every one of ``num_rows`` rows must be there."""
    by_row = {row: (row_logps, row_tokens) for row, row_logps, row_tokens in results}
    if sorted(by_row) != list(range(num_rows)):
        raise RuntimeError(f"Reference pass covered {len(by_row)} of {num_rows} dataset rows.")
    counts = [len(by_row[row][0]) for row in range(num_rows)]
    return ReferenceTable(
        logps=torch.tensor([value for row in range(num_rows) for value in by_row[row][0]], dtype=torch.float32),
        num_tokens=torch.tensor([value for row in range(num_rows) for value in by_row[row][1]], dtype=torch.long),
        offsets=torch.tensor([0] + counts, dtype=torch.long).cumsum(0),
    )


def _logger():
    from llamafactory.extras import logging

    # Under LLaMA-Factory's library logger, so that its handlers (console, LLaMA-Board) show the lines.
    return logging.get_logger("llamafactory." + __name__)
