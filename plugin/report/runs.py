"""``minorsft report``: the results tables and charts of a sweep, like the paper's Figures 1 and 2.

A run directory is what the sweep leaves: ``train.yaml`` (the run's identity: the method by
``methods.method_of``, learning rate, β, the SFT variant's α and the seed), LLaMA-Factory's
``trainer_state.json`` (per logged step the training ``deviation`` of Eq. 8 and MinorSFT's ``coef_mean``; per
evaluation the deviation on each eval set), ``train.log`` (whether the run computed the reference log-probs or
loaded them from the cache) and ``eval/<task>/results.json`` from ``minorsft eval``; a benchmark without results
is explained by ``eval/<task>.skipped`` (its data could not be reached; the file holds why) or ``eval/<task>.log``
(the evaluation ran and failed). A directory with evaluations and no ``train.yaml`` is the base model
(``model.yaml`` names it).

Eval sets are of two kinds (docs/method.md, "Two measures that are easy to confuse"): a *drift set* is marked
``"drift_set": true`` in the run's ``dataset_dir``/dataset_info.json (``minorsft drift-set`` writes the mark), and
its deviation estimates −KL(π_ref‖π_θ) per token; every other eval set is *held-out domain* data, whose deviation
is the gain in log-likelihood per token over the starting model. Runs that differ only in their seed form one
*setting*; charts draw settings (the mean over seeds, with the seeds' range).

Writes ``results.md``, ``results.csv`` (one row per run), ``settings.csv`` (one row per setting), ``deviation.png``,
``accuracy.png`` and, when their data exist, ``drift_accuracy.png`` and ``learning_drift.png`` into
``--output_dir``, all or none.
"""

import argparse
import csv
import functools
import glob
import json
import math
import os
import re
from dataclasses import dataclass, field

import yaml

from ..evaluation.drift_set import DRIFT_SET_KEY
from ..files import add_overwrite_argument, checked_output_dir, local_path, staged_dir
from ..methods import METHODS, format_number, method_of
from .plots import (
    Curve,
    Point,
    percent,
    plot_accuracy,
    plot_deviation,
    plot_tradeoff,
)

BASE_LABEL = "Base model"
METHOD_ORDER = ("base", *METHODS)
TASK_LABELS = {"ceval": "ceval-exam", "financeiq": "FinanceIQ", "fineval": "fineval"}
TASK_ORDER = ("financeiq", "fineval", "ceval")  # the paper's Figure 2
# What an accuracy cell says when there is no accuracy (see ``Run.status``).
NO_DATA, FAILED, NOT_RUN = "no data", "failed", "not run"
# The lines ``ref_cache.PrecomputedReference.ensure`` logs into the run's train.log.
COMPUTED_LINE = re.compile(
    r"Computed reference log-probs of \d+ samples .*? in ([0-9.]+) s \(([0-9.]+) s CPU time"
    r".*?; saved to (.+?)\.?\s*$",
    re.MULTILINE,
)
LOADED_LINE = re.compile(r"Loaded reference log-probs of \d+ samples from (.+?)\.?\s*$", re.MULTILINE)
# The wording of the measures, shared by the tables, the notes and the charts' axes.
HELDOUT_MEASURE = "held-out domain deviation"
TRAIN_MEASURE = "training deviation"
LEARNING_AXIS = (
    "learning: final held-out domain deviation (Eq. 8) = mean over held-out samples of\n"
    "(log π_θ(y|x) − log π_ref(y|x)) / m: gain in log-likelihood per response token over the base model"
)
DRIFT_AXIS = (
    "drift: −(final drift-set deviation) = mean over the base model's own samples y ~ π_ref(·|x) of\n"
    "(log π_ref(y|x) − log π_θ(y|x)) / m: estimated KL(π_ref‖π_θ) per response token"
)


class ReportError(Exception):
    pass


@dataclass
class Run:
    directory: str
    method: str
    learning_rate: float | None = None
    beta: float | None = None
    alpha: float | None = None  # the SFT variant's own strength (asft_alpha, eaft_alpha)
    seed: int | None = None
    model: str = ""
    finished: bool = True
    steps: int | None = None
    deviation: list = field(default_factory=list)  # (step, value) of the training log
    coefficient: list = field(default_factory=list)  # (step, coef_mean): MinorSFT's mean 2σ(−βr)
    heldout_set: str = ""  # the held-out domain eval set read, and its (step, eval deviation)
    heldout: list = field(default_factory=list)
    drift_set: str = ""  # the drift set read, and its (step, eval deviation) (≤ 0 in expectation)
    drift: list = field(default_factory=list)
    merged_eval_sets: list = field(default_factory=list)  # drift and domain sets merged into one eval_deviation
    accuracy: dict = field(default_factory=dict)  # task -> fraction
    num_questions: dict = field(default_factory=dict)
    unreachable: dict = field(default_factory=dict)  # task -> why its data could not be reached (eval/<task>.skipped)
    attempted: set = field(default_factory=set)  # tasks with an eval/<task>.log
    reference_passes: list = field(default_factory=list)  # (seconds, CPU seconds, cache file) per pass it made
    reference_loads: list = field(default_factory=list)  # cache files it loaded instead
    best: bool = False

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.directory))

    @property
    def setting_key(self) -> tuple:
        """What the run is, but for its seed: runs with one key are seeds of one setting."""
        return self.method, self.learning_rate, self.beta, self.alpha, self.model if self.method == "base" else ""

    @property
    def label(self) -> str:
        if self.method == "base":
            return f"{BASE_LABEL} ({os.path.basename(self.model.rstrip('/'))})" if self.model else BASE_LABEL
        return f"{METHODS[self.method].label} ({self.settings_text})"

    @property
    def settings_text(self) -> str:
        settings = [f"lr {number(self.learning_rate)}"] + ([f"β {number(self.beta)}"] if self.beta is not None else [])
        return ", ".join(settings + ([f"α {number(self.alpha)}"] if self.alpha is not None else []))

    @property
    def final_train_deviation(self) -> float | None:
        return last(self.deviation)

    @property
    def final_heldout_deviation(self) -> float | None:
        return last(self.heldout)

    @property
    def final_drift(self) -> float | None:
        """−(the last drift-set deviation): the estimate of KL(π_ref‖π_θ) per token."""
        value = last(self.drift)
        return None if value is None else -value

    @property
    def coefficient_first(self) -> float | None:
        return self.coefficient[0][1] if self.coefficient else None

    @property
    def coefficient_last(self) -> float | None:
        return last(self.coefficient)

    def mean_accuracy(self, tasks: list) -> float | None:
        if not tasks or any(task not in self.accuracy for task in tasks):
            return None
        return sum(self.accuracy[task] for task in tasks) / len(tasks)

    def status(self, task: str) -> str:
        """The accuracy in percent, or why there is none."""
        if task in self.accuracy:
            return percent(self.accuracy[task])
        if task in self.unreachable:
            return NO_DATA
        return FAILED if task in self.attempted else NOT_RUN


def last(series: list) -> float | None:
    return series[-1][1] if series else None


def mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class Setting:
    """The runs that differ only in their seed. Quacks like a ``Run`` where the accuracy chart needs one."""

    runs: list  # every run of the setting, finished or not
    best: bool = False

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def label(self) -> str:
        return self.runs[0].label

    @property
    def finished(self) -> list:
        return [run for run in self.runs if run.finished]

    @property
    def seeds(self) -> list:
        return [run.seed for run in self.finished]

    def values(self, measure) -> list:
        """``measure(run)`` of each finished run that has it."""
        return [value for value in map(measure, self.finished) if value is not None]

    def summary(self, measure) -> tuple:
        """(mean, min, max) of ``measure`` over the seeds that have it; Nones when none has."""
        values = self.values(measure)
        return (mean(values), min(values), max(values)) if values else (None, None, None)

    @property
    def accuracy(self) -> dict:
        tasks = {task for run in self.finished for task in run.accuracy}
        return {task: mean([run.accuracy[task] for run in self.finished if task in run.accuracy]) for task in tasks}

    @property
    def num_questions(self) -> dict:
        return self.runs[0].num_questions

    def mean_accuracy(self, tasks: list) -> float | None:
        return mean(self.values(lambda run: run.mean_accuracy(tasks)))


def number(value: float | None) -> str:
    return "—" if value is None else format_number(value)


def decimal(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


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


@functools.cache
def llamafactory_default(key: str):
    """The value LLaMA-Factory trains with when a train.yaml leaves ``key`` out."""
    # Imported here: LLaMA-Factory pulls in torch, and only a train.yaml that leaves a key out needs it.
    from llamafactory.hparams import FinetuningArguments, TrainingArguments

    for arguments in (FinetuningArguments, TrainingArguments):
        if key in arguments.__dataclass_fields__:
            return arguments.__dataclass_fields__[key].default
    raise KeyError(key)


def key_or_default(config: dict, key: str, path: str) -> float:
    return float_key(config, key, path) if key in config else float(llamafactory_default(key))


def eval_set_names(config: dict) -> list:
    value = config.get("eval_dataset") or []
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def drift_set_marks(config: dict, names: list, config_path: str) -> dict:
    """Per eval set, whether its dataset_info.json entry marks it ``"drift_set": true``."""
    dataset_dir = str(config.get("dataset_dir", "data"))  # LLaMA-Factory's default
    info_path = os.path.abspath(os.path.join(dataset_dir, "dataset_info.json"))
    if not os.path.isfile(info_path):
        raise ReportError(
            f"{config_path}: `dataset_dir: {dataset_dir}` has no dataset_info.json ({info_path}); the "
            f'report reads it to tell drift sets (`"{DRIFT_SET_KEY}": true`) from held-out domain sets'
        )
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except json.JSONDecodeError as error:
        raise ReportError(f"{info_path} is not valid JSON: {error}") from None
    missing = [name for name in names if not isinstance(info.get(name), dict)]
    if missing:
        raise ReportError(f"{config_path}: eval set(s) {', '.join(missing)} of `eval_dataset` are not in {info_path}")
    return {name: info[name].get(DRIFT_SET_KEY) is True for name in names}


def load_eval_deviations(run: Run, config: dict, config_path: str, history: list) -> None:
    """The held-out domain and drift-set deviations the run's evaluations logged (the first set of each kind)."""
    names = eval_set_names(config)
    per_set = {name: series(history, f"eval_{name}_deviation") for name in names}
    merged = series(history, "eval_deviation")  # a single eval set, or several merged, or a `val_size` split
    if not merged and not any(per_set.values()):
        return
    is_drift = drift_set_marks(config, names, config_path) if names else {}
    if merged:
        if names and all(is_drift.values()):
            run.drift_set, run.drift = ", ".join(names), merged
        elif any(is_drift.values()):
            run.merged_eval_sets = names
        else:
            run.heldout_set, run.heldout = ", ".join(names) or "`val_size` split", merged
    for name in names:
        if per_set[name] and is_drift[name] and not run.drift:
            run.drift_set, run.drift = name, per_set[name]
        elif per_set[name] and not is_drift[name] and not run.heldout:
            run.heldout_set, run.heldout = name, per_set[name]


def series(history: list, key: str) -> list:
    return [(entry["step"], float(entry[key])) for entry in history if key in entry and "step" in entry]


def load_training(run: Run) -> None:
    config_path = os.path.join(run.directory, "train.yaml")
    config = read_yaml(config_path)
    if "stage" not in config:
        raise ReportError(f"{config_path} has no `stage`")
    try:
        run.method = method_of(config)
    except ValueError as error:
        raise ReportError(f"{config_path}: {error}") from None
    method = METHODS[run.method]
    run.model = str(config.get("model_name_or_path", ""))
    run.learning_rate = float_key(config, "learning_rate", config_path)
    if method.uses_beta:
        run.beta = key_or_default(config, "pref_beta", config_path)
    if method.alpha_key:
        run.alpha = key_or_default(config, method.alpha_key, config_path)
    seed = config.get("seed", llamafactory_default("seed"))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ReportError(f"{config_path}: `seed: {seed}` is not an integer")
    run.seed = seed
    state_path = os.path.join(run.directory, "trainer_state.json")
    run.finished = os.path.isfile(state_path)
    if run.finished:
        try:
            with open(state_path, encoding="utf-8") as f:
                state = json.load(f)
        except json.JSONDecodeError as error:
            raise ReportError(f"{state_path} is not valid JSON: {error}") from None
        history = state.get("log_history", [])
        run.steps = state.get("global_step")
        run.deviation = series(history, "deviation")
        run.coefficient = series(history, "coef_mean")
        load_eval_deviations(run, config, config_path, history)
    log_path = os.path.join(run.directory, "train.log")
    if os.path.isfile(log_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            log = f.read()
        run.reference_passes = [(float(seconds), float(cpu), path) for seconds, cpu, path in COMPUTED_LINE.findall(log)]
        run.reference_loads = LOADED_LINE.findall(log)


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
    eval_dir = os.path.join(run.directory, "eval")
    for path in sorted(glob.glob(os.path.join(eval_dir, "*.skipped"))):
        with open(path, encoding="utf-8") as f:
            run.unreachable[os.path.basename(path)[: -len(".skipped")]] = f.read().strip()
    run.attempted = {os.path.basename(path)[: -len(".log")] for path in glob.glob(os.path.join(eval_dir, "*.log"))}


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
        children = [
            child
            for child in children
            if os.path.isdir(child) and is_run_dir(child) and os.path.abspath(child) != os.path.abspath(output_dir)
        ]
        if not children:
            raise ReportError(f"{path} holds no run (no train.yaml, model.yaml or eval/ in it or its subdirectories)")
        found.extend(children)
    return found


def order_key(run: Run) -> tuple:
    return (
        METHOD_ORDER.index(run.method),
        run.learning_rate or 0.0,
        run.beta or 0.0,
        run.alpha or 0.0,
        run.seed or 0,
        run.name,
    )


def group_settings(runs: list) -> list:
    """The settings, in the order of their first run (``runs`` is sorted)."""
    settings = {}
    for run in runs:
        settings.setdefault(run.setting_key, []).append(run)
    return [Setting(members) for members in settings.values()]


def mark_best(settings: list, tasks: list) -> dict:
    """Per method, the setting with the highest mean accuracy over ``tasks``, averaged over its seeds (first one on
    ties); its finished runs are marked too."""
    best = {}
    for setting in settings:
        score = setting.mean_accuracy(tasks)
        if setting.method == "base" or score is None:
            continue
        if setting.method not in best or score > best[setting.method].mean_accuracy(tasks):
            best[setting.method] = setting
    for setting in best.values():
        setting.best = True
        for run in setting.finished:
            run.best = True
    return best


def pareto_front(points: list) -> list:
    """The points no other point dominates: none has at most their x (cost) and at least their y (gain), better
    in one of the two. Points are (x, y, item); returns the items, by x."""
    front = [
        (x, y, item)
        for x, y, item in points
        if not any(ox <= x and oy >= y and (ox < x or oy > y) for ox, oy, _ in points)
    ]
    return [item for _, _, item in sorted(front, key=lambda point: (point[0], -point[1]))]


def tradeoff_point(setting: Setting, x_measure, y_measure) -> Point | None:
    xs, ys = setting.summary(x_measure), setting.summary(y_measure)
    if xs[0] is None or ys[0] is None:
        return None
    return Point(setting.label, setting.method, *xs, *ys, seeds=len(setting.values(x_measure)))


@dataclass
class Tradeoff:
    """One trade-off chart: its points (settings), the Pareto front among them, and why it is not drawn."""

    file: str
    title: str
    x_label: str
    y_label: str
    points: list = field(default_factory=list)
    front: list = field(default_factory=list)
    base: Point | None = None
    missing: str = ""  # why there is no chart

    def describe(self, x_format, y_format) -> str:
        if not self.points:
            return f"`{self.file}` not drawn: {self.missing}."
        best = "; ".join(f"{point.label}: {x_format(point.x)}, {y_format(point.y)}" for point in self.front)
        return f"`{self.file}`, {self.title}; Pareto front (best trade-offs): {best}."


def drift_accuracy_chart(settings: list, scored: list, measure: str, deviation_of) -> Tradeoff:
    chart = Tradeoff(
        "drift_accuracy.png",
        f"final {measure} against mean accuracy",
        f"final {measure} (Eq. 8; lower = closer to the base model)",
        f"mean accuracy over {', '.join(TASK_LABELS.get(t, t) for t in scored) or 'the benchmarks'} (%)",
    )
    trained = [setting for setting in settings if setting.method != "base"]
    chart.points = [
        point
        for point in (
            tradeoff_point(setting, deviation_of, lambda run: run.mean_accuracy(scored)) for setting in trained
        )
        if point
    ]
    chart.front = pareto_front([(point.x, point.y, point) for point in chart.points])
    base = next((setting for setting in settings if setting.method == "base"), None)
    if base and base.mean_accuracy(scored) is not None:
        accuracy = base.mean_accuracy(scored)
        chart.base = Point(base.label, "base", 0.0, 0.0, 0.0, accuracy, accuracy, accuracy)
    chart.missing = (
        "no accuracy was measured" if not scored else f"no finished run has both a {measure} and a mean accuracy"
    )
    return chart


def learning_drift_chart(settings: list) -> Tradeoff:
    chart = Tradeoff(
        "learning_drift.png",
        "learning against drift (both per token, against the base model)",
        DRIFT_AXIS,
        LEARNING_AXIS,
    )
    chart.points = [
        point
        for point in (
            tradeoff_point(setting, lambda run: run.final_drift, lambda run: run.final_heldout_deviation)
            for setting in settings
            if setting.method != "base"
        )
        if point
    ]
    chart.front = pareto_front([(point.x, point.y, point) for point in chart.points])
    chart.base = Point(BASE_LABEL, "base", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    has_drift = any(run.drift for setting in settings for run in setting.finished)
    has_heldout = any(run.heldout for setting in settings for run in setting.finished)
    chart.missing = (
        "no run evaluated both a held-out domain set and a drift set"
        if has_drift and has_heldout
        else 'no run evaluated a drift set (an eval set marked `"drift_set": true` in dataset_info.json, '
        "made by `minorsft drift-set`)"
        if not has_drift
        else "no run evaluated a held-out domain set"
    )
    return chart


def with_range(summary: tuple, fmt, seeds: int) -> str:
    """``mean [min, max]`` over the seeds, the value alone for one seed."""
    center, low, high = summary
    if center is None:
        return "—"
    return fmt(center) if seeds <= 1 else f"{fmt(center)} [{fmt(low)}, {fmt(high)}]"


SETTING_MEASURES = (  # (name in settings.csv, column in results.md, the run's value, its format)
    ("train_deviation", "Train dev.", lambda run: run.final_train_deviation, decimal),
    ("heldout_deviation", "Held-out dev.", lambda run: run.final_heldout_deviation, decimal),
    ("drift", "Drift", lambda run: run.final_drift, decimal),
    ("coefficient_last", "Coef. (last)", lambda run: run.coefficient_last, decimal),
)


def setting_measures(scored: list) -> tuple:
    return SETTING_MEASURES + (("mean_accuracy", "Mean (%)", lambda run: run.mean_accuracy(scored), percent),)


def coefficient_cell(run: Run) -> str:
    return "—" if not run.coefficient else f"{run.coefficient_first:.3f} → {run.coefficient_last:.3f}"


def markdown(runs: list, settings: list, tasks: list, scored: list, task_names: dict, notes: list, charts: list) -> str:
    header = (
        ["", "Method", "lr", "β", "α", "Seed", "Steps", "Train dev.", "Held-out dev.", "Drift", "Coef. first → last"]
        + [f"{task_names[t]} (%)" for t in tasks]
        + ["Mean (%)"]
    )
    legend = (
        "One row per run, the base model first. ★ marks the best setting of each method (highest mean accuracy over "
        "the benchmarks, averaged over its seeds). The three deviations are final values of Eq. 8, the mean over "
        "samples of the per-token log-ratio (log π_θ(y|x) − log π_ref(y|x)) / m against the base model: *Train dev.* "
        "on the last logged training batches; *Held-out dev.* on a held-out eval set of the training domain (the "
        "same samples at every evaluation; it rises as the model learns the domain); *Drift* is minus the deviation "
        'on a drift set (the base model\'s own samples on general prompts, marked `"drift_set": true` in '
        "dataset_info.json), an estimate of KL(π_ref‖π_θ) per token that learning the domain does not raise. "
        "*Coef.*: MinorSFT's mean sample coefficient 2σ(−β·r), first and last logged (1 at the start). An accuracy "
        f"cell without a number says why: *{NO_DATA}* (the benchmark data could not be reached), *{FAILED}* (the "
        f"evaluation ran but wrote no results; see the run's eval/<benchmark>.log), *{NOT_RUN}* (never evaluated on "
        "that benchmark). Mean: over the benchmarks that were measured; — where the run lacks one."
    )
    lines = ["# MinorSFT sweep: results", "", legend, ""]
    unmeasured = not_measured_note(runs, tasks, task_names)
    if unmeasured:
        lines += [f"**{unmeasured}**", ""]
    lines += table(
        header,
        [
            [
                "★" if run.best else "",
                method_label(run.method),
                number(run.learning_rate),
                number(run.beta),
                number(run.alpha),
                "—" if run.seed is None else str(run.seed),
                "not finished" if not run.finished else ("—" if run.steps is None else str(run.steps)),
                decimal(run.final_train_deviation),
                decimal(run.final_heldout_deviation),
                decimal(run.final_drift),
                coefficient_cell(run),
            ]
            + [run.status(t) for t in tasks]
            + [percent(run.mean_accuracy(scored))]
            for run in runs
        ],
    )
    lines += [
        "",
        "Runs: " + ", ".join(f"`{run.directory}`" for run in runs) + ".",
        "",
        "## Settings",
        "",
        "One row per setting (the runs that differ only in their seed): the mean over its finished seeds, "
        "[min, max] where it has several. Pareto: the setting is on the front of that chart (below).",
        "",
    ]
    fronts = {chart.file: chart.front for chart in charts}
    measures = setting_measures(scored)
    rows = []
    for setting in (setting for setting in settings if setting.method != "base"):
        seeds = len(setting.finished)
        on = [name for name, front in fronts.items() if any(point.label == setting.label for point in front)]
        rows.append(
            ["★" if setting.best else "", setting.label, ", ".join(map(str, setting.seeds)) or "—"]
            + [with_range(setting.summary(value), fmt, seeds) for _, _, value, fmt in measures]
            + [", ".join(name[: -len(".png")] for name in on) or ""]
        )
    lines += table(["", "Setting", "Seeds"] + [column for _, column, _, _ in measures] + ["Pareto"], rows)
    lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    lines += ["", "![Deviation during training](deviation.png)", "", "![Accuracy per benchmark](accuracy.png)", ""]
    for chart in charts:
        if chart.points:
            lines += [f"![{chart.title}]({chart.file})", ""]
    return "\n".join(lines)


def method_label(method: str) -> str:
    return BASE_LABEL if method == "base" else METHODS[method].label


def table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def write_csv(path: str, runs: list, tasks: list, scored: list, charts: list) -> None:
    fronts = {chart.file: {point.label for point in chart.front} for chart in charts}
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "run_dir",
                "method",
                "learning_rate",
                "beta",
                "alpha",
                "seed",
                "finished",
                "steps",
                "final_train_deviation",
                "heldout_set",
                "final_heldout_deviation",
                "drift_set",
                "final_drift",
                "coefficient_first",
                "coefficient_last",
            ]
            + [f"accuracy_{t}" for t in tasks]
            + [f"num_questions_{t}" for t in tasks]
            + ["mean_accuracy", "best"]
            + [f"pareto_{name[: -len('.png')]}" for name in fronts]
            + ["reference_passes", "reference_pass_seconds", "reference_loads"]
        )
        for run in runs:
            writer.writerow(
                [
                    run.directory,
                    run.method,
                    run.learning_rate,
                    run.beta,
                    run.alpha,
                    run.seed,
                    run.finished,
                    run.steps,
                    run.final_train_deviation,
                    run.heldout_set,
                    run.final_heldout_deviation,
                    run.drift_set,
                    run.final_drift,
                    run.coefficient_first,
                    run.coefficient_last,
                ]
                + [run.accuracy.get(t) for t in tasks]
                + [run.num_questions.get(t) for t in tasks]
                + [run.mean_accuracy(scored), run.best]
                + [run.finished and run.label in front for front in fronts.values()]
                + [len(run.reference_passes), sum(p[0] for p in run.reference_passes), len(run.reference_loads)]
            )


def write_settings_csv(path: str, settings: list, scored: list, charts: list) -> None:
    fronts = {chart.file: {point.label for point in chart.front} for chart in charts}
    measures = setting_measures(scored)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["setting", "method", "learning_rate", "beta", "alpha", "seeds", "runs", "finished_runs"]
            + [f"{name}_{part}" for name, _, _, _ in measures for part in ("mean", "min", "max")]
            + ["best"]
            + [f"pareto_{name[: -len('.png')]}" for name in fronts]
        )
        for setting in (setting for setting in settings if setting.method != "base"):
            first = setting.runs[0]
            writer.writerow(
                [
                    setting.label,
                    setting.method,
                    first.learning_rate,
                    first.beta,
                    first.alpha,
                    " ".join(map(str, setting.seeds)),
                    len(setting.runs),
                    len(setting.finished),
                ]
                + [value for _, _, measure, _ in measures for value in setting.summary(measure)]
                + [setting.best]
                + [setting.label in front for front in fronts.values()]
            )


def names(items) -> str:
    return ", ".join(items)


def not_measured_note(runs: list, tasks: list, task_names: dict) -> str:
    """The benchmarks whose data could not be reached, and why (as the sweep found it)."""
    reasons = {}  # task -> distinct reasons
    for run in runs:
        for task, reason in run.unreachable.items():
            if task not in run.accuracy:
                reasons.setdefault(task, {})[reason or "no reason given"] = None
    if not reasons:
        return ""
    opening = "Not measured" if any(run.accuracy for run in runs) else "Accuracy was not measured"
    why = "; ".join(dict.fromkeys(reason for task in tasks for reason in reasons.get(task, ())))
    return (
        f"{opening} on {names(task_names[t] for t in tasks if t in reasons)}: the benchmark data could not be "
        f"reached ({why}). To measure it, re-run with the data reachable: `--eval_data_dir DIR` or "
        "`MINORSFT_EVAL_DATA_DIR=DIR` (a folder holding ceval-exam/, FinanceIQ/, fineval/), or network access "
        "to the Hugging Face Hub; finished trainings are kept."
    )


def missing_notes(runs: list, tasks: list, task_names: dict) -> list:
    """Per run, the benchmarks whose evaluation failed or never ran (unreachable data has its own note)."""
    notes = []
    for run in (run for run in runs if run.finished):  # an unfinished run has its own note
        failed = [task_names[t] for t in tasks if run.status(t) == FAILED]
        not_run = [task_names[t] for t in tasks if run.status(t) == NOT_RUN]
        parts = (
            [f"evaluation failed on {names(failed)} (no results.json; see `eval/<benchmark>.log`)"] if failed else []
        ) + ([f"not evaluated on {names(not_run)}"] if not_run else [])
        if parts:
            notes.append(f"{run.name}: {'; '.join(parts)}.")
    return notes


def reference_note(runs: list) -> str:
    """How many reference passes (``precompute_ref_logps``) the runs made, how long they took, who reused them."""
    passes = [(run.name, *entry) for run in runs for entry in run.reference_passes]
    loaders = [run.name for run in runs if run.reference_loads]
    if not passes and not loaders:
        return ""
    count = f"{len(passes)} pass{'es' if len(passes) != 1 else ''}"
    if passes:
        total, total_cpu = sum(p[1] for p in passes), sum(p[2] for p in passes)
        count += f", {total:.1f} s ({total_cpu:.1f} s CPU){' in all' if len(passes) > 1 else ''}"
        made = "; ".join(
            f"{name} computed them into `{path}`" + (f" in {seconds:.1f} s" if len(passes) > 1 else "")
            for name, seconds, _, path in passes
        )
    else:
        made = "none was computed by these runs"
    loaded = f"; loaded from the cache, without a pass of their own, by {names(loaders)}" if loaders else ""
    return f"Reference log-probs (`precompute_ref_logps`): {count}: {made}{loaded}."


def figure1_measure(runs: list) -> str:
    """Figure 1 plots the held-out domain deviation when any run evaluated one, else the training deviation."""
    return HELDOUT_MEASURE if any(run.heldout for run in runs if run.finished) else TRAIN_MEASURE


def measure_series(measure: str):
    return (lambda run: run.heldout) if measure == HELDOUT_MEASURE else (lambda run: run.deviation)


def setting_curve(setting: Setting, series_of) -> Curve | None:
    """The mean over the seeds at the steps every seed logged, with the seeds' min and max."""
    per_seed = [dict(series_of(run)) for run in setting.finished if series_of(run)]
    if not per_seed:
        return None
    steps = sorted(set.intersection(*(set(values) for values in per_seed)))
    columns = [[values[step] for values in per_seed] for step in steps]
    return Curve(
        setting.label,
        setting.method,
        steps,
        [mean(column) for column in columns],
        [min(column) for column in columns],
        [max(column) for column in columns],
        len(per_seed),
    )


def deviation_curves(settings: list, best: dict, measure: str) -> tuple:
    """Figure 1's curves (one per setting, the mean over its seeds) and its legend title: per method the best
    setting when accuracies picked one, else every setting of that method that logged the measure."""
    series_of = measure_series(measure)
    chosen, every = [], []
    for method in dict.fromkeys(setting.method for setting in settings if setting.method != "base"):
        candidates = [best[method]] if method in best else [s for s in settings if s.method == method]
        curves = [curve for curve in map(lambda s: setting_curve(s, series_of), candidates) if curve]
        chosen += curves
        if method not in best and curves:
            every.append(METHODS[method].label)
    if not every:
        title = "best setting of each method (by mean accuracy)"
    elif len(every) == len({curve.method for curve in chosen}):
        title = "every setting (no accuracy to pick the best by)"
    else:
        title = f"best setting of each method; every setting of {names(every)} (no accuracy)"
    return chosen, title


def measure_notes(runs: list, measure: str, charts: list) -> list:
    trained = [run for run in runs if run.method != "base" and run.finished]
    notes = []
    heldout_sets = sorted({run.heldout_set for run in trained if run.heldout})
    drift_sets = sorted({run.drift_set for run in trained if run.drift})
    if heldout_sets or drift_sets:
        notes.append(
            f"Eval sets read: held-out domain {names(heldout_sets) or '—'}; drift {names(drift_sets) or '—'}"
            + (" (runs on different eval sets do not compare)" if len(heldout_sets) > 1 or len(drift_sets) > 1 else "")
            + "."
        )
    if measure == HELDOUT_MEASURE:
        notes.append(
            "Figure 1 (`deviation.png`) plots the held-out domain deviation at each evaluation (the same "
            "samples at every point), the mean over each setting's seeds with their range."
        )
        without = [run.name for run in trained if not run.heldout]
        if without:
            notes.append(f"No held-out domain deviation was logged by {names(without)}: left out of Figure 1.")
    else:
        notes.append(
            "Figure 1 (`deviation.png`) plots the training deviation (each point over that step's "
            "training batches); no run evaluated a held-out domain set."
        )
    merged = [run.name for run in trained if run.merged_eval_sets]
    if merged:
        notes.append(
            f"{names(merged)}: drift and domain eval sets merged into one `eval_deviation` (set "
            "`eval_on_each_dataset: true`); left out of the held-out and drift measures."
        )
    notes += [
        chart.describe(decimal, (lambda value: f"{percent(value)}%") if chart.file == "drift_accuracy.png" else decimal)
        for chart in charts
    ]
    return notes


def question_notes(runs: list, tasks: list, task_names: dict) -> list:
    notes = []
    for task in tasks:
        counts = sorted({run.num_questions[task] for run in runs if run.num_questions.get(task) is not None})
        if len(counts) == 1:
            scores = [run.accuracy[task] for run in runs if task in run.accuracy]
            average = sum(scores) / len(scores)
            error = 100 * math.sqrt(average * (1 - average) / counts[0])
            notes.append(
                f"{task_names[task]}: {counts[0]} questions per model; at its mean accuracy of "
                f"{100 * average:.0f}% one standard error is {error:.1f} points."
            )
        elif counts:
            notes.append(
                f"{task_names[task]}: the models were scored on different numbers of questions "
                f"({', '.join(map(str, counts))}); their accuracies are not directly comparable."
            )
    notes += missing_notes(runs, tasks, task_names)
    reference = reference_note(runs)
    if reference:
        notes.append(reference)
    missing = [run.name for run in runs if run.method != "base" and run.finished and not run.deviation]
    if missing:
        notes.append(
            f"No deviation was logged by {', '.join(missing)} (for `stage: sft` set `deviation_metric: true`)."
        )
    unfinished = [run.name for run in runs if not run.finished]
    if unfinished:
        notes.append(
            f"Not finished (no trainer_state.json), left out of the plots and the choice of best: "
            f"{', '.join(unfinished)}."
        )
    return notes


def ordered_tasks(found: set) -> list:
    return [task for task in TASK_ORDER if task in found] + sorted(found - set(TASK_ORDER))


def build(paths: list, output_dir: str) -> list:
    runs = sorted((load_run(directory) for directory in collect_run_dirs(paths, output_dir)), key=order_key)
    settings = group_settings(runs)
    # Columns: every benchmark a run was evaluated on or meant to be; the mean and the best: those measured.
    tasks = ordered_tasks({task for run in runs for task in (*run.accuracy, *run.unreachable, *run.attempted)})
    scored = ordered_tasks({task for run in runs for task in run.accuracy})
    task_names = {task: TASK_LABELS.get(task, task) for task in tasks}
    best = mark_best(settings, scored)
    bars = [setting for setting in settings if setting.method == "base"] + [best[m] for m in METHODS if m in best]
    measure = figure1_measure(runs)
    deviation_of = (
        (lambda run: run.final_heldout_deviation)
        if measure == HELDOUT_MEASURE
        else (lambda run: run.final_train_deviation)
    )
    charts = [drift_accuracy_chart(settings, scored, measure, deviation_of), learning_drift_chart(settings)]
    notes = question_notes(runs, tasks, task_names) + measure_notes(runs, measure, charts)

    with staged_dir(output_dir, prefix=".report-") as staging:
        with open(os.path.join(staging, "results.md"), "w", encoding="utf-8") as f:
            f.write(markdown(runs, settings, tasks, scored, task_names, notes, charts))
        write_csv(os.path.join(staging, "results.csv"), runs, tasks, scored, charts)
        write_settings_csv(os.path.join(staging, "settings.csv"), settings, scored, charts)
        plot_deviation(os.path.join(staging, "deviation.png"), *deviation_curves(settings, best, measure), measure)
        plot_accuracy(os.path.join(staging, "accuracy.png"), bars, scored, task_names)
        for chart in charts:
            if chart.points:
                plot_tradeoff(os.path.join(staging, chart.file), chart)
    return runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories (train.yaml + trainer_state.json + eval/<task>/results.json), the "
        "base model's directory (eval/ and model.yaml), or a sweep root holding them",
    )
    parser.add_argument("--output_dir", required=True, help="where results.md, results.csv and the charts go")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    args.run_dirs = [local_path(path, "RUN_DIR") for path in args.run_dirs]
    args.output_dir = checked_output_dir(args.output_dir, args.overwrite)
    try:
        build(args.run_dirs, args.output_dir)
    except ReportError as error:
        raise SystemExit(f"minorsft report: {error}") from None
    with open(os.path.join(args.output_dir, "results.md"), encoding="utf-8") as f:
        print(f.read())
    written = sorted(name for name in os.listdir(args.output_dir))
    print(f"Wrote {', '.join(os.path.join(args.output_dir, name) for name in written)}")
    return 0
