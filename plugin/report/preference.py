"""``minorsft report`` for the runs on preference pairs (DPO, Eq. 1, and MinorDPO, Eq. 2; ``stage: dpo``): Eq. 8 on
the chosen and on the rejected answers per step, and the fraction of pairs whose rejected term Eq. 2 still
penalises (``r_l > 0``), as the plugin's DPO trainer logs them (``deviation_metric``). A table section of results.md
and ``dpo_deviation.png``; nothing when no run trained on pairs.

A MinorDPO pair whose rejected answer has fallen below the reference (``r_l ≤ 0``) trains its chosen answer alone
(Eq. 3), so the active fraction says how much of the batch is still DPO; DPO keeps pushing every rejected answer
down, which shows as a rejected deviation that keeps falling.
"""

from ..methods import METHODS
from .plots import LINE_STYLES, METHOD_COLORS
from .runs import Setting, decimal, last, mean, percent

FIGURE = "dpo_deviation.png"
PANELS = (
    ("deviation/chosen", "chosen answers: Eq. 8"),
    ("deviation/rejected", "rejected answers: Eq. 8"),
    ("rejected_active", "pairs with r_l > 0 (MinorDPO's rejected term active)"),
)


def preference_settings(settings: list) -> list:
    return [s for s in settings if s.method != "base" and METHODS[s.method].preference and s.finished]


def _final(setting: Setting, name: str) -> float | None:
    return mean(setting.values(lambda run: last(run.preference.get(name, []))))


def _over_steps(setting: Setting, name: str) -> float | None:
    """The mean over the logged steps, then over the seeds."""
    return mean(setting.values(lambda run: mean([value for _, value in run.preference.get(name, [])])))


def markdown_section(settings: list) -> list:
    rows = []
    for setting in preference_settings(settings):
        active = [_over_steps(setting, "rejected_active"), _final(setting, "rejected_active")]
        rows.append(
            [
                setting.label,
                str(len(setting.finished)),
                *(decimal(_final(setting, name)) for name in ("deviation/chosen", "deviation/rejected")),
                *(decimal(_final(setting, f"heldout/{name}")) for name in ("deviation/chosen", "deviation/rejected")),
                " / ".join(percent(value) for value in active) if setting.method == "minor_dpo" else "—",
            ]
        )
    if not rows:
        return []
    header = [
        "setting",
        "seeds",
        "final chosen deviation",
        "final rejected deviation",
        "held-out chosen deviation",
        "held-out rejected deviation",
        "rejected term active, % of pairs (mean over steps / last step)",
    ]
    return [
        "",
        "## Preference pairs: DPO and MinorDPO",
        "",
        "Eq. 8 on each answer of the pairs (mean over the pairs of (log π_θ − log π_ref) / m; training: the last "
        "logged step, held-out: the last evaluation; the mean over seeds). MinorDPO (Eq. 2) stops pushing a "
        "rejected answer down once it is below the reference (r_l ≤ 0): the last column is the share of pairs "
        f"where it still does. Per step: {FIGURE}.",
        "",
        *("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows]),
    ]


def plot_preference(path: str, settings: list) -> bool:
    """Per setting the chosen and rejected deviation and the active fraction against the step (the mean over its
    seeds at the steps all of them logged); False (nothing written) without a preference run."""
    chosen = [s for s in preference_settings(settings) if any(run.preference for run in s.finished)]
    if not chosen:
        return False
    import matplotlib.pyplot as plt  # here, not at the top: `minorsft --help` stays fast

    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 4.5), dpi=120)
    for position, setting in enumerate(chosen):
        index = sum(other.method == setting.method for other in chosen[:position])
        style = {"color": METHOD_COLORS.get(setting.method), "linestyle": LINE_STYLES[index % len(LINE_STYLES)]}
        for axis, (name, _) in zip(axes, PANELS):
            per_seed = [dict(run.preference[name]) for run in setting.finished if run.preference.get(name)]
            if not per_seed:
                continue
            steps = sorted(set.intersection(*(set(values) for values in per_seed)))
            axis.plot(steps, [mean([values[s] for values in per_seed]) for s in steps], label=setting.label, **style)
    for axis, (_, title) in zip(axes, PANELS):
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("training step")
        axis.axhline(0, color="#444444", linewidth=0.8)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean per-token log π_θ − log π_ref")
    axes[0].legend(fontsize=8)
    fig.suptitle("Preference pairs: deviation from the reference per answer, and MinorDPO's active rejected terms")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
