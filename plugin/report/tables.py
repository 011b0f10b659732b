"""``minorsft report``, tables: results.md (the runs, the settings, the notes), results.csv (one row per run) and
settings.csv (one row per setting)."""

import csv
import math

from ..methods import METHODS
from .plots import HELDOUT_MEASURE
from .runs import BASE_LABEL, FAILED, NO_DATA, NOT_RUN, RunResults, decimal, number, percent


def with_range(summary: tuple, fmt, seeds: int) -> str:
    """``mean [min, max]`` over the seeds, the value alone for one seed."""
    center, low, high = summary
    if center is None:
        return "—"
    return fmt(center) if seeds <= 1 else f"{fmt(center)} [{fmt(low)}, {fmt(high)}]"


SETTING_MEASURES = (  # (name in settings.csv, column in results.md, the run's value, its format)
    ("train_deviation", "Train dev.", lambda run: run.final_train_deviation, decimal),
    ("heldout_deviation", "Held-out dev.", lambda run: run.final_heldout_deviation, decimal),
    ("heldout_token_deviation", "Held-out dev. per token", lambda run: run.final_heldout_token_deviation, decimal),
    ("drift", "Drift", lambda run: run.final_drift, decimal),
    ("coefficient_last", "Coef. (last)", lambda run: run.coefficient_last, decimal),
)


def setting_measures(scored: list) -> tuple:
    return SETTING_MEASURES + (("mean_accuracy", "Mean (%)", lambda run: run.mean_accuracy(scored), percent),)


def coefficient_cell(run: RunResults) -> str:
    return "—" if not run.coefficient else f"{run.coefficient_first:.3f} → {run.coefficient_last:.3f}"


def markdown(
    runs: list,
    settings: list,
    tasks: list,
    scored: list,
    task_names: dict,
    notes: list,
    charts: list,
    learning_section: list = (),
) -> str:
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
    lines += list(learning_section)
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
                "final_heldout_token_deviation",
                "drift_set",
                "final_drift",
                "drift_measure",
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
                    run.final_heldout_token_deviation,
                    run.drift_set,
                    run.final_drift,
                    ("exact KL" if run.drift_kl else "-deviation estimate") if run.final_drift is not None else "",
                    run.coefficient_first,
                    run.coefficient_last,
                ]
                + [run.accuracy.get(t) for t in tasks]
                + [run.num_questions.get(t) for t in tasks]
                + [run.mean_accuracy(scored), run.best]
                + [run.finished and run.label in front for front in fronts.values()]
                + [
                    int(bool(run.reference and run.reference.computed)),
                    run.reference.seconds if run.reference and run.reference.computed else 0,
                    int(bool(run.reference and not run.reference.computed)),
                ]
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


def reference_note(uses: list) -> str:
    """How many reference passes (``precompute_ref_logps``) the runs made, how long they took, who reused them;
    ``uses``: (run name, ``ReferenceUse``) of the runs that precomputed them. Also the sweep's last line."""
    passes = [(name, use) for name, use in uses if use.computed]
    loaders = [name for name, use in uses if not use.computed]
    if not passes and not loaders:
        return ""
    count = f"{len(passes)} pass{'es' if len(passes) != 1 else ''}"
    if passes:
        total, total_cpu = sum(use.seconds for _, use in passes), sum(use.cpu_seconds for _, use in passes)
        count += f", {total:.1f} s ({total_cpu:.1f} s CPU){' in all' if len(passes) > 1 else ''}"
        made = "; ".join(
            f"{name} computed them into `{use.cache_file}`" + (f" in {use.seconds:.1f} s" if len(passes) > 1 else "")
            for name, use in passes
        )
    else:
        made = "none was computed by these runs"
    loaded = f"; loaded from the cache, without a pass of their own, by {names(loaders)}" if loaders else ""
    return f"Reference log-probs (`precompute_ref_logps`): {count}: {made}{loaded}."


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
    reference = reference_note([(run.name, run.reference) for run in runs if run.reference])
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


# Below this many optimizer steps the report says plainly that its paths cannot answer the drift question: the
# demo's runs (8 steps, two evaluations) show the pipeline; the CPU regimes of docs/results.md run 40 and 50.
SHORT_RUN_STEPS = 20


def learning_drift_section(tables: list, checks: list, has_paths: bool, longest_run_steps: int = 0) -> list:
    """results.md's "Learning against drift" section: the equal-learning tables and when the coefficient acted."""
    from .paths import COEFFICIENT_ACTED, LEVEL_FRACTIONS

    if not any(equal.rows for equal in tables) and not checks:
        return []
    lines = ["", "## Learning against drift", ""]
    if 0 < longest_run_steps < SHORT_RUN_STEPS:
        lines += [
            f"**Short runs: at most {longest_run_steps} optimizer steps.** Their paths show the pipeline and the "
            "first move of each measure, not which method drifts less for the same learning: a level below a "
            "path's first evaluation is read on the straight line from (0, 0), and a coefficient that falls late "
            "has had no time to act. The plugin's docs/results.md has runs long enough to ask that question.",
            "",
        ]
    if has_paths:
        lines += [
            "`learning_drift_paths.png`: each setting's path through (drift, learning) at every evaluation, from "
            "(0, 0); drift is the exact KL(π_ref‖π_θ) per token on the drift set; `dynamics.png`: the held-out "
            "deviation, the drift, the coefficient, the gradient norm and the learning rate against the step.",
            "",
            "![Learning against drift](learning_drift_paths.png)",
            "",
            "![Training dynamics](dynamics.png)",
            "",
        ]
    for equal in tables:
        lines += [f"### Drift at equal learning ({equal.measure})", ""]
        if not equal.rows:
            lines += [f"Not measured: {equal.missing}.", ""]
            continue
        fractions = ", ".join(f"{fraction:g}" for fraction in LEVEL_FRACTIONS)
        lines += [
            f"The exact KL on the drift set where each setting's held-out learning ({equal.measure}) first reaches "
            f"{fractions} of the reference's final gain (reference: {equal.reference}), read by linear "
            "interpolation between evaluations; the mean over the seeds that reached it [their range]. Lower is "
            "better: less drift for the same learning.",
            "",
        ]
        header = ["Setting"] + [
            f"{fraction:g} × ({level:.4f})" for fraction, level in zip(LEVEL_FRACTIONS, equal.levels)
        ]
        lines += table(header, [[label, *cells] for label, cells in equal.rows]) + [""]
    if checks:
        lines += [
            "### When MinorSFT's coefficient acted",
            "",
            f"The first logged step at which a MinorSFT setting's mean coefficient (mean over its seeds) fell below "
            f"{COEFFICIENT_ACTED:g}, and the share of its optimizer steps after it. Where that share is at most half, "
            "the run trained mostly as Eq. 5 (the coefficient near 1), and says little about the coefficient.",
            "",
        ]
        rows = [
            [
                check.label,
                "never" if check.step is None else str(check.step),
                str(check.total_steps),
                f"{100 * check.share_after:.0f}%",
                "yes" if check.acted else "no",
            ]
            for check in checks
        ]
        lines += table(["Setting", "Below 0.5 from step", "Steps", "Steps after", "Coefficient acted"], rows)
    return lines
