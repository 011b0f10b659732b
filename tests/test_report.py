"""``minorsft report`` on hand-made run directories whose numbers are known.

The deviation curves and accuracies here are made up (this tests the report, not training); the
report on real tiny runs is checked end to end in ``test_reproduce.py``.
"""

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from llamafactory_minorsft.cli import main
from llamafactory_minorsft.methods import METHODS
from llamafactory_minorsft.report.plots import METHOD_COLORS, deviation_curves, figure1_measure, pareto_front
from llamafactory_minorsft.report.runs import group_settings, load_run
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.image import imread

from helpers import write_run_record

TASKS = ("financeiq", "fineval", "ceval")  # the paper's order, which the report keeps


def write_eval(run_dir: Path, accuracies: dict, num_questions: int = 40) -> None:
    for task, accuracy in accuracies.items():
        out = run_dir / "eval" / task
        out.mkdir(parents=True)
        (out / "results.json").write_text(
            json.dumps(
                {
                    "task": task,
                    "split": "val",
                    "accuracy": accuracy,
                    "num_questions": num_questions,
                    "subjects": {},
                    "categories": {},
                }
            )
        )


def write_run(
    root: Path,
    name: str,
    config: str,
    deviations=None,
    accuracies=None,
    reference: dict = None,
    evaluations: dict = None,
    coefficients: list = None,
) -> Path:
    """A run directory; a finished one (``deviations`` given) with the run record the plugin's trainer writes
    (``reference``: its reference pass). ``evaluations``: per log key (``eval_<set>_deviation``) its (step, value)
    entries, each logged on an entry of its own, as LLaMA-Factory logs each eval set."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "train.yaml").write_text(config)
    if deviations is not None:
        history = [
            {"step": step, "loss": 2.0 - 0.01 * step, "deviation": value}
            for step, value in enumerate(deviations, start=1)
        ]
        for entry, coefficient in zip(history, coefficients or []):
            entry["coef_mean"] = coefficient
        for key, points in (evaluations or {}).items():
            history += [{"step": step, key.replace("_deviation", "_loss"): 1.9, key: value} for step, value in points]
        history.sort(key=lambda entry: entry["step"])
        (run_dir / "trainer_state.json").write_text(
            json.dumps({"global_step": len(deviations), "log_history": history})
        )
        write_run_record(run_dir, yaml.safe_load(config), reference)
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
    write_run(
        root,
        "sft_lr1e-5",
        "stage: sft\nlearning_rate: 1.0e-5\ndeviation_metric: true\n",
        [0.0, 0.1, 0.3, 0.45],
        {"financeiq": 0.35, "fineval": 0.40, "ceval": 0.30},
    )
    write_run(
        root,
        "sft_lr2e-5",
        "stage: sft\nlearning_rate: 2.0e-5\ndeviation_metric: true\n",
        [0.0, 0.2, 0.5, 0.9],
        {"financeiq": 0.30, "fineval": 0.35, "ceval": 0.25},
    )
    write_run(
        root,
        "minorsft_lr2e-5_beta0.04",
        "stage: minorsft\nlearning_rate: 2.0e-5\npref_beta: 0.04\n",
        [0.0, 0.05, 0.1, 0.2],
        {"financeiq": 0.45, "fineval": 0.40, "ceval": 0.35},
    )
    write_run(
        root,
        "sft_dpo_lr2e-5_beta0.04",
        "stage: sft_dpo\nlearning_rate: 2e-5\npref_beta: 0.04\n",
        [0.0, 0.06, 0.15, 0.25],
        {"financeiq": 0.40, "fineval": 0.30, "ceval": 0.35},
    )
    # Trained no further than its train.yaml: listed, but neither plotted nor a candidate for best.
    write_run(root, "minorsft_lr3e-5_beta0.04", "stage: minorsft\nlearning_rate: 3.0e-5\npref_beta: 0.04\n")
    return root


def report(root: Path, out: Path) -> str:
    """``minorsft report ROOT --output_dir OUT --overwrite`` (some tests report the same root twice); its results.md."""
    assert main(["report", str(root), "--output_dir", str(out), "--overwrite"]) == 0
    return (out / "results.md").read_text()


def table_rows(markdown: str, which: int = 0) -> list:
    """The rows of the ``which``-th table (0: the runs, 1: the settings), header excluded."""
    tables, previous = [], ""
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append([cell.strip() for cell in line.strip("|").split("|")])
        previous = line
    return tables[which][2:]


def read_csv(path: Path) -> dict:
    with open(path, newline="") as f:
        return {Path(row["run_dir"]).name if "run_dir" in row else row["setting"]: row for row in csv.DictReader(f)}


def test_report_writes_its_files_with_the_numbers_of_the_runs(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *(str(p) for p in sorted(sweep.iterdir())), "--output_dir", str(out)]) == 0
    # No run evaluated a drift set: no learning-vs-drift chart, and the notes say why.
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",
        "deviation.png",
        "drift_accuracy.png",
        "results.csv",
        "results.md",
        "settings.csv",
    ]

    markdown = (out / "results.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("|"))
    assert "FinanceIQ (%) | fineval (%) | ceval-exam (%) | Mean (%)" in header
    rows = table_rows(markdown)
    # best, method, lr, β, α, seed (LLaMA-Factory's default), steps, train / held-out deviation, drift, coefficient,
    # FinanceIQ, fineval, ceval, mean
    nothing = ["—", "—", "—"]
    assert rows == [
        ["", "Base model", "—", "—", "—", "—", "—", "—", *nothing, "25.0", "30.0", "20.0", "25.0"],
        ["★", "SFT", "1e-5", "—", "—", "42", "4", "0.4500", *nothing, "35.0", "40.0", "30.0", "35.0"],
        ["", "SFT", "2e-5", "—", "—", "42", "4", "0.9000", *nothing, "30.0", "35.0", "25.0", "30.0"],
        ["★", "SFT using DPO", "2e-5", "0.04", "—", "42", "4", "0.2500", *nothing, "40.0", "30.0", "35.0", "35.0"],
        ["★", "MinorSFT", "2e-5", "0.04", "—", "42", "4", "0.2000", *nothing, "45.0", "40.0", "35.0", "40.0"],
        [
            "",
            "MinorSFT",
            "3e-5",
            "0.04",
            "—",
            "42",
            "not finished",
            "—",
            *nothing,
            "not run",
            "not run",
            "not run",
            "—",
        ],
    ]
    # FinanceIQ's mean accuracy over the rows is 35%: sqrt(0.35 × 0.65 / 40) = 7.5 points.
    assert (
        "FinanceIQ: 40 questions per model; at its mean accuracy of 35% one standard error is 7.5 points." in markdown
    )
    assert "minorsft_lr3e-5_beta0.04" in markdown.split("Not finished")[1]

    records = read_csv(out / "results.csv")
    assert float(records["minorsft_lr2e-5_beta0.04"]["accuracy_financeiq"]) == 0.45
    assert float(records["minorsft_lr2e-5_beta0.04"]["mean_accuracy"]) == pytest.approx(0.4)
    assert float(records["sft_lr2e-5"]["final_train_deviation"]) == 0.9
    assert records["sft_lr2e-5"]["final_heldout_deviation"] == records["sft_lr2e-5"]["final_drift"] == ""
    assert float(records["sft_dpo_lr2e-5_beta0.04"]["beta"]) == 0.04
    assert [name for name, row in records.items() if row["best"] == "True"] == [
        "sft_lr1e-5",
        "sft_dpo_lr2e-5_beta0.04",
        "minorsft_lr2e-5_beta0.04",
    ]
    assert records["base"]["method"] == "base" and records["minorsft_lr3e-5_beta0.04"]["finished"] == "False"

    for plot in ("deviation.png", "accuracy.png", "drift_accuracy.png"):
        height, width, _ = imread(out / plot).shape
        assert width >= 800 and height >= 500
    assert "| ★ | MinorSFT | 2e-5 | 0.04 |" in capsys.readouterr().out
    assert (
        '- `learning_drift.png` not drawn: no run evaluated a drift set (an eval set marked `"drift_set": true` '
        "in dataset_info.json, made by `minorsft drift-set`)."
    ) in markdown
    # Without held-out eval sets, the deviation-accuracy chart stands on the training deviation, and says so.
    assert "no run evaluated a held-out domain set" in markdown


def test_a_sweep_root_stands_for_its_runs_and_the_report_dir_is_not_one(sweep):
    out = sweep / "report"
    assert main(["report", str(sweep), "--output_dir", str(out)]) == 0
    first = (out / "results.md").read_text()
    assert main(["report", str(sweep), "--output_dir", str(out)]) == 2  # refused: report/ holds the first report
    assert main(["report", str(sweep), "--output_dir", str(out), "--overwrite"]) == 0  # report/ is inside the root
    assert (out / "results.md").read_text() == first
    assert len(table_rows(first)) == 6 and len(table_rows(first, 1)) == 5  # five settings: the base is no setting


def test_runs_without_deviation_or_a_benchmark_are_reported_as_such(tmp_path):
    root = tmp_path / "sweep"
    write_run(root, "sft_lr1e-5", "stage: sft\nlearning_rate: 1.0e-5\n", [], {"ceval": 0.5, "fineval": 0.25})
    write_run(root, "sft_lr2e-5", "stage: sft\nlearning_rate: 2.0e-5\n", [], {"ceval": 0.75})
    out = tmp_path / "report"
    markdown = report(root, out)
    # The second run lacks fineval, so it has no mean and cannot be the best despite its ceval score.
    assert [row[:2] + row[6:8] + row[11:] for row in table_rows(markdown)] == [  # steps, train dev., tasks, mean
        ["★", "SFT", "0", "—", "25.0", "50.0", "37.5"],
        ["", "SFT", "0", "—", "not run", "75.0", "—"],
    ]
    assert "- sft_lr2e-5: not evaluated on fineval." in markdown
    assert "sft_lr1e-5:" not in markdown
    assert "No deviation was logged by sft_lr1e-5, sft_lr2e-5" in markdown


def test_each_missing_accuracy_says_why(tmp_path):
    root = tmp_path / "sweep"
    failed = write_run(root, "sft_lr1e-5", "stage: sft\nlearning_rate: 1.0e-5\n", [0.0, 0.1], {"ceval": 0.5})
    (failed / "eval" / "fineval.log").write_text("Traceback ...\n")  # it ran and wrote no results.json
    write_run(root, "sft_lr2e-5", "stage: sft\nlearning_rate: 2.0e-5\n", [0.0, 0.2], {"ceval": 0.75})
    unreachable = write_run(
        root,
        "minorsft_lr2e-5_beta0.04",
        "stage: minorsft\nlearning_rate: 2e-5\npref_beta: 0.04\n",
        [0.0, 0.05],
        {"ceval": 0.25},
    )
    (unreachable / "eval" / "fineval.skipped").write_text("fineval: no local copy and HF_HUB_OFFLINE=1\n")
    out = tmp_path / "report"
    markdown = report(root, out)
    assert [row[:4] + row[6:8] + row[11:] for row in table_rows(markdown)] == [  # steps, train dev., tasks, mean
        ["", "SFT", "1e-5", "—", "2", "0.1000", "failed", "50.0", "50.0"],
        ["★", "SFT", "2e-5", "—", "2", "0.2000", "not run", "75.0", "75.0"],
        ["★", "MinorSFT", "2e-5", "0.04", "2", "0.0500", "no data", "25.0", "25.0"],
    ]  # no run has fineval: the mean and the best are over ceval alone
    assert "- sft_lr1e-5: evaluation failed on fineval (no results.json" in markdown
    assert "- sft_lr2e-5: not evaluated on fineval." in markdown
    assert (
        "**Not measured on fineval: the benchmark data could not be reached (fineval: no local copy and "
        "HF_HUB_OFFLINE=1)." in markdown
    )


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
    assert title == "best setting of each method (by mean accuracy)"
    curves = [line for line in drawn["deviation.png"].axes[0].get_lines() if not line.get_label().startswith("_")]
    assert [list(line.get_ydata()) for line in curves] == [
        [0.0, 0.1, 0.3, 0.45],
        [0.0, 0.06, 0.15, 0.25],
        [0.0, 0.05, 0.1, 0.2],
    ]
    assert sorted(legend(drawn["accuracy.png"])[1]) == sorted(
        ["Base model (SmolLM2-135M-Instruct)", *labels, "chance (4 options)"]
    )


def test_without_accuracy_the_report_says_why_and_figure_1_draws_every_run(tmp_path, drawn):
    root = tmp_path / "sweep"
    reason = "ceval: the Hub is not reachable (HF_HUB_OFFLINE=1) and no local copy was given"
    runs = [
        ("base", None),
        ("sft_lr1e-5", "stage: sft\nlearning_rate: 1.0e-5\ndeviation_metric: true\n"),
        ("sft_lr2e-5", "stage: sft\nlearning_rate: 2.0e-5\ndeviation_metric: true\n"),
        ("sft_dpo_lr2e-5_beta0.04", "stage: sft_dpo\nlearning_rate: 2e-5\npref_beta: 0.04\n"),
        ("minorsft_lr2e-5_beta0.04", "stage: minorsft\nlearning_rate: 2e-5\npref_beta: 0.04\n"),
    ]
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
    assert all(row[11:] == ["no data", "no data", "no data", "—"] and row[0] == "" for row in table_rows(markdown))
    assert (
        "**Accuracy was not measured on FinanceIQ, fineval, ceval-exam: the benchmark data could not be reached "
        f"({reason.replace('ceval', 'financeiq')}; {reason.replace('ceval', 'fineval')}; {reason})."
    ) in markdown
    assert "MINORSFT_EVAL_DATA_DIR" in markdown and "not evaluated" not in markdown

    title, labels = legend(drawn["deviation.png"])
    assert title == "every setting (no accuracy to pick the best by)"
    assert labels == ["SFT (lr 1e-5)", "SFT (lr 2e-5)", "SFT using DPO (lr 2e-5, β 0.04)", "MinorSFT (lr 2e-5, β 0.04)"]
    styles = [line.get_linestyle() for line in drawn["deviation.png"].axes[0].get_lines()][:2]
    assert styles[0] != styles[1]  # the two SFT runs share a colour, not a line style
    for method in ("sft", "sft_dpo", "minorsft"):  # and the PNG holds every method's curve
        assert color_pixels(out / "deviation.png", METHOD_COLORS[method]) > 200, method
    assert drawn["accuracy.png"].axes[0].texts[0].get_text().startswith("accuracy was not measured")
    assert not any(color_pixels(out / "accuracy.png", METHOD_COLORS[m]) for m in ("sft", "sft_dpo", "minorsft"))


def test_the_reference_passes_are_counted_from_the_run_records(tmp_path):
    root = tmp_path / "sweep"
    cache = tmp_path / "sweep" / "ref_logps" / "ref_logps-0123456789abcdef.pt"
    computed = {"mode": "precomputed", "pass": "computed", "seconds": 3.2, "cpu_seconds": 6.1, "cache_file": str(cache)}
    loaded = {"mode": "precomputed", "pass": "loaded", "seconds": None, "cpu_seconds": None, "cache_file": str(cache)}
    write_run(root, "sft_lr1e-5", "stage: sft\nlearning_rate: 1.0e-5\n", [0.0, 0.1], reference=computed)
    for lr in ("1e-5", "2e-5"):
        write_run(
            root,
            f"minorsft_lr{lr}_beta0.04",
            f"stage: minorsft\nlearning_rate: {lr}\npref_beta: 0.04\n",
            [0.0, 0.1],
            reference=loaded,
        )
    write_run(root, "sft_lr3e-5", "stage: sft\nlearning_rate: 3.0e-5\n", [0.0, 0.1], reference={"mode": "online"})
    out = tmp_path / "report"
    assert (
        f"- Reference log-probs (`precompute_ref_logps`): 1 pass, 3.2 s (6.1 s CPU): sft_lr1e-5 computed them "
        f"into `{cache}`; loaded from the cache, without a pass of their own, by minorsft_lr1e-5_beta0.04, "
        f"minorsft_lr2e-5_beta0.04."
    ) in report(root, out)
    records = read_csv(out / "results.csv")
    assert [(r["reference_passes"], r["reference_pass_seconds"], r["reference_loads"]) for r in records.values()] == [
        ("1", "3.2", "0"),
        ("0", "0", "0"),  # the reference computed online, every step
        ("0", "0", "1"),
        ("0", "0", "1"),
    ]

    # A second pass (another reference or data) is counted, with the time of each.
    other = {**computed, "seconds": 4.0, "cpu_seconds": 7.0, "cache_file": str(cache).replace("0123", "fedc")}
    write_run(root, "sft_lr2e-5", "stage: sft\nlearning_rate: 2.0e-5\n", [0.0, 0.1], reference=other)
    assert (
        "Reference log-probs (`precompute_ref_logps`): 2 passes, 7.2 s (13.1 s CPU) in all: sft_lr1e-5 computed "
        f"them into `{cache}` in 3.2 s; sft_lr2e-5 computed them into" in report(root, out)
    )


@pytest.mark.parametrize(
    "breakage, message",
    [
        (
            lambda root: (root / "sft_lr1e-5" / "eval" / "ceval" / "results.json").write_text(
                json.dumps({"task": "ceval", "accuracy": 57.0})
            ),
            "`accuracy` must be a fraction in [0, 1], got 57.0",
        ),
        (lambda root: (root / "sft_lr1e-5" / "eval" / "ceval" / "results.json").write_text("{"), "is not valid JSON"),
        (lambda root: (root / "sft_lr1e-5" / "minorsft_run.json").write_text("{"), "is not valid JSON"),
        (lambda root: (root / "sft_lr1e-5" / "train.yaml").write_text("stage: sft\n"), "has no `learning_rate`"),
        (lambda root: (root / "sft_lr1e-5" / "train.yaml").write_text("learning_rate: 1e-5\n"), "has no `stage`"),
        (
            lambda root: (root / "sft_lr1e-5" / "train.yaml").write_text("stage: sft\nlearning_rate: fast\n"),
            "`learning_rate: fast` is not a number",
        ),
        (
            lambda root: (root / "sft_lr1e-5" / "train.yaml").write_text("stage: kto\nlearning_rate: 1e-5\n"),
            "`stage: kto` is none of the methods",
        ),
        (
            lambda root: (root / "sft_lr1e-5" / "train.yaml").write_text(
                "stage: sft\nlearning_rate: 1e-5\nuse_dft_loss: true\nuse_asft_loss: true\n"
            ),
            "more than one SFT variant",
        ),
    ],
)
def test_bad_run_files_are_named_and_nothing_is_written(tmp_path, capsys, breakage, message):
    root = tmp_path / "sweep"
    write_run(root, "sft_lr1e-5", "stage: sft\nlearning_rate: 1.0e-5\n", [0.0, 0.1], {"ceval": 0.5})
    breakage(root)
    out = tmp_path / "report"
    assert main(["report", str(root / "sft_lr1e-5"), "--output_dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("minorsft report: ") and message in error
    assert str(root / "sft_lr1e-5") in error
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report-")]


def test_a_missing_or_empty_directory_is_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out")]) == 2
    assert f"minorsft report: RUN_DIR {tmp_path / 'nope'}: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")]) == 2
    assert "holds no run" in capsys.readouterr().err


# The six methods, two seeds each, with a held-out domain set and a drift set evaluated at steps 0, 2 and 4. Per
# setting the seeds' mean of: final held-out deviation, final drift (−drift-set deviation), mean accuracy; seed 1
# is the mean minus the spread, seed 2 plus it (spreads 0.02, 0.01, 0.02).
#   drift-accuracy front (lower held-out deviation, higher accuracy): DFT, SFT using DPO, MinorSFT;
#     SFT is dominated by SFT using DPO (lower deviation, higher accuracy), ASFT by DFT (lower deviation, same
#     accuracy), EAFT by MinorSFT (lower deviation, higher accuracy).
#   learning-drift front (more learning, less drift): DFT, MinorSFT, SFT; SFT using DPO and ASFT are dominated by
#     MinorSFT, EAFT by SFT (same learning, more drift).
SIX = {  # method: (extra train.yaml keys, held-out deviation, drift, accuracy)
    "sft": ("stage: sft\nlearning_rate: 1.0e-5\ndeviation_metric: true\n", 0.50, 0.30, 0.40),
    "sft_dpo": ("stage: sft_dpo\nlearning_rate: 2.0e-5\npref_beta: 0.04\n", 0.40, 0.20, 0.42),
    "minorsft": ("stage: minorsft\nlearning_rate: 2.0e-5\npref_beta: 0.04\n", 0.45, 0.10, 0.45),
    "dft": ("stage: sft\nlearning_rate: 1.0e-5\nuse_dft_loss: true\ndeviation_metric: true\n", 0.10, 0.05, 0.30),
    "asft": ("stage: sft\nlearning_rate: 1.0e-5\nuse_asft_loss: true\ndeviation_metric: true\n", 0.30, 0.12, 0.30),
    "eaft": (
        "stage: sft\nlearning_rate: 1.0e-5\nuse_eaft_loss: true\neaft_alpha: 0.5\ndeviation_metric: true\n",
        0.50,
        0.35,
        0.44,
    ),
}
COEFFICIENTS = {1: [1.0, 0.98, 0.95, 0.90], 2: [1.0, 0.97, 0.93, 0.88]}  # MinorSFT's coef_mean per step
TRAIN_DEVIATIONS = [0.01, 0.2, 0.6, 1.0]  # unlike any eval value: Figure 1 must not draw these when evals exist


def write_dataset_info(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    (directory / "dataset_info.json").write_text(
        json.dumps(
            {
                "finance_heldout": {"file_name": "finance.json", "split": "train[300:]", "columns": columns},
                "general_drift": {"file_name": "general_drift.json", "columns": columns, "drift_set": True},
                "general_drift2": {"file_name": "general_drift2.json", "columns": columns, "drift_set": True},
                "general_unmarked": {"file_name": "general_unmarked.json", "columns": columns},
            }
        )
    )
    return directory


@pytest.fixture
def six(tmp_path) -> Path:
    root = tmp_path / "six"
    data = write_dataset_info(tmp_path / "data")
    base = root / "base"
    base.mkdir(parents=True)
    (base / "model.yaml").write_text("model_name_or_path: /models/SmolLM2-135M-Instruct\n")
    write_eval(base, {"financeiq": 0.25, "fineval": 0.25})
    evals = f"dataset_dir: {data}\neval_dataset: finance_heldout,general_drift\neval_on_each_dataset: true\n"
    for method, (config, heldout, drift, accuracy) in SIX.items():
        for seed, sign in ((1, -1), (2, 1)):
            h, d, a = heldout + sign * 0.02, drift + sign * 0.01, accuracy + sign * 0.02
            write_run(
                root,
                f"{method}_seed{seed}",
                config + evals + f"seed: {seed}\n",
                TRAIN_DEVIATIONS,
                {"financeiq": a, "fineval": a},
                evaluations={
                    "eval_finance_heldout_deviation": [(0, 0.0), (2, h / 2), (4, h)],
                    "eval_general_drift_deviation": [(0, 0.0), (2, -d / 2), (4, -d)],
                },
                coefficients=COEFFICIENTS[seed] if method == "minorsft" else None,
            )
    # A third seed that has not finished: a run of the setting, left out of its numbers and never marked best.
    write_run(root, "minorsft_seed3", SIX["minorsft"][0] + evals + "seed: 3\n")
    return root


def test_six_methods_with_seeds_on_held_out_and_drift_sets(six, tmp_path, drawn):
    out = tmp_path / "report"
    markdown = report(six, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",
        "deviation.png",
        "drift_accuracy.png",
        "learning_drift.png",
        "results.csv",
        "results.md",
        "settings.csv",
    ]
    assert "*not run* (never evaluated" in markdown
    records = read_csv(out / "results.csv")
    # The method from the train.yaml alone (run names say nothing of use_dft_loss), the seed, β and α only where
    # the method has them (ASFT's α is LLaMA-Factory's default).
    assert {name: records[f"{name}_seed1"]["method"] for name in SIX} == {name: name for name in SIX}
    assert [
        (records[f"{m}_seed2"]["seed"], records[f"{m}_seed2"]["beta"], records[f"{m}_seed2"]["alpha"]) for m in SIX
    ] == [("2", "", ""), ("2", "0.04", ""), ("2", "0.04", ""), ("2", "", ""), ("2", "", "0.1"), ("2", "", "0.5")]
    minorsft = records["minorsft_seed1"]
    assert (minorsft["heldout_set"], minorsft["drift_set"]) == ("finance_heldout", "general_drift")
    assert float(minorsft["final_heldout_deviation"]) == pytest.approx(0.43)
    assert float(minorsft["final_drift"]) == pytest.approx(0.09)  # minus the drift set's −0.09
    assert float(minorsft["final_train_deviation"]) == 1.0
    assert (float(minorsft["coefficient_first"]), float(minorsft["coefficient_last"])) == (1.0, 0.9)
    assert records["sft_seed1"]["coefficient_first"] == records["sft_seed1"]["coefficient_last"] == ""
    assert (
        "| MinorSFT | 2e-5 | 0.04 | — | 1 | 4 | 1.0000 | 0.4300 | 0.0900 | 1.000 → 0.900 | 43.0 | 43.0 | 43.0 |"
        in markdown
    )

    settings = read_csv(out / "settings.csv")
    assert list(settings) == [
        f"{METHODS[m].label} ({s})"
        for m, s in (
            ("sft", "lr 1e-5"),
            ("sft_dpo", "lr 2e-5, β 0.04"),
            ("minorsft", "lr 2e-5, β 0.04"),
            ("dft", "lr 1e-5"),
            ("asft", "lr 1e-5, α 0.1"),
            ("eaft", "lr 1e-5, α 0.5"),
        )
    ]
    summary = settings["MinorSFT (lr 2e-5, β 0.04)"]
    assert (summary["seeds"], summary["runs"], summary["finished_runs"]) == ("1 2", "3", "2")
    assert (records["minorsft_seed1"]["best"], records["minorsft_seed3"]["best"]) == ("True", "False")
    assert records["minorsft_seed3"]["pareto_learning_drift"] == "False"
    for measure, expected in (
        ("heldout_deviation", (0.45, 0.43, 0.47)),
        ("drift", (0.10, 0.09, 0.11)),
        ("mean_accuracy", (0.45, 0.43, 0.47)),
        ("coefficient_last", (0.89, 0.88, 0.90)),
    ):
        assert [float(summary[f"{measure}_{part}"]) for part in ("mean", "min", "max")] == pytest.approx(expected)
    assert [
        "★",
        "MinorSFT (lr 2e-5, β 0.04)",
        "1, 2",
        "1.0000 [1.0000, 1.0000]",
        "0.4500 [0.4300, 0.4700]",
        "—",  # no per-token held-out deviation logged
        "0.1000 [0.0900, 0.1100]",
        "0.8900 [0.8800, 0.9000]",
        "45.0 [43.0, 47.0]",
        "drift_accuracy, learning_drift",
    ] in table_rows(markdown, 1)

    # The Pareto fronts: the dominated settings are not on them, the others are.
    front = {
        name: [label for label, row in settings.items() if row[f"pareto_{name}"] == "True"]
        for name in ("drift_accuracy", "learning_drift")
    }
    assert front == {
        "drift_accuracy": ["SFT using DPO (lr 2e-5, β 0.04)", "MinorSFT (lr 2e-5, β 0.04)", "DFT (lr 1e-5)"],
        "learning_drift": ["SFT (lr 1e-5)", "MinorSFT (lr 2e-5, β 0.04)", "DFT (lr 1e-5)"],
    }
    assert records["dft_seed2"]["pareto_learning_drift"] == "True"
    assert records["eaft_seed2"]["pareto_learning_drift"] == "False"
    assert (
        "`learning_drift.png`, learning against drift (both per token, against the base model); Pareto front "
        "(best trade-offs): DFT (lr 1e-5): 0.0500, 0.1000; MinorSFT (lr 2e-5, β 0.04): 0.1000, 0.4500; "
        "SFT (lr 1e-5): 0.3000, 0.5000."
    ) in markdown

    # The charts draw the settings' means, the six methods trained here in the legend, the base model as a reference.
    for name, x, y in (
        ("learning_drift.png", "final_drift", "final_heldout_deviation"),
        ("drift_accuracy.png", "final_heldout_deviation", "mean_accuracy"),
    ):
        axes = drawn[name].axes[0]
        assert [text.get_text() for text in axes.get_legend().get_texts()] == [
            *(method.label for method in METHODS.values() if method.name != "sft_sample" and not method.preference),
            "Base model (SmolLM2-135M-Instruct): reference"
            if name == "drift_accuracy.png"
            else "Base model: reference",
            "Pareto front (best trade-offs)",
        ]
        front_line = next(line for line in axes.get_lines() if line.get_label().startswith("Pareto"))
        scale = 100 if name == "drift_accuracy.png" else 1
        names = {"drift_accuracy.png": ("dft", "sft_dpo", "minorsft"), "learning_drift.png": ("dft", "minorsft", "sft")}
        means = {
            axis: [np.mean([float(records[f"{m}_seed{s}"][key]) for s in (1, 2)]) for m in names[name]]
            for axis, key in (("x", x), ("y", y))
        }
        assert list(front_line.get_xdata()) == pytest.approx(means["x"])
        assert list(front_line.get_ydata()) == pytest.approx([scale * value for value in means["y"]])
    assert "KL(π_ref‖π_θ) per response token" in drawn["learning_drift.png"].axes[0].get_xlabel()
    assert "held-out domain deviation" in drawn["drift_accuracy.png"].axes[0].get_xlabel()


def test_figure_1_draws_the_held_out_deviation_at_the_evaluations_when_runs_have_them(six, tmp_path, drawn):
    out = tmp_path / "report"
    report(six, out)
    figure = drawn["deviation.png"]
    axes = figure.axes[0]
    assert "held-out domain deviation" in axes.get_ylabel() and "held-out domain deviation" in figure.get_suptitle()
    curves = {line.get_label(): line for line in axes.get_lines() if not line.get_label().startswith("_")}
    minorsft = curves["MinorSFT (lr 2e-5, β 0.04), mean of 2 seeds"]
    assert list(minorsft.get_xdata()) == [0, 2, 4]  # the evaluations, not the training steps 1-4
    assert list(minorsft.get_ydata()) == pytest.approx([0.0, 0.225, 0.45])
    assert len(curves) == 6
    # The seeds' range is a band around each mean.
    band = axes.collections[0].get_paths()[0].vertices
    assert band[:, 1].max() == pytest.approx(0.52) and band[:, 1].min() == pytest.approx(0.0)

    # The same through the function, on settings of one seed and without held-out sets: the training deviation.
    runs = [load_run(str(six / "minorsft_seed1"))]
    runs[0].heldout = []
    settings = group_settings(runs)
    curves, _ = deviation_curves(settings, {}, figure1_measure(runs))
    assert (curves[0].steps, curves[0].mean) == ([1, 2, 3, 4], TRAIN_DEVIATIONS)


@pytest.mark.parametrize(
    ("eval_dataset", "key", "kind"),
    [
        ("general_drift", "eval_deviation", "drift"),  # one eval set: `eval_deviation`, a drift set by its mark
        ("general_unmarked", "eval_deviation", "heldout"),  # general prompts, but not marked: domain data
        (None, "eval_deviation", "heldout"),  # a `val_size` split of the training data
        ("general_unmarked,general_drift", "eval_general_unmarked_deviation", "heldout"),
        ("general_unmarked,general_drift", "eval_general_drift_deviation", "drift"),
        ("general_drift,general_drift2", "eval_deviation", "drift"),  # merged, drift sets only: still drift
        ("general_unmarked,general_drift", "eval_deviation", "merged"),  # merged kinds: neither measure
    ],
)
def test_eval_sets_are_drift_sets_by_their_mark_and_domain_data_otherwise(tmp_path, eval_dataset, key, kind):
    data = write_dataset_info(tmp_path / "data")
    config = {"stage": "minorsft", "learning_rate": 1e-5, "pref_beta": 0.04, "dataset_dir": str(data), "seed": 3}
    if eval_dataset:
        config["eval_dataset"] = eval_dataset
    else:
        config["val_size"] = 0.1
    if key != "eval_deviation":
        config["eval_on_each_dataset"] = True  # each set logged under its own name
    run_dir = write_run(tmp_path, "run", yaml.safe_dump(config), [0.0, 0.1], evaluations={key: [(1, -0.25), (2, -0.5)]})
    run = load_run(str(run_dir))
    logged = [(1, -0.25), (2, -0.5)]
    assert (run.heldout, run.drift) == {"heldout": (logged, []), "drift": ([], logged), "merged": ([], [])}[kind]
    assert run.final_drift == (0.5 if kind == "drift" else None)
    assert run.merged_eval_sets == (["general_unmarked", "general_drift"] if kind == "merged" else [])
    if eval_dataset is None:
        assert run.heldout_set == "`val_size` split"


def test_eval_deviations_without_a_run_record_are_named(tmp_path, capsys):
    """The run record says which eval sets are drift sets; without it the report cannot tell and says so."""
    config = {"stage": "sft", "learning_rate": 1e-5, "deviation_metric": True, "eval_dataset": "x"}
    run_dir = write_run(
        tmp_path / "sweep", "run", yaml.safe_dump(config), [0.0], evaluations={"eval_deviation": [(1, 0.1)]}
    )
    (run_dir / "minorsft_run.json").unlink()
    assert main(["report", str(tmp_path / "sweep"), "--output_dir", str(tmp_path / "out")]) == 2
    assert (
        f"{run_dir / 'trainer_state.json'} holds evaluation deviations, but minorsft_run.json, which says which eval "
        "sets are drift sets, is missing beside it"
    ) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pareto_front():
    points = [
        (0.1, 0.3, "a"),
        (0.3, 0.3, "dominated by a: more cost, same gain"),
        (0.2, 0.5, "b"),
        (0.2, 0.4, "dominated by b: same cost, less gain"),
        (0.5, 0.6, "c"),
        (0.6, 0.55, "dominated by c"),
    ]
    assert pareto_front(points) == ["a", "b", "c"]
    assert pareto_front([(0.1, 0.2, "x"), (0.1, 0.2, "y")]) == ["x", "y"]  # ties dominate neither


@pytest.mark.slow
def test_minorsft_report_command(six, tmp_path):
    """The installed console script, as the sweep calls it: one RUN_DIR per run plus the base model's dir."""
    out = tmp_path / "report"
    command = [
        "minorsft",
        "report",
        *(str(path) for path in sorted(six.iterdir())),
        "--output_dir",
        str(out),
        "--overwrite",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "learning_drift.png" in result.stdout.splitlines()[-1]
    assert len(read_csv(out / "results.csv")) == 14
    assert subprocess.run(command[:-1], capture_output=True, text=True, timeout=300).returncode == 2  # not empty


# --- learning against drift (the exact KL on the drift set; learning per sample and per token) -------------


def test_drift_at_learning_interpolates_at_the_first_crossing():
    from llamafactory_minorsft.report.paths import drift_at_learning

    path = [(0, 0.0, 0.0), (10, 0.02, 0.2), (20, 0.05, 0.6), (30, 0.09, 0.4), (40, 0.12, 0.8)]
    assert drift_at_learning(path, 0.1) == pytest.approx(0.01)  # half-way to the first evaluation
    assert drift_at_learning(path, 0.5) == pytest.approx(0.02 + 0.03 * 0.75)
    # 0.5 is reached again between steps 30 and 40; the first crossing counts, not the later one.
    assert drift_at_learning(path, 0.7) == pytest.approx(0.09 + 0.03 * 0.75)
    assert drift_at_learning(path, 0.9) is None


def heldout_drift_run(
    root: Path, name: str, config: str, heldout: list, token: list, kl: list, coefficients=None, every: int = 10
):
    """A run evaluated every ``every`` steps on a held-out set and a drift set with ``kl_metric``, as the figure1
    recipes (every 10 steps)."""
    steps = [every * (index + 1) for index in range(len(heldout))]
    config += (
        "eval_dataset: finance_qa_heldout,smollm2_general_drift\neval_on_each_dataset: true\n"
        f"dataset_dir: {Path(__file__).resolve().parent.parent / 'data'}\n"
    )
    return write_run(
        root,
        name,
        config,
        [0.1] * steps[-1],
        coefficients=coefficients,
        evaluations={
            "eval_finance_qa_heldout_deviation": list(zip(steps, heldout)),
            "eval_finance_qa_heldout_token_deviation": list(zip(steps, token)),
            "eval_smollm2_general_drift_deviation": list(zip(steps, [-value for value in kl])),
            "eval_smollm2_general_drift_kl": list(zip(steps, kl)),
        },
    )


@pytest.fixture
def path_runs(tmp_path) -> Path:
    root = tmp_path / "paths"
    # SFT's final per-sample gain is 0.8 (mean of its two seeds), so the levels are 0.2, 0.4 and 0.6.
    for seed, scale in ((1, 1.0), (2, 1.0)):
        heldout_drift_run(
            root,
            f"sft_lr5e-5_seed{seed}",
            f"stage: sft\nlearning_rate: 5.0e-5\ndeviation_metric: true\nseed: {seed}\n",
            [0.4 * scale, 0.8 * scale],
            [0.5, 1.0],
            [0.1 * seed, 0.3 * seed],
        )
    # MinorSFT reaches 0.2 at half its first interval (drift 0.025 / 0.03) and never reaches 0.6.
    for seed, kl in ((1, [0.05, 0.08]), (2, [0.06, 0.09])):
        heldout_drift_run(
            root,
            f"minorsft_lr5e-5_beta0.1_seed{seed}",
            f"stage: minorsft\nlearning_rate: 5.0e-5\npref_beta: 0.1\nseed: {seed}\n",
            [0.4, 0.5],
            [0.3, 0.4],
            kl,
            coefficients=[1.0] * 5 + [0.4] * 15,
        )
    return root


def test_equal_learning_tables_read_the_drift_at_fractions_of_sfts_final_gain(path_runs):
    from llamafactory_minorsft.report.paths import coefficient_checks, equal_learning_table

    runs = sorted((load_run(str(path)) for path in sorted(path_runs.iterdir())), key=lambda run: run.name)
    settings = group_settings(sorted(runs, key=lambda run: (run.method != "sft", run.name)))
    per_sample = equal_learning_table(settings, "per sample")
    assert per_sample.levels == pytest.approx([0.2, 0.4, 0.6])
    cells = dict(per_sample.rows)
    # SFT: seed 1 reaches 0.2 at 0.05 and 0.4 at 0.1 (its first evaluation); seed 2 at 0.1 and 0.2.
    assert cells["SFT (lr 5e-5)"][0] == "0.0750 [0.0500, 0.1000]"
    assert cells["SFT (lr 5e-5)"][2] == "0.3000 [0.2000, 0.4000]"  # 0.6: half-way between 0.4 and 0.8
    assert cells["MinorSFT (lr 5e-5, β 0.1)"][0] == "0.0275 [0.0250, 0.0300]"
    assert cells["MinorSFT (lr 5e-5, β 0.1)"][2] == "never reached (2 seeds)"
    per_token = equal_learning_table(settings, "per token")
    assert per_token.levels == pytest.approx([0.25, 0.5, 0.75])
    assert dict(per_token.rows)["MinorSFT (lr 5e-5, β 0.1)"][1] == "never reached (2 seeds)"
    [check] = coefficient_checks(settings)
    assert (check.step, check.total_steps, check.acted) == (6, 20, True)  # below 0.5 from step 6: 70% after


def test_the_report_draws_the_paths_and_tabulates_drift_at_equal_learning(path_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(path_runs), "--output_dir", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "## Learning against drift" in text and "### Drift at equal learning (per token)" in text
    assert "| MinorSFT (lr 5e-5, β 0.1) | 0.0275 [0.0250, 0.0300] |" in text
    assert "### When MinorSFT's coefficient acted" in text
    assert "Short runs" not in text  # 20 steps
    for name in ("learning_drift_paths.png", "dynamics.png"):
        image = imread(out / name)
        assert image.shape[0] > 400 and image[..., :3].std() > 0.05  # drawn, not blank
    # The final-point drift is the exact KL where it was logged (not minus the deviation, here equal anyway).
    rows = {Path(row["run_dir"]).name: row for row in csv.DictReader((out / "results.csv").open())}
    assert float(rows["minorsft_lr5e-5_beta0.1_seed1"]["final_drift"]) == pytest.approx(0.08)
    assert rows["minorsft_lr5e-5_beta0.1_seed1"]["drift_measure"] == "exact KL"
    assert float(rows["sft_lr5e-5_seed2"]["final_heldout_token_deviation"]) == pytest.approx(1.0)


def test_a_report_of_short_runs_says_what_they_cannot_show(tmp_path):
    """The demo's runs: 8 steps, evaluated at 4 and 8. The paths are drawn, and the report says plainly that runs
    this short do not answer which method drifts less for the same learning."""
    root, out = tmp_path / "demo", tmp_path / "report"
    for name, config, kl in (
        ("sft_lr5e-5", "stage: sft\nlearning_rate: 5.0e-5\ndeviation_metric: true\n", [0.02, 0.04]),
        ("minorsft_lr1e-4_beta0.04", "stage: minorsft\nlearning_rate: 1.0e-4\npref_beta: 0.04\n", [0.05, 0.1]),
    ):
        heldout_drift_run(root, name, config, [0.5, 0.6], [0.4, 0.5], kl, coefficients=[1.0] * 8, every=4)
    assert main(["report", str(root), "--output_dir", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "**Short runs: at most 8 optimizer steps.**" in text
    assert text.index("**Short runs") < text.index("### Drift at equal learning (per sample)")
    assert (out / "learning_drift_paths.png").is_file()
