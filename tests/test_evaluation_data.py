"""minorsft eval: task definitions and task files, prompt files, the loaders on the benchmark fixtures (and on
the real data where MINORSFT_EVAL_DATA_DIR names it), bad rows, stratified sampling, where the data is found
(--data_dir, the environment variable, the Hub) and the Hub repositories' layouts, read offline from local
copies of those layouts."""

import csv
import io
import json
import zipfile
from pathlib import Path

import pytest
from llamafactory_minorsft.errors import Unreachable, UsageError
from llamafactory_minorsft.evaluation.data import (
    ENV_DATA_DIR,
    HubRepository,
    LocalFolder,
    load_split,
    resolve_source,
    stratified_sample,
)
from llamafactory_minorsft.evaluation.tasks import (
    CHOICES,
    available_tasks,
    definitions_dir,
    load_prompt,
    load_task,
)

# Question counts of the real releases: (folder, eval split, its count, dev count, subjects).
REAL_COUNTS = {
    "ceval": ("ceval-exam", "val", 1346, 260, 52),
    "financeiq": ("FinanceIQ", "test", 7123, 50, 10),
    "fineval": ("fineval", "val", 3340, 170, 34),
}
# The fixtures (tests/fixtures/make_benchmarks.py): three subjects per benchmark, 5 dev and 8 evaluated questions each.
FIXTURE_SUBJECTS = {
    "ceval": ["accountant", "high_school_mathematics", "law"],
    "financeiq": ["cpa", "fund_qualification", "tax_advisor"],
    "fineval": ["accounting", "investments", "macroeconomics"],
}
HEADER = "id,question,A,B,C,D,answer\n"


def test_the_three_tasks_are_defined():
    assert available_tasks() == ["ceval", "financeiq", "fineval"]
    for key, (_, split, _, _, num_subjects) in REAL_COUNTS.items():
        task = load_task(key)
        assert task.splits[0] == split
        assert len(task.subjects) == num_subjects
        assert all(subject.category for subject in task.subjects.values())
    # The Hub repositories and their layouts as checked in evaluation/README.md ("What was checked, and how").
    assert {key: (load_task(key).hub["id"], load_task(key).hub["format"]) for key in REAL_COUNTS} == {
        "ceval": ("ceval/ceval-exam", "parquet_configs"),
        "financeiq": ("Duxiaoman-DI/FinanceIQ", "csv_files"),
        "fineval": ("SUFE-AIFLM-Lab/FinEval", "zip_of_csv"),
    }


def _every_question(task, source, split, subjects):
    return [q for items in load_split(task, source, split, subjects, skipped=None).values() for q in items]


@pytest.mark.parametrize("task_key", sorted(REAL_COUNTS))
def test_loaders_read_every_fixture_file_with_its_format_quirks(task_key, benchmark_fixtures_dir):
    folder, split, _, _, _ = REAL_COUNTS[task_key]
    task = load_task(task_key)
    source = resolve_source(task, str(benchmark_fixtures_dir), split)
    assert isinstance(source, LocalFolder) and source.root == benchmark_fixtures_dir / folder
    assert [subject for subject in task.subjects if source.has(subject, split)] == sorted(
        FIXTURE_SUBJECTS[task_key], key=list(task.subjects).index
    )
    for name, count in ((split, 8), (task.few_shot_split, 5)):
        on_disk = {path.relative_to(source.root).as_posix() for path in (source.root / name).glob("*.csv")}
        assert on_disk == {task.subject_file(subject, name) for subject in FIXTURE_SUBJECTS[task_key]}
        by_subject = load_split(task, source, name, FIXTURE_SUBJECTS[task_key], skipped=None)
        assert all(len(questions) == count for questions in by_subject.values())
        questions = [q for items in by_subject.values() for q in items]
        assert all(q.answer in CHOICES and all(q.options) and q.question for q in questions)
        assert [q.id for q in questions[:count]] == [str(i) for i in range(count)]  # FinanceIQ: the unnamed column
        assert any("\n" in q.question for q in questions)  # a quoted multi-line cell stays one question
    if task_key == "fineval":
        dev = (source.root / "dev" / "accounting_dev.csv").read_bytes()
        assert dev.startswith(b"\xef\xbb\xbfid,question")  # the BOM is there, and the id column is still found
        assert load_split(task, source, "dev", ["accounting"], None)["accounting"][0].id == "0"
        raw_answers = [
            row[6]
            for row in csv.reader(
                io.StringIO((source.root / "val" / "investments_val.csv").read_text(encoding="utf-8"))
            )
        ]
        assert "D " in raw_answers  # the stray space, read as "D"
        assert any("$\\%$" in q.question for q in questions)


@pytest.mark.parametrize("task_key", sorted(REAL_COUNTS))
def test_loaders_read_every_real_file_with_the_readme_counts(task_key, real_data_dir):
    folder, split, expected, expected_dev, _ = REAL_COUNTS[task_key]
    task = load_task(task_key)
    source = resolve_source(task, str(real_data_dir), split)
    assert source.root == real_data_dir / folder
    for name, count in ((split, expected), (task.few_shot_split, expected_dev)):
        on_disk = {path.relative_to(source.root).as_posix() for path in (source.root / name).glob("*.csv")}
        assert on_disk == {task.subject_file(subject, name) for subject in task.subjects}
        questions = _every_question(task, source, name, list(task.subjects))
        assert len(questions) == count
        assert all(q.answer in CHOICES and all(q.options) and q.question for q in questions)


def _write_subject(root: Path, rows: str, subject: str = "accountant", split: str = "val") -> Path:
    path = root / split / f"{subject}_{split}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + rows, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "row, problem",
    [
        ('1,"Q?",a,b,,d,A\n', "missing option(s) C"),
        ('1,"Q?",a,b,c,d,E\n', "answer 'E' is not one of A, B, C, D"),
        ('1,"Q?",a,b,c\n', "missing option(s) D"),
        ("1,,a,b,c,d,A\n", "empty question"),
    ],
)
def test_a_bad_row_is_named_by_file_and_line(tmp_path, row, problem):
    task = load_task("ceval")
    path = _write_subject(tmp_path, '0,"multi\nline question",a,b,c,d,B\n' + row)
    with pytest.raises(UsageError) as err:
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
    with pytest.raises(UsageError, match=r"accountant_val.csv: header lacks column\(s\) answer"):
        load_split(task, tmp_path, "val", ["accountant"], None)
    with pytest.raises(UsageError, match=r"art_studies_val.csv: file not found"):
        load_split(task, tmp_path, "val", ["art_studies"], None)
    # A GBK-encoded file (a common way Chinese CSVs arrive) is named, not a traceback.
    path.write_bytes("id,question,A,B,C,D,answer\n0,会计,a,b,c,d,A\n".encode("gbk"))
    with pytest.raises(UsageError, match=r"accountant_val.csv: not UTF-8 text"):
        load_split(task, tmp_path, "val", ["accountant"], None)


def test_unanswered_split_subjects_and_unknown_task_are_refused():
    task = load_task("ceval")
    with pytest.raises(UsageError, match="test answers are not public"):
        task.check_split("test")
    with pytest.raises(UsageError, match="evaluated on val"):
        task.check_split("dev")
    assert task.select_subjects(["注册会计师", "art_studies", "accountant"]) == ["accountant", "art_studies"]
    with pytest.raises(UsageError, match="'astrology' is not a subject of ceval"):
        task.select_subjects(["astrology"])
    with pytest.raises(UsageError, match="unknown task; choose from ceval, financeiq, fineval, or give the path"):
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
            "if it involves analysis or reasoning, please give the reasoning and analysis process"
        )
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
    with pytest.raises(UsageError, match=r"bad.txt: unknown field\(s\) E"):
        load_prompt(str(bad), task)
    bad.write_text("{question} {A} {B}", encoding="utf-8")
    with pytest.raises(UsageError, match="must contain"):
        load_prompt(str(bad), task)
    with pytest.raises(UsageError, match="no such file"):
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


def test_stratified_sample_on_real_data_gives_exactly_n(real_data_dir):
    task = load_task("fineval")
    by_subject = load_split(task, real_data_dir / "fineval", "val", list(task.subjects), None)
    sampled = stratified_sample(by_subject, 100, seed=42)
    assert sum(len(items) for items in sampled.values()) == 100
    assert sum(bool(items) for items in sampled.values()) >= 30


def test_stratified_sample_on_the_fixtures_draws_from_every_subject(benchmark_fixtures_dir):
    task = load_task("ceval")
    by_subject = load_split(task, benchmark_fixtures_dir / "ceval-exam", "val", FIXTURE_SUBJECTS["ceval"], None)
    sampled = stratified_sample(by_subject, 7, seed=42)
    assert [len(items) for items in sampled.values()] == [3, 2, 2]  # 7/3 each: the first remainder rounds up
    assert all({q.id for q in sampled[s]} <= {q.id for q in by_subject[s]} for s in sampled)


def test_where_the_data_comes_from(benchmark_fixtures_dir, tmp_path, monkeypatch):
    task = load_task("ceval")
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)
    # --data_dir: the benchmark folder itself or the folder holding it.
    for given in (benchmark_fixtures_dir, benchmark_fixtures_dir / "ceval-exam"):
        assert resolve_source(task, str(given), "val").root == benchmark_fixtures_dir / "ceval-exam"
    # The environment variable names the folder of all benchmarks; --data_dir wins over it.
    monkeypatch.setenv(ENV_DATA_DIR, str(benchmark_fixtures_dir))
    assert resolve_source(task, None, "val").root == benchmark_fixtures_dir / "ceval-exam"
    other = tmp_path / "other" / "val"
    other.mkdir(parents=True)
    (other / "law_val.csv").write_text(HEADER + "0,Q,a,b,c,d,A\n", encoding="utf-8")
    assert resolve_source(task, str(tmp_path / "other"), "val").root == tmp_path / "other"
    # A folder without this benchmark: the Hub, by the task's own id.
    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path / "other"))
    hub = resolve_source(task, None, "val")
    assert isinstance(hub, HubRepository) and hub.location == "ceval/ceval-exam" and not hub.local
    monkeypatch.delenv(ENV_DATA_DIR)
    assert resolve_source(task, None, "val").location == "ceval/ceval-exam"
    assert resolve_source(task, "someone/ceval-copy", "val").location == "someone/ceval-copy"
    with pytest.raises(UsageError, match="neither a folder nor a Hub dataset id"):
        resolve_source(task, str(tmp_path / "no" / "such" / "dir"), "val")
    with pytest.raises(UsageError, match=r"no val file of any ceval subject \(such as val/accountant_val.csv\)"):
        resolve_source(task, str(tmp_path), "val")


@pytest.mark.parametrize("task_key", sorted(REAL_COUNTS))
def test_the_hub_cannot_be_reached_offline(task_key, tmp_path, monkeypatch):
    """Tests run with HF_HUB_OFFLINE=1: each format's real Hub call must fail as Unreachable (exit 3)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    task = load_task(task_key)
    source = HubRepository(task, task.hub["id"], local=False)
    with pytest.raises(
        Unreachable,
        match="the Hugging Face Hub cannot be reached.*--data_dir FOLDER or set "
        f"{ENV_DATA_DIR}.*network access to the Hugging Face Hub",
    ):
        source.read(FIXTURE_SUBJECTS[task_key][0], task.splits[0], None)


# The Hub repositories as they are laid out now (see evaluation/README.md, "Where the data comes from"), written
# from the fixtures: C-Eval as parquet files, one config per subject declared in the dataset card; FinanceIQ as
# CSV files under data/ (the Hub listing writes 注册会计师(CPA).csv with ASCII brackets); FinEval as FinEval.zip.
def _fixture_rows(path: Path) -> list:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def _write_ceval_hub(fixtures: Path, target: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    card = ["---", "license: cc-by-nc-sa-4.0", "configs:"]
    for subject in FIXTURE_SUBJECTS["ceval"]:
        card += [f"- config_name: {subject}", "  data_files:"]
        for split in ("val", "dev"):
            card += [f"  - split: {split}", f"    path: {subject}/{split}-*"]
            rows = _fixture_rows(fixtures / "ceval-exam" / split / f"{subject}_{split}.csv")
            columns = {
                name: [row.get(name, "") for row in rows]
                for name in ("question", "A", "B", "C", "D", "answer", "explanation")
            }
            table = pa.table({"id": pa.array([int(row["id"]) for row in rows], pa.int32()), **columns})
            (target / subject).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, target / subject / f"{split}-00000-of-00001.parquet")
    (target / "README.md").write_text(
        "\n".join(card + ["---", "C-Eval, parquet per subject."]) + "\n", encoding="utf-8"
    )


def _write_financeiq_hub(fixtures: Path, target: Path) -> None:
    (target / "README.md").parent.mkdir(parents=True, exist_ok=True)
    (target / "README.md").write_text("---\nlicense: cc-by-nc-sa-4.0\n---\n", encoding="utf-8")
    for path in (fixtures / "FinanceIQ").rglob("*.csv"):
        name = path.name.replace("（", "(").replace("）", ")")
        destination = target / "data" / path.parent.name / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(path.read_bytes())


def _write_fineval_hub(fixtures: Path, target: Path) -> None:
    target.mkdir(parents=True)
    (target / "README.md").write_text("---\nlicense: cc-by-nc-sa-4.0\nviewer: false\n---\n", encoding="utf-8")
    with zipfile.ZipFile(target / "FinEval.zip", "w") as zf:
        for path in (fixtures / "fineval").rglob("*.csv"):
            zf.write(path, path.relative_to(fixtures / "fineval").as_posix())


HUB_WRITERS = {"ceval": _write_ceval_hub, "financeiq": _write_financeiq_hub, "fineval": _write_fineval_hub}


@pytest.mark.parametrize("task_key", sorted(HUB_WRITERS))
def test_a_local_copy_of_the_hub_layout_reads_as_the_release(task_key, benchmark_fixtures_dir, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    task = load_task(task_key)
    hub_copy = tmp_path / "hub" / task.hub["id"].split("/")[1]
    HUB_WRITERS[task_key](benchmark_fixtures_dir, hub_copy)
    release = LocalFolder(task, benchmark_fixtures_dir / REAL_COUNTS[task_key][0])
    subjects = FIXTURE_SUBJECTS[task_key]
    for split in (task.splits[0], task.few_shot_split):
        source = resolve_source(task, str(hub_copy), split)
        expected = [
            (q.subject, q.id, q.question, q.options, q.answer) for q in _every_question(task, release, split, subjects)
        ]
        got = [
            (q.subject, q.id, q.question, q.options, q.answer) for q in _every_question(task, source, split, subjects)
        ]
        assert got == expected and len(got) == 3 * (8 if split == task.splits[0] else 5)
    if task_key != "financeiq":  # FinanceIQ's Hub copy is the release's CSV layout under data/
        assert isinstance(source, HubRepository) and source.local
    absent = next(subject for subject in task.subjects if subject not in subjects)
    with pytest.raises(UsageError, match=absent if task_key != "financeiq" else task.subjects[absent].name):
        load_split(task, resolve_source(task, str(hub_copy), task.splits[0]), task.splits[0], [absent], None)


def test_task_files_anywhere_and_their_refusals(tmp_path):
    task_file = tmp_path / "bench" / "my_bench.json"
    task_file.parent.mkdir()
    definition = {
        "name": "My Bench",
        "local_folder": "my-bench",
        "splits": ["val"],
        "unanswered_splits": {},
        "few_shot_split": "dev",
        "file": "{split}/{subject}.csv",
        "columns": {"id": "id", "question": "question", "answer": "answer"},
        "prompt": "my_prompt.txt",
        "subjects": {"algebra": {"name": "代数", "category": "STEM"}},
    }
    task_file.write_text(json.dumps(definition), encoding="utf-8")
    with pytest.raises(
        UsageError,
        match=r"my_bench.json: prompt file my_prompt.txt not found \(looked for "
        + str(tmp_path / "bench" / "my_prompt.txt"),
    ):
        load_task(str(task_file))
    (task_file.parent / "my_prompt.txt").write_text("{question}\n{A}|{B}|{C}|{D}", encoding="utf-8")
    task = load_task(str(task_file))
    assert task.key == "my_bench" and task.hub is None and task.prompt == task_file.parent / "my_prompt.txt"
    assert load_prompt("paper", task).render("Q", ("a", "b", "c", "d"), "代数") == "Q\na|b|c|d"
    # A built-in prompt may be named from anywhere.
    task_file.write_text(json.dumps({**definition, "prompt": "ceval_paper.txt"}), encoding="utf-8")
    assert load_task(str(task_file)).prompt == definitions_dir() / "prompts" / "ceval_paper.txt"
    for broken, message in (
        (
            {key: value for key, value in definition.items() if key != "few_shot_split"},
            r"missing key\(s\) few_shot_split",
        ),
        ({**definition, "columns": {"id": "id", "question": "q"}}, r"missing key\(s\) columns.answer"),
        ({**definition, "hub": {"id": "x/y", "format": "csv_files"}}, r"missing key\(s\) hub.file"),
        ({**definition, "hub": {"id": "x/y", "format": "tarball"}}, "`hub` needs `id` and `format`"),
    ):
        task_file.write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(UsageError, match=message):
            load_task(str(task_file))
    with pytest.raises(UsageError, match="no such task file"):
        load_task(str(tmp_path / "absent.json"))


def test_definitions_ship_inside_the_built_package(tmp_path):
    """``setup.py build_py`` lays out what a wheel installs: the definitions must be found there."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    build = tmp_path / "build"
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)],
        cwd=root,
        check=True,
        capture_output=True,
    )
    check = (
        "from llamafactory_minorsft.evaluation.tasks import *; d = definitions_dir(); "
        "print(d); [load_prompt('paper', load_task(t)) for t in available_tasks()]; print(available_tasks())"
    )
    out = subprocess.run(
        [sys.executable, "-c", check],
        cwd=tmp_path,
        env={"PYTHONPATH": str(build), "PATH": ""},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    assert out[0] == str(build / "llamafactory_minorsft" / "benchmarks")
    assert out[1] == "['ceval', 'financeiq', 'fineval']"
    assert definitions_dir() == root / "evaluation"  # a source checkout reads the folder in place
