"""Benchmark definitions and prompts: the built-in ones in the top-level ``evaluation/`` folder, or a task
file anywhere (``--task PATH/task.json``, its prompt file next to it).

A wheel ships that folder as the package ``llamafactory_minorsft.benchmarks``; a source checkout (or an
editable install) reads it in place, next to ``plugin/``.
"""

import json
import string
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

CHOICES = ("A", "B", "C", "D")
PROMPT_FIELDS = {"question", "subject", *CHOICES}
TASK_KEYS = (
    "name",
    "local_folder",
    "splits",
    "unanswered_splits",
    "few_shot_split",
    "file",
    "columns",
    "prompt",
    "subjects",
)
COLUMN_KEYS = ("id", "question", "answer")
# How a benchmark's Hugging Face Hub repository holds it (see evaluation/README.md, "Where the data comes from"):
# the hub section's `format` -> the keys that format needs besides `id`.
HUB_FORMATS = {
    "parquet_configs": (),  # one config per subject, one split per config split (datasets.load_dataset)
    "csv_files": ("file",),  # one CSV per subject and split at `file` in the repository
    "zip_of_csv": ("archive", "file"),  # the same CSV files inside one zip archive
}
SECTION_MARKERS = {"[system]": "system", "[user]": "user"}


def definitions_dir() -> Path:
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (package_dir / "benchmarks", package_dir.parent / "evaluation"):
        if (candidate / "tasks").is_dir():
            return candidate
    raise UsageError(f"benchmark definitions not found next to {package_dir} (broken install?)")


def available_tasks() -> list[str]:
    return sorted(path.stem for path in (definitions_dir() / "tasks").glob("*.json"))


@dataclass(frozen=True)
class Subject:
    key: str
    name: str
    category: str


@dataclass(frozen=True)
class Task:
    key: str
    name: str
    hub: dict | None  # see HUB_FORMATS; None: the benchmark is only read from local folders
    local_folder: str
    splits: tuple[str, ...]
    unanswered_splits: dict
    few_shot_split: str
    file: str  # path of one subject's CSV inside the data root; fields {split}, {subject}, {name}
    columns: dict  # our column -> the CSV header's; A-D are always the option columns
    prompt: Path  # the paper prompt: next to the task file, else in the built-in prompts/ folder
    subjects: dict  # key -> Subject, in definition order

    def subject_file(self, subject: str, split: str) -> str:
        return self.file.format(split=split, subject=subject, name=self.subjects[subject].name)

    def check_split(self, split: str) -> None:
        if split in self.unanswered_splits:
            raise UsageError(f"--split {split}: {self.unanswered_splits[split]}")
        if split not in self.splits:
            raise UsageError(f"--split {split}: task {self.key} is evaluated on {', '.join(self.splits)}")

    def select_subjects(self, requested: list[str] | None) -> list[str]:
        """Subject keys for ``--subjects`` (keys or the benchmark's own names); all when None."""
        if not requested:
            return list(self.subjects)
        by_name = {subject.name: key for key, subject in self.subjects.items()}
        selected = []
        for item in requested:
            key = item if item in self.subjects else by_name.get(item)
            if key is None:
                raise UsageError(
                    f"--subjects: {item!r} is not a subject of {self.key}; choose from {', '.join(self.subjects)}"
                )
            if key not in selected:
                selected.append(key)
        return selected


def task_path(spec: str) -> Path:
    """A built-in task name (``ceval``) or the path of a task file."""
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        if not path.is_file():
            raise UsageError(f"--task {spec}: no such task file")
        return path
    builtin = definitions_dir() / "tasks" / f"{spec}.json"
    if not builtin.is_file():
        raise UsageError(
            f"--task {spec}: unknown task; choose from {', '.join(available_tasks())}, or give the "
            'path of a task file (evaluation/README.md, "Adding a benchmark")'
        )
    return builtin


def load_task(spec: str) -> Task:
    path = task_path(spec)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a task file holds one JSON object")
    missing = [name for name in TASK_KEYS if name not in raw] + [
        f"columns.{name}" for name in COLUMN_KEYS if name not in raw.get("columns", {})
    ]
    if missing:
        raise UsageError(f"{path}: missing key(s) {', '.join(missing)}")
    if not raw["splits"] or not raw["subjects"]:
        raise UsageError(f"{path}: `splits` and `subjects` must not be empty")
    subjects = {}
    for subject_key, entry in raw["subjects"].items():
        if not isinstance(entry, dict) or not {"name", "category"} <= entry.keys():
            raise UsageError(f"{path}: subjects.{subject_key} needs `name` and `category`")
        subjects[subject_key] = Subject(subject_key, entry["name"], entry["category"])
    return Task(
        key=path.stem,
        name=raw["name"],
        hub=_check_hub(raw.get("hub"), path),
        local_folder=raw["local_folder"],
        splits=tuple(raw["splits"]),
        unanswered_splits=dict(raw["unanswered_splits"]),
        few_shot_split=raw["few_shot_split"],
        file=raw["file"],
        columns=dict(raw["columns"]),
        prompt=_find_prompt(raw["prompt"], path),
        subjects=subjects,
    )


def _check_hub(hub, path: Path) -> dict | None:
    if hub is None:
        return None
    if not isinstance(hub, dict) or "id" not in hub or hub.get("format") not in HUB_FORMATS:
        raise UsageError(f"{path}: `hub` needs `id` and `format` ({', '.join(HUB_FORMATS)})")
    missing = [f"hub.{name}" for name in HUB_FORMATS[hub["format"]] if name not in hub]
    if missing:
        raise UsageError(f"{path}: missing key(s) {', '.join(missing)} (hub format {hub['format']})")
    return dict(hub)


def _find_prompt(name: str, task_file: Path) -> Path:
    """A task's prompt file: next to the task file, else one of the built-in prompts (which a task file
    anywhere may name too)."""
    candidates = [task_file.parent / name, definitions_dir() / "prompts" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UsageError(f"{task_file}: prompt file {name} not found (looked for {' and '.join(map(str, candidates))})")


@dataclass(frozen=True)
class Prompt:
    """A user-message template and an optional system prompt (None: the chat template's default system)."""

    source: str
    user: str
    system: str | None

    def render(self, question: str, options: tuple[str, ...], subject: str) -> str:
        return self.user.format(question=question, subject=subject, **dict(zip(CHOICES, options)))


def load_prompt(spec: str, task: Task) -> Prompt:
    """``paper`` (the task's prompt from the paper) or the path of a prompt file.

    A prompt file is the user-message template, or ``[system]`` and ``[user]`` sections, each on a line of
    its own. The user template takes the fields {question}, {A}..{D} and {subject} (``{{`` for a brace).
    """
    path = task.prompt if spec == "paper" else Path(spec)
    if not path.is_file():
        raise UsageError(f"--prompt {spec}: no such file {path}")
    sections = _split_sections(path.read_text(encoding="utf-8"))
    user = sections.get("user", "")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(user) if name is not None}
    except ValueError as err:
        raise UsageError(
            f"{path}: the user template is not a valid format string ({err}); write {{{{ for a brace"
        ) from None
    if fields - PROMPT_FIELDS:
        unknown = ", ".join(sorted(fields - PROMPT_FIELDS))
        raise UsageError(f"{path}: unknown field(s) {unknown} in the user template")
    if "question" not in fields or not set(CHOICES) <= fields:
        raise UsageError(f"{path}: the user template must contain {{question}} and {{A}}, {{B}}, {{C}}, {{D}}")
    return Prompt(source=str(path), user=user, system=sections.get("system") or None)


def _split_sections(text: str) -> dict:
    lines = text.strip("\n").split("\n")
    if lines[0].strip() not in SECTION_MARKERS:
        return {"user": text.strip("\n")}
    sections, current = {}, None
    for line in lines:
        if line.strip() in SECTION_MARKERS:
            current = SECTION_MARKERS[line.strip()]
            sections[current] = []
        else:
            sections[current].append(line)
    return {name: "\n".join(body).strip("\n") for name, body in sections.items()}
