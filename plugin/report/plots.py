"""The charts of ``minorsft report``: the deviation against the step (Figure 1), accuracy bars (Figure 2), and the
trade-off charts (deviation or drift against accuracy or learning, with their Pareto fronts).

They take what ``report`` computed (``Curve``, ``Point``, settings); matplotlib is imported when a chart is drawn.
"""

import math
from dataclasses import dataclass

from ..methods import METHODS

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


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


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
