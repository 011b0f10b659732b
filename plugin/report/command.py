"""``minorsft report``: the results tables and charts of a sweep, like the paper's Figures 1 and 2.

Reads the run directories (``runs``), picks the best setting of each method and the Pareto fronts (``plots``), and
writes ``results.md``, ``results.csv`` (one row per run), ``settings.csv`` (one row per setting; runs that differ
only in their seed form one *setting*, and charts draw settings: the mean over seeds, with the seeds' range),
``deviation.png``, ``accuracy.png`` and, when their data exist, ``drift_accuracy.png``, ``learning_drift.png``,
``learning_drift_paths.png`` and ``dynamics.png`` (``paths``: learning against drift along the way, drift at equal
learning, when MinorSFT's coefficient acted), and for runs on preference pairs ``dpo_deviation.png`` and a section
of results.md (``preference``) into ``--output_dir``, all or none.
"""

import argparse
import os

from ..files import add_overwrite_argument, checked_output_dir, local_path, staged_dir
from ..methods import METHODS
from .paths import LEARNING_MEASURES, coefficient_checks, equal_learning_table, plot_dynamics, plot_paths
from .plots import (
    HELDOUT_MEASURE,
    deviation_curves,
    drift_accuracy_chart,
    figure1_measure,
    learning_drift_chart,
    plot_accuracy,
    plot_deviation,
    plot_tradeoff,
)
from .preference import markdown_section, plot_preference
from .runs import TASK_LABELS, TASK_ORDER, collect_run_dirs, group_settings, load_run, mark_best, order_key
from .tables import learning_drift_section, markdown, measure_notes, question_notes, write_csv, write_settings_csv


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
    equal_learning = [equal_learning_table(settings, name) for name in LEARNING_MEASURES]
    checks = coefficient_checks(settings)
    has_paths = any(run.drift_kl and run.heldout for run in runs if run.finished)
    longest_run_steps = max((run.steps or 0 for run in runs if run.method != "base" and run.finished), default=0)

    with staged_dir(output_dir, prefix=".report-") as staging:
        with open(os.path.join(staging, "results.md"), "w", encoding="utf-8") as f:
            section = learning_drift_section(equal_learning, checks, has_paths, longest_run_steps)
            f.write(markdown(runs, settings, tasks, scored, task_names, notes, charts, section))
            f.write("".join(line + "\n" for line in markdown_section(settings)))
        write_csv(os.path.join(staging, "results.csv"), runs, tasks, scored, charts)
        write_settings_csv(os.path.join(staging, "settings.csv"), settings, scored, charts)
        plot_deviation(os.path.join(staging, "deviation.png"), *deviation_curves(settings, best, measure), measure)
        plot_accuracy(os.path.join(staging, "accuracy.png"), bars, scored, task_names)
        for chart in charts:
            if chart.points:
                plot_tradeoff(os.path.join(staging, chart.file), chart)
        if has_paths:
            plot_paths(os.path.join(staging, "learning_drift_paths.png"), settings)
            plot_dynamics(os.path.join(staging, "dynamics.png"), settings)
        plot_preference(os.path.join(staging, "dpo_deviation.png"), settings)
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
    run_dirs = [local_path(path, "RUN_DIR") for path in args.run_dirs]
    output_dir = checked_output_dir(args.output_dir, args.overwrite)
    build(run_dirs, output_dir)
    with open(os.path.join(output_dir, "results.md"), encoding="utf-8") as f:
        print(f.read())
    written = sorted(name for name in os.listdir(output_dir))
    print(f"Wrote {', '.join(os.path.join(output_dir, name) for name in written)}")
    return 0
