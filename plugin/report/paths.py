"""Learning against drift along the way: each setting's path through (drift, learning) at every evaluation, the drift
at fixed levels of learning ("at equal learning, which method drifts least"), when MinorSFT's coefficient acted, and
the training dynamics beside them.

Drift is the exact KL(π_ref‖π_θ) per token on the drift set (``kl_metric``; docs/method.md). Learning is measured
twice on the held-out domain set: per sample (Eq. 8, which weights every sample alike, as Eq. 5 and Eq. 7 do) and per
token (the gain in log-likelihood per response token, which weights every token alike, as LLaMA-Factory's SFT does).
Every path starts at (0, 0): before the first update the model is the reference.
"""

from dataclasses import dataclass, field

from ..methods import METHODS
from .plots import LINE_STYLES, MARKERS, METHOD_COLORS, setting_curve
from .runs import Setting, mean

# The learning levels of the equal-learning table, as fractions of SFT's final held-out gain: fixed before any run.
LEVEL_FRACTIONS = (0.25, 0.5, 0.75)
# MinorSFT's coefficient has acted once its mean over the batch is below this (docs/results.md).
COEFFICIENT_ACTED = 0.5
LEARNING_MEASURES = {  # name -> (the run's series, axis label)
    "per sample": (
        lambda run: run.heldout,
        "learning per sample: held-out deviation (Eq. 8), mean over samples of (log π_θ − log π_ref) / m",
    ),
    "per token": (
        lambda run: run.heldout_token,
        "learning per token: held-out Σ(log π_θ − log π_ref) / Σ m over all response tokens",
    ),
}
DRIFT_LABEL = "drift: exact KL(π_ref‖π_θ) per token on the drift set (the base model's own answers to general prompts)"


def run_path(run, learning_of) -> list:
    """(step, drift, learning) at the evaluations where the run logged both, from (0, 0, 0)."""
    drift, learning = dict(run.drift_kl), dict(learning_of(run))
    return [(0, 0.0, 0.0)] + [(step, drift[step], learning[step]) for step in sorted(drift) if step in learning]


def drift_at_learning(path: list, level: float) -> float | None:
    """The drift where the path first reaches ``level`` of learning, linear between evaluations; None if never."""
    for (_, drift_a, learning_a), (_, drift_b, learning_b) in zip(path, path[1:]):
        if learning_a < level <= learning_b:
            return drift_a + (drift_b - drift_a) * (level - learning_a) / (learning_b - learning_a)
    return None


@dataclass
class PathCurve:
    """One setting's path: at each evaluation step every seed logged, the mean over its seeds and their range."""

    label: str
    method: str
    steps: list
    drift: list  # (mean, low, high) per step
    learning: list
    seeds: int


def setting_path(setting: Setting, learning_of) -> PathCurve | None:
    paths = [run_path(run, learning_of) for run in setting.finished]
    paths = [path for path in paths if len(path) > 1]
    if not paths:
        return None
    steps = sorted(set.intersection(*({step for step, _, _ in path} for path in paths)))

    def spread(index: int) -> list:
        columns = [[next(point[index] for point in path if point[0] == step) for path in paths] for step in steps]
        return [(mean(column), min(column), max(column)) for column in columns]

    return PathCurve(setting.label, setting.method, steps, spread(1), spread(2), len(paths))


@dataclass
class EqualLearningTable:
    """Drift at fixed learning levels: one row per setting, one cell per level."""

    measure: str  # a key of LEARNING_MEASURES
    reference: str  # whose final gain the levels are fractions of
    levels: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # (setting label, [cell text per level])
    missing: str = ""


def equal_learning_table(settings: list, measure: str) -> EqualLearningTable:
    learning_of = LEARNING_MEASURES[measure][0]
    table = EqualLearningTable(measure, "")
    sft = next((s for s in settings if s.method == "sft" and s.values(lambda run: last_value(learning_of(run)))), None)
    if sft is None:
        table.missing = "no SFT run logged the held-out learning, so there are no levels to read the drift at"
        return table
    if not any(run.drift_kl for setting in settings for run in setting.finished):
        table.missing = "no run logged the exact KL on a drift set (`kl_metric: true` with a drift set)"
        return table
    final_gain = mean(sft.values(lambda run: last_value(learning_of(run))))
    table.reference = f"{sft.label}, final held-out gain {final_gain:.4f} ({measure}, mean of {len(sft.seeds)} seed(s))"
    table.levels = [fraction * final_gain for fraction in LEVEL_FRACTIONS]
    for setting in settings:
        if setting.method == "base":
            continue
        paths = [run_path(run, learning_of) for run in setting.finished if run.drift_kl]
        if not paths:
            continue
        table.rows.append((setting.label, [drift_cell(paths, level) for level in table.levels]))
    return table


def drift_cell(paths: list, level: float) -> str:
    """Mean drift at ``level`` over the seeds that reached it, with their range; says how many never did."""
    values = [value for value in (drift_at_learning(path, level) for path in paths) if value is not None]
    if not values:
        return "never reached" + (f" ({len(paths)} seeds)" if len(paths) > 1 else "")
    text = f"{mean(values):.4f}" + (f" [{min(values):.4f}, {max(values):.4f}]" if len(values) > 1 else "")
    return text + (
        f" ({len(paths) - len(values)} of {len(paths)} seeds never reached it)" if len(values) < len(paths) else ""
    )


def last_value(series: list) -> float | None:
    return series[-1][1] if series else None


@dataclass
class CoefficientCheck:
    """When a MinorSFT setting's mean coefficient first fell below ``COEFFICIENT_ACTED``, and the share of its
    optimizer steps after that: a regime measures Eq. 7 rather than Eq. 5 only when most steps come after."""

    label: str
    step: int | None  # the first logged step below the threshold (mean over seeds), None if never
    total_steps: int

    @property
    def share_after(self) -> float:
        return 0.0 if self.step is None else (self.total_steps - self.step) / self.total_steps

    @property
    def acted(self) -> bool:
        return self.share_after > 0.5


def coefficient_checks(settings: list) -> list:
    checks = []
    for setting in settings:
        runs = [run for run in setting.finished if run.coefficient and run.steps]
        if setting.method != "minorsft" or not runs:
            continue
        per_seed = [dict(run.coefficient) for run in runs]
        steps = sorted(set.intersection(*(set(values) for values in per_seed)))
        below = [step for step in steps if mean([values[step] for values in per_seed]) < COEFFICIENT_ACTED]
        checks.append(CoefficientCheck(setting.label, below[0] if below else None, max(run.steps for run in runs)))
    return checks


def plot_paths(path: str, settings: list) -> bool:
    """Two panels, learning per sample and per token against the drift, one path per setting (the mean over its seeds,
    the seeds' range as error bars); False when no run has a path."""
    curves = {
        measure: [curve for curve in (setting_path(s, of) for s in settings if s.method != "base") if curve]
        for measure, (of, _) in LEARNING_MEASURES.items()
    }
    if not any(curves.values()):
        return False
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5), dpi=110)
    for ax, (measure, measure_curves) in zip(axes, curves.items()):
        for position, curve in enumerate(measure_curves):
            index = sum(other.method == curve.method for other in measure_curves[:position])
            drift = [point[0] for point in curve.drift]
            learning = [point[0] for point in curve.learning]
            ax.errorbar(
                drift,
                learning,
                xerr=[[m - lo for m, lo, _ in curve.drift], [hi - m for m, _, hi in curve.drift]],
                yerr=[[m - lo for m, lo, _ in curve.learning], [hi - m for m, _, hi in curve.learning]],
                color=METHOD_COLORS.get(curve.method),
                linestyle=LINE_STYLES[index % len(LINE_STYLES)],
                marker=MARKERS[index % len(MARKERS)],
                markersize=4,
                capsize=2,
                elinewidth=0.8,
                label=curve.label + (f", {curve.seeds} seeds" if curve.seeds > 1 else ""),
            )
        ax.set_xlabel(DRIFT_LABEL, fontsize=8)
        ax.set_ylabel(LEARNING_MEASURES[measure][1], fontsize=8)
        ax.set_title(f"learning {measure} against drift, at every evaluation from (0, 0)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Learning the domain against drifting away from the base model: up and to the left is better")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


DYNAMICS = (  # (the run's series, panel title)
    (lambda run: run.heldout, "held-out deviation (Eq. 8) at each evaluation"),
    (lambda run: run.drift_kl, "exact KL on the drift set at each evaluation"),
    (lambda run: run.coefficient, "MinorSFT's mean coefficient 2σ(−β·r) (training batches)"),
    (lambda run: run.grad_norm, "gradient norm before clipping (training batches)"),
    (lambda run: run.learning_rates, "learning rate"),
)


def plot_dynamics(path: str, settings: list) -> bool:
    """Per setting, against the step: the held-out deviation, the drift, the coefficient, the gradient norm and the
    learning rate (means over seeds), so that a reader sees when the coefficient acted."""
    trained = [setting for setting in settings if setting.method != "base" and setting.finished]
    if not trained:
        return False
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(DYNAMICS), 1, figsize=(10, 3 * len(DYNAMICS)), dpi=100, sharex=True)
    for ax, (series_of, title) in zip(axes, DYNAMICS):
        drawn = 0
        for position, setting in enumerate(trained):
            curve = setting_curve(setting, series_of)
            if curve is None:
                continue
            index = sum(other.method == setting.method for other in trained[:position])
            ax.plot(
                curve.steps,
                curve.mean,
                color=METHOD_COLORS.get(setting.method),
                linestyle=LINE_STYLES[index % len(LINE_STYLES)],
                linewidth=1.5,
                label=setting.label,
            )
            drawn += 1
        if series_of is DYNAMICS[2][0] and drawn:
            ax.axhline(COEFFICIENT_ACTED, color="#444444", linewidth=0.8, linestyle=":")
        ax.set_title(title if drawn else f"{title}: not logged", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[-1].set_xlabel("training step")
    labels = ", ".join(dict.fromkeys(METHODS[s.method].label for s in trained))
    fig.suptitle(f"Training dynamics per setting (mean over seeds): {labels}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
