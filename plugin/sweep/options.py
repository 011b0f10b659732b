"""The sweep's options: flags, then environment variables, then the mode's preset, resolved into ``SweepSettings``.

The repository root (``--repo_root``: the folder of the reproduce.sh that was run, else the current folder) is
where the presets' recipes, data, prepared models and default output root are: the checkout that runs the sweep,
whichever checkout the Python package was installed from.
"""

import argparse
import os
import re
import subprocess
from dataclasses import dataclass, field

import yaml

from ..evaluation.data import ENV_DATA_DIR
from ..evaluation.tasks import available_tasks
from ..files import UsageError, local_path
from ..methods import BASELINES, METHODS, PAPER_METHODS, PREFERENCE_METHODS

# `all`: every method on supervised data; the preference methods train on pairs from their own base model.
METHOD_GROUPS = {
    "all": tuple(name for name in METHODS if name not in PREFERENCE_METHODS),
    "baselines": BASELINES,
    "preference": PREFERENCE_METHODS,
}


@dataclass(frozen=True)
class PrepareStep:
    """A command that makes the mode's base model or data before everything else (``--demo``, ``--figure1``).

    In a preset the command holds ``{model}`` (the base model) and ``{repo}`` (the repository root), and
    ``creates`` is relative to the repository; in a plan both are resolved."""

    what: str
    command: list
    creates: str | None = None  # skipped when this exists (else the command itself skips finished work)

    def resolved(self, model: str, repo_root: str) -> "PrepareStep":
        return PrepareStep(
            self.what,
            [part.format(model=model, repo=repo_root) for part in self.command],
            os.path.join(repo_root, self.creates) if self.creates else None,
        )


# --- the mode presets: every default that depends on the mode, in one table --------------------------------
SMOLLM2 = "models/SmolLM2-135M-Instruct"  # relative to the repository; prepared by `minorsft demo-model`
PREPARE_SMOLLM2 = PrepareStep("the demo model", ["minorsft", "demo-model", "--output_dir", "{model}"])
# Freeze tuning on a CPU needs the checkpoint in float32 (examples/figure1/*.yaml say why).
SMOLLM2_FLOAT32 = "models/SmolLM2-135M-Instruct-float32"
PREPARE_SMOLLM2_FLOAT32 = PrepareStep(
    "the demo model in float32", ["minorsft", "demo-model", "--dtype", "float32", "--output_dir", "{model}"]
)
PRESETS = {
    "paper": {
        "output_root": "saves/sweep",
        "recipes": "examples/{method}_qwen2.yaml",
        "sft_lrs": "5e-6 1e-5 2e-5 3e-5",
        "lrs": "1e-5 2e-5 3e-5",
        "betas": "0.02 0.04 0.08",
        "dpo_lrs": "5e-7 1e-6",
        "dpo_betas": "0.1 0.3",
        "global_batch": "64",
    },
    "lora": {
        "output_root": "saves/sweep",
        "recipes": "examples/{method}_qwen2_lora.yaml",
        "sft_lrs": "5e-5 1e-4 2e-4 3e-4",
        "lrs": "1e-4 2e-4 3e-4",
        "betas": "0.02 0.04 0.08",
        "dpo_lrs": "5e-6 1e-5",
        "dpo_betas": "0.1 0.3",
        "global_batch": "64",
    },
    "demo": {
        "output_root": "saves/demo",
        "recipes": "examples/demo/{method}_smollm2.yaml",
        "sft_lrs": "",
        "lrs": "",
        "betas": "",
        "global_batch": "",
        "eval_max_samples": "30",
        # With the preset's recipes only: other recipes keep their own model.
        "base_model": SMOLLM2,
        "prepare": [PREPARE_SMOLLM2],
    },
    # docs/results.md: the two CPU regimes of the Figure 1 experiment, each sized for about 100-150 minutes on
    # 2 cores. The core grid trains 2 seeds; LLaMA-Factory's SFT variants (`--methods baselines`, docs/sweep.md)
    # are a second command into the same output root, whose report joins both.
    "figure1": {  # cheap: the last 6 layers, 96-token cut-off, global batch 8, 50 steps
        "output_root": "saves/figure1",
        "recipes": "examples/figure1/{method}_smollm2.yaml",
        "methods": "sft sft_sample minorsft sft_dpo",
        "sft_lrs": "5e-5",
        "lrs": "5e-5 1e-4",
        # 0.1: the smallest β tried (0.04, 0.1, 0.3) at which MinorSFT's mean coefficient ended at 0.3 or below
        # in a 50-step calibration run at 5e-5 (0.23; docs/results.md), chosen before any method was compared.
        "betas": "0.04 0.1",
        "sft_dpo_betas": "0.04",
        "seeds": "1 2",
        "global_batch": "",
        "tasks": "none",  # accuracy is at chance on this model; the held-out and drift sets measure instead
        "base_model": SMOLLM2_FLOAT32,
        "prepare": [PREPARE_SMOLLM2_FLOAT32],
    },
    "figure1_full": {  # paper-like: full fine-tuning, 256-token cut-off, global batch 4, 40 steps
        "output_root": "saves/figure1_full",
        "recipes": "examples/figure1_full/{method}_smollm2.yaml",
        "methods": "sft sft_sample minorsft sft_dpo",
        "sft_lrs": "5e-5",
        "lrs": "5e-5 1e-4",
        "betas": "0.04",
        "seeds": "1 2",
        "global_batch": "",
        "tasks": "none",
        "base_model": SMOLLM2,
        "prepare": [PREPARE_SMOLLM2],
    },
}
MODE_FLAGS = {"lora": "--lora", "demo": "--demo", "figure1": "--figure1", "figure1_full": "--figure1_full"}
MODES = tuple(MODE_FLAGS)


@dataclass(frozen=True)
class Option:
    name: str  # the flag without its dashes, and the key of the presets
    env: str | None  # the environment variable that sets its default
    help: str
    default: str = ""  # when neither flag, variable nor preset gives one
    empty_is_a_value: bool = False  # an empty variable means "the recipe's value" rather than "unset"
    empty_means: str = "the recipes'"  # what an empty value does, for --help


def _alpha_options() -> list:
    return [
        Option(
            f"{m.alpha_key}s",
            f"{m.alpha_key.upper()}S",
            f"{m.label}'s `{m.alpha_key}` grid (LLaMA-Factory's default)",
            default=f"{m.alpha_default:g}",
            empty_is_a_value=True,
            empty_means="the recipe's",
        )
        for m in METHODS.values()
        if m.alpha_key
    ]


OPTIONS = [
    Option("output_root", "OUTPUT_ROOT", "where runs, evaluations and the report go"),
    Option(
        "methods",
        "METHODS",
        f"methods to train, from {', '.join(METHODS)}, or `all`, or `baselines` ({', '.join(BASELINES)})",
        default=" ".join(PAPER_METHODS),
    ),
    Option(
        "sft_lrs",
        "SFT_LRS",
        f"learning rates of SFT and of its variants ({', '.join(BASELINES)})",
        empty_is_a_value=True,
        empty_means="the recipe's",
    ),
    Option(
        "lrs", "LRS", "MinorSFT and SFT-using-DPO learning rates", empty_is_a_value=True, empty_means="the recipe's"
    ),
    Option(
        "betas",
        "BETAS",
        "β (pref_beta) of MinorSFT and SFT using DPO",
        empty_is_a_value=True,
        empty_means="the recipe's",
    ),
    Option("sft_dpo_betas", "SFT_DPO_BETAS", "β of SFT using DPO alone", empty_means="--betas"),
    Option(
        "dpo_lrs",
        "DPO_LRS",
        "learning rates of DPO and MinorDPO (`--methods preference`)",
        empty_is_a_value=True,
        empty_means="the recipe's",
    ),
    Option("dpo_betas", "DPO_BETAS", "β (pref_beta) of DPO and MinorDPO", empty_means="--betas"),
    *_alpha_options(),
    Option(
        "seeds",
        "SEEDS",
        "train each grid point once per seed (the `seed` key; run names get _seed<N>)",
        empty_is_a_value=True,
        empty_means="the recipe's seed, run names without it",
    ),
    Option(
        "recipes",
        "RECIPES",
        "recipe per method, {method} is replaced by the method's stage (the SFT variants train from the sft recipe, "
        "DPO and MinorDPO from the minordpo one)",
    ),
    Option("model", "MODEL", "base model, instead of the recipes'"),
    Option("template", "TEMPLATE", "LLaMA-Factory template, instead of the recipes'"),
    Option(
        "dataset",
        "DATASET",
        "training dataset(s) from dataset_info.json, instead of the recipes' "
        "(domain_corpus, your corpus: see data/README.md; --demo: finance_qa_demo)",
    ),
    Option("dataset_dir", "DATASET_DIR", "folder of dataset_info.json, instead of the recipes' (data/)"),
    Option(
        "set",
        "TRAIN_SET",
        "any other training key for every run, e.g. --set cutoff_len=4096 (repeatable; "
        "the variable: space-separated KEY=VALUE items)",
        empty_means="none",
    ),
    Option(
        "gpus",
        "GPUS",
        "GPU ids, e.g. 0,1,2,3; more than one runs torchrun through llamafactory-cli; with "
        "--slurm_dir their count is each task's --gres=gpu:N",
        empty_means="all visible GPUs, or the CPU",
    ),
    Option(
        "global_batch",
        "GLOBAL_BATCH",
        "keep per-device batch × gradient accumulation × GPUs = N by setting the accumulation steps",
        empty_is_a_value=True,
        empty_means="the recipe's",
    ),
    Option(
        "tasks",
        "TASKS",
        f"benchmarks, from {', '.join(available_tasks())}; `none`: no evaluation, the report shows the deviation only",
        default=" ".join(available_tasks()),
    ),
    Option(
        "eval_data_dir",
        "EVAL_DATA_DIR",
        "folder holding each benchmark's folder (ceval-exam/, FinanceIQ/, fineval/) as CSV files",
        empty_means=f"${ENV_DATA_DIR} if set, else the Hub copies",
    ),
    Option(
        "eval_max_samples",
        "EVAL_MAX_SAMPLES",
        "questions per benchmark, stratified over subjects",
        empty_is_a_value=True,
        empty_means="all",
    ),
    Option("eval_seed", "EVAL_SEED", "seed of that draw, the same questions for every model", default="42"),
    Option("eval_batch_size", "EVAL_BATCH_SIZE", "batch size of `minorsft eval`", empty_means="minorsft eval's"),
    Option("eval_args", "EVAL_ARGS", 'more `minorsft eval` arguments, e.g. "--dtype bfloat16"', empty_means="none"),
]
METAVARS = {
    "output_root": "DIR",
    "recipes": "PATTERN",
    "model": "PATH_OR_ID",
    "template": "NAME",
    "dataset": "NAMES",
    "dataset_dir": "DIR",
    "set": "KEY=VALUE",
    "global_batch": "N",
    "eval_data_dir": "DIR",
    "eval_max_samples": "N",
    "eval_seed": "N",
    "eval_batch_size": "N",
    "eval_args": '"ARGS"',
}
ALPHA_GRIDS = tuple(f"{m.alpha_key}s" for m in METHODS.values() if m.alpha_key)
GRID_OPTIONS = ("sft_lrs", "lrs", "betas", "sft_dpo_betas", "dpo_lrs", "dpo_betas", *ALPHA_GRIDS, "seeds")


@dataclass(frozen=True)
class SweepSettings:
    """The sweep's options after flags, environment variables and the mode's preset, as text: ``plan.build_plan``
    parses and checks them. Paths the preset gives are under the repository root; paths the user gives are as
    typed (relative ones against the current folder)."""

    mode: str  # paper, lora, demo, figure1, figure1_full
    dry_run: bool
    repo_root: str
    output_root: str
    methods: str
    grids: dict  # each grid option (GRID_OPTIONS: sft_lrs, lrs, betas, <alpha_key>s, seeds) -> its list as typed
    recipes: str  # a pattern with {method}
    model: str
    template: str
    dataset: str
    dataset_dir: str
    train_set: list  # --set KEY=VALUE items, the environment's first
    gpus: str
    global_batch: str
    tasks: str
    eval_data_dir: str
    eval_data_from: str  # where eval_data_dir came from, for messages: --eval_data_dir or MINORSFT_EVAL_DATA_DIR
    eval_max_samples: str
    eval_seed: str
    eval_batch_size: str
    eval_args: str
    prepare: list = field(default_factory=list)  # PrepareSteps of the preset, unresolved
    slurm_dir: str | None = None
    slurm_header: str | None = None


def resolve_settings(args: argparse.Namespace) -> SweepSettings:
    for flag in ("run_index", "job"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} needs --plan (a plan written by --slurm_dir)")
    env = os.environ
    switches = {name: getattr(args, name) or env.get(name.upper(), "0") == "1" for name in (*MODES, "dry_run")}
    chosen = [MODE_FLAGS[name] for name in MODES if switches[name]]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)}: choose one mode")
    mode = next((name for name in MODES if switches[name]), "paper")
    preset = PRESETS[mode]
    repo_root = local_path(args.repo_root, "--repo_root") if args.repo_root else os.getcwd()
    if not os.path.isdir(repo_root):
        raise UsageError(f"--repo_root {args.repo_root} is not a folder")
    values, given = {}, {}
    for option in OPTIONS:
        value = getattr(args, option.name)
        if option.name == "set":
            value = env.get(option.env, "").split() + (value or [])
        elif value is None and option.env in env and (env[option.env] or option.empty_is_a_value):
            value = env[option.env]
        given[option.name] = value is not None
        values[option.name] = value if value is not None else preset.get(option.name, option.default)
    eval_data_dir, eval_data_from = values["eval_data_dir"], "--eval_data_dir"
    if not eval_data_dir and env.get(ENV_DATA_DIR):
        eval_data_dir, eval_data_from = env[ENV_DATA_DIR], ENV_DATA_DIR
    # The preset's model belongs to the preset's recipes (the demo recipes train the model it prepares).
    model, prepare = values["model"], []
    if "base_model" in preset and not given["recipes"] and not given["model"]:
        model, prepare = os.path.join(repo_root, preset["base_model"]), preset["prepare"]

    def from_repo(name: str) -> str:
        """A path of the preset, under the repository root; one the user gave, as typed."""
        return values[name] if given[name] else os.path.join(repo_root, values[name])

    return SweepSettings(
        mode=mode,
        dry_run=switches["dry_run"],
        repo_root=repo_root,
        output_root=from_repo("output_root"),
        methods=values["methods"],
        grids={name: values[name] for name in GRID_OPTIONS},
        recipes=from_repo("recipes"),
        model=model,
        template=values["template"],
        dataset=values["dataset"],
        dataset_dir=values["dataset_dir"],
        train_set=values["set"],
        gpus=values["gpus"],
        global_batch=values["global_batch"],
        tasks=values["tasks"],
        eval_data_dir=eval_data_dir,
        eval_data_from=eval_data_from,
        eval_max_samples=values["eval_max_samples"],
        eval_seed=values["eval_seed"],
        eval_batch_size=values["eval_batch_size"],
        eval_args=values["eval_args"],
        prepare=list(prepare),
        slurm_dir=args.slurm_dir,
        slurm_header=args.slurm_header,
    )


def absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def parse_value(text: str):
    """A command-line value as YAML reads it, plus what YAML 1.1 leaves as a string (``5e-6``)."""
    value = yaml.safe_load(text) if text != "" else ""
    if isinstance(value, str):
        try:
            return float(text)
        except ValueError:
            return value
    return value


def parse_assignments(items: list, what: str) -> dict:
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} `{item}` is not KEY=VALUE")
        result[key.strip()] = parse_value(value.strip())
    return result


def parse_grid(text: str, what: str, integer: bool = False) -> list:
    values = []
    for item in text.replace(",", " ").split():
        try:
            values.append(int(item) if integer else float(item))
        except ValueError:
            raise UsageError(f"{what}: `{item}` is not {'an integer' if integer else 'a number'}") from None
    return values


def positive_integer(text: str, flag: str) -> int | None:
    if text in ("", None):
        return None
    if not re.fullmatch(r"[1-9][0-9]*", str(text)):
        raise UsageError(f"{flag} {text} is not a positive integer")
    return int(text)


def parse_methods(text: str) -> list:
    names = []
    for item in text.replace(",", " ").split():
        if item not in METHODS and item not in METHOD_GROUPS:
            raise UsageError(
                f"--methods: unknown method `{item}` (valid: {', '.join(METHODS)}, or {', '.join(METHOD_GROUPS)})"
            )
        names += [name for name in METHOD_GROUPS.get(item, (item,)) if name not in names]
    if not names:
        raise UsageError("--methods is empty")
    return [METHODS[name] for name in names]


def detect_gpus(gpus: str) -> tuple:
    """(number of GPUs, the prefix that pins them to every command): --gpus, else CUDA_VISIBLE_DEVICES, else
    nvidia-smi. No GPU: (0, []), and a run is one process on the CPU."""
    if gpus:
        if not re.fullmatch(r"[0-9]+(,[0-9]+)*", gpus):
            raise UsageError(f"--gpus {gpus} is not a comma-separated list of GPU ids")
        return len(gpus.split(",")), ["env", f"CUDA_VISIBLE_DEVICES={gpus}"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([item for item in visible.split(",") if item.strip()]), []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0, []
    return (
        len([line for line in listing.stdout.splitlines() if line.startswith("GPU")]) if listing.returncode == 0 else 0
    ), []
