"""``minorsft report`` on hand-made run directories whose numbers are known.

The deviation curves and accuracies here are made up (this tests the report, not training); the
report on real tiny runs is checked end to end in ``test_reproduce.py``.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from llamafactory_minorsft.cli import main
from llamafactory_minorsft.report_plots import METHOD_COLORS
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.image import imread

TASKS = ("financeiq", "fineval", "ceval")  # the paper's order, which the report keeps


def write_eval(run_dir: Path, accuracies: dict, num_questions: int = 40) -> None:
    for task, accuracy in accuracies.items():
        out = run_dir / "eval" / task
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps(
            {"task": task, "split": "val", "accuracy": accuracy, "num_questions": num_questions,
             "subjects": {}, "categories": {}}))


def write_run(root: Path, name: str, config: str, deviations=None, accuracies=None, train_log: str = "") -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    if train_log:
        (run_dir / "train.log").write_text(train_log)
    (run_dir / "train.yaml").write_text(config)
    if deviations is not None:
        history = [{"step": step, "loss": 2.0 - 0.01 * step, "deviation": value}
                   for step, value in enumerate(deviations, start=1)]
        history.insert(2, {"step": 2, "eval_loss": 1.9, "eval_deviation": 0.5})  # eval entries are not the curve
        (run_dir / "trainer_state.json").write_text(
            json.dumps({"global_step": len(deviations), "log_history": history})
        )
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


def report(root: Path, out: Path) -> str:
    """``minorsft report ROOT --output_dir OUT --overwrite`` (some tests report the same root twice); its results.md."""
    assert main(["report", str(root), "--output_dir", str(out), "--overwrite"]) == 0
    return (out / "results.md").read_text()


def table_rows(markdown: str) -> list:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_report_writes_the_four_files_with_the_numbers_of_the_runs(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *(str(p) for p in sorted(sweep.iterdir())), "--output_dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "deviation.png", "results.csv", "results.md"]

    markdown = (out / "results.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("|"))
    assert "FinanceIQ (%) | fineval (%) | ceval-exam (%) | Mean (%)" in header
    rows = table_rows(markdown)
    # best, method, lr, beta, steps, final deviation, FinanceIQ, fineval, ceval, mean
    assert rows == [
        ["", "Base model", "—", "—", "—", "—", "25.0", "30.0", "20.0", "25.0"],
        ["★", "SFT", "1e-5", "—", "4", "0.4500", "35.0", "40.0", "30.0", "35.0"],
        ["", "SFT", "2e-5", "—", "4", "0.9000", "30.0", "35.0", "25.0", "30.0"],
        ["★", "SFT using DPO", "2e-5", "0.04", "4", "0.2500", "40.0", "30.0", "35.0", "35.0"],
        ["★", "MinorSFT", "2e-5", "0.04", "4", "0.2000", "45.0", "40.0", "35.0", "40.0"],
        ["", "MinorSFT", "3e-5", "0.04", "not finished", "—", "not run", "not run", "not run", "—"],
    ]
    # FinanceIQ's mean accuracy over the rows is 35%: sqrt(0.35 × 0.65 / 40) = 7.5 points.
    assert (
        "FinanceIQ: 40 questions per model; at its mean accuracy of 35% one standard error is 7.5 points." in markdown
    )
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
    assert main(["report", str(sweep), "--output_dir", str(out)]) == 2  # refused: report/ holds the first report
    assert main(["report", str(sweep), "--output_dir", str(out), "--overwrite"]) == 0  # report/ is inside the root
    assert (out / "results.md").read_text() == first
    assert len(table_rows(first)) == 6


def test_runs_without_deviation_or_a_benchmark_are_reported_as_such(tmp_path):
    root = tmp_path / "sweep"
    write_run(root, "sft_lr1e-5", "stage: sft\nlearning_rate: 1.0e-5\n", [], {"ceval": 0.5, "fineval": 0.25})
    write_run(root, "sft_lr2e-5", "stage: sft\nlearning_rate: 2.0e-5\n", [], {"ceval": 0.75})
    out = tmp_path / "report"
    markdown = report(root, out)
    # The second run lacks fineval, so it has no mean and cannot be the best despite its ceval score.
    assert table_rows(markdown) == [  # best, method, lr, beta, steps, final deviation, fineval, ceval, mean
        ["★", "SFT", "1e-5", "—", "0", "—", "25.0", "50.0", "37.5"],
        ["", "SFT", "2e-5", "—", "0", "—", "not run", "75.0", "—"],
    ]
    assert "- sft_lr2e-5: not evaluated on fineval." in markdown
    assert "sft_lr1e-5:" not in markdown
    assert "No deviation was logged by sft_lr1e-5, sft_lr2e-5" in markdown


def test_each_missing_accuracy_says_why(tmp_path):
    root = tmp_path / "sweep"
    failed = write_run(root, "sft_lr1e-5", "stage: sft\nlearning_rate: 1.0e-5\n", [0.0, 0.1], {"ceval": 0.5})
    (failed / "eval" / "fineval.log").write_text("Traceback ...\n")  # it ran and wrote no results.json
    write_run(root, "sft_lr2e-5", "stage: sft\nlearning_rate: 2.0e-5\n", [0.0, 0.2], {"ceval": 0.75})
    unreachable = write_run(root, "minorsft_lr2e-5_beta0.04", "stage: minorsft\nlearning_rate: 2e-5\npref_beta: 0.04\n",
                            [0.0, 0.05], {"ceval": 0.25})
    (unreachable / "eval" / "fineval.skipped").write_text("fineval: no local copy and HF_HUB_OFFLINE=1\n")
    out = tmp_path / "report"
    markdown = report(root, out)
    assert table_rows(markdown) == [  # best, method, lr, beta, steps, final deviation, fineval, ceval, mean
        ["", "SFT", "1e-5", "—", "2", "0.1000", "failed", "50.0", "50.0"],
        ["★", "SFT", "2e-5", "—", "2", "0.2000", "not run", "75.0", "75.0"],
        ["★", "MinorSFT", "2e-5", "0.04", "2", "0.0500", "no data", "25.0", "25.0"],
    ]  # no run has fineval: the mean and the best are over ceval alone
    assert "- sft_lr1e-5: evaluation failed on fineval (no results.json" in markdown
    assert "- sft_lr2e-5: not evaluated on fineval." in markdown
    assert "**Not measured on fineval: the benchmark data could not be reached (fineval: no local copy and " \
           "HF_HUB_OFFLINE=1)." in markdown


@pytest.fixture
def drawn(monkeypatch) -> dict:
    """The figures the report saves, by file name, to look at what they draw."""
    figures, savefig = {}, Figure.savefig

    def record(figure, path, *args, **kwargs):
        figures[Path(path).name] = figure
        return savefig(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def legend(figure: Figure) -> tuple:
    box = figure.axes[0].get_legend()
    return box.get_title().get_text(), [text.get_text() for text in box.get_texts()]


def color_pixels(png: Path, color: str) -> int:
    """How many pixels of the image have exactly this colour (antialiasing aside: within 2 %)."""
    image = imread(png)[..., :3]
    return int((np.abs(image - np.array(to_rgb(color))).max(axis=-1) < 0.02).sum())


def test_figure_1_draws_the_best_run_of_each_method_when_accuracies_picked_them(sweep, tmp_path, drawn):
    out = tmp_path / "report"
    assert main(["report", str(sweep), "--output_dir", str(out)]) == 0
    title, labels = legend(drawn["deviation.png"])
    assert labels == ["SFT (lr 1e-5)", "SFT using DPO (lr 2e-5, β 0.04)", "MinorSFT (lr 2e-5, β 0.04)"]
    assert title == "best run of each method (by mean accuracy)"
    curves = [line for line in drawn["deviation.png"].axes[0].get_lines() if not line.get_label().startswith("_")]
    assert [list(line.get_ydata()) for line in curves] == [[0.0, 0.1, 0.3, 0.45], [0.0, 0.06, 0.15, 0.25],
                                                           [0.0, 0.05, 0.1, 0.2]]
    assert sorted(legend(drawn["accuracy.png"])[1]) == sorted(["Base model (SmolLM2-135M-Instruct)", *labels,
                                                               "chance (4 options)"])


def test_without_accuracy_the_report_says_why_and_figure_1_draws_every_run(tmp_path, drawn):
    root = tmp_path / "sweep"
    reason = "ceval: the Hub is not reachable (HF_HUB_OFFLINE=1) and no local copy was given"
    runs = [("base", None), ("sft_lr1e-5", "stage: sft\nlearning_rate: 1.0e-5\ndeviation_metric: true\n"),
            ("sft_lr2e-5", "stage: sft\nlearning_rate: 2.0e-5\ndeviation_metric: true\n"),
            ("sft_dpo_lr2e-5_beta0.04", "stage: sft_dpo\nlearning_rate: 2e-5\npref_beta: 0.04\n"),
            ("minorsft_lr2e-5_beta0.04", "stage: minorsft\nlearning_rate: 2e-5\npref_beta: 0.04\n")]
    for index, (name, config) in enumerate(runs):
        if config is None:
            (root / name).mkdir(parents=True)
            (root / name / "model.yaml").write_text("model_name_or_path: /models/tiny\n")
        else:
            write_run(root, name, config, [0.0, 0.1 * index, 0.2 * index])
        (root / name / "eval").mkdir()
        for task in TASKS:  # what reproduce.sh leaves when it cannot reach the benchmark data
            (root / name / "eval" / f"{task}.skipped").write_text(reason.replace("ceval", task) + "\n")
    out = tmp_path / "report"
    markdown = report(root, out)
    assert all(row[6:] == ["no data", "no data", "no data", "—"] and row[0] == "" for row in table_rows(markdown))
    assert ("**Accuracy was not measured on FinanceIQ, fineval, ceval-exam: the benchmark data could not be reached "
            f"({reason.replace('ceval', 'financeiq')}; {reason.replace('ceval', 'fineval')}; {reason}).") in markdown
    assert "MINORSFT_EVAL_DATA_DIR" in markdown and "not evaluated" not in markdown

    title, labels = legend(drawn["deviation.png"])
    assert title == "every run (no accuracy to pick the best by)"
    assert labels == ["SFT (lr 1e-5)", "SFT (lr 2e-5)", "SFT using DPO (lr 2e-5, β 0.04)", "MinorSFT (lr 2e-5, β 0.04)"]
    styles = [line.get_linestyle() for line in drawn["deviation.png"].axes[0].get_lines()][:2]
    assert styles[0] != styles[1]  # the two SFT runs share a colour, not a line style
    for method in ("sft", "sft_dpo", "minorsft"):  # and the PNG holds every method's curve
        assert color_pixels(out / "deviation.png", METHOD_COLORS[method]) > 200, method
    assert drawn["accuracy.png"].axes[0].texts[0].get_text().startswith("accuracy was not measured")
    assert not any(color_pixels(out / "accuracy.png", METHOD_COLORS[m]) for m in ("sft", "sft_dpo", "minorsft"))


def test_the_reference_passes_are_counted_from_the_training_logs(tmp_path):
    root = tmp_path / "sweep"
    cache = tmp_path / "sweep" / "ref_logps" / "ref_logps-0123456789abcdef.pt"
    # As train.log has them: after a progress bar's carriage return, under LLaMA-Factory's logger.
    prefix = (
        "  0%|          | 0/4 [00:00<?, ?it/s][INFO|2026-11-27 22:00:00] "
        "llamafactory.llamafactory_minorsft.ref_cache:316 >> "
    )
    computed = (f"{prefix}Computed reference log-probs of 16 samples (412 label tokens) in 3.2 s (6.1 s CPU time on "
                f"rank 0) on 1 rank(s); saved to {cache}.\n")
    loaded = f"{prefix}Loaded reference log-probs of 16 samples from {cache}.\n"
    write_run(root, "sft_lr1e-5", "stage: sft\nlearning_rate: 1.0e-5\n", [0.0, 0.1], train_log="...\n" + computed)
    write_run(root, "minorsft_lr1e-5_beta0.04", "stage: minorsft\nlearning_rate: 1e-5\npref_beta: 0.04\n", [0.0, 0.1],
              train_log=loaded)
    write_run(root, "minorsft_lr2e-5_beta0.04", "stage: minorsft\nlearning_rate: 2e-5\npref_beta: 0.04\n", [0.0, 0.1],
              train_log=loaded + "=== resumed\n" + loaded)
    out = tmp_path / "report"
    assert (f"- Reference log-probs (`precompute_ref_logps`): 1 pass, 3.2 s (6.1 s CPU): sft_lr1e-5 computed them "
            f"into `{cache}`; loaded from the cache, without a pass of their own, by minorsft_lr1e-5_beta0.04, "
            f"minorsft_lr2e-5_beta0.04.") in report(root, out)
    with open(out / "results.csv", newline="") as f:
        records = {Path(row["run_dir"]).name: row for row in csv.DictReader(f)}
    assert [(r["reference_passes"], r["reference_pass_seconds"], r["reference_loads"]) for r in records.values()] == [
        ("1", "3.2", "0"), ("0", "0", "1"), ("0", "0", "2")]

    # A second pass (another reference or data) is counted, with the time of each.
    write_run(root, "sft_lr2e-5", "stage: sft\nlearning_rate: 2.0e-5\n", [0.0, 0.1],
              train_log=computed.replace("3.2 s (6.1", "4.0 s (7.0").replace("0123456789abcdef", "fedcba9876543210"))
    assert "Reference log-probs (`precompute_ref_logps`): 2 passes, 7.2 s (13.1 s CPU) in all: sft_lr1e-5 computed " \
           f"them into `{cache}` in 3.2 s; sft_lr2e-5 computed them into" in report(root, out)


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


def test_a_missing_or_empty_directory_is_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out")]) == 2
    assert f"minorsft report: RUN_DIR {tmp_path / 'nope'}: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no run"):
        main(["report", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])
