"""``minorsft report``, loading: what a run directory holds, read into a ``RunResults``; runs that differ only in
their seed grouped into a ``Setting``.

A run directory is what the sweep leaves: ``train.yaml`` (the run's identity: the method by ``methods.method_of``,
learning rate, β, the SFT variant's α and the seed; LLaMA-Factory's own trainer, which plain SFT runs use, writes
no other record of them), LLaMA-Factory's ``trainer_state.json`` (per logged step the training ``deviation`` of
Eq. 8 and MinorSFT's ``coef_mean``; per evaluation the deviation on each eval set), ``minorsft_run.json`` (written by
the plugin's trainer, ``train.run_record``: whether the run computed the reference log-probs or loaded them from the
cache, and which of its eval sets are drift sets) and ``eval/<task>/results.json`` from ``minorsft eval``; a
benchmark without results is explained by ``eval/<task>.skipped`` (its data could not be reached; the file holds
why) or ``eval/<task>.log`` (the evaluation ran and failed). A directory with evaluations and no ``train.yaml`` is
the base model (``model.yaml`` names it).

Eval sets are of two kinds (docs/method.md, "Two measures that are easy to confuse"): a *drift set* is marked
``"drift_set": true`` in its dataset_info.json entry (``minorsft drift-set`` writes the mark; the run record says
``"kind": "drift"``), and its deviation estimates −KL(π_ref‖π_θ) per token; every other eval set is *held-out
domain* data, whose deviation is the gain in log-likelihood per token over the starting model.
"""

import functools
import glob
import json
import os
from dataclasses import dataclass, field

import yaml

from ..errors import UsageError
from ..methods import METHODS, format_number, method_of
from ..train import run_record

BASE_LABEL = "Base model"
METHOD_ORDER = ("base", *METHODS)
TASK_LABELS = {"ceval": "ceval-exam", "financeiq": "FinanceIQ", "fineval": "fineval"}
TASK_ORDER = ("financeiq", "fineval", "ceval")  # the paper's Figure 2
# What an accuracy cell says when there is no accuracy (see ``RunResults.status``).
NO_DATA, FAILED, NOT_RUN = "no data", "failed", "not run"


@dataclass(frozen=True)
class ReferenceUse:
    """What a run with precomputed reference log-probs did for them (its ``minorsft_run.json``): computed them, a
    reference pass of ``seconds`` (``cpu_seconds`` of CPU time on rank 0), or loaded them from the cache."""

    computed: bool
    cache_file: str
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def reference_use(record: dict | None) -> ReferenceUse | None:
    """From a run record; None for a run without one, with the reference computed online, or with no table."""
    reference = (record or {}).get("reference") or {}
    if reference.get("mode") != "precomputed" or reference.get("pass") not in ("computed", "loaded"):
        return None
    if reference["pass"] == "loaded":
        return ReferenceUse(False, reference["cache_file"])
    return ReferenceUse(True, reference["cache_file"], reference["seconds"], reference["cpu_seconds"])


@dataclass
class RunResults:
    """What one run directory (or the base model's) holds, as the tables and charts need it."""

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
    heldout_token: list = field(default_factory=list)  # (step, eval token_deviation): the per-token gain
    drift_set: str = ""  # the drift set read, and its (step, eval deviation) (≤ 0 in expectation)
    drift: list = field(default_factory=list)
    drift_kl: list = field(default_factory=list)  # (step, eval kl) on the drift set: the exact drift (kl_metric)
    grad_norm: list = field(default_factory=list)  # (step, value) of the training log
    learning_rates: list = field(default_factory=list)
    merged_eval_sets: list = field(default_factory=list)  # drift and domain sets merged into one eval_deviation
    accuracy: dict = field(default_factory=dict)  # task -> fraction
    num_questions: dict = field(default_factory=dict)
    unreachable: dict = field(default_factory=dict)  # task -> why its data could not be reached (eval/<task>.skipped)
    attempted: set = field(default_factory=set)  # tasks with an eval/<task>.log
    reference: ReferenceUse | None = None  # the reference log-probs: computed or loaded (precompute_ref_logps)
    preference: dict = field(default_factory=dict)  # DPO/MinorDPO runs: PREFERENCE_SERIES name -> (step, value)
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
        """The last exact KL(π_ref‖π_θ) per token on the drift set where the run logged it (``kl_metric``), else
        −(the last drift-set deviation), its sampled estimate."""
        if self.drift_kl:
            return last(self.drift_kl)
        value = last(self.drift)
        return None if value is None else -value

    @property
    def final_heldout_token_deviation(self) -> float | None:
        return last(self.heldout_token)

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
    """The runs that differ only in their seed. Quacks like a ``RunResults`` where the accuracy chart needs one."""

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


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def number(value: float | None) -> str:
    return "—" if value is None else format_number(value)


def decimal(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def read_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        content = yaml.safe_load(f)
    if not isinstance(content, dict):
        raise UsageError(f"{path} is not a YAML mapping")
    return content


def float_key(config: dict, key: str, path: str) -> float:
    try:
        return float(config[key])
    except KeyError:
        raise UsageError(f"{path} has no `{key}`") from None
    except (TypeError, ValueError):
        raise UsageError(f"{path}: `{key}: {config[key]}` is not a number") from None


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


def load_eval_deviations(run: RunResults, record: dict | None, history: list, state_path: str) -> None:
    """The held-out domain and drift-set deviations the run's evaluations logged (the first set of each kind), each
    eval set's kind and metrics as its run record says."""
    if record is None:
        if any(key.startswith("eval_") and key.endswith("deviation") for entry in history for key in entry):
            raise UsageError(
                f"{state_path} holds evaluation deviations, but {run_record.RUN_RECORD_FILE}, which says which eval "
                "sets are drift sets, is missing beside it (the plugin's trainer writes it at the end of training)"
            )
        return
    groups = {}  # metrics prefix -> the eval sets logged under it: one with eval_on_each_dataset, else all together
    for eval_set in record.get("eval_sets", []):
        groups.setdefault(eval_set["metrics_prefix"], []).append(eval_set)
    for prefix, members in groups.items():
        values = series(history, f"{prefix}deviation")
        if not values:
            continue
        names = [member["name"] for member in members]
        label = "`val_size` split" if names == ["val_size"] else ", ".join(names)
        kinds = {member["kind"] for member in members}
        if kinds == {"drift"}:
            if not run.drift:
                run.drift_set, run.drift = label, values
                run.drift_kl = series(history, f"{prefix}kl")
        elif "drift" in kinds:
            run.merged_eval_sets = names
        elif not run.heldout:
            run.heldout_set, run.heldout = label, values
            run.heldout_token = series(history, f"{prefix}token_deviation")


def series(history: list, key: str) -> list:
    return [(entry["step"], float(entry[key])) for entry in history if key in entry and "step" in entry]


# What the plugin's DPO trainer logs (Eq. 8 on each answer, the pairs whose Eq. 2 rejected term acts), and the same
# on the first evaluation set that logged them (``heldout/...``).
PREFERENCE_SERIES = ("deviation/chosen", "deviation/rejected", "rejected_active")


def preference_series(history: list) -> dict:
    found = {name: series(history, name) for name in PREFERENCE_SERIES}
    eval_keys = [
        key for entry in history for key in entry if key.startswith("eval_") and key.endswith("deviation/chosen")
    ]
    if eval_keys:
        prefix = eval_keys[0].removesuffix("deviation/chosen")
        found.update({f"heldout/{name}": series(history, prefix + name) for name in PREFERENCE_SERIES})
    return {name: values for name, values in found.items() if values}


def load_training(run: RunResults) -> None:
    config_path = os.path.join(run.directory, "train.yaml")
    config = read_yaml(config_path)
    if "stage" not in config:
        raise UsageError(f"{config_path} has no `stage`")
    try:
        run.method = method_of(config)
    except ValueError as error:
        raise UsageError(f"{config_path}: {error}") from None
    method = METHODS[run.method]
    run.model = str(config.get("model_name_or_path", ""))
    run.learning_rate = float_key(config, "learning_rate", config_path)
    if method.uses_beta:
        run.beta = key_or_default(config, "pref_beta", config_path)
    if method.alpha_key:
        run.alpha = key_or_default(config, method.alpha_key, config_path)
    seed = config.get("seed", llamafactory_default("seed"))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UsageError(f"{config_path}: `seed: {seed}` is not an integer")
    run.seed = seed
    record = read_run_record(run.directory)
    run.reference = reference_use(record)
    state_path = os.path.join(run.directory, "trainer_state.json")
    run.finished = os.path.isfile(state_path)
    if run.finished:
        try:
            with open(state_path, encoding="utf-8") as f:
                state = json.load(f)
        except json.JSONDecodeError as error:
            raise UsageError(f"{state_path} is not valid JSON: {error}") from None
        history = state.get("log_history", [])
        run.steps = state.get("global_step")
        run.deviation = series(history, "deviation")
        run.coefficient = series(history, "coef_mean")
        run.grad_norm = series(history, "grad_norm")
        run.learning_rates = series(history, "learning_rate")
        load_eval_deviations(run, record, history, state_path)
        if method.preference:
            run.preference = preference_series(history)


def read_run_record(run_dir: str) -> dict | None:
    """The run's ``minorsft_run.json`` (``train.run_record``), or None where the plugin's trainer wrote none."""
    path = os.path.join(run_dir, run_record.RUN_RECORD_FILE)
    try:
        record = run_record.read(run_dir)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from None
    if record is not None and record.get("format") != run_record.RUN_RECORD_FORMAT:
        raise UsageError(
            f"{path} has format {record.get('format')!r}; this version of the plugin reads format "
            f"{run_record.RUN_RECORD_FORMAT}"
        )
    return record


def load_evaluations(run: RunResults) -> None:
    for path in sorted(glob.glob(os.path.join(run.directory, "eval", "*", "results.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                results = json.load(f)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path} is not valid JSON: {error}") from None
        task = results.get("task") or os.path.basename(os.path.dirname(path))
        accuracy = results.get("accuracy")
        if not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1:
            raise UsageError(f"{path}: `accuracy` must be a fraction in [0, 1], got {accuracy!r}")
        run.accuracy[task] = float(accuracy)
        run.num_questions[task] = results.get("num_questions")
    eval_dir = os.path.join(run.directory, "eval")
    for path in sorted(glob.glob(os.path.join(eval_dir, "*.skipped"))):
        with open(path, encoding="utf-8") as f:
            run.unreachable[os.path.basename(path)[: -len(".skipped")]] = f.read().strip()
    run.attempted = {os.path.basename(path)[: -len(".log")] for path in glob.glob(os.path.join(eval_dir, "*.log"))}


def load_run(directory: str) -> RunResults:
    run = RunResults(directory=directory, method="base")
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
            raise UsageError(f"{path} is not a directory")
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
            raise UsageError(f"{path} holds no run (no train.yaml, model.yaml or eval/ in it or its subdirectories)")
        found.extend(children)
    return found


def order_key(run: RunResults) -> tuple:
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
