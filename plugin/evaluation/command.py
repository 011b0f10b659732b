"""``minorsft eval``: arguments, checks before any work, model loading the LLaMA-Factory way, the run."""

import argparse
import time

from .data import DataError, load_split, resolve_data_root, stratified_sample
from .results import Prediction, check_output_dir, summarize, write_outputs
from .tasks import CHOICES, DefinitionError, available_tasks, load_prompt, load_task

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

    model, tokenizer, template = load_model_and_template(args)
    started = time.perf_counter()
    encoded = encode_questions(template, tokenizer, questions, shots, prompt, task)
    predictions = predict(model, tokenizer, template, questions, encoded, args.mode, args.batch_size,
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


def load_model_and_template(args: argparse.Namespace) -> tuple:
    """Tokenizer, template and model through LLaMA-Factory's own loaders, so any checkpoint it trains (full,
    LoRA adapters, quantised) loads here as it does for ``llamafactory-cli chat``."""
    import torch
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_model, load_tokenizer

    infer_args = {"model_name_or_path": args.model_name_or_path, "template": args.template, "infer_dtype": args.dtype}
    if args.adapter_name_or_path:
        infer_args.update(adapter_name_or_path=args.adapter_name_or_path, finetuning_type="lora")
    model_args, data_args, finetuning_args, _ = get_infer_args(infer_args)
    if args.device != "auto":
        model_args.device_map = {"": torch.device(args.device)}
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    model = load_model(tokenizer, model_args, finetuning_args)
    # LLaMA-Factory 0.9.5 loads weights in the checkpoint's dtype and only records the one it chose
    # (bf16 checkpoints would then run in bf16 on a CPU, which is several times slower than fp32).
    if not getattr(model, "is_quantized", False) and model.dtype != model_args.compute_dtype:
        model.to(model_args.compute_dtype)
    return model, tokenizer, template


def encode_questions(template, tokenizer, questions: list, shots: dict, prompt, task) -> list:
    from .scoring import build_messages, encode_question

    return [
        encode_question(template, tokenizer,
                        build_messages(q, shots[q.subject], prompt, task.subjects[q.subject].name), prompt.system)
        for q in questions
    ]


def predict(model, tokenizer, template, questions: list, encoded: list, mode: str = "logits",
            batch_size: int = DEFAULT_BATCH_SIZE, padding_side: str = "left", max_new_tokens: int = 32) -> list:
    """One Prediction per question, in question order."""
    import torch

    from .generation import generate_replies, parse_answer
    from .scoring import choice_token_ids, score_choices

    choice_ids = choice_token_ids(template, tokenizer)
    if mode == "logits":
        scores = score_choices(model, encoded, choice_ids, tokenizer.pad_token_id, batch_size, padding_side)
        predicted, replies = [CHOICES[i] for i in scores.argmax(-1).tolist()], [None] * len(questions)
    else:
        stop_ids = template.get_stop_token_ids(tokenizer)
        replies, scores = generate_replies(model, tokenizer, encoded, choice_ids, stop_ids, batch_size, max_new_tokens)
        predicted = [parse_answer(reply) for reply in replies]
    probabilities = torch.softmax(scores, dim=-1).tolist()
    return [
        Prediction(question, letter, {c: round(p, 6) for c, p in zip(CHOICES, probs)}, reply)
        for question, letter, probs, reply in zip(questions, predicted, probabilities, replies)
    ]
