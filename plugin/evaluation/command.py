"""``minorsft eval``: arguments, the checks made before any work (data included), and the run."""

import argparse
import time

from .data import DataError, load_split, resolve_data_root, stratified_sample
from .results import check_output_dir, summarize, write_outputs
from .tasks import DefinitionError, available_tasks, load_prompt, load_task

DEFAULT_BATCH_SIZE = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=available_tasks())
    parser.add_argument("--split", help="the split to score (default: the task's answered split: ceval val, "
                        "fineval val, financeiq test)")
    parser.add_argument("--data_dir", help="a local folder of the benchmark's CSV files, or a Hub dataset id "
                        "(default: the task's Hub id)")
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--adapter_name_or_path", help="LoRA adapter(s), comma-separated, applied on the model")
    parser.add_argument("--template", help="LLaMA-Factory template the model was trained with (default: parsed "
                        "from the tokenizer's chat template)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    parser.add_argument("--subjects", type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
                        help="comma-separated subject keys or names (default: all)")
    parser.add_argument("--max_samples", type=int, help="at most this many questions in total, drawn "
                        "stratified across subjects")
    parser.add_argument("--seed", type=int, default=42, help="seed of the --max_samples draw")
    parser.add_argument("--n_shot", type=int, default=0, help="examples from the dev split before each question")
    parser.add_argument("--mode", choices=["logits", "generate"], default="logits")
    parser.add_argument("--prompt", default="paper", help="`paper` or a prompt file (see evaluation/README.md)")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--device", default="auto", help="auto (accelerate places the model), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="auto: bf16 where supported, else fp16, else fp32 (LLaMA-Factory's rule)")
    parser.add_argument("--padding_side", choices=["left", "right"], default="left",
                        help="logits mode only; generation always pads on the left")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="generate mode: reply length limit")
    parser.add_argument("--skip_bad_rows", action="store_true",
                        help="leave malformed rows out (counted in results.json) instead of stopping")


def run(args: argparse.Namespace) -> int:
    try:
        task, split, subjects, prompt = _check_arguments(args)
        questions, shots, skipped = _load_questions(args, task, split, subjects)
    except (DefinitionError, DataError, FileExistsError) as err:
        raise SystemExit(f"minorsft eval: {err}")

    from .checkpoint import load_checkpoint, load_tokenizer_and_template
    from .pipeline import encode_questions, predict
    from .scoring import choice_token_ids

    tokenizer, template, loader_args = load_tokenizer_and_template(args)
    try:
        choice_ids = choice_token_ids(template, tokenizer)
    except ValueError as err:
        raise SystemExit(f"minorsft eval: --template {args.template}: {err}")
    encoded = encode_questions(template, tokenizer, questions, shots, prompt, task)
    model = load_checkpoint(tokenizer, loader_args)
    started = time.perf_counter()
    predictions = predict(model, tokenizer, template, questions, encoded, choice_ids, args.mode, args.batch_size,
                          args.padding_side, args.max_new_tokens)
    seconds = time.perf_counter() - started
    run_info = {
        "model_name_or_path": args.model_name_or_path,
        "adapter_name_or_path": args.adapter_name_or_path,
        "template": args.template,
        "data_dir": args.data_dir or task.hub_id,
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
    write_outputs(args.output_dir, results, predictions, args.overwrite)
    print(f"{task.key} {split}: accuracy {results['accuracy']:.4f} on {results['num_questions']} questions "
          f"({results['questions_per_second']:.2f} questions/s); results in {args.output_dir}")
    return 0


def _check_arguments(args: argparse.Namespace) -> tuple:
    task = load_task(args.task)
    split = args.split or task.splits[0]
    task.check_split(split)
    for name in ("batch_size", "max_new_tokens", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DefinitionError(f"--{name} must be at least 1 (got {value})")
    if args.n_shot < 0:
        raise DefinitionError(f"--n_shot must not be negative (got {args.n_shot})")
    check_output_dir(args.output_dir, args.overwrite)
    return task, split, task.select_subjects(args.subjects), load_prompt(args.prompt, task)


def _load_questions(args: argparse.Namespace, task, split: str, subjects: list) -> tuple:
    """The sampled questions in subject order, each subject's first ``n_shot`` dev examples, skipped rows."""
    skipped = [] if args.skip_bad_rows else None
    root = resolve_data_root(task, args.data_dir, split, subjects[0])
    by_subject = stratified_sample(load_split(task, root, split, subjects, skipped), args.max_samples, args.seed)
    shots = {subject: [] for subject in subjects}
    if args.n_shot:
        dev = load_split(task, root, task.few_shot_split, subjects, skipped)
        for subject, examples in dev.items():
            if len(examples) < args.n_shot:
                raise DataError(f"--n_shot {args.n_shot}: subject {subject} has {len(examples)} usable "
                                f"{task.few_shot_split} examples")
            shots[subject] = examples[: args.n_shot]
    questions = [question for items in by_subject.values() for question in items]
    if not questions:
        raise DataError(f"no questions left to evaluate in {task.key} {split}")
    return questions, shots, skipped or []
