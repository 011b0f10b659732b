"""Accuracy per subject and category, and the output folder: results.json, predictions.jsonl, results.md."""

import json
import os
from dataclasses import dataclass

from ..files import checked_output_dir, staged_dir
from .data import Question
from .tasks import CHOICES, Task


@dataclass(frozen=True)
class Prediction:
    question: Question
    predicted: str | None  # None: a generated reply the parser could not read
    probabilities: dict  # letter -> softmax over the four letter logits
    reply: str | None = None  # generate mode only

    @property
    def correct(self) -> bool:
        return self.predicted == self.question.answer


def _score(predictions: list) -> dict:
    correct = sum(prediction.correct for prediction in predictions)
    return {"accuracy": correct / len(predictions), "num_questions": len(predictions), "num_correct": correct}


def summarize(task: Task, split: str, predictions: list, run_info: dict) -> dict:
    """results.json's content: overall (micro) accuracy, the mean over subjects, subjects and categories."""
    by_subject, by_category = {}, {}
    for prediction in predictions:
        subject = task.subjects[prediction.question.subject]
        by_subject.setdefault(subject.key, []).append(prediction)
        by_category.setdefault(subject.category, []).append(prediction)
    subjects = {
        key: {"name": task.subjects[key].name, "category": task.subjects[key].category, **_score(items)}
        for key, items in by_subject.items()
    }
    return {
        "task": task.key,
        "benchmark": task.name,
        "split": split,
        **_score(predictions),
        "macro_accuracy": sum(entry["accuracy"] for entry in subjects.values()) / len(subjects),
        "num_unparseable": sum(prediction.predicted is None for prediction in predictions),
        **run_info,
        "categories": {name: _score(items) for name, items in sorted(by_category.items())},
        "subjects": subjects,
    }


def prediction_record(prediction: Prediction) -> dict:
    question = prediction.question
    record = {
        "subject": question.subject,
        "id": question.id,
        "question": question.question,
        "options": dict(zip(CHOICES, question.options)),
        "gold": question.answer,
        "predicted": prediction.predicted,
        "correct": prediction.correct,
        "probabilities": prediction.probabilities,
    }
    if prediction.reply is not None:
        record["reply"] = prediction.reply
    return record


def markdown_report(results: dict) -> str:
    lines = [
        f"# {results['benchmark']} ({results['task']}, split {results['split']})",
        "",
        f"Model `{results['model_name_or_path']}`"
        + (f" + adapter `{results['adapter_name_or_path']}`" if results.get("adapter_name_or_path") else "")
        + f", mode {results['mode']}, {results['n_shot']}-shot, prompt `{results['prompt']}`.",
        "",
        "| group | questions | correct | accuracy |",
        "|---|---:|---:|---:|",
        _row("**all**", results),
        _row("mean over subjects", {"num_questions": "", "num_correct": "", "accuracy": results["macro_accuracy"]}),
    ]
    lines += [_row(f"category: {name}", entry) for name, entry in results["categories"].items()]
    lines += [_row(f"{key} ({entry['name']})", entry) for key, entry in results["subjects"].items()]
    if results["num_unparseable"]:
        lines += ["", f"{results['num_unparseable']} generated replies named no single answer (counted wrong)."]
    if results.get("missing_subjects"):
        lines += [
            "",
            f"The data held {len(results['subjects'])} subjects; missing, hence not evaluated: "
            f"{', '.join(results['missing_subjects'])}.",
        ]
    if results["num_skipped_rows"]:
        lines += ["", f"{results['num_skipped_rows']} malformed rows were skipped (listed in results.json)."]
    return "\n".join(lines) + "\n"


def _row(label: str, entry: dict) -> str:
    return f"| {label} | {entry['num_questions']} | {entry['num_correct']} | {100 * entry['accuracy']:.2f} |"


def write_outputs(output_dir: str, results: dict, predictions: list, overwrite: bool) -> None:
    """All three files appear together or not at all: they are written to a staging folder that replaces
    ``output_dir`` at the end."""
    checked_output_dir(output_dir, overwrite)
    with staged_dir(output_dir, prefix=".eval-") as staging:
        with open(os.path.join(staging, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False, indent=2)
            f.write("\n")
        with open(os.path.join(staging, "predictions.jsonl"), "w", encoding="utf-8") as f:
            for prediction in predictions:
                f.write(json.dumps(prediction_record(prediction), ensure_ascii=False) + "\n")
        with open(os.path.join(staging, "results.md"), "w", encoding="utf-8") as f:
            f.write(markdown_report(results))
