"""The plan of a sweep: one training YAML per method and grid point, built from the recipes and checked before
any work; ``--slurm_dir`` writes it as plan.json."""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..evaluation.tasks import available_tasks, load_task
from ..files import UsageError, check_creatable_folder
from ..methods import format_number, method_of
from .options import (
    GRID_OPTIONS,
    PrepareStep,
    SweepSettings,
    absolute,
    detect_gpus,
    parse_assignments,
    parse_grid,
    parse_methods,
    positive_integer,
)

# Recipe keys holding paths: relative ones are resolved against the repository root, so a run's
# train.yaml works from any directory.
PATH_KEYS = (
    "model_name_or_path",
    "adapter_name_or_path",
    "ref_model",
    "dataset_dir",
    "deepspeed",
    "ref_logps_cache_dir",
)
LOCAL_PATH_KEYS = ("dataset_dir", "deepspeed", "ref_logps_cache_dir")  # never Hub ids
REF_LOGPS_DIR = "ref_logps"  # under the output root: the reference log-probs shared by the sweep's runs
HEADER = (
    "# Written by `minorsft sweep` (reproduce.sh) from {recipe}. Re-running the sweep checks this file "
    "against its settings.\n"
)


@dataclass
class PlannedRun:
    """One training of the sweep: a method at one grid point, its exact training config (its train.yaml)."""

    name: str
    method: str
    recipe: str
    config: dict
    summary: str

    @property
    def finetuning_type(self) -> str:
        return self.config.get("finetuning_type", "lora")  # LLaMA-Factory's default

    @property
    def train_yaml(self) -> str:
        return HEADER.format(recipe=self.recipe) + yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark the sweep evaluates on: its task, the split scored, the folder of its data (None: the Hub)."""

    name: str
    split: str
    data_dir: str | None


@dataclass(frozen=True)
class JobSelection:
    """What of a plan to run: ``all`` of it, or one job of its Slurm export (``prepare``, ``base``, ``report``, or
    ``run`` with the index of the run to train and evaluate)."""

    job: str = "all"
    run_index: int | None = None


WHOLE_SWEEP = JobSelection()


@dataclass
class Plan:
    """Everything a sweep runs, fixed before any work, every path absolute; ``--slurm_dir`` writes it as plan.json."""

    mode: str
    output_root: str
    base_model: str
    base_template: str | None
    runs: list  # PlannedRuns
    tasks: list  # Benchmarks
    eval_data_dir: str
    eval_data_from: str
    eval_seed: int
    eval_max_samples: int | None
    eval_batch_size: int | None
    eval_args: list
    launch: list  # prefix of every command, e.g. env CUDA_VISIBLE_DEVICES=0,1
    num_gpus: int  # processes per run: the GPUs, or 1 on the CPU
    gpu: bool
    prepare: list = field(default_factory=list)  # PrepareSteps, resolved, before everything else

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        raw = json.loads(text)
        raw["runs"] = [PlannedRun(**run) for run in raw["runs"]]
        raw["tasks"] = [Benchmark(**task) for task in raw["tasks"]]
        raw["prepare"] = [PrepareStep(**step) for step in raw["prepare"]]
        return cls(**raw)

    @property
    def ref_logps_dirs(self) -> list:
        return list(
            dict.fromkeys(
                run.config["ref_logps_cache_dir"] for run in self.runs if run.config.get("ref_logps_cache_dir")
            )
        )


def recipe_path(recipe: str, repo_root: str) -> str:
    """Against the starting folder, else (as the recipes' own paths) against the repository."""
    path = absolute(recipe)
    in_repo = os.path.join(repo_root, recipe)
    return in_repo if not os.path.exists(path) and os.path.isfile(in_repo) else path


def load_recipe(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"recipe {path} does not exist")
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise UsageError(f"recipe {path} is not a YAML mapping of LLaMA-Factory keys")
    return config


def resolve_paths(config: dict, repo_root: str) -> None:
    for key in PATH_KEYS:
        value = config.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            candidate = os.path.join(repo_root, value)
            # Hub ids (Qwen/Qwen2-7B-Instruct) stay as they are; dataset_dir and deepspeed are always local.
            if os.path.exists(candidate) or key in LOCAL_PATH_KEYS:
                config[key] = os.path.normpath(candidate)


class MissingDatasetFile(UsageError):
    """Only a warning under --dry-run: the plan can be shown before the user's corpus is in place."""


def check_dataset(config: dict, recipe: str) -> None:
    dataset_dir = config.get("dataset_dir", "data")
    info_path = os.path.join(dataset_dir, "dataset_info.json")
    names = [name.strip() for name in str(config.get("dataset", "")).split(",") if name.strip()]
    if not names:
        raise UsageError(f"{recipe}: no `dataset` given (set it in the recipe or pass --dataset)")
    if not os.path.isfile(info_path):
        raise UsageError(f"{recipe}: `dataset_dir` {dataset_dir} has no dataset_info.json")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    for name in names:
        if name not in info:
            raise UsageError(f"dataset `{name}` is not in {info_path} (known: {', '.join(sorted(info))})")
        file_name = info[name].get("file_name")
        if file_name and not os.path.exists(os.path.join(dataset_dir, file_name)):
            raise MissingDatasetFile(
                f"dataset `{name}` points to {os.path.join(dataset_dir, file_name)}, which does not exist; "
                f"put your corpus there (see data/README.md) or pass --dataset"
            )


def set_global_batch(config: dict, global_batch: int, num_gpus: int, recipe: str) -> None:
    per_device = int(config.get("per_device_train_batch_size", 8))  # LLaMA-Factory's default
    if global_batch % (per_device * num_gpus):
        raise UsageError(
            f"global batch {global_batch} is not a multiple of per_device_train_batch_size {per_device} × "
            f"{num_gpus} GPU(s) (from {recipe} and --gpus); change --global_batch or "
            f"--set per_device_train_batch_size=N"
        )
    config["gradient_accumulation_steps"] = global_batch // (per_device * num_gpus)


def grid_points(method, grids: dict) -> list:
    """{key: value} per grid point of ``method``; a key whose grid is empty keeps the recipe's value."""
    if method.lr_grid:
        axes = [("learning_rate", grids[method.lr_grid])]
    else:
        axes = [("learning_rate", grids["sft_lrs"] if method.sft_lr_grid else grids["lrs"])]
    if method.uses_beta:
        axes.append(("pref_beta", grids[method.beta_grid] or grids["betas"]))
    if method.alpha_key:
        axes.append((method.alpha_key, grids[f"{method.alpha_key}s"]))
    axes.append(("seed", grids["seeds"]))
    points = [{}]
    for key, values in axes:
        points = [{**point, key: value} for point in points for value in (values or [None])]
    return [{key: value for key, value in point.items() if value is not None} for point in points]


def run_name(method, config: dict, with_seed: bool) -> str:
    name = f"{method.name}_lr{format_number(float(config['learning_rate']))}"
    if method.uses_beta:
        name += f"_beta{format_number(float(config['pref_beta']))}"
    if method.alpha_key:
        name += f"_alpha{format_number(float(config.get(method.alpha_key, method.alpha_default)))}"
    return name + (f"_seed{config['seed']}" if with_seed else "")


def summary(method, config: dict, num_gpus: int, with_seed: bool) -> str:
    parts = [
        f"stage={config['stage']}",
        *(f"{key}={'true' if value is True else value}" for key, value in method.flags.items()),
        f"learning_rate={format_number(float(config['learning_rate']))}",
    ]
    if method.uses_beta:
        parts.append(f"pref_beta={format_number(float(config['pref_beta']))}")
    if method.alpha_key:
        parts.append(f"{method.alpha_key}={format_number(float(config.get(method.alpha_key, method.alpha_default)))}")
    if with_seed:
        parts.append(f"seed={config['seed']}")
    per_device = config.get("per_device_train_batch_size", 8)
    accumulation = config.get("gradient_accumulation_steps", 1)
    return " ".join(parts) + (
        f" global_batch={per_device * accumulation * num_gpus}"
        f" ({per_device} per device × GA {accumulation} × {num_gpus} GPU(s))"
    )


def plan_tasks(settings: SweepSettings) -> list:
    """Each benchmark's split and data folder, from its task file (evaluation/tasks/)."""
    eval_data_dir = absolute(settings.eval_data_dir) if settings.eval_data_dir else ""
    if settings.tasks.strip() == "none":
        return []
    tasks = []
    for name in settings.tasks.replace(",", " ").split():
        if name not in available_tasks():
            raise UsageError(f"--tasks: unknown benchmark {name} (valid: {' '.join(available_tasks())})")
        task = load_task(name)
        data_dir = os.path.join(eval_data_dir, task.local_folder) if eval_data_dir else None
        if data_dir and not os.path.isdir(data_dir):
            raise UsageError(f"{settings.eval_data_from} {eval_data_dir} has no {task.local_folder}/ folder for {name}")
        tasks.append(Benchmark(name, task.splits[0], data_dir))
    if not tasks:
        raise UsageError("--tasks is empty")
    return tasks


def build_plan(settings: SweepSettings) -> Plan:
    """The runs of the sweep, without writing anything; every problem is a UsageError naming the flag or key."""
    output_root = absolute(settings.output_root)
    check_creatable_folder(output_root, "--output_root")
    overrides = parse_assignments(settings.train_set, "--set")
    model = settings.model
    if model and os.path.exists(os.path.expanduser(model)):
        model = absolute(model)  # a model that is not a local path is a Hub id and stays as it is
    for key, value in (
        ("model_name_or_path", model),
        ("template", settings.template),
        ("dataset", settings.dataset),
        ("dataset_dir", absolute(settings.dataset_dir) if settings.dataset_dir else ""),
    ):
        if value:
            overrides[key] = value
    grids = {name: parse_grid(settings.grids[name], f"--{name}", integer=name == "seeds") for name in GRID_OPTIONS}
    for name in ("betas", "sft_dpo_betas", "dpo_betas"):
        if any(not 0 < beta < float("inf") for beta in grids[name]):
            raise UsageError(f"--{name}: β must be finite and > 0")
    methods = parse_methods(settings.methods)
    global_batch = positive_integer(settings.global_batch, "--global_batch")
    eval_max_samples = positive_integer(settings.eval_max_samples, "--eval_max_samples")
    eval_batch_size = positive_integer(settings.eval_batch_size, "--eval_batch_size")
    if not re.fullmatch(r"[0-9]+", settings.eval_seed):
        raise UsageError(f"--eval_seed {settings.eval_seed} is not a non-negative integer")
    gpus, launch = detect_gpus(settings.gpus)
    num_gpus = max(gpus, 1)  # processes per run
    tasks = plan_tasks(settings)
    with_seed = bool(grids["seeds"])

    runs, warnings = [], set()
    for method in methods:
        recipe = settings.recipes.replace("{method}", method.recipe_name)
        base_config = load_recipe(recipe_path(recipe, settings.repo_root))
        if base_config.get("stage") != method.stage:
            raise UsageError(f"recipe {recipe} has `stage: {base_config.get('stage')}`, expected `{method.stage}`")
        for point in grid_points(method, grids):
            config = {**base_config, **overrides, **method.flags, **point}
            if method.flags:  # the variants log the deviation (Eq. 8) like the SFT baseline
                config["deviation_metric"] = True
            if method.preference:
                # Every micro-batch full: LLaMA-Factory's sigmoid averages each micro-batch, MinorDPO the global batch
                # (docs/behaviour.md); the two reductions agree only when the micro-batches are of equal size.
                config["dataloader_drop_last"] = True
            config.setdefault("dataset_dir", "data")  # LLaMA-Factory's default
            resolve_paths(config, settings.repo_root)
            for key in ("learning_rate",) + (("pref_beta",) if method.uses_beta else ()):
                if key not in config:
                    raise UsageError(f"recipe {recipe} has no `{key}` and no grid value was given")
            try:
                if method_of(config) != method.name:
                    raise UsageError(f"recipe {recipe} trains {method_of(config)}, not {method.name}")
            except ValueError as error:
                raise UsageError(f"recipe {recipe} with --set: {error}") from None
            if global_batch:
                set_global_batch(config, global_batch, num_gpus, recipe)
            try:
                check_dataset(config, recipe)
            except MissingDatasetFile as error:
                if not settings.dry_run:
                    raise
                warnings.add(str(error))
            name = run_name(method, config, with_seed)
            config["output_dir"] = os.path.join(output_root, name)
            if "ref_logps_cache_dir" not in overrides:
                if config.get("precompute_ref_logps") is True:
                    config["ref_logps_cache_dir"] = os.path.join(output_root, REF_LOGPS_DIR)
                else:  # the recipe's cache directory means nothing once --set turns precomputing off
                    config.pop("ref_logps_cache_dir", None)
            runs.append(PlannedRun(name, method.name, recipe, config, summary(method, config, num_gpus, with_seed)))

    for warning in sorted(warnings):
        print(f"minorsft sweep: warning: {warning}", file=sys.stderr)
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise UsageError(f"the grid repeats a run: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    models = {(run.config.get("model_name_or_path"), run.config.get("template")) for run in runs}
    if len(models) != 1:
        raise UsageError(f"all methods must start from one base model and template, got {sorted(map(str, models))}")
    base_model, base_template = models.pop()
    for run in runs:  # a run directory is never shared by two settings
        existing = os.path.join(run.config["output_dir"], "train.yaml")
        if os.path.isfile(existing):
            with open(existing, encoding="utf-8") as f:
                if yaml.safe_load(f) != run.config:
                    raise UsageError(
                        f"{existing} was written with other settings than this sweep's; use another "
                        f"--output_root, or delete {os.path.dirname(existing)} to retrain it"
                    )
    return Plan(
        mode=settings.mode,
        output_root=output_root,
        base_model=base_model,
        base_template=base_template,
        runs=runs,
        tasks=tasks,
        eval_data_dir=absolute(settings.eval_data_dir) if settings.eval_data_dir else "",
        eval_data_from=settings.eval_data_from,
        eval_seed=int(settings.eval_seed),
        eval_max_samples=eval_max_samples,
        eval_batch_size=eval_batch_size,
        eval_args=shlex.split(settings.eval_args),
        launch=launch,
        num_gpus=num_gpus,
        gpu=gpus > 0,
        prepare=[step.resolved(base_model, settings.repo_root) for step in settings.prepare],
    )


def check_training_configs(plan: Plan) -> None:
    """Every run's config through LLaMA-Factory's argument parsing and the plugin's checks (``sweep.check``),
    in one child process: it must see one CPU process, as LLaMA-Factory refuses to parse a multi-GPU or
    DeepSpeed config outside torchrun."""
    configs = {run.name: run.config for run in plan.runs}
    with tempfile.TemporaryDirectory(prefix="minorsft-sweep-check-") as staging:
        answer_path = os.path.join(staging, "errors.json")
        child = subprocess.run(
            [sys.executable, "-m", "llamafactory_minorsft.sweep.check", answer_path],
            input=json.dumps(configs),
            capture_output=True,
            text=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
            timeout=600,
        )
        if child.returncode != 0 or not os.path.isfile(answer_path):
            raise UsageError(f"could not check the training configs with LLaMA-Factory:\n{child.stderr[-3000:]}")
        errors = json.loads(Path(answer_path).read_text(encoding="utf-8"))
    if errors:
        recipes = {run.name: run.recipe for run in plan.runs}
        lines = [f"run {name} ({recipes[name]} with the sweep's settings): {error}" for name, error in errors.items()]
        raise UsageError(
            "LLaMA-Factory refuses the training config of "
            f"{len(errors)} of the {len(plan.runs)} run(s):\n  " + "\n  ".join(lines)
        )
    print(
        f"# checked the {len(plan.runs)} training config(s) with LLaMA-Factory's argument parsing and the "
        "plugin's checks"
    )
