"""The charts of ``minorsft report``: the deviation against the step (Figure 1), accuracy bars (Figure 2), and the
trade-off charts (deviation or drift against accuracy or learning, with their Pareto fronts).

What each chart shows is chosen here from the settings (``runs.Setting``): Figure 1's measure and curves
(``deviation_curves``), the trade-off charts' points and Pareto fronts (``Tradeoff``); the tables list the same
fronts. matplotlib is imported when a chart is drawn.
"""

import math
from dataclasses import dataclass, field

from ..methods import METHODS
from .runs import BASE_LABEL, TASK_LABELS, Setting, mean, percent

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

# matplotlib's tab10 in the order of the method table: SFT blue, SFT using DPO orange, MinorSFT green, DFT red,
# ASFT purple, EAFT brown; the base model grey.
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
METHOD_COLORS = {"base": "#8c8c8c", **{name: TAB10[index % len(TAB10)] for index, name in enumerate(METHODS)}}
METHOD_MARKERS = {"base": "*", **{name: "os^DvPX"[index % 7] for index, name in enumerate(METHODS)}}
# Curves longer than this are drawn smoothed (LLaMA-Factory's EMA) over the raw values.
SMOOTH_FROM_POINTS = 50
# Several settings of one method share its colour and differ in line style and marker.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")


@dataclass
class Curve:
    """One setting's deviation per step: the mean over its seeds and their range."""

    label: str
    method: str
    steps: list
    mean: list
    low: list
    high: list
    seeds: int


@dataclass
class Point:
    """One setting on a trade-off chart: the mean over its seeds and their range on each axis."""

    label: str
    method: str
    x: float
    x_low: float
    x_high: float
    y: float
    y_low: float
    y_high: float
    seeds: int = 1


def plot_deviation(path: str, curves: list, legend_title: str, measure: str) -> None:
    """Figure 1: per setting the deviation against the step, the mean over its seeds with their min–max band."""
    import matplotlib.pyplot as plt  # here, not at the top: `minorsft --help` stays fast

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for position, curve in enumerate(curves):
        color = METHOD_COLORS.get(curve.method)
        index = sum(other.method == curve.method for other in curves[:position])  # the how-many-th of its method
        style = {"color": color, "linestyle": LINE_STYLES[index % len(LINE_STYLES)], "linewidth": 2}
        label = curve.label + (f", mean of {curve.seeds} seeds" if curve.seeds > 1 else "")
        if curve.seeds > 1:
            ax.fill_between(curve.steps, curve.low, curve.high, color=color, alpha=0.15, linewidth=0)
        if len(curve.mean) >= SMOOTH_FROM_POINTS:
            # Imported here: it pulls in transformers, which only long curves are worth.
            from llamafactory.extras.ploting import smooth

            ax.plot(curve.steps, curve.mean, color=color, alpha=0.25, linewidth=1)
            ax.plot(curve.steps, smooth(list(curve.mean)), label=label, **style)
        else:
            ax.plot(curve.steps, curve.mean, marker=MARKERS[index % len(MARKERS)], markersize=4, label=label, **style)
    ax.axhline(0, color="#444444", linewidth=0.8)
    if curves:
        ax.legend(title=legend_title, loc="best", fontsize=8 if len(curves) > 6 else 10, title_fontsize=9)
    else:
        ax.text(0.5, 0.5, "no run logged the deviation", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"Deviation from the base model during training (Eq. 8): {measure}")
    if measure.startswith("held-out"):
        subtitle = (
            "each point: the mean over the same held-out samples of the training domain at that evaluation;\n"
            "bands: the range over a setting's seeds"
        )
        x_label = "training step (evaluation)"
    else:
        subtitle = (
            "each point: the mean over that step's training batch; all runs see the same batches in the same\n"
            "order, so a peak shared by all runs comes from the batch, not from the method"
        )
        x_label = "training step"
    ax.set_title(subtitle, fontsize=8, color="#444444")
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{measure}: mean per-token log π_θ − log π_ref")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_tradeoff(path: str, chart) -> None:
    """A trade-off chart (``report.Tradeoff``): one point per setting, the seeds' range as error bars, the base model
    as a reference, and the Pareto front joined and ringed."""
    import matplotlib.pyplot as plt

    scale = 100 if chart.file == "drift_accuracy.png" else 1  # accuracy in percent
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    by_method = {}  # one legend entry per method, in the method table's order, then the base and the front
    for point in chart.points:
        by_method[point.method] = ax.errorbar(
            point.x,
            scale * point.y,
            xerr=[[point.x - point.x_low], [point.x_high - point.x]],
            yerr=[[scale * (point.y - point.y_low)], [scale * (point.y_high - point.y)]],
            fmt=METHOD_MARKERS[point.method],
            color=METHOD_COLORS[point.method],
            markersize=7,
            capsize=3,
        )
        ax.annotate(
            point.label.split("(", 1)[-1].rstrip(")"),
            (point.x, scale * point.y),
            fontsize=6,
            xytext=(4, 4),
            textcoords="offset points",
            color="#444444",
        )
    handles = {METHODS[method].label: by_method[method] for method in METHODS if method in by_method}
    if chart.base:
        [handles[f"{chart.base.label}: reference"]] = ax.plot(
            chart.base.x, scale * chart.base.y, METHOD_MARKERS["base"], color=METHOD_COLORS["base"], markersize=12
        )
    [handles["Pareto front (best trade-offs)"]] = ax.plot(
        [point.x for point in chart.front],
        [scale * point.y for point in chart.front],
        color="#222222",
        linestyle="--",
        linewidth=1,
        marker="o",
        markersize=14,
        markerfacecolor="none",
        label="Pareto front (best trade-offs)",
    )
    ax.set_xlabel(chart.x_label, fontsize=8)
    ax.set_ylabel(chart.y_label, fontsize=8)
    seeds = max(point.seeds for point in chart.points)
    ax.set_title(
        chart.title
        + (
            "\none point per setting: the mean over its seeds, bars their range"
            if seeds > 1
            else "\none point per setting"
        ),
        fontsize=10,
    )
    ax.legend(list(handles.values()), list(handles), loc="best", fontsize=8)
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
    """Grouped bars: per benchmark (and their mean), one bar per run, with the chance level."""
    import matplotlib.pyplot as plt

    groups = tasks + (["mean"] if len(tasks) > 1 else [])
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(groups) + 2), 5), dpi=120)
    if not any(run.accuracy for run in bars):
        ax.text(
            0.5,
            0.5,
            "accuracy was not measured (results.md says why)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_title("Accuracy of the base model and the best run of each method")
        ax.set_axis_off()
        fig.savefig(path)
        plt.close(fig)
        return
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
        title = f"best setting of each method; every setting of {', '.join(every)} (no accuracy)"
    return chosen, title
