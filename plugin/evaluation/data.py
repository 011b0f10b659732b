"""Benchmark questions: where the CSV files are (a local folder or the Hub), how they are read and checked,
and the paper's stratified down-sampling."""

import csv
import os
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .tasks import CHOICES, Task

CACHE_DIR = Path(os.environ.get("MINORSFT_CACHE", Path.home() / ".cache" / "llamafactory-minorsft"))


class DataError(ValueError):
    """The benchmark data cannot be found, or a file or row of it is malformed."""


@dataclass(frozen=True)
class Question:
    subject: str
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str
    source: str  # "file line N", for messages


def resolve_data_root(task: Task, data_dir: str | None, split: str, subject: str) -> Path:
    """The folder that ``task.file`` is relative to: ``data_dir`` itself, its ``<local_folder>/`` or ``data/``
    sub-folder, or the same inside a Hub snapshot of ``data_dir`` (a dataset id; the task's own by default)."""
    if data_dir is not None and os.path.isdir(data_dir):
        return _find_root([Path(data_dir)], task, split, subject, data_dir)
    repo_id = data_dir or task.hub_id
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise DataError(f"--data_dir {data_dir}: neither a folder nor a Hub dataset id (owner/name)")
    snapshot = _download(repo_id)
    try:
        return _find_root([snapshot], task, split, subject, repo_id)
    except DataError:
        # Some releases (C-Eval) keep the CSV files only inside a zip archive.
        return _find_root([_extract_zips(snapshot, repo_id)], task, split, subject, repo_id)


def _find_root(bases: list, task: Task, split: str, subject: str, label: str) -> Path:
    relative = task.subject_file(subject, split)
    candidates = [root for base in bases for root in (base, base / task.local_folder, base / "data")]
    for root in candidates:
        if (root / relative).is_file():
            return root
    raise DataError(f"{label}: no {relative} in {', '.join(str(root) for root in candidates)}")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.csv", "*.zip", "*.json"]))


def _extract_zips(snapshot: Path, repo_id: str) -> Path:
    target = CACHE_DIR / "hub" / repo_id.replace("/", "--") / snapshot.name
    if not target.is_dir():
        archives = sorted(snapshot.rglob("*.zip"))
        if not archives:
            raise DataError(f"{repo_id}: the Hub snapshot {snapshot} holds neither the CSV files nor a zip of them")
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        for archive in archives:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
        staging.rename(target)
    return target


def read_subject_file(path: Path, task: Task, subject: str, skipped: list | None) -> list[Question]:
    """Every row of one subject's CSV as a Question. A malformed row raises DataError naming file and line,
    or, when ``skipped`` is a list, is described there and left out."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (subject {subject})")
    columns = task.columns
    questions = []
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: FinEval's dev files start with a BOM
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        wanted = [columns["id"], columns["question"], *CHOICES, columns["answer"]]
        absent = [name or "(unnamed first column)" for name in wanted if name not in header]
        if absent:
            raise DataError(f"{path}: header lacks column(s) {', '.join(absent)} (header: {header})")
        index = {name: header.index(name) for name in wanted}
        line = reader.line_num + 1
        for row in reader:
            source = f"{path} line {line}"
            line = reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            cells = {name: row[i].strip() if i < len(row) else "" for name, i in index.items()}
            problem = _row_problem(cells, columns)
            if problem:
                if skipped is None:
                    raise DataError(f"{source}: {problem} (use --skip_bad_rows to leave such rows out)")
                skipped.append(f"{source}: {problem}")
                continue
            questions.append(Question(
                subject=subject,
                id=cells[columns["id"]],
                question=cells[columns["question"]],
                options=tuple(cells[choice] for choice in CHOICES),
                answer=cells[columns["answer"]],
                source=source,
            ))
    return questions


def _row_problem(cells: dict, columns: dict) -> str | None:
    if not cells[columns["question"]]:
        return "empty question"
    missing = [choice for choice in CHOICES if not cells[choice]]
    if missing:
        return f"missing option(s) {', '.join(missing)}"
    if cells[columns["answer"]] not in CHOICES:
        return f"answer {cells[columns['answer']]!r} is not one of {', '.join(CHOICES)}"
    return None


def load_split(task: Task, root: Path, split: str, subjects: list, skipped: list | None) -> dict:
    """subject -> its questions, for every subject in ``subjects``."""
    return {subject: read_subject_file(root / task.subject_file(subject, split), task, subject, skipped)
            for subject in subjects}


def stratified_sample(by_subject: dict, max_samples: int | None, seed: int) -> dict:
    """At most ``max_samples`` questions in total, each subject's share proportional to its size (largest
    remainders round up). Each subject draws with its own seeded generator, so the same seed gives the same
    questions whatever the other subjects are."""
    total = sum(len(questions) for questions in by_subject.values())
    if max_samples is None or max_samples >= total:
        return dict(by_subject)
    exact = {subject: max_samples * len(questions) / total for subject, questions in by_subject.items()}
    quota = {subject: int(share) for subject, share in exact.items()}
    position = {subject: i for i, subject in enumerate(by_subject)}
    by_remainder = sorted(by_subject, key=lambda subject: (quota[subject] - exact[subject], position[subject]))
    for subject in by_remainder[: max_samples - sum(quota.values())]:
        quota[subject] += 1
    sampled = {}
    for subject, questions in by_subject.items():
        rng = random.Random(f"{seed}:{subject}")
        picked = sorted(rng.sample(range(len(questions)), quota[subject]))
        sampled[subject] = [questions[i] for i in picked]
    return sampled
