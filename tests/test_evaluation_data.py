"""minorsft eval: task definitions, prompt files, the CSV loaders on the real benchmark data, bad rows,
stratified sampling and the Hub path (with the download replaced by a local folder)."""

import zipfile
from pathlib import Path

import pytest

from llamafactory_minorsft.evaluation import data as eval_data
from llamafactory_minorsft.evaluation.data import DataError, load_split, resolve_data_root, stratified_sample
from llamafactory_minorsft.evaluation.tasks import (
    CHOICES,
    DefinitionError,
    available_tasks,
    definitions_dir,
    load_prompt,
    load_task,
)

# Question counts from ../shared/data/README.md: (folder, eval split, its count, dev count, subjects).
REAL_COUNTS = {
    "ceval": ("ceval-exam", "val", 1346, 260, 52),
    "financeiq": ("FinanceIQ", "test", 7123, 50, 10),
    "fineval": ("fineval", "val", 3340, 170, 34),
}
HEADER = "id,question,A,B,C,D,answer\n"


def test_the_three_tasks_are_defined():
    assert available_tasks() == ["ceval", "financeiq", "fineval"]
    for key, (_, split, _, _, num_subjects) in REAL_COUNTS.items():
        task = load_task(key)
        assert task.splits[0] == split
        assert len(task.subjects) == num_subjects
        assert all(subject.category for subject in task.subjects.values())


@pytest.mark.parametrize("task_key", sorted(REAL_COUNTS))
def test_loaders_read_every_real_file_with_the_readme_counts(task_key, shared_data_dir):
    folder, split, expected, expected_dev, _ = REAL_COUNTS[task_key]
    task = load_task(task_key)
    root = resolve_data_root(task, str(shared_data_dir), split, next(iter(task.subjects)))
    assert root == shared_data_dir / folder
    for name, count in ((split, expected), (task.few_shot_split, expected_dev)):
        on_disk = {path.relative_to(root).as_posix() for path in (root / name).glob("*.csv")}
        assert on_disk == {task.subject_file(subject, name) for subject in task.subjects}
        by_subject = load_split(task, root, name, list(task.subjects), skipped=None)
        questions = [q for items in by_subject.values() for q in items]
        assert len(questions) == count
        assert all(q.answer in CHOICES and all(q.options) and q.question for q in questions)
    # FinEval has one answer written "D " (stray space) and dev files with a BOM; FinanceIQ an unnamed id column.
    if task_key == "fineval":
        assert by_subject["accounting"][0].id == "0"
    if task_key == "financeiq":
        cpa = load_split(task, root, split, ["cpa"], None)["cpa"]
        assert [q.id for q in cpa[:2]] == ["0", "1"] and cpa[0].answer == "A"


def _write_subject(root: Path, rows: str, subject: str = "accountant", split: str = "val") -> Path:
    path = root / split / f"{subject}_{split}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + rows, encoding="utf-8")
    return path


@pytest.mark.parametrize("row, problem", [
    ('1,"Q?",a,b,,d,A\n', "missing option(s) C"),
    ('1,"Q?",a,b,c,d,E\n', "answer 'E' is not one of A, B, C, D"),
    ('1,"Q?",a,b,c\n', "missing option(s) D"),
    ('1,,a,b,c,d,A\n', "empty question"),
])
def test_a_bad_row_is_named_by_file_and_line(tmp_path, row, problem):
    task = load_task("ceval")
    path = _write_subject(tmp_path, '0,"multi\nline question",a,b,c,d,B\n' + row)
    with pytest.raises(DataError) as err:
        load_split(task, tmp_path, "val", ["accountant"], skipped=None)
    assert f"{path} line 4: {problem}" in str(err.value)  # the record after a two-line record starts on line 4

    skipped = []
    questions = load_split(task, tmp_path, "val", ["accountant"], skipped)["accountant"]
    assert [q.answer for q in questions] == ["B"] and questions[0].question == "multi\nline question"
    assert skipped == [f"{path} line 4: {problem}"]


def test_a_missing_column_or_file_is_named(tmp_path):
    task = load_task("ceval")
    path = tmp_path / "val" / "accountant_val.csv"
    path.parent.mkdir()
    path.write_text("id,question,A,B,C,D\n0,Q,a,b,c,d\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"accountant_val.csv: header lacks column\(s\) answer"):
        load_split(task, tmp_path, "val", ["accountant"], None)
    with pytest.raises(DataError, match=r"art_studies_val.csv: file not found"):
        load_split(task, tmp_path, "val", ["art_studies"], None)


def test_unanswered_split_subjects_and_unknown_task_are_refused():
    task = load_task("ceval")
    with pytest.raises(DefinitionError, match="test answers are not public"):
        task.check_split("test")
    with pytest.raises(DefinitionError, match="evaluated on val"):
        task.check_split("dev")
    assert task.select_subjects(["注册会计师", "art_studies", "accountant"]) == ["accountant", "art_studies"]
    with pytest.raises(DefinitionError, match="'astrology' is not a subject of ceval"):
        task.select_subjects(["astrology"])
    with pytest.raises(DefinitionError, match="unknown task; choose from ceval, financeiq, fineval"):
        load_task("mmlu")


def test_paper_prompts_are_verbatim_and_in_the_right_slot():
    ceval = load_prompt("paper", load_task("ceval"))
    assert ceval.system is None  # the question is the user message; the template keeps its default system
    rendered = ceval.render("1+1=?", ("1", "2", "3", "4"), "数学")
    assert rendered == (
        "You need to choose one of the four options A, B, C, and D as the most appropriate answer to the question. "
        "You can only output one character, and this character must be one of A, B, C, and D. The question content "
        "is: 1+1=? The four options are: A. 1 B. 2 C. 3 D. 4 Your answer is:"
    )
    for key in ("financeiq", "fineval"):
        finance = load_prompt("paper", load_task(key))
        assert finance.system.startswith("Please answer the questions based on the context provided.")
        assert finance.system.endswith(
            "if it involves analysis or reasoning, please give the reasoning and analysis process")
        assert finance.render("Q", ("a", "b", "c", "d"), "x") == "Q\nA. a\nB. b\nC. c\nD. d\nAnswer:"


def test_custom_prompt_files(tmp_path):
    task = load_task("fineval")
    plain = tmp_path / "plain.txt"
    plain.write_text("{subject}: {question} {{braces}}\n{A}|{B}|{C}|{D}\n", encoding="utf-8")
    prompt = load_prompt(str(plain), task)
    assert prompt.system is None
    assert prompt.render("Q", ("a", "b", "c", "d"), "S") == "S: Q {braces}\na|b|c|d"
    sections = tmp_path / "sections.txt"
    sections.write_text("[system]\nBe brief.\n[user]\n{question} {A} {B} {C} {D}\n", encoding="utf-8")
    assert load_prompt(str(sections), task).system == "Be brief."
    bad = tmp_path / "bad.txt"
    bad.write_text("{question} {A} {B} {C} {E}", encoding="utf-8")
    with pytest.raises(DefinitionError, match=r"bad.txt: unknown field\(s\) E"):
        load_prompt(str(bad), task)
    bad.write_text("{question} {A} {B}", encoding="utf-8")
    with pytest.raises(DefinitionError, match="must contain"):
        load_prompt(str(bad), task)
    with pytest.raises(DefinitionError, match="no such file"):
        load_prompt(str(tmp_path / "absent.txt"), task)


def test_stratified_sample_is_proportional_and_reproducible():
    by_subject = {"big": list(range(60)), "mid": list(range(30)), "small": list(range(10))}
    sampled = stratified_sample(by_subject, 10, seed=1)
    assert {key: len(items) for key, items in sampled.items()} == {"big": 6, "mid": 3, "small": 1}
    assert sampled == stratified_sample(by_subject, 10, seed=1)
    assert sampled != stratified_sample(by_subject, 10, seed=2)
    assert all(items == sorted(set(items)) for items in sampled.values())
    # Largest remainders: 7 * (0.6, 0.3, 0.1) = (4.2, 2.1, 0.7) -> 4, 2, 1.
    assert [len(items) for items in stratified_sample(by_subject, 7, seed=0).values()] == [4, 2, 1]
    # A subject's draw does not depend on the other subjects.
    alone = stratified_sample({"big": by_subject["big"]}, 6, seed=1)
    assert alone["big"] == sampled["big"]
    assert stratified_sample(by_subject, 1000, seed=0) == by_subject


def test_stratified_sample_on_real_data_gives_exactly_n(shared_data_dir):
    task = load_task("fineval")
    by_subject = load_split(task, shared_data_dir / "fineval", "val", list(task.subjects), None)
    sampled = stratified_sample(by_subject, 100, seed=42)
    assert sum(len(items) for items in sampled.values()) == 100
    assert sum(bool(items) for items in sampled.values()) >= 30


def test_hub_id_downloads_a_snapshot_and_unpacks_a_zip(tmp_path, monkeypatch, shared_data_dir):
    """C-Eval's Hub repo keeps its CSV files in a zip; the download itself is replaced by a local folder."""
    snapshot = tmp_path / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    with zipfile.ZipFile(snapshot / "ceval-exam.zip", "w") as zf:
        zf.write(shared_data_dir / "ceval-exam" / "val" / "accountant_val.csv", "val/accountant_val.csv")
    calls = []
    monkeypatch.setattr(eval_data, "_download", lambda repo_id: calls.append(repo_id) or snapshot)
    monkeypatch.setattr(eval_data, "CACHE_DIR", tmp_path / "cache")
    task = load_task("ceval")
    root = resolve_data_root(task, None, "val", "accountant")
    assert calls == ["ceval/ceval-exam"] and root == tmp_path / "cache" / "hub" / "ceval--ceval-exam" / "abc123"
    assert len(load_split(task, root, "val", ["accountant"], None)["accountant"]) == 49
    with pytest.raises(DataError, match="neither a folder nor a Hub dataset id"):
        resolve_data_root(task, str(tmp_path / "no" / "such" / "dir"), "val", "accountant")


def test_definitions_ship_inside_the_built_package(tmp_path):
    """``setup.py build_py`` lays out what a wheel installs: the definitions must be found there."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    build = tmp_path / "build"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)], cwd=root, check=True,
                   capture_output=True)
    check = ("from llamafactory_minorsft.evaluation.tasks import *; d = definitions_dir(); "
             "print(d); [load_prompt('paper', load_task(t)) for t in available_tasks()]; print(available_tasks())")
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env={"PYTHONPATH": str(build), "PATH": ""},
                         check=True, capture_output=True, text=True).stdout.split("\n")
    assert out[0] == str(build / "llamafactory_minorsft" / "benchmarks")
    assert out[1] == "['ceval', 'financeiq', 'fineval']"
    assert definitions_dir() == root / "evaluation"  # a source checkout reads the folder in place
