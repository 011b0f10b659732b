"""``minorsft eval``: arguments, the checks made before any work (data included), and the run."""

import argparse
import json
import os
import sys
import time

from ..errors import Unreachable, UsageError
from ..files import add_overwrite_argument, checked_output_dir, local_path_or_hub_id, local_paths_or_hub_ids
from .checkpoint import add_device_and_dtype_arguments
from .data import ENV_DATA_DIR, load_split, resolve_source, stratified_sample
from .results import summarize, write_outputs
from .tasks import available_tasks, load_prompt, load_task

DEFAULT_BATCH_SIZE = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        required=True,
        help=f"a built-in task ({', '.join(available_tasks())}) or the path "
        "of a task file (its prompt file next to it; see evaluation/README.md)",
    )
    parser.add_argument(
        "--split",
        help="the split to score (default: the task's answered split: ceval val, fineval val, financeiq test)",
    )
    parser.add_argument(
        "--data_dir",
        help=f"a local folder of the benchmark's files, or a Hub dataset id (default: "
        f"${ENV_DATA_DIR}/<the task's local_folder> if that exists, else the task's Hub repository)",
    )
    parser.add_argument(
        "--check_data",
        action="store_true",
        help="only find and read the data (no model): print "
        "one line; exit 0 if usable, 3 if it cannot be reached, 2 if malformed",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="with --check_data: print the answer as one JSON object instead (status usable, unreachable or "
        "bad_input; message; the counts of questions and subjects)",
    )
    parser.add_argument("--model_name_or_path", help="required unless --check_data")
    parser.add_argument("--adapter_name_or_path", help="LoRA adapter(s), comma-separated, applied on the model")
    parser.add_argument(
        "--template",
        help="LLaMA-Factory template the model was trained with (default: parsed from the tokenizer's chat template)",
    )
    parser.add_argument("--output_dir", help="required unless --check_data")
    add_overwrite_argument(parser)
    parser.add_argument(
        "--subjects",
        type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
        help="comma-separated subject keys or names (default: all)",
    )
    parser.add_argument(
        "--max_samples", type=int, help="at most this many questions in total, drawn stratified across subjects"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the --max_samples draw")
    parser.add_argument("--n_shot", type=int, default=0, help="examples from the dev split before each question")
    parser.add_argument("--mode", choices=["logits", "generate"], default="logits")
    parser.add_argument("--prompt", default="paper", help="`paper` or a prompt file (see evaluation/README.md)")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    add_device_and_dtype_arguments(parser, "auto: bf16 where supported, else fp16, else fp32 (LLaMA-Factory's rule)")
    parser.add_argument(
        "--padding_side",
        choices=["left", "right"],
        default="left",
        help="logits mode only; generation always pads on the left",
    )
    parser.add_argument("--max_new_tokens", type=int, default=32, help="generate mode: reply length limit")
    parser.add_argument(
        "--skip_bad_rows",
        action="store_true",
        help="leave malformed rows out (counted in results.json) instead of stopping",
    )


def run(args: argparse.Namespace) -> int:
    try:
        task, split, subjects, prompt, output_dir = _check_arguments(args)
        source, questions, shots, skipped, missing = _load_questions(args, task, split, subjects)
    except UsageError as error:
        if args.check_data and args.json:
            _print_json(status="unreachable" if isinstance(error, Unreachable) else "bad_input", error=error)
        raise
    if missing:
        print(
            f"minorsft eval: {source.description} holds {len(subjects) - len(missing)} of the {len(subjects)} "
            f"{task.key} subjects; evaluating those (missing: {', '.join(missing)})",
            file=sys.stderr,
        )
    if args.check_data:
        examples = sum(map(len, shots.values()))
        shots_note = f", {examples} {task.few_shot_split} examples" if args.n_shot else ""
        line = (
            f"{task.key} {split}: {len(questions)} questions{shots_note} in {len(subjects) - len(missing)} of "
            f"{len(subjects)} subjects from {source.description}"
        )
        if not args.json:
            print(line)
            return 0
        _print_json(
            status="usable",
            message=line,
            task=task.key,
            split=split,
            questions=len(questions),
            few_shot_examples=examples,
            subjects=len(subjects) - len(missing),
            subjects_asked=len(subjects),
            missing_subjects=missing,
            source=source.description,
        )
        return 0

    # After the data (a bad data file is named even when the model path is wrong too), before the model loads.
    model_name_or_path = local_path_or_hub_id(args.model_name_or_path, "--model_name_or_path")
    adapter_name_or_path = (
        local_paths_or_hub_ids(args.adapter_name_or_path, "--adapter_name_or_path")
        if args.adapter_name_or_path
        else None
    )

    from .checkpoint import check_hub_model, load_checkpoint, load_tokenizer_and_template

    if not os.path.exists(model_name_or_path):
        check_hub_model(model_name_or_path, "--model_name_or_path")
    for adapter in (adapter_name_or_path or "").split(","):
        if adapter and not os.path.exists(adapter):
            check_hub_model(adapter, "--adapter_name_or_path", "adapter_config.json")
    from .pipeline import encode_questions, predict
    from .scoring import choice_token_ids

    tokenizer, template, loader_args = load_tokenizer_and_template(
        model_name_or_path, adapter_name_or_path, args.template, args.dtype, args.device
    )
    try:
        choice_ids = choice_token_ids(template, tokenizer)
    except ValueError as err:
        raise UsageError(f"--template {args.template}: {err}") from None
    encoded = encode_questions(template, tokenizer, questions, shots, prompt, task)
    model = load_checkpoint(tokenizer, loader_args)
    started = time.perf_counter()
    predictions = predict(
        model,
        tokenizer,
        template,
        questions,
        encoded,
        choice_ids,
        args.mode,
        args.batch_size,
        args.padding_side,
        args.max_new_tokens,
    )
    seconds = time.perf_counter() - started
    run_info = {
        "model_name_or_path": model_name_or_path,
        "adapter_name_or_path": adapter_name_or_path,
        "template": args.template,
        "data_dir": source.description,
        "missing_subjects": missing,
        "mode": args.mode,
        "prompt": args.prompt,
        "n_shot": args.n_shot,
        "max_samples": args.max_samples,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "dtype": str(model.dtype).replace("torch.", ""),
        "seconds": round(seconds, 3),
        "questions_per_second": round(len(predictions) / seconds, 3),
        "num_skipped_rows": len(skipped),
        "skipped_rows": skipped,
    }
    results = summarize(task, split, predictions, run_info)
    write_outputs(output_dir, results, predictions, args.overwrite)
    print(
        f"{task.key} {split}: accuracy {results['accuracy']:.4f} on {results['num_questions']} questions "
        f"({results['questions_per_second']:.2f} questions/s); results in {output_dir}"
    )
    return 0


def _print_json(status: str, error: UsageError | None = None, **fields) -> None:
    """``--check_data --json``: the answer as one JSON object on stdout. ``status`` goes with the exit status:
    usable 0, bad_input 2, unreachable 3 (the sweep does without unreachable data, and stops on bad input)."""
    if error is not None:
        fields = {"message": str(error), "reason": error.reason, **fields}
    print(json.dumps({"status": status, **fields}, ensure_ascii=False))


def _check_arguments(args: argparse.Namespace) -> tuple:
    """(task, split, subjects, prompt, output_dir); output_dir is None with --check_data."""
    if args.json and not args.check_data:
        raise UsageError("--json goes with --check_data")
    if not args.check_data:
        absent = [f"--{name}" for name in ("model_name_or_path", "output_dir") if not getattr(args, name)]
        if absent:
            raise UsageError(f"{' and '.join(absent)} required (except with --check_data)")
    task = load_task(args.task)
    split = args.split or task.splits[0]
    task.check_split(split)
    for name in ("batch_size", "max_new_tokens", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1 (got {value})")
    if args.n_shot < 0:
        raise UsageError(f"--n_shot must not be negative (got {args.n_shot})")
    output_dir = None if args.check_data else checked_output_dir(args.output_dir, args.overwrite)
    return task, split, task.select_subjects(args.subjects), load_prompt(args.prompt, task), output_dir


def _load_questions(args: argparse.Namespace, task, split: str, subjects: list) -> tuple:
    """The data source, the sampled questions in subject order, each subject's first ``n_shot`` dev examples,
    skipped rows, and the subjects that a local folder lacks (only when --subjects was not given)."""
    skipped = [] if args.skip_bad_rows else None
    source = resolve_source(task, args.data_dir, split)
    # A local folder may hold some of the subjects (a partial copy, the test fixtures); subjects asked for by
    # name must all be there.
    missing = [] if args.subjects else [subject for subject in subjects if not source.has(subject, split)]
    present = [subject for subject in subjects if subject not in missing]
    if not present:
        raise UsageError(f"{source.description}: no {split} file of the subjects {', '.join(subjects)}")
    by_subject = stratified_sample(load_split(task, source, split, present, skipped), args.max_samples, args.seed)
    shots = {subject: [] for subject in present}
    if args.n_shot:
        dev = load_split(task, source, task.few_shot_split, present, skipped)
        for subject, examples in dev.items():
            if len(examples) < args.n_shot:
                raise UsageError(
                    f"--n_shot {args.n_shot}: subject {subject} has {len(examples)} usable "
                    f"{task.few_shot_split} examples"
                )
            shots[subject] = examples[: args.n_shot]
    questions = [question for items in by_subject.values() for question in items]
    if not questions:
        raise UsageError(f"no questions left to evaluate in {task.key} {split}")
    return source, questions, shots, skipped or [], missing
