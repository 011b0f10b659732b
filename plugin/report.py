"""``minorsft report``: the results table and plots of a sweep, like the paper's Figures 1 and 2.

A run directory is what ``reproduce.sh`` leaves: ``train.yaml`` (method, learning rate and β are read
from it), LLaMA-Factory's ``trainer_state.json`` (the ``deviation`` of Eq. 8 per logged step) and
``eval/<task>/results.json`` from ``minorsft eval``. A directory with evaluations and no ``train.yaml``
is the base model (``model.yaml`` names it). Writes ``results.md``, ``results.csv``, ``deviation.png``
and ``accuracy.png`` into ``--output_dir``, all or none.
"""

import argparse
import csv
import glob
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import yaml

METHOD_LABELS = {"base": "Base model", "sft": "SFT", "sft_dpo": "SFT using DPO", "minorsft": "MinorSFT"}
METHOD_COLORS = {"base": "#8c8c8c", "sft": "#1f77b4", "sft_dpo": "#ff7f0e", "minorsft": "#2ca02c"}
TASK_LABELS = {"ceval": "ceval-exam", "financeiq": "FinanceIQ", "fineval": "fineval"}
TASK_ORDER = ("financeiq", "fineval", "ceval")  # the paper's Figure 2
OUTPUT_FILES = ("results.md", "results.csv", "deviation.png", "accuracy.png")
# Curves longer than this are drawn smoothed (LLaMA-Factory's EMA) over the raw values.
SMOOTH_FROM_POINTS = 50


class ReportError(Exception):
    pass


@dataclass
class Run:
    directory: str
    method: str
    learning_rate: Optional[float] = None
    beta: Optional[float] = None
    model: str = ""
    finished: bool = True
    steps: Optional[int] = None
    deviation: list = field(default_factory=list)  # (step, value) of the training log
    accuracy: dict = field(default_factory=dict)  # task -> fraction
    num_questions: dict = field(default_factory=dict)
    best: bool = False

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.directory))

    @property
    def label(self) -> str:
        if self.method == "base":
            return f"{METHOD_LABELS['base']} ({os.path.basename(self.model.rstrip('/'))})" if self.model else "Base model"
        settings = [f"lr {number(self.learning_rate)}"] + ([f"β {number(self.beta)}"] if self.beta is not None else [])
        return f"{METHOD_LABELS.get(self.method, self.method)} ({', '.join(settings)})"

    @property
    def final_deviation(self) -> Optional[float]:
        return self.deviation[-1][1] if self.deviation else None

    def mean_accuracy(self, tasks: list) -> Optional[float]:
        if not tasks or any(task not in self.accuracy for task in tasks):
            return None
        return sum(self.accuracy[task] for task in tasks) / len(tasks)


def number(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:g}".replace("e-0", "e-")


def read_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        content = yaml.safe_load(f)
    if not isinstance(content, dict):
        raise ReportError(f"{path} is not a YAML mapping")
    return content


def float_key(config: dict, key: str, path: str) -> float:
    try:
        return float(config[key])
    except KeyError:
        raise ReportError(f"{path} has no `{key}`") from None
    except (TypeError, ValueError):
        raise ReportError(f"{path}: `{key}: {config[key]}` is not a number") from None


def default_pref_beta() -> float:
    from llamafactory.hparams import FinetuningArguments  # noqa: PLC0415 - heavy; only for recipes without β

    return FinetuningArguments.__dataclass_fields__["pref_beta"].default


def load_training(run: Run) -> None:
    config_path = os.path.join(run.directory, "train.yaml")
    config = read_yaml(config_path)
    if "stage" not in config:
        raise ReportError(f"{config_path} has no `stage`")
    run.method = str(config["stage"])
    run.model = str(config.get("model_name_or_path", ""))
    run.learning_rate = float_key(config, "learning_rate", config_path)
    if run.method != "sft":
        run.beta = float_key(config, "pref_beta", config_path) if "pref_beta" in config else default_pref_beta()
    state_path = os.path.join(run.directory, "trainer_state.json")
    run.finished = os.path.isfile(state_path)
    if run.finished:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        run.steps = state.get("global_step")
        run.deviation = [(entry["step"], entry["deviation"]) for entry in state.get("log_history", [])
                         if "deviation" in entry and "step" in entry]


def load_evaluations(run: Run) -> None:
    for path in sorted(glob.glob(os.path.join(run.directory, "eval", "*", "results.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                results = json.load(f)
        except json.JSONDecodeError as error:
            raise ReportError(f"{path} is not valid JSON: {error}") from None
        task = results.get("task") or os.path.basename(os.path.dirname(path))
        accuracy = results.get("accuracy")
        if not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1:
            raise ReportError(f"{path}: `accuracy` must be a fraction in [0, 1], got {accuracy!r}")
        run.accuracy[task] = float(accuracy)
        run.num_questions[task] = results.get("num_questions")


def load_run(directory: str) -> Run:
    run = Run(directory=directory, method="base")
    if os.path.isfile(os.path.join(directory, "train.yaml")):
        load_training(run)
    elif os.path.isfile(os.path.join(directory, "model.yaml")):
        run.model = str(read_yaml(os.path.join(directory, "model.yaml")).get("model_name_or_path", ""))
    load_evaluations(run)
    return run


def is_run_dir(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, name)) for name in ("train.yaml", "model.yaml", "eval"))


def collect_run_dirs(paths: list, output_dir: str) -> list:
    """The given run directories; a directory that is not one (a sweep root) stands for its run subdirectories."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise ReportError(f"{path} is not a directory")
        if is_run_dir(path):
            found.append(path)
            continue
        children = [os.path.join(path, name) for name in sorted(os.listdir(path))]
        children = [child for child in children if os.path.isdir(child) and is_run_dir(child)
                    and os.path.abspath(child) != os.path.abspath(output_dir)]
        if not children:
            raise ReportError(f"{path} holds no run (no train.yaml, model.yaml or eval/ in it or its subdirectories)")
        found.extend(children)
    return found


def order_key(run: Run) -> tuple:
    methods = list(METHOD_LABELS)
    rank = methods.index(run.method) if run.method in methods else len(methods)
    return rank, run.method, run.learning_rate or 0.0, run.beta or 0.0, run.name


def mark_best(runs: list, tasks: list) -> dict:
    """Per method, the finished run with the highest mean accuracy over ``tasks`` (first one on ties)."""
    best = {}
    for run in runs:
        score = run.mean_accuracy(tasks)
        if run.method == "base" or not run.finished or score is None:
            continue
        if run.method not in best or score > best[run.method].mean_accuracy(tasks):
            best[run.method] = run
    for run in best.values():
        run.best = True
    return best


def percent(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def markdown(runs: list, tasks: list, task_names: dict, notes: list) -> str:
    header = ["", "Method", "lr", "β", "Steps", "Final deviation"] + [f"{task_names[t]} (%)" for t in tasks] + ["Mean (%)"]
    lines = ["# MinorSFT sweep: results", "",
             "One row per run, the base model first. ★ marks the best run of each method (highest mean accuracy "
             "over the benchmarks). Final deviation: the last logged value of Eq. 8, the mean per-token log-ratio "
             "log π_θ − log π_ref of the training samples (0 = the base model; lower = closer to it).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        steps = "not finished" if not run.finished else ("—" if run.steps is None else str(run.steps))
        deviation = "—" if run.final_deviation is None else f"{run.final_deviation:.4f}"
        row = ["★" if run.best else "", METHOD_LABELS.get(run.method, run.method), number(run.learning_rate),
               number(run.beta), steps, deviation] + [percent(run.accuracy.get(t)) for t in tasks]
        lines.append("| " + " | ".join(row + [percent(run.mean_accuracy(tasks))]) + " |")
    lines += ["", "Runs: " + ", ".join(f"`{run.directory}`" for run in runs) + "."]
    lines += [""] + [f"- {note}" for note in notes]
    lines += ["", "![Deviation during training](deviation.png)", "", "![Accuracy per benchmark](accuracy.png)", ""]
    return "\n".join(lines)


def write_csv(path: str, runs: list, tasks: list) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_dir", "method", "learning_rate", "beta", "finished", "steps", "final_deviation"]
                        + [f"accuracy_{t}" for t in tasks] + [f"num_questions_{t}" for t in tasks]
                        + ["mean_accuracy", "best"])
        for run in runs:
            writer.writerow([run.directory, run.method, run.learning_rate, run.beta, run.finished, run.steps,
                             run.final_deviation] + [run.accuracy.get(t) for t in tasks]
                            + [run.num_questions.get(t) for t in tasks] + [run.mean_accuracy(tasks), run.best])


def question_notes(runs: list, tasks: list, task_names: dict) -> list:
    notes = []
    for task in tasks:
        counts = sorted({run.num_questions[task] for run in runs if run.num_questions.get(task) is not None})
        if len(counts) == 1:
            notes.append(f"{task_names[task]}: {counts[0]} questions per model.")
        elif counts:
            notes.append(f"{task_names[task]}: the models were scored on different numbers of questions "
                         f"({', '.join(map(str, counts))}); their accuracies are not directly comparable.")
    missing = [run.name for run in runs if run.method != "base" and run.finished and not run.deviation]
    if missing:
        notes.append(f"No deviation was logged by {', '.join(missing)} (for `stage: sft` set `deviation_metric: true`).")
    unfinished = [run.name for run in runs if not run.finished]
    if unfinished:
        notes.append(f"Not finished (no trainer_state.json), left out of the plots and the choice of best: "
                     f"{', '.join(unfinished)}.")
    return notes


def plot_deviation(path: str, best: dict) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415 - keeps `minorsft --help` fast

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    curves = [run for method, run in sorted(best.items(), key=lambda item: order_key(item[1])) if run.deviation]
    for run in curves:
        steps, values = zip(*run.deviation)
        color = METHOD_COLORS.get(run.method)
        if len(values) >= SMOOTH_FROM_POINTS:
            from llamafactory.extras.ploting import smooth  # noqa: PLC0415 - imports transformers; long runs only

            ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
            ax.plot(steps, smooth(list(values)), color=color, linewidth=2, label=run.label)
        else:
            ax.plot(steps, values, color=color, marker="o", markersize=4, linewidth=2, label=run.label)
    ax.axhline(0, color="#444444", linewidth=0.8)
    if curves:
        ax.legend(title="best run of each method", loc="upper left")
    else:
        ax.text(0.5, 0.5, "no run logged the deviation", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Deviation from the base model during training (Eq. 8)")
    ax.set_xlabel("training step")
    ax.set_ylabel("deviation: mean per-token log π_θ − log π_ref")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def axis_label(task: str, task_names: dict, bars: list) -> str:
    if task not in task_names:
        return "Mean of the benchmarks"
    counts = sorted({run.num_questions[task] for run in bars if run.num_questions.get(task)})
    questions = "–".join(str(count) for count in (counts[:1] + counts[-1:] if len(counts) > 1 else counts))
    return f"{task_names[task]}\n({questions} questions)" if counts else task_names[task]


def plot_accuracy(path: str, bars: list, tasks: list, task_names: dict) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    groups = tasks + (["mean"] if len(tasks) > 1 else [])
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(groups) + 2), 5), dpi=120)
    width = 0.8 / max(len(bars), 1)
    for index, run in enumerate(bars):
        values = [run.accuracy.get(task) if task != "mean" else run.mean_accuracy(tasks) for task in groups]
        positions = [group + (index - (len(bars) - 1) / 2) * width for group in range(len(groups))]
        heights = [100 * value if value is not None else 0 for value in values]
        rects = ax.bar(positions, heights, width * 0.95, label=run.label, color=METHOD_COLORS.get(run.method))
        ax.bar_label(rects, labels=[percent(value) for value in values], fontsize=8, padding=2)
    ax.axhline(25, color="#444444", linestyle="--", linewidth=1, label="chance (4 options)")
    ax.set_xticks(range(len(groups)), [axis_label(task, task_names, bars) for task in groups])
    top = max([100 * value for run in bars for value in run.accuracy.values()] + [25])
    ax.set_ylim(0, min(100, math.ceil(top / 10) * 10 + 15))
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy of the base model and the best run of each method")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build(paths: list, output_dir: str) -> list:
    runs = sorted((load_run(directory) for directory in collect_run_dirs(paths, output_dir)), key=order_key)
    found = {task for run in runs for task in run.accuracy}
    tasks = [task for task in TASK_ORDER if task in found] + sorted(found - set(TASK_ORDER))
    task_names = {task: TASK_LABELS.get(task, task) for task in tasks}
    best = mark_best(runs, tasks)
    bars = [run for run in runs if run.method == "base"] + sorted(best.values(), key=order_key)

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".report-", dir=parent)
    try:
        with open(os.path.join(staging, "results.md"), "w", encoding="utf-8") as f:
            f.write(markdown(runs, tasks, task_names, question_notes(runs, tasks, task_names)))
        write_csv(os.path.join(staging, "results.csv"), runs, tasks)
        plot_deviation(os.path.join(staging, "deviation.png"), best)
        plot_accuracy(os.path.join(staging, "accuracy.png"), bars, tasks, task_names)
        os.makedirs(output_dir, exist_ok=True)
        for name in OUTPUT_FILES:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (train.yaml + trainer_state.json + eval/<task>/results.json), the "
                             "base model's directory (eval/ and model.yaml), or a sweep root holding them")
    parser.add_argument("--output_dir", required=True, help="where results.md, results.csv and the plots go")


def run(args: argparse.Namespace) -> int:
    try:
        build(args.run_dirs, args.output_dir)
    except ReportError as error:
        raise SystemExit(f"minorsft report: {error}") from None
    with open(os.path.join(args.output_dir, "results.md"), encoding="utf-8") as f:
        print(f.read())
    print(f"Wrote {', '.join(os.path.join(args.output_dir, name) for name in OUTPUT_FILES)}")
    return 0
