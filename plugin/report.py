"""``minorsft report``: the results table and plots of a sweep, like the paper's Figures 1 and 2.

A run directory is what ``reproduce.sh`` leaves: ``train.yaml`` (method, learning rate and β are read
from it), LLaMA-Factory's ``trainer_state.json`` (the ``deviation`` of Eq. 8 per logged step),
``train.log`` (whether the run computed the reference log-probs or loaded them from the cache) and
``eval/<task>/results.json`` from ``minorsft eval``; a benchmark without results is explained by
``eval/<task>.skipped`` (reproduce.sh could not reach its data; the file holds why) or ``eval/<task>.log``
(the evaluation ran and failed). A directory with evaluations and no ``train.yaml`` is the base model
(``model.yaml`` names it). Writes ``results.md``, ``results.csv``, ``deviation.png`` and ``accuracy.png``
into ``--output_dir``, all or none.
"""

import argparse
import csv
import glob
import json
import math
import os
import re
from dataclasses import dataclass, field

import yaml

from .files import add_overwrite_argument, checked_output_dir, local_path, staged_dir
from .report_plots import percent, plot_accuracy, plot_deviation
from .sweep import format_number

METHOD_LABELS = {"base": "Base model", "sft": "SFT", "sft_dpo": "SFT using DPO", "minorsft": "MinorSFT"}
TASK_LABELS = {"ceval": "ceval-exam", "financeiq": "FinanceIQ", "fineval": "fineval"}
TASK_ORDER = ("financeiq", "fineval", "ceval")  # the paper's Figure 2
OUTPUT_FILES = ("results.md", "results.csv", "deviation.png", "accuracy.png")
# What an accuracy cell says when there is no accuracy (see ``Run.status``).
NO_DATA, FAILED, NOT_RUN = "no data", "failed", "not run"
# The lines ``ref_cache.PrecomputedReference.ensure`` logs into the run's train.log.
COMPUTED_LINE = re.compile(r"Computed reference log-probs of \d+ samples .*? in ([0-9.]+) s \(([0-9.]+) s CPU time"
                           r".*?; saved to (.+?)\.?\s*$", re.MULTILINE)
LOADED_LINE = re.compile(r"Loaded reference log-probs of \d+ samples from (.+?)\.?\s*$", re.MULTILINE)


class ReportError(Exception):
    pass


@dataclass
class Run:
    directory: str
    method: str
    learning_rate: float | None = None
    beta: float | None = None
    model: str = ""
    finished: bool = True
    steps: int | None = None
    deviation: list = field(default_factory=list)  # (step, value) of the training log
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
    def label(self) -> str:
        if self.method == "base":
            return (
                f"{METHOD_LABELS['base']} ({os.path.basename(self.model.rstrip('/'))})" if self.model else "Base model"
            )
        settings = [f"lr {number(self.learning_rate)}"] + ([f"β {number(self.beta)}"] if self.beta is not None else [])
        return f"{METHOD_LABELS.get(self.method, self.method)} ({', '.join(settings)})"

    @property
    def final_deviation(self) -> float | None:
        return self.deviation[-1][1] if self.deviation else None

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


def number(value: float | None) -> str:
    return "—" if value is None else format_number(value)


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
    # Imported here: LLaMA-Factory pulls in torch, and only a train.yaml without `pref_beta` needs it.
    from llamafactory.hparams import FinetuningArguments

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


def markdown(runs: list, tasks: list, scored: list, task_names: dict, notes: list) -> str:
    header = (
        ["", "Method", "lr", "β", "Steps", "Final deviation"] + [f"{task_names[t]} (%)" for t in tasks] + ["Mean (%)"]
    )
    legend = ("One row per run, the base model first. ★ marks the best run of each method (highest mean accuracy "
              "over the benchmarks). Final deviation: the last logged value of Eq. 8, the mean per-token log-ratio "
              "log π_θ − log π_ref of the training samples (0 = the base model; lower = closer to it). An accuracy "
              f"cell without a number says why: *{NO_DATA}* (the benchmark data could not be reached), *{FAILED}* "
              f"(the evaluation ran but wrote no results; see the run's eval/<benchmark>.log), *{NOT_RUN}* (never "
              "evaluated on that benchmark). Mean: over the benchmarks that were measured; — where the run lacks one.")
    lines = ["# MinorSFT sweep: results", "", legend, ""]
    unmeasured = not_measured_note(runs, tasks, task_names)
    if unmeasured:
        lines += [f"**{unmeasured}**", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        steps = "not finished" if not run.finished else ("—" if run.steps is None else str(run.steps))
        deviation = "—" if run.final_deviation is None else f"{run.final_deviation:.4f}"
        row = ["★" if run.best else "", METHOD_LABELS.get(run.method, run.method), number(run.learning_rate),
               number(run.beta), steps, deviation] + [run.status(t) for t in tasks]
        lines.append("| " + " | ".join(row + [percent(run.mean_accuracy(scored))]) + " |")
    lines += ["", "Runs: " + ", ".join(f"`{run.directory}`" for run in runs) + "."]
    lines += [""] + [f"- {note}" for note in notes]
    lines += ["", "![Deviation during training](deviation.png)", "", "![Accuracy per benchmark](accuracy.png)", ""]
    return "\n".join(lines)


def write_csv(path: str, runs: list, tasks: list, scored: list) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_dir", "method", "learning_rate", "beta", "finished", "steps", "final_deviation"]
                        + [f"accuracy_{t}" for t in tasks] + [f"num_questions_{t}" for t in tasks]
                        + ["mean_accuracy", "best", "reference_passes", "reference_pass_seconds", "reference_loads"])
        for run in runs:
            writer.writerow([run.directory, run.method, run.learning_rate, run.beta, run.finished, run.steps,
                             run.final_deviation] + [run.accuracy.get(t) for t in tasks]
                            + [run.num_questions.get(t) for t in tasks] + [run.mean_accuracy(scored), run.best]
                            + [len(run.reference_passes), sum(p[0] for p in run.reference_passes),
                               len(run.reference_loads)])


def names(items) -> str:
    return ", ".join(items)


def not_measured_note(runs: list, tasks: list, task_names: dict) -> str:
    """The benchmarks whose data could not be reached, and why (as reproduce.sh found it)."""
    reasons = {}  # task -> distinct reasons
    for run in runs:
        for task, reason in run.unreachable.items():
            if task not in run.accuracy:
                reasons.setdefault(task, {})[reason or "no reason given"] = None
    if not reasons:
        return ""
    opening = "Not measured" if any(run.accuracy for run in runs) else "Accuracy was not measured"
    why = "; ".join(dict.fromkeys(reason for task in tasks for reason in reasons.get(task, ())))
    return (f"{opening} on {names(task_names[t] for t in tasks if t in reasons)}: the benchmark data could not be "
            f"reached ({why}). To measure it, re-run with the data reachable: `--eval_data_dir DIR` or "
            "`MINORSFT_EVAL_DATA_DIR=DIR` (a folder holding ceval-exam/, FinanceIQ/, fineval/), or network access "
            "to the Hugging Face Hub; finished trainings are kept.")


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
        made = "; ".join(f"{name} computed them into `{path}`" + (f" in {seconds:.1f} s" if len(passes) > 1 else "")
                         for name, seconds, _, path in passes)
    else:
        made = "none was computed by these runs"
    loaded = f"; loaded from the cache, without a pass of their own, by {names(loaders)}" if loaders else ""
    return f"Reference log-probs (`precompute_ref_logps`): {count}: {made}{loaded}."


def deviation_curves(runs: list, best: dict) -> tuple:
    """The runs Figure 1 draws and its legend title: per method the best run when accuracies picked one,
    else every finished run of that method that logged the deviation."""
    chosen, every = [], []
    for method in dict.fromkeys(run.method for run in runs):
        if method in best:
            chosen += [best[method]] if best[method].deviation else []
            continue
        logged = [run for run in runs if run.method == method and run.finished and run.deviation]
        if logged:
            chosen += logged
            every.append(METHOD_LABELS.get(method, method))
    if not every:
        title = "best run of each method (by mean accuracy)"
    elif len(every) == len({run.method for run in chosen}):
        title = "every run (no accuracy to pick the best by)"
    else:
        title = f"best run of each method; every run of {names(every)} (no accuracy)"
    return chosen, title


def question_notes(runs: list, tasks: list, task_names: dict) -> list:
    notes = []
    for task in tasks:
        counts = sorted({run.num_questions[task] for run in runs if run.num_questions.get(task) is not None})
        if len(counts) == 1:
            scores = [run.accuracy[task] for run in runs if task in run.accuracy]
            mean = sum(scores) / len(scores)
            error = 100 * math.sqrt(mean * (1 - mean) / counts[0])
            notes.append(f"{task_names[task]}: {counts[0]} questions per model; at its mean accuracy of "
                         f"{100 * mean:.0f}% one standard error is {error:.1f} points.")
        elif counts:
            notes.append(f"{task_names[task]}: the models were scored on different numbers of questions "
                         f"({', '.join(map(str, counts))}); their accuracies are not directly comparable.")
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
        notes.append(f"Not finished (no trainer_state.json), left out of the plots and the choice of best: "
                     f"{', '.join(unfinished)}.")
    return notes


def ordered_tasks(found: set) -> list:
    return [task for task in TASK_ORDER if task in found] + sorted(found - set(TASK_ORDER))


def build(paths: list, output_dir: str) -> list:
    runs = sorted((load_run(directory) for directory in collect_run_dirs(paths, output_dir)), key=order_key)
    # Columns: every benchmark a run was evaluated on or meant to be; the mean and the best: those measured.
    tasks = ordered_tasks({task for run in runs for task in (*run.accuracy, *run.unreachable, *run.attempted)})
    scored = ordered_tasks({task for run in runs for task in run.accuracy})
    task_names = {task: TASK_LABELS.get(task, task) for task in tasks}
    best = mark_best(runs, scored)
    best_runs = sorted(best.values(), key=order_key)
    bars = [run for run in runs if run.method == "base"] + best_runs

    with staged_dir(output_dir, prefix=".report-") as staging:
        with open(os.path.join(staging, "results.md"), "w", encoding="utf-8") as f:
            f.write(markdown(runs, tasks, scored, task_names, question_notes(runs, tasks, task_names)))
        write_csv(os.path.join(staging, "results.csv"), runs, tasks, scored)
        plot_deviation(os.path.join(staging, "deviation.png"), *deviation_curves(runs, best))
        plot_accuracy(os.path.join(staging, "accuracy.png"), bars, scored, task_names)
    return runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (train.yaml + trainer_state.json + eval/<task>/results.json), the "
                             "base model's directory (eval/ and model.yaml), or a sweep root holding them")
    parser.add_argument("--output_dir", required=True, help="where results.md, results.csv and the plots go")
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
    print(f"Wrote {', '.join(os.path.join(args.output_dir, name) for name in OUTPUT_FILES)}")
    return 0
