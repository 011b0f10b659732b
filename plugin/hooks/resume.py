"""Re-running a killed job: the same command, on the half-finished ``output_dir``, finishes the job.

With ``overwrite_output_dir: false`` LLaMA-Factory resumes from the newest ``checkpoint-N`` it finds
(``get_last_checkpoint``), whether or not its save was finished. A kill during a save leaves the weights without
the optimizer state and ``trainer_state.json`` (the Trainer writes that last), and the re-run then stops with a
``FileNotFoundError``, or, where only the optimizer state is missing, resumes silently with a fresh optimizer.
For the plugin's runs (``arguments.sets_plugin_keys``) such a checkpoint is moved aside to
``incomplete-checkpoint-N`` before LLaMA-Factory looks, so it picks the last complete one, or starts afresh when
there is none; an incomplete ``resume_from_checkpoint`` is refused. The steps after the checkpoint run again, and
their lines in ``trainer_log.jsonl``, written before the kill, are dropped so that each step is logged once.
"""

import json
import os

from ..errors import UsageError
from ..files import write_text_atomically

INCOMPLETE_PREFIX = "incomplete-"


def checkpoint_problem(checkpoint: str, save_only_model: bool) -> str | None:
    """Why the Trainer cannot resume from ``checkpoint`` as it was saved, or None when it can."""
    from llamafactory.extras.constants import CHECKPOINT_NAMES
    from transformers.trainer import (
        FSDP_MODEL_NAME,
        OPTIMIZER_NAME,
        OPTIMIZER_NAME_BIN,
        SCHEDULER_NAME,
        TRAINER_STATE_NAME,
    )

    if not os.path.isdir(checkpoint):
        return "it is not a folder"
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
            json.load(f)
    except FileNotFoundError:
        return f"it has no {TRAINER_STATE_NAME} (the Trainer writes it last: its save was cut short)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"its {TRAINER_STATE_NAME} is cut short"
    names = set(os.listdir(checkpoint))
    folders = {name for name in names if os.path.isdir(os.path.join(checkpoint, name))}
    # DeepSpeed keeps the weights and the optimizer state in global_step<N>/; sharded FSDP in pytorch_model_fsdp_0/
    # and optimizer_0/.
    deepspeed = any(name.startswith("global_step") for name in folders)
    fsdp = any(name.startswith(FSDP_MODEL_NAME) for name in folders)
    if not (deepspeed or fsdp or _has_weights(checkpoint, names & CHECKPOINT_NAMES)):
        return "it has no weights file"
    if save_only_model or deepspeed:
        return None
    if not ({OPTIMIZER_NAME, OPTIMIZER_NAME_BIN} & names or any("optimizer" in name for name in folders)):
        return f"it has no optimizer state ({OPTIMIZER_NAME})"
    if SCHEDULER_NAME not in names:
        return f"it has no {SCHEDULER_NAME}"
    return None


def _has_weights(checkpoint: str, weight_files: set) -> bool:
    """A weights file, or an index whose shards are all there."""
    for name in weight_files:
        if not name.endswith(".index.json"):
            return True
        try:
            with open(os.path.join(checkpoint, name), encoding="utf-8") as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError):
            continue
        if all(os.path.isfile(os.path.join(checkpoint, shard)) for shard in shards):
            return True
    return False


def prepare_resume(training_args) -> None:
    """Before LLaMA-Factory picks the checkpoint to resume from (``get_train_args``): refuse an incomplete
    ``resume_from_checkpoint``, or move aside the newest checkpoints that are incomplete."""
    if not training_args.do_train:
        return
    checkpoint = training_args.resume_from_checkpoint
    if isinstance(checkpoint, str):
        problem = checkpoint_problem(checkpoint, training_args.save_only_model)
        if problem:
            raise UsageError(
                f"`resume_from_checkpoint: {checkpoint}` cannot be resumed: {problem}. Give an earlier checkpoint-N, "
                "or drop the key: with `overwrite_output_dir: false` the run resumes from the last complete one."
            )
        return
    # LLaMA-Factory's own conditions for picking a checkpoint itself.
    if checkpoint is None and not training_args.overwrite_output_dir and os.path.isdir(training_args.output_dir):
        set_aside_incomplete_checkpoints(training_args.output_dir, training_args.save_only_model)


def set_aside_incomplete_checkpoints(output_dir: str, save_only_model: bool) -> None:
    """Move every checkpoint that LLaMA-Factory would pick before the newest complete one to
    ``incomplete-checkpoint-N``; it is left there for the user to delete."""
    from transformers.trainer_utils import get_last_checkpoint

    while (checkpoint := get_last_checkpoint(output_dir)) is not None:
        try:
            problem = checkpoint_problem(checkpoint, save_only_model)
        except FileNotFoundError:  # moved by another rank of this run while it was looked at
            continue
        if problem is None:
            return
        target = _unused_name(os.path.join(output_dir, INCOMPLETE_PREFIX + os.path.basename(checkpoint)))
        try:
            os.rename(checkpoint, target)
        except FileNotFoundError:  # another rank of this run moved it first
            continue
        except OSError as error:
            raise UsageError(
                f"`output_dir: {output_dir}`: {checkpoint} cannot be resumed ({problem}) and cannot be moved aside "
                f"({error.strerror}); delete it and re-run."
            ) from None
        _logger().warning_rank0(
            f"Not resuming from {checkpoint}: {problem}. Moved it to {target}; delete that when you like."
        )


def _unused_name(path: str) -> str:
    candidate, number = path, 1
    while os.path.exists(candidate):
        number += 1
        candidate = f"{path}.{number}"
    return candidate


def drop_replayed_log_lines(training_args) -> None:
    """When resuming from checkpoint-N: keep the lines of ``trainer_log.jsonl`` that LLaMA-Factory's ``LogCallback``
    wrote up to step N, as many at step N as the checkpoint's log history has entries there; drop the later ones
    (their steps run again, and log again) and a line a kill cut short."""
    from llamafactory.extras.constants import TRAINER_LOG
    from transformers.trainer import TRAINER_STATE_NAME

    checkpoint = training_args.resume_from_checkpoint
    log_path = os.path.join(training_args.output_dir, TRAINER_LOG)
    if not isinstance(checkpoint, str) or not training_args.should_save or not os.path.isfile(log_path):
        return
    with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
        state = json.load(f)
    step = state["global_step"]
    left_at_step = sum(1 for entry in state["log_history"] if entry.get("step") == step)
    with open(log_path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            entry = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            continue
        logged_at = entry.get("current_steps")
        if logged_at is None or logged_at < step:
            kept.append(line)
        elif logged_at == step and left_at_step > 0:
            kept.append(line)
            left_at_step -= 1
    if len(kept) < len(lines):
        write_text_atomically(log_path, "".join(kept))
        _logger().info_rank0(
            f"Dropped {len(lines) - len(kept)} line(s) of {log_path} written after step {step}: those steps run again."
        )


def _logger():
    from llamafactory.extras import logging

    return logging.get_logger("llamafactory." + __name__)
