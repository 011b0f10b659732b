"""``minorsft sweep`` (``bash reproduce.sh``): the paper's sweep, planned, checked, run, evaluated and reported.

This module holds the options, the mode presets and the plan: one training YAML per method and grid point,
built from the recipes and checked before any work. ``sweep_steps`` runs a plan (training, evaluation,
report, with skipping and resuming), ``sweep_slurm`` writes it as a Slurm job array instead.

Runs with ``precompute_ref_logps: true`` all cache the reference log-probs in ``<output_root>/ref_logps/``
(``--set ref_logps_cache_dir=DIR`` for another): the cache file is keyed on the reference model, the
tokenised data, the template and ``cutoff_len``, so the whole grid on one model and data, the SFT
baseline's ``deviation_metric`` included, makes one reference pass.
"""

import argparse
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

from .evaluation.data import ENV_DATA_DIR
from .evaluation.tasks import DefinitionError, available_tasks, load_task
from .files import UsageError
from .methods import BASELINES, METHODS, PAPER_METHODS, method_of

PACKAGE_DIR = Path(__file__).resolve().parent
# The recipes, models/ and data/ of a source checkout; a wheel has none, and its paths are the starting folder's.
REPO_ROOT = str(PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "examples").is_dir() else Path.cwd())

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
HEADER = ("# Written by `minorsft sweep` (reproduce.sh) from {recipe}. Re-running the sweep checks this file "
          "against its settings.\n")
METHOD_GROUPS = {"all": tuple(METHODS), "baselines": BASELINES}

# --- the mode presets: every default that depends on the mode, in one table --------------------------------
SMOLLM2 = "models/SmolLM2-135M-Instruct"  # relative to the repository; prepared by `minorsft demo-model`
PREPARE_SMOLLM2 = {"what": "the demo model", "command": ["minorsft", "demo-model", "--output_dir", "{model}"]}
# Freeze tuning on a CPU needs the checkpoint in float32 (examples/figure1/*.yaml say why).
SMOLLM2_FLOAT32 = "models/SmolLM2-135M-Instruct-float32"
PREPARE_SMOLLM2_FLOAT32 = {"what": "the demo model in float32",
                           "command": ["minorsft", "demo-model", "--dtype", "float32", "--output_dir", "{model}"]}
PRESETS = {
    "paper": {
        "output_root": "saves/sweep", "recipes": "examples/{method}_qwen2.yaml",
        "sft_lrs": "5e-6 1e-5 2e-5 3e-5", "lrs": "1e-5 2e-5 3e-5", "betas": "0.02 0.04 0.08", "global_batch": "64",
    },
    "lora": {
        "output_root": "saves/sweep", "recipes": "examples/{method}_qwen2_lora.yaml",
        "sft_lrs": "5e-5 1e-4 2e-4 3e-4", "lrs": "1e-4 2e-4 3e-4", "betas": "0.02 0.04 0.08", "global_batch": "64",
    },
    "demo": {
        "output_root": "saves/demo", "recipes": "examples/demo/{method}_smollm2.yaml",
        "sft_lrs": "", "lrs": "", "betas": "", "global_batch": "", "eval_max_samples": "30",
        # With the preset's recipes only: other recipes keep their own model.
        "base_model": SMOLLM2, "prepare": [PREPARE_SMOLLM2],
    },
    "figure1": {  # docs/results.md: sized to finish in under 45 minutes on 2 CPU cores
        "output_root": "saves/figure1", "recipes": "examples/figure1/{method}_smollm2.yaml", "methods": "all",
        "sft_lrs": "5e-5", "lrs": "5e-5 1e-4", "betas": "0.04", "seeds": "1 2", "global_batch": "",
        "tasks": "none",  # accuracy is at chance on this model; the held-out and drift sets measure instead
        "base_model": SMOLLM2_FLOAT32,
        "prepare": [
            PREPARE_SMOLLM2_FLOAT32,
            {"what": "the drift set", "creates": "data/smollm2_general_drift.json",
             "command": ["minorsft", "drift-set", "--model_name_or_path", "{model}", "--template", "smollm2",
                         "--prompts", "{repo}/data/general_prompts.json", "--output_dir", "{repo}/data",
                         "--dataset_name", "smollm2_general_drift", "--num_samples", "1", "--max_new_tokens", "32",
                         "--keep_truncated"]},
        ],
    },
}
MODE_FLAGS = {"lora": "--lora", "demo": "--demo", "figure1": "--figure1"}


@dataclass(frozen=True)
class Option:
    name: str  # the flag without its dashes, and the key of the presets
    env: str | None  # the environment variable that sets its default
    help: str
    default: str = ""  # when neither flag, variable nor preset gives one
    empty_is_a_value: bool = False  # an empty variable means "the recipe's value" rather than "unset"
    empty_means: str = "the recipes'"  # what an empty value does, for --help


def _alpha_options() -> list:
    return [Option(f"{m.alpha_key}s", f"{m.alpha_key.upper()}S", f"{m.label}'s `{m.alpha_key}` grid "
                   "(LLaMA-Factory's default)", default=f"{m.alpha_default:g}", empty_is_a_value=True,
                   empty_means="the recipe's")

            for m in METHODS.values() if m.alpha_key]


OPTIONS = [
    Option("output_root", "OUTPUT_ROOT", "where runs, evaluations and the report go"),
    Option("methods", "METHODS", f"methods to train, from {', '.join(METHODS)}, or `all`, or `baselines` "
           f"({', '.join(BASELINES)})", default=" ".join(PAPER_METHODS)),
    Option("sft_lrs", "SFT_LRS", "learning rates of SFT and of its variants "
           f"({', '.join(BASELINES)})", empty_is_a_value=True, empty_means="the recipe's"),
    Option("lrs", "LRS", "MinorSFT and SFT-using-DPO learning rates", empty_is_a_value=True,
           empty_means="the recipe's"),
    Option("betas", "BETAS", "β (pref_beta) of MinorSFT and SFT using DPO", empty_is_a_value=True,
           empty_means="the recipe's"),
    *_alpha_options(),
    Option("seeds", "SEEDS", "train each grid point once per seed (the `seed` key; run names get _seed<N>)",
           empty_is_a_value=True, empty_means="the recipe's seed, run names without it"),
    Option("recipes", "RECIPES", "recipe per method, {method} is replaced by the method's stage (the SFT "
           "variants train from the sft recipe)"),
    Option("model", "MODEL", "base model, instead of the recipes'"),
    Option("template", "TEMPLATE", "LLaMA-Factory template, instead of the recipes'"),
    Option("dataset", "DATASET", "training dataset(s) from dataset_info.json, instead of the recipes' "
           "(domain_corpus, your corpus: see data/README.md; --demo: finance_qa_demo)"),
    Option("dataset_dir", "DATASET_DIR", "folder of dataset_info.json, instead of the recipes' (data/)"),
    Option("set", "TRAIN_SET", "any other training key for every run, e.g. --set cutoff_len=4096 (repeatable; "
           "the variable: space-separated KEY=VALUE items)", empty_means="none"),
    Option("gpus", "GPUS", "GPU ids, e.g. 0,1,2,3; more than one runs torchrun through llamafactory-cli; with "
           "--slurm_dir their count is each task's --gres=gpu:N", empty_means="all visible GPUs, or the CPU"),
    Option("global_batch", "GLOBAL_BATCH", "keep per-device batch × gradient accumulation × GPUs = N by setting "
           "the accumulation steps", empty_is_a_value=True, empty_means="the recipe's"),
    Option("tasks", "TASKS", f"benchmarks, from {', '.join(available_tasks())}; `none`: no evaluation, the report "
           "shows the deviation only", default=" ".join(available_tasks())),
    Option("eval_data_dir", "EVAL_DATA_DIR", "folder holding each benchmark's folder (ceval-exam/, FinanceIQ/, "
           "fineval/) as CSV files", empty_means=f"${ENV_DATA_DIR} if set, else the Hub copies"),
    Option("eval_max_samples", "EVAL_MAX_SAMPLES", "questions per benchmark, stratified over subjects",
           empty_is_a_value=True, empty_means="all"),
    Option("eval_seed", "EVAL_SEED", "seed of that draw, the same questions for every model", default="42"),
    Option("eval_batch_size", "EVAL_BATCH_SIZE", "batch size of `minorsft eval`", empty_means="minorsft eval's"),
    Option("eval_args", "EVAL_ARGS", 'more `minorsft eval` arguments, e.g. "--dtype bfloat16"', empty_means="none"),
]
METAVARS = {"output_root": "DIR", "recipes": "PATTERN", "model": "PATH_OR_ID", "template": "NAME", "dataset": "NAMES",
            "dataset_dir": "DIR", "set": "KEY=VALUE", "global_batch": "N", "eval_data_dir": "DIR",
            "eval_max_samples": "N", "eval_seed": "N", "eval_batch_size": "N", "eval_args": '"ARGS"'}
GRID_OPTIONS = ("sft_lrs", "lrs", "betas", *(f"{m.alpha_key}s" for m in METHODS.values() if m.alpha_key), "seeds")

DESCRIPTION = """\
The paper's sweep (arXiv 2408.10642 §4), also run as `bash reproduce.sh`: trains every method at every grid
point with `llamafactory-cli train`, evaluates the base model and each run with `minorsft eval` on each
benchmark, then writes the report (results.md, results.csv, deviation.png, accuracy.png) with
`minorsft report` into OUTPUT_ROOT/report.

Layout: OUTPUT_ROOT/base/eval/<task>/ for the base model; OUTPUT_ROOT/<run>/ for a run, named
<method>_lr<lr>[_beta<β>][_alpha<α>][_seed<N>], holding its exact train.yaml, train.log, LLaMA-Factory's
outputs and eval/<task>/.

Before any work every run's train.yaml is checked with LLaMA-Factory's own argument parsing and the plugin's
checks, and each benchmark's data with `minorsft eval --check_data`. Data that cannot be reached (no
--eval_data_dir and no network access to the Hub) is said once, up front; the runs are then trained and
reported without that accuracy, and a later re-run with the data adds it. A wrong --eval_data_dir stops
the sweep before any work.

Runs with precompute_ref_logps (all the recipes) share one cache of reference log-probs,
OUTPUT_ROOT/ref_logps/ (--set ref_logps_cache_dir=DIR for another): the runs on one reference model and
data make one reference pass between them. The report and the sweep's last lines count the passes.

Re-running skips finished trainings (trainer_state.json and saved weights present) and finished
evaluations (results.json present), and resumes an unfinished training from its last complete
checkpoint-N. A failed training or evaluation is reported and the sweep goes on; the exit status is 1
if anything failed, 2 on bad input (before any work, nothing written)."""

EPILOG = """\
LIST: values separated by spaces or commas, e.g. --lrs "1e-5,2e-5".

Grid: SFT and each of its variants at every --sft_lrs value, ASFT and EAFT also at every value of their
alpha grid (defaults: LLaMA-Factory's asft_alpha 0.1 and eaft_alpha 1.0); MinorSFT and SFT using DPO at
every --lrs × --betas pair; each point once per --seeds value. An empty grid ("") means the recipe's value.

Slurm: --slurm_dir DIR writes the sweep as Slurm jobs instead of running it (DIR must be new or empty):
plan.json (the checked training configs), train_eval.sbatch (a job array, one task per run: train, then
evaluate), base.sbatch (the base model's evaluation, a job of its own), prepare.sbatch (--demo, --figure1:
the base model and drift set, before the others), report.sbatch (after all of them) and submit.sh, which
submits them in that order. Each task runs `minorsft sweep --plan DIR/plan.json --run_index N` (or
--job base|prepare|report). Partition, account, time limit: add #SBATCH lines in --slurm_header FILE, or
edit the .sbatch files.

Examples:
  bash reproduce.sh --demo
  bash reproduce.sh --dry-run
  bash reproduce.sh --dataset my_corpus --gpus 0,1,2,3 --output_root saves/qwen2-sweep
  bash reproduce.sh --lora --methods minorsft --lrs 2e-4 --betas "0.02 0.04" --gpus 0
  bash reproduce.sh --methods baselines --sft_lrs 1e-5 --asft_alphas "0.05 0.1" --seeds "1 2 3"
  bash reproduce.sh --gpus 0,1,2,3,4,5,6,7 --slurm_dir slurm/paper --slurm_header my_cluster.sbatch"""


def _defaults_text(option: Option) -> str:
    """`[ENV; default X, --demo: Y]`, read from the option and the preset table."""
    def shown(value: str) -> str:
        return value or option.empty_means

    paper = PRESETS["paper"].get(option.name, option.default)
    parts = [f"default {shown(paper)}"]
    for mode, preset in PRESETS.items():
        if mode != "paper" and preset.get(option.name, option.default) != paper:
            parts.append(f"{MODE_FLAGS[mode]}: {shown(preset.get(option.name, option.default))}")
    return f" [{option.env}; {', '.join(parts)}]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=110, max_help_position=32)
    parser.allow_abbrev = False  # a typo must not silently pick another flag
    modes = parser.add_argument_group("modes")
    modes.add_argument("--demo", action="store_true", help="the same pipeline on 2 CPU cores in under 15 minutes: "
                       "SmolLM2-135M-Instruct (prepared with `minorsft demo-model` if missing), examples/demo/ "
                       "recipes, one grid point per method, 30 questions per benchmark [DEMO=1]")
    modes.add_argument("--figure1", action="store_true", help="the CPU Figure 1 experiment (docs/results.md): "
                       "the six methods on SmolLM2-135M-Instruct (float32), examples/figure1/ recipes, two seeds, no "
                       "benchmark (the held-out and drift sets measure); samples the drift set "
                       "data/smollm2_general_drift.json first if missing [FIGURE1=1]")
    modes.add_argument("--lora", action="store_true", help="the single-GPU LoRA recipes and grid [LORA=1]")
    modes.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                       help="print every command (and what would be skipped) without running or writing anything "
                       "[DRY_RUN=1]")
    options = parser.add_argument_group("options (each also read from the environment variable in brackets; a flag "
                                        "wins)")
    for option in OPTIONS:
        kwargs = {"action": "append"} if option.name == "set" else {}
        options.add_argument(f"--{option.name}", metavar=METAVARS.get(option.name, "LIST"),
                             help=option.help + _defaults_text(option), **kwargs)
    slurm = parser.add_argument_group("Slurm (see below)")
    slurm.add_argument("--slurm_dir", help="write the sweep as a Slurm job array into this new or empty folder "
                       "instead of running it")
    slurm.add_argument("--slurm_header", help="a file of #SBATCH lines (partition, account, time) added to every job")
    slurm.add_argument("--plan", help="run (part of) a plan written by --slurm_dir; no other sweep flags")
    slurm.add_argument("--run_index", help="with --plan: train and evaluate this run only (0-based)")
    slurm.add_argument("--job", choices=("prepare", "base", "report"), help="with --plan: only this job")


def run(args: argparse.Namespace) -> int:
    from . import sweep_slurm, sweep_steps

    sys.stdout.reconfigure(line_buffering=True)
    if args.plan:
        plan, selection = sweep_slurm.read_plan_for_task(args)
        return sweep_steps.run_plan(plan, dry_run=args.dry_run, selection=selection)
    settings = resolve_settings(args)
    plan = build_plan(settings)
    if settings["slurm_dir"]:
        return sweep_slurm.export(plan, settings, check_training_configs)
    return sweep_steps.run_plan(plan, dry_run=settings["dry_run"], check_configs=check_training_configs)


# --- settings: flags, then environment variables, then the mode's preset --------------------------------------


def resolve_settings(args: argparse.Namespace) -> dict:
    for flag in ("run_index", "job"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} needs --plan (a plan written by --slurm_dir)")
    env = os.environ
    switches = {name: getattr(args, name) or env.get(name.upper(), "0") == "1"
                for name in ("demo", "figure1", "lora", "dry_run")}
    chosen = [MODE_FLAGS[name] for name in ("demo", "figure1", "lora") if switches[name]]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)}: choose one mode")
    mode = next((name for name in ("demo", "figure1", "lora") if switches[name]), "paper")
    preset = PRESETS[mode]
    settings = {"mode": mode, "dry_run": switches["dry_run"], "slurm_dir": args.slurm_dir,
                "slurm_header": args.slurm_header}
    given = {}
    for option in OPTIONS:
        value = getattr(args, option.name)
        if option.name == "set":
            value = env.get(option.env, "").split() + (value or [])
        elif value is None and option.env in env and (env[option.env] or option.empty_is_a_value):
            value = env[option.env]
        given[option.name] = value is not None
        if value is None:
            value = preset.get(option.name, option.default)
        settings[option.name] = value
    settings["eval_data_from"] = "--eval_data_dir"
    if not settings["eval_data_dir"] and env.get(ENV_DATA_DIR):
        settings["eval_data_dir"], settings["eval_data_from"] = env[ENV_DATA_DIR], ENV_DATA_DIR
    # The preset's model belongs to the preset's recipes (the demo recipes train the model it prepares).
    settings["prepare"] = []
    if "base_model" in preset and not given["recipes"] and not given["model"]:
        settings["model"] = os.path.join(REPO_ROOT, preset["base_model"])
        settings["prepare"] = preset["prepare"]
    settings["recipes"] = settings["recipes"] if given["recipes"] else os.path.join(REPO_ROOT, settings["recipes"])
    return settings


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
            raise UsageError(f"--methods: unknown method `{item}` (valid: {', '.join(METHODS)}, or "
                             f"{', '.join(METHOD_GROUPS)})")
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
    return (len([line for line in listing.stdout.splitlines() if line.startswith("GPU")])
            if listing.returncode == 0 else 0), []


# --- the plan --------------------------------------------------------------------------------------------------


@dataclass
class Run:
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


@dataclass
class Plan:
    """Everything a sweep runs, fixed before any work; ``--slurm_dir`` writes it as plan.json."""

    mode: str
    output_root: str
    base_model: str
    base_template: str | None
    runs: list
    tasks: list  # [{"name", "split", "data_dir"}]: data_dir None reads the Hub
    eval_data_dir: str
    eval_data_from: str
    eval_seed: int
    eval_max_samples: int | None
    eval_batch_size: int | None
    eval_args: list
    launch: list  # prefix of every command, e.g. env CUDA_VISIBLE_DEVICES=0,1
    num_gpus: int  # processes per run: the GPUs, or 1 on the CPU
    gpu: bool
    prepare: list = field(default_factory=list)  # [{"what", "command", "creates"}] before everything else

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        raw = json.loads(text)
        raw["runs"] = [Run(**run) for run in raw["runs"]]
        return cls(**raw)

    @property
    def ref_logps_dirs(self) -> list:
        return list(dict.fromkeys(run.config["ref_logps_cache_dir"] for run in self.runs
                                  if run.config.get("ref_logps_cache_dir")))


def format_number(value: float) -> str:
    """Short and stable, for run names and tables: 5e-06 -> 5e-6, 0.0001 -> 1e-4, 2.5e-05 -> 2.5e-5, 0.04 -> 0.04."""
    if value == 0 or abs(value) >= 1e-3:
        return f"{value:g}"
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def recipe_path(recipe: str) -> str:
    """Against the starting folder, else (as the recipes' own paths) against the repository."""
    path = absolute(recipe)
    in_repo = os.path.join(REPO_ROOT, recipe)
    return in_repo if not os.path.exists(path) and os.path.isfile(in_repo) else path


def load_recipe(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"recipe {path} does not exist")
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise UsageError(f"recipe {path} is not a YAML mapping of LLaMA-Factory keys")
    return config


def resolve_paths(config: dict) -> None:
    for key in PATH_KEYS:
        value = config.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            candidate = os.path.join(REPO_ROOT, value)
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
    axes = [("learning_rate", grids["sft_lrs"] if method.sft_lr_grid else grids["lrs"])]
    if method.uses_beta:
        axes.append(("pref_beta", grids["betas"]))
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
    parts = [f"stage={config['stage']}", *(f"{key}=true" for key in method.flags),
             f"learning_rate={format_number(float(config['learning_rate']))}"]
    if method.uses_beta:
        parts.append(f"pref_beta={format_number(float(config['pref_beta']))}")
    if method.alpha_key:
        parts.append(f"{method.alpha_key}={format_number(float(config.get(method.alpha_key, method.alpha_default)))}")
    if with_seed:
        parts.append(f"seed={config['seed']}")
    per_device = config.get("per_device_train_batch_size", 8)
    accumulation = config.get("gradient_accumulation_steps", 1)
    return " ".join(parts) + (f" global_batch={per_device * accumulation * num_gpus}"
                              f" ({per_device} per device × GA {accumulation} × {num_gpus} GPU(s))")


def plan_tasks(settings: dict) -> list:
    """Each benchmark's split and data folder, from its task file (evaluation/tasks/)."""
    eval_data_dir = absolute(settings["eval_data_dir"]) if settings["eval_data_dir"] else ""
    if settings["tasks"].strip() == "none":
        return []
    tasks = []
    for name in settings["tasks"].replace(",", " ").split():
        if name not in available_tasks():
            raise UsageError(f"--tasks: unknown benchmark {name} (valid: {' '.join(available_tasks())})")
        try:
            task = load_task(name)
        except DefinitionError as error:
            raise UsageError(str(error)) from None
        data_dir = os.path.join(eval_data_dir, task.local_folder) if eval_data_dir else None
        if data_dir and not os.path.isdir(data_dir):
            raise UsageError(f"{settings['eval_data_from']} {eval_data_dir} has no {task.local_folder}/ folder for "
                             f"{name}")
        tasks.append({"name": name, "split": task.splits[0], "data_dir": data_dir})
    if not tasks:
        raise UsageError("--tasks is empty")
    return tasks


def build_plan(settings: dict) -> Plan:
    """The runs of the sweep, without writing anything; every problem is a UsageError naming the flag or key."""
    output_root = absolute(settings["output_root"])
    overrides = parse_assignments(settings["set"], "--set")
    model = settings["model"]
    if model and os.path.exists(os.path.expanduser(model)):
        model = absolute(model)  # a model that is not a local path is a Hub id and stays as it is
    for key, value in (("model_name_or_path", model), ("template", settings["template"]),
                       ("dataset", settings["dataset"]),
                       ("dataset_dir", absolute(settings["dataset_dir"]) if settings["dataset_dir"] else "")):
        if value:
            overrides[key] = value
    grids = {name: parse_grid(settings[name], f"--{name}", integer=name == "seeds") for name in GRID_OPTIONS}
    if any(beta <= 0 for beta in grids["betas"]):
        raise UsageError("--betas: β must be > 0")
    methods = parse_methods(settings["methods"])
    global_batch = positive_integer(settings["global_batch"], "--global_batch")
    eval_max_samples = positive_integer(settings["eval_max_samples"], "--eval_max_samples")
    eval_batch_size = positive_integer(settings["eval_batch_size"], "--eval_batch_size")
    if not re.fullmatch(r"[0-9]+", settings["eval_seed"]):
        raise UsageError(f"--eval_seed {settings['eval_seed']} is not a non-negative integer")
    gpus, launch = detect_gpus(settings["gpus"])
    num_gpus = max(gpus, 1)  # processes per run
    tasks = plan_tasks(settings)
    with_seed = bool(grids["seeds"])

    runs, warnings = [], set()
    for method in methods:
        recipe = settings["recipes"].replace("{method}", method.stage)
        base_config = load_recipe(recipe_path(recipe))
        if base_config.get("stage") != method.stage:
            raise UsageError(f"recipe {recipe} has `stage: {base_config.get('stage')}`, expected `{method.stage}`")
        for point in grid_points(method, grids):
            config = {**base_config, **overrides, **method.flags, **point}
            if method.flags:  # the variants log the deviation (Eq. 8) like the SFT baseline
                config["deviation_metric"] = True
            config.setdefault("dataset_dir", "data")  # LLaMA-Factory's default
            resolve_paths(config)
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
                if not settings["dry_run"]:
                    raise
                warnings.add(str(error))
            name = run_name(method, config, with_seed)
            config["output_dir"] = os.path.join(output_root, name)
            if "ref_logps_cache_dir" not in overrides:
                if config.get("precompute_ref_logps") is True:
                    config["ref_logps_cache_dir"] = os.path.join(output_root, REF_LOGPS_DIR)
                else:  # the recipe's cache directory means nothing once --set turns precomputing off
                    config.pop("ref_logps_cache_dir", None)
            runs.append(Run(name, method.name, recipe, config, summary(method, config, num_gpus, with_seed)))

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
                    raise UsageError(f"{existing} was written with other settings than this sweep's; use another "
                                     f"--output_root, or delete {os.path.dirname(existing)} to retrain it")
    prepare = [{"what": step["what"], "creates": os.path.join(REPO_ROOT, step.get("creates")) if step.get("creates")
                else None,
                "command": [part.format(model=base_model, repo=REPO_ROOT) for part in step["command"]]}
               for step in settings["prepare"]]
    return Plan(
        mode=settings["mode"], output_root=output_root, base_model=base_model, base_template=base_template,
        runs=runs, tasks=tasks, eval_data_dir=absolute(settings["eval_data_dir"]) if settings["eval_data_dir"] else "",
        eval_data_from=settings["eval_data_from"], eval_seed=int(settings["eval_seed"]),
        eval_max_samples=eval_max_samples, eval_batch_size=eval_batch_size,
        eval_args=shlex.split(settings["eval_args"]), launch=launch, num_gpus=num_gpus, gpu=gpus > 0, prepare=prepare,
    )


def check_training_configs(plan: Plan) -> None:
    """Every run's config through LLaMA-Factory's argument parsing and the plugin's checks (``sweep_check``),
    in one child process: it must see one CPU process, as LLaMA-Factory refuses to parse a multi-GPU or
    DeepSpeed config outside torchrun."""
    configs = {run.name: run.config for run in plan.runs}
    with tempfile.TemporaryDirectory(prefix="minorsft-sweep-check-") as staging:
        answer_path = os.path.join(staging, "errors.json")
        child = subprocess.run([sys.executable, "-m", "llamafactory_minorsft.sweep_check", answer_path],
                               input=json.dumps(configs), capture_output=True, text=True,
                               env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
        if child.returncode != 0 or not os.path.isfile(answer_path):
            raise UsageError(f"could not check the training configs with LLaMA-Factory:\n{child.stderr[-3000:]}")
        errors = json.loads(Path(answer_path).read_text(encoding="utf-8"))
    if errors:
        recipes = {run.name: run.recipe for run in plan.runs}
        lines = [f"run {name} ({recipes[name]} with the sweep's settings): {error}" for name, error in errors.items()]
        raise UsageError("LLaMA-Factory refuses the training config of "
                         f"{len(errors)} of the {len(plan.runs)} run(s):\n  " + "\n  ".join(lines))
    print(f"# checked the {len(plan.runs)} training config(s) with LLaMA-Factory's argument parsing and the "
          "plugin's checks")
