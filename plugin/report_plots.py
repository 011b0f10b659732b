"""The two figures of ``minorsft report``: deviation against step (Figure 1) and accuracy bars (Figure 2).

Both take the report's ``Run`` objects; matplotlib is imported when a figure is drawn.
"""

import math

METHOD_COLORS = {"base": "#8c8c8c", "sft": "#1f77b4", "sft_dpo": "#ff7f0e", "minorsft": "#2ca02c"}
# Curves longer than this are drawn smoothed (LLaMA-Factory's EMA) over the raw values.
SMOOTH_FROM_POINTS = 50
# Several runs of one method share its colour and differ in line style and marker.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def plot_deviation(path: str, runs: list, legend_title: str) -> None:
    """The logged deviation against the step, one curve per run (those that logged it)."""
    import matplotlib.pyplot as plt  # here, not at the top: `minorsft --help` stays fast

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    curves = [run for run in runs if run.deviation]
    for position, run in enumerate(curves):
        steps, values = zip(*run.deviation)
        color = METHOD_COLORS.get(run.method)
        index = sum(other.method == run.method for other in curves[:position])  # the how-many-th of its method
        style = {"color": color, "linestyle": LINE_STYLES[index % len(LINE_STYLES)], "linewidth": 2}
        if len(values) >= SMOOTH_FROM_POINTS:
            # Imported here: it pulls in transformers, which only long curves are worth.
            from llamafactory.extras.ploting import smooth

            ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
            ax.plot(steps, smooth(list(values)), label=run.label, **style)
        else:
            ax.plot(steps, values, marker=MARKERS[index % len(MARKERS)], markersize=4, label=run.label, **style)
    ax.axhline(0, color="#444444", linewidth=0.8)
    if curves:
        ax.legend(title=legend_title, loc="best", fontsize=8 if len(curves) > 6 else 10, title_fontsize=9)
    else:
        ax.text(0.5, 0.5, "no run logged the deviation", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Deviation from the base model during training (Eq. 8)")
    ax.set_title("each point: the mean over that step's training batch; all runs see the same batches in the same\n"
                 "order, so a peak shared by all runs comes from the batch, not from the method",
                 fontsize=8, color="#444444")
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
    """Grouped bars: per benchmark (and their mean), one bar per run, with the chance level."""
    import matplotlib.pyplot as plt

    groups = tasks + (["mean"] if len(tasks) > 1 else [])
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(groups) + 2), 5), dpi=120)
    if not any(run.accuracy for run in bars):
        ax.text(0.5, 0.5, "accuracy was not measured (results.md says why)", ha="center", va="center",
                transform=ax.transAxes)
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
