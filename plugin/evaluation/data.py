"""Benchmark questions: where they are (a local folder, ``$MINORSFT_EVAL_DATA_DIR`` or the Hugging Face Hub), how
they are read and checked, and the paper's stratified down-sampling."""

import csv
import io
import os
import random
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import Unreachable, UsageError
from .tasks import CHOICES, Task

ENV_DATA_DIR = "MINORSFT_EVAL_DATA_DIR"
HOW_TO_GET_DATA = (
    f"pass --data_dir FOLDER or set {ENV_DATA_DIR} to a folder holding the benchmark's local copy "
    "(layout in evaluation/README.md), or allow network access to the Hugging Face Hub"
)


@dataclass(frozen=True)
class Question:
    subject: str
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str
    source: str  # "file line N" or "repo config/split row N", for messages


class LocalFolder:
    """One CSV file per subject and split, at ``task.file`` below ``root`` (the layout of the releases)."""

    def __init__(self, task: Task, root: Path):
        self.task, self.root, self.description = task, root, str(root)

    def path(self, subject: str, split: str) -> Path:
        path = self.root / self.task.subject_file(subject, split)
        if not path.is_file() and path.parent.is_dir():
            match = _match_name(path.name, [item.name for item in path.parent.iterdir()])
            path = path.parent / match if match else path
        return path

    def has(self, subject: str, split: str) -> bool:
        return self.path(subject, split).is_file()

    def read(self, subject: str, split: str, skipped: list | None) -> list[Question]:
        return read_subject_file(self.path(subject, split), self.task, subject, skipped)


class HubRepository:
    """A benchmark as its Hub repository holds it (``task.hub``), read from the Hub by id or from a local folder
    laid out like the repository (a clone of it)."""

    def __init__(self, task: Task, location: str, local: bool):
        self.task, self.location, self.local = task, location, local
        self.format = task.hub["format"]
        self._fetched = {}  # file name -> local path: FinEval's one archive serves every subject
        self.description = (
            f"{location} ({'a local copy of the Hub layout' if local else 'Hugging Face Hub'}, {self.format})"
        )

    def has(self, subject: str, split: str) -> bool:
        return True  # the Hub layouts hold every subject; a missing one is an error when it is read

    def read(self, subject: str, split: str, skipped: list | None) -> list[Question]:
        if self.format == "parquet_configs":
            return self._read_config(subject, split, skipped)
        name = self.task.hub["file"].format(split=split, subject=subject, name=self.task.subjects[subject].name)
        if self.format == "csv_files":
            path = self._fetch(name)
            return read_subject_file(path, self.task, subject, skipped)
        archive = self._fetch(self.task.hub["archive"])
        try:
            with zipfile.ZipFile(archive) as zf:
                member = _match_name(name, zf.namelist())
                if member is None:
                    raise UsageError(f"{archive}: no {name} inside (subject {subject})")
                with zf.open(member) as raw:
                    text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
                    return _read_csv(text, f"{archive}:{member}", self.task, subject, skipped)
        except zipfile.BadZipFile as err:
            raise UsageError(f"{archive}: not a zip archive ({err})") from None

    def _read_config(self, subject: str, split: str, skipped: list | None) -> list[Question]:
        import datasets

        label = f"{self.location} config {subject} split {split}"
        rows = _from_hub(lambda: datasets.load_dataset(self.location, name=subject, split=split), label)
        columns = self.task.columns
        wanted = [columns["id"], columns["question"], *CHOICES, columns["answer"]]
        absent = [name for name in wanted if name not in rows.column_names]
        if absent:
            raise UsageError(f"{label}: lacks column(s) {', '.join(absent)} (columns: {rows.column_names})")
        questions = []
        for number, row in enumerate(rows):
            cells = {name: "" if row[name] is None else str(row[name]).strip() for name in wanted}
            _add_question(questions, cells, f"{label} row {number}", self.task, subject, skipped)
        return questions

    def _fetch(self, name: str) -> Path:
        """The local path of one file of the repository (from the Hub cache for a Hub id, so a file fetched once
        is found offline too)."""
        if name not in self._fetched:
            self._fetched[name] = self._locate(name)
        return self._fetched[name]

    def _locate(self, name: str) -> Path:
        if self.local:
            root = Path(self.location)
            present = [path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()]
            match = _match_name(name, present)
            if match is None:
                raise UsageError(f"{self.location}: no {name}")
            return root / match
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        label = f"{self.location} file {name}"
        try:
            return Path(
                _from_hub(
                    lambda: hf_hub_download(self.location, name, repo_type="dataset"),
                    label,
                    passing=RemoteEntryNotFoundError,
                )
            )
        except RemoteEntryNotFoundError:
            files = _from_hub(lambda: HfApi().list_repo_files(self.location, repo_type="dataset"), self.location)
        match = _match_name(name, files)
        if match is None:
            raise UsageError(f"{self.location}: the Hub repository has no {name}")
        return Path(_from_hub(lambda: hf_hub_download(self.location, match, repo_type="dataset"), label))


def _match_name(name: str, present: list) -> str | None:
    """``name`` among ``present`` file names, comparing NFKC forms: FinanceIQ's Hub listing writes
    ``注册会计师(CPA).csv`` where the GitHub release has full-width brackets, ``注册会计师（CPA）.csv``."""
    if name in present:
        return name
    wanted = unicodedata.normalize("NFKC", name)
    return next((item for item in present if unicodedata.normalize("NFKC", item) == wanted), None)


def hub_unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or an error it came from) says the Hub could not be reached: offline mode, no network."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    network = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
    try:
        import httpx

        network += (httpx.TransportError,)
    except ImportError:
        pass
    while err is not None:
        if isinstance(err, network):
            return True
        err = err.__cause__ or err.__context__
    return False


def _from_hub(call, label: str, passing: type = ()):
    """``call()``, a request to the Hub or ``datasets``: failing to reach the Hub (offline, no network) raises
    Unreachable, any other failure (no such repository, config or file) UsageError; ``passing`` errors are
    left to the caller."""
    try:
        return call()
    except passing:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the libraries raise about remote data becomes a message
        if hub_unreachable(err):
            raise Unreachable(
                f"{label}: the Hugging Face Hub cannot be reached ({type(err).__name__})", remedy=HOW_TO_GET_DATA
            ) from None
        raise UsageError(f"{label}: cannot be read ({type(err).__name__}: {err})") from None


def resolve_source(task: Task, data_dir: str | None, split: str):
    """Where the task's questions are read from: ``data_dir`` (a folder, or a Hub dataset id), else
    ``$MINORSFT_EVAL_DATA_DIR/<local_folder>``, else the task's Hub repository."""
    if data_dir is not None:
        if os.path.isdir(data_dir):
            return _folder_source(task, Path(data_dir), split, label=f"--data_dir {data_dir}")
        if data_dir.count("/") != 1 or data_dir.startswith((".", "/")) or os.path.exists(data_dir):
            raise UsageError(f"--data_dir {data_dir}: neither a folder nor a Hub dataset id (owner/name)")
        if task.hub is None:
            raise UsageError(
                f"--data_dir {data_dir}: task {task.key} defines no `hub` section, so it cannot be read "
                "from a Hub dataset id"
            )
        return HubRepository(task, data_dir, local=False)
    env_dir = os.environ.get(ENV_DATA_DIR)
    if env_dir and os.path.isdir(os.path.join(env_dir, task.local_folder)):
        return _folder_source(
            task, Path(env_dir) / task.local_folder, split, label=f"{ENV_DATA_DIR}={env_dir} ({task.local_folder}/)"
        )
    if task.hub is None:
        reason = f"{ENV_DATA_DIR} has no {task.local_folder}/" if env_dir else f"{ENV_DATA_DIR} is not set"
        raise UsageError(
            f"task {task.key} has no local data ({reason}) and defines no `hub` section; "
            f"pass --data_dir FOLDER or set {ENV_DATA_DIR}"
        )
    return HubRepository(task, task.hub["id"], local=False)


def _folder_source(task: Task, base: Path, split: str, label: str):
    """A folder in the releases' CSV layout (``base`` itself, its ``<local_folder>/`` or ``data/``), or a local
    copy of the task's Hub repository."""
    relative = [task.subject_file(subject, split) for subject in task.subjects]
    candidates = [base, base / task.local_folder, base / "data"]
    for root in candidates:
        if any((root / name).is_file() for name in relative):
            return LocalFolder(task, root)
    if task.hub is not None and _looks_like_hub_copy(task, base):
        return HubRepository(task, str(base), local=True)
    raise UsageError(
        f"{label}: no {split} file of any {task.key} subject (such as {relative[0]}) in "
        f"{', '.join(str(root) for root in candidates)}"
    )


def _looks_like_hub_copy(task: Task, base: Path) -> bool:
    if task.hub["format"] == "parquet_configs":
        card = base / "README.md"
        return card.is_file() and "configs:" in card.read_text(encoding="utf-8", errors="replace")
    if task.hub["format"] == "zip_of_csv":
        return (base / task.hub["archive"]).is_file()
    return any(path.suffix == ".csv" for path in base.rglob("*.csv"))


def read_subject_file(path: Path, task: Task, subject: str, skipped: list | None) -> list[Question]:
    """Every row of one subject's CSV as a Question. A malformed row raises UsageError naming file and line,
    or, when ``skipped`` is a list, is described there and left out."""
    if not path.is_file():
        raise UsageError(f"{path}: file not found (subject {subject})")
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: FinEval's dev files start with a BOM
        return _read_csv(f, str(path), task, subject, skipped)


def _read_csv(stream, label: str, task: Task, subject: str, skipped: list | None) -> list[Question]:
    try:
        return _read_rows(csv.reader(stream), label, task, subject, skipped)
    except UnicodeDecodeError as err:
        raise UsageError(f"{label}: not UTF-8 text ({err})") from None
    except csv.Error as err:
        raise UsageError(f"{label}: not a readable CSV file ({err})") from None


def _read_rows(reader, label: str, task: Task, subject: str, skipped: list | None) -> list[Question]:
    columns = task.columns
    questions = []
    header = [name.strip() for name in next(reader, [])]
    wanted = [columns["id"], columns["question"], *CHOICES, columns["answer"]]
    absent = [name or "(unnamed first column)" for name in wanted if name not in header]
    if absent:
        raise UsageError(f"{label}: header lacks column(s) {', '.join(absent)} (header: {header})")
    index = {name: header.index(name) for name in wanted}
    line = reader.line_num + 1
    for row in reader:
        source = f"{label} line {line}"
        line = reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        cells = {name: row[i].strip() if i < len(row) else "" for name, i in index.items()}
        _add_question(questions, cells, source, task, subject, skipped)
    return questions


def _add_question(questions: list, cells: dict, source: str, task: Task, subject: str, skipped: list | None) -> None:
    columns = task.columns
    problem = _row_problem(cells, columns)
    if problem:
        if skipped is None:
            raise UsageError(f"{source}: {problem} (use --skip_bad_rows to leave such rows out)")
        skipped.append(f"{source}: {problem}")
        return
    questions.append(
        Question(
            subject=subject,
            id=cells[columns["id"]],
            question=cells[columns["question"]],
            options=tuple(cells[choice] for choice in CHOICES),
            answer=cells[columns["answer"]],
            source=source,
        )
    )


def _row_problem(cells: dict, columns: dict) -> str | None:
    if not cells[columns["question"]]:
        return "empty question"
    missing = [choice for choice in CHOICES if not cells[choice]]
    if missing:
        return f"missing option(s) {', '.join(missing)}"
    if cells[columns["answer"]] not in CHOICES:
        return f"answer {cells[columns['answer']]!r} is not one of {', '.join(CHOICES)}"
    return None


def load_split(task: Task, source, split: str, subjects: list, skipped: list | None) -> dict:
    """subject -> its questions, for every subject in ``subjects``; ``source`` is a LocalFolder or
    HubRepository, or the root folder of a LocalFolder."""
    if isinstance(source, (str, Path)):
        source = LocalFolder(task, Path(source))
    return {subject: source.read(subject, split, skipped) for subject in subjects}


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
