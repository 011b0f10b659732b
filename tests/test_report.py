"""``minorsft report`` on hand-made run directories whose numbers are known.

The deviation curves and accuracies here are made up (this tests the report, not training); the
report on real tiny runs is checked end to end in ``test_reproduce.py``.
"""

import csv
import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from llamafactory_minorsft.cli import main

TASKS = ("financeiq", "fineval", "ceval")  # the paper's order, which the report keeps


def write_eval(run_dir: Path, accuracies: dict, num_questions: int = 40) -> None:
    for task, accuracy in accuracies.items():
        out = run_dir / "eval" / task
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps(
            {"task": task, "split": "val", "accuracy": accuracy, "num_questions": num_questions,
             "subjects": {}, "categories": {}}))


def write_run(root: Path, name: str, config: str, deviations=None, accuracies=None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "train.yaml").write_text(config)
    if deviations is not None:
        history = [{"step": step, "loss": 2.0 - 0.01 * step, "deviation": value}
                   for step, value in enumerate(deviations, start=1)]
        history.insert(2, {"step": 2, "eval_loss": 1.9, "eval_deviation": 0.5})  # eval entries are not the curve
        (run_dir / "trainer_state.json").write_text(json.dumps({"global_step": len(deviations), "log_history": history}))
    if accuracies:
        write_eval(run_dir, accuracies)
    return run_dir


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    base = root / "base"
    base.mkdir(parents=True)
    (base / "model.yaml").write_text("model_name_or_path: /models/SmolLM2-135M-Instruct\ntemplate: smollm2\n")
    write_eval(base, {"financeiq": 0.25, "fineval": 0.30, "ceval": 0.20})
    write_run(root, "sft_lr1e-5", "stage: sft\nlearning_rate: 1.0e-5\ndeviation_metric: true\n",
              [0.0, 0.1, 0.3, 0.45], {"financeiq": 0.35, "fineval": 0.40, "ceval": 0.30})
    write_run(root, "sft_lr2e-5", "stage: sft\nlearning_rate: 2.0e-5\ndeviation_metric: true\n",
              [0.0, 0.2, 0.5, 0.9], {"financeiq": 0.30, "fineval": 0.35, "ceval": 0.25})
    write_run(root, "minorsft_lr2e-5_beta0.04", "stage: minorsft\nlearning_rate: 2.0e-5\npref_beta: 0.04\n",
              [0.0, 0.05, 0.1, 0.2], {"financeiq": 0.45, "fineval": 0.40, "ceval": 0.35})
    write_run(root, "sft_dpo_lr2e-5_beta0.04", "stage: sft_dpo\nlearning_rate: 2e-5\npref_beta: 0.04\n",
              [0.0, 0.06, 0.15, 0.25], {"financeiq": 0.40, "fineval": 0.30, "ceval": 0.35})
    # Trained no further than its train.yaml: listed, but neither plotted nor a candidate for best.
    write_run(root, "minorsft_lr3e-5_beta0.04", "stage: minorsft\nlearning_rate: 3.0e-5\npref_beta: 0.04\n")
    return root


def table_rows(markdown: str) -> list:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_report_writes_the_four_files_with_the_numbers_of_the_runs(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *(str(p) for p in sorted(sweep.iterdir())), "--output_dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "deviation.png", "results.csv", "results.md"]

    markdown = (out / "results.md").read_text()
    header = [line for line in markdown.splitlines() if line.startswith("|")][0]
    assert "FinanceIQ (%) | fineval (%) | ceval-exam (%) | Mean (%)" in header
    rows = table_rows(markdown)
    # best, method, lr, beta, steps, final deviation, FinanceIQ, fineval, ceval, mean
    assert rows == [
        ["", "Base model", "—", "—", "—", "—", "25.0", "30.0", "20.0", "25.0"],
        ["★", "SFT", "1e-5", "—", "4", "0.4500", "35.0", "40.0", "30.0", "35.0"],
        ["", "SFT", "2e-5", "—", "4", "0.9000", "30.0", "35.0", "25.0", "30.0"],
        ["★", "SFT using DPO", "2e-5", "0.04", "4", "0.2500", "40.0", "30.0", "35.0", "35.0"],
        ["★", "MinorSFT", "2e-5", "0.04", "4", "0.2000", "45.0", "40.0", "35.0", "40.0"],
        ["", "MinorSFT", "3e-5", "0.04", "not finished", "—", "—", "—", "—", "—"],
    ]
    assert "40 questions per model" in markdown
    assert "minorsft_lr3e-5_beta0.04" in markdown.split("Not finished")[1]

    with open(out / "results.csv", newline="") as f:
        records = {Path(row["run_dir"]).name: row for row in csv.DictReader(f)}
    assert float(records["minorsft_lr2e-5_beta0.04"]["accuracy_financeiq"]) == 0.45
    assert float(records["minorsft_lr2e-5_beta0.04"]["mean_accuracy"]) == pytest.approx(0.4)
    assert float(records["sft_lr2e-5"]["final_deviation"]) == 0.9
    assert float(records["sft_dpo_lr2e-5_beta0.04"]["beta"]) == 0.04
    assert [name for name, row in records.items() if row["best"] == "True"] == [
        "sft_lr1e-5", "sft_dpo_lr2e-5_beta0.04", "minorsft_lr2e-5_beta0.04"]
    assert records["base"]["method"] == "base" and records["minorsft_lr3e-5_beta0.04"]["finished"] == "False"

    for plot in ("deviation.png", "accuracy.png"):
        height, width, _ = imread(out / plot).shape
        assert width >= 800 and height >= 500
    assert "| ★ | MinorSFT | 2e-5 | 0.04 |" in capsys.readouterr().out


def test_a_sweep_root_stands_for_its_runs_and_the_report_dir_is_not_one(sweep):
    out = sweep / "report"
    assert main(["report", str(sweep), "--output_dir", str(out)]) == 0
    first = (out / "results.md").read_text()
    assert main(["report", str(sweep), "--output_dir", str(out)]) == 0  # report/ now exists inside the root
    assert (out / "results.md").read_text() == first
    assert len(table_rows(first)) == 6


def test_runs_without_deviation_or_a_benchmark_are_reported_as_such(tmp_path):
    root = tmp_path / "sweep"
    write_run(root, "sft_lr1e-5", "stage: sft\nlearning_rate: 1.0e-5\n", [], {"ceval": 0.5, "fineval": 0.25})
    write_run(root, "sft_lr2e-5", "stage: sft\nlearning_rate: 2.0e-5\n", [], {"ceval": 0.75})
    out = tmp_path / "report"
    assert main(["report", str(root), "--output_dir", str(out)]) == 0
    markdown = (out / "results.md").read_text()
    # The second run lacks fineval, so it has no mean and cannot be the best despite its ceval score.
    assert table_rows(markdown) == [  # best, method, lr, beta, steps, final deviation, fineval, ceval, mean
        ["★", "SFT", "1e-5", "—", "0", "—", "25.0", "50.0", "37.5"],
        ["", "SFT", "2e-5", "—", "0", "—", "—", "75.0", "—"],
    ]
    assert "No deviation was logged by sft_lr1e-5, sft_lr2e-5" in markdown


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda root: (root / "sft_lr1e-5" / "eval" / "ceval" / "results.json").write_text(
            json.dumps({"task": "ceval", "accuracy": 57.0})), "`accuracy` must be a fraction in [0, 1], got 57.0"),
        (lambda root: (root / "sft_lr1e-5" / "eval" / "ceval" / "results.json").write_text("{"), "is not valid JSON"),
        (lambda root: (root / "sft_lr1e-5" / "train.yaml").write_text("stage: sft\n"), "has no `learning_rate`"),
        (lambda root: (root / "sft_lr1e-5" / "train.yaml").write_text("learning_rate: 1e-5\n"), "has no `stage`"),
        (lambda root: (root / "sft_lr1e-5" / "train.yaml").write_text("stage: sft\nlearning_rate: fast\n"),
         "`learning_rate: fast` is not a number"),
    ],
)
def test_bad_run_files_are_named_and_nothing_is_written(tmp_path, breakage, message):
    root = tmp_path / "sweep"
    write_run(root, "sft_lr1e-5", "stage: sft\nlearning_rate: 1.0e-5\n", [0.0, 0.1], {"ceval": 0.5})
    breakage(root)
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as error:
        main(["report", str(root / "sft_lr1e-5"), "--output_dir", str(out)])
    assert message in str(error.value)
    assert str(root / "sft_lr1e-5") in str(error.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report-")]


def test_a_missing_or_empty_directory_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="is not a directory"):
        main(["report", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no run"):
        main(["report", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])
