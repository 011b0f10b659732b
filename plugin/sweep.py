"""The plan of a ``reproduce.sh`` sweep: one training YAML per method and grid point, checked up front.

``reproduce.sh`` runs ``python -m llamafactory_minorsft.sweep ...`` once before any work. It reads each
method's recipe, applies the grid point and the overrides, and writes ``<staging_dir>/<run>.yaml``;
on stdout it prints one tab-separated line per target, which the script then trains and evaluates:

    base       <model_name_or_path>  <template>
    run        <name>  <method>  <finetuning_type>  <summary>
    ref_logps  <cache directory>         (once per directory, for runs with ``precompute_ref_logps: true``)

Runs with ``precompute_ref_logps: true`` all cache the reference log-probs in ``<output_root>/ref_logps/``
(``--set ref_logps_cache_dir=DIR`` for another): the cache file is keyed on the reference model, the
tokenised data, the template and ``cutoff_len``, so the whole lr × β grid on one model and data, the SFT
baseline's ``deviation_metric`` included, makes one reference pass, and runs with another key get a file
of their own.

Every problem (an unknown method, a recipe whose stage is another method, a missing dataset file, a
global batch the GPUs cannot split, a run directory made with other settings) ends here with a message
naming the key or file, exit status 2, and nothing written outside ``staging_dir``.
"""

import argparse
import json
import os
import sys

import yaml

METHODS = ("sft", "sft_dpo", "minorsft")
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
HEADER = "# Written by reproduce.sh from {recipe}. Re-running the sweep checks this file against its settings.\n"


class PlanError(Exception):
    pass


class MissingDatasetFile(PlanError):
    """Only a warning under --dry_run: the plan can be shown before the user's corpus is in place."""


def format_number(value: float) -> str:
    """Short and stable, for run names and tables: 5e-06 -> 5e-6, 0.0001 -> 1e-4, 2.5e-05 -> 2.5e-5, 0.04 -> 0.04."""
    if value == 0 or abs(value) >= 1e-3:
        return f"{value:g}"
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


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
            raise PlanError(f"{what} `{item}` is not KEY=VALUE")
        result[key.strip()] = parse_value(value.strip())
    return result


def parse_grid(text: str, what: str) -> list:
    values = []
    for item in text.replace(",", " ").split():
        try:
            values.append(float(item))
        except ValueError:
            raise PlanError(f"{what}: `{item}` is not a number") from None
    return values


def load_recipe(path: str) -> dict:
    if not os.path.isfile(path):
        raise PlanError(f"recipe {path} does not exist")
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise PlanError(f"recipe {path} is not a YAML mapping of LLaMA-Factory keys")
    return config


def resolve_paths(config: dict, repo_root: str) -> None:
    for key in PATH_KEYS:
        value = config.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            candidate = os.path.join(repo_root, value)
            # Hub ids (Qwen/Qwen2-7B-Instruct) stay as they are; dataset_dir and deepspeed are always local.
            if os.path.exists(candidate) or key in LOCAL_PATH_KEYS:
                config[key] = os.path.normpath(candidate)


def check_dataset(config: dict, recipe: str) -> None:
    dataset_dir = config.get("dataset_dir", "data")
    info_path = os.path.join(dataset_dir, "dataset_info.json")
    names = [name.strip() for name in str(config.get("dataset", "")).split(",") if name.strip()]
    if not names:
        raise PlanError(f"{recipe}: no `dataset` given (set it in the recipe or pass --dataset)")
    if not os.path.isfile(info_path):
        raise PlanError(f"{recipe}: `dataset_dir` {dataset_dir} has no dataset_info.json")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    for name in names:
        if name not in info:
            raise PlanError(f"dataset `{name}` is not in {info_path} (known: {', '.join(sorted(info))})")
        file_name = info[name].get("file_name")
        if file_name and not os.path.exists(os.path.join(dataset_dir, file_name)):
            raise MissingDatasetFile(
                f"dataset `{name}` points to {os.path.join(dataset_dir, file_name)}, which does not exist; "
                f"put your corpus there (see data/README.md) or pass --dataset"
            )


def set_global_batch(config: dict, global_batch: int, num_gpus: int, recipe: str) -> None:
    per_device = int(config.get("per_device_train_batch_size", 8))  # LLaMA-Factory's default
    if global_batch % (per_device * num_gpus):
        raise PlanError(
            f"global batch {global_batch} is not a multiple of per_device_train_batch_size {per_device} × "
            f"{num_gpus} GPU(s) (from {recipe} and --gpus); change --global_batch or "
            f"--set per_device_train_batch_size=N"
        )
    config["gradient_accumulation_steps"] = global_batch // (per_device * num_gpus)


def grid_points(method: str, sft_lrs: list, lrs: list, betas: list) -> list:
    """(lr, beta) pairs; None means the recipe's value."""
    if method == "sft":
        return [(lr, None) for lr in (sft_lrs or [None])]
    return [(lr, beta) for lr in (lrs or [None]) for beta in (betas or [None])]


def run_name(config: dict) -> str:
    name = f"{config['stage']}_lr{format_number(float(config['learning_rate']))}"
    if config["stage"] != "sft":
        name += f"_beta{format_number(float(config['pref_beta']))}"
    return name


def build_plan(args: argparse.Namespace) -> tuple:
    """(base (model, template), [(name, method, config, recipe)]) without writing anything."""
    overrides = parse_assignments(args.set, "--set")
    for key, value in (("model_name_or_path", args.model), ("template", args.template),
                       ("dataset", args.dataset), ("dataset_dir", args.dataset_dir)):
        if value:
            overrides[key] = value
    sft_lrs = parse_grid(args.sft_lrs, "--sft_lrs")
    lrs, betas = parse_grid(args.lrs, "--lrs"), parse_grid(args.betas, "--betas")
    if any(beta <= 0 for beta in betas):
        raise PlanError("--betas: β must be > 0")
    methods = args.methods.replace(",", " ").split()
    if not methods:
        raise PlanError("--methods is empty")
    for method in methods:
        if method not in METHODS:
            raise PlanError(f"--methods: unknown method `{method}` (valid: {', '.join(METHODS)})")

    runs, warnings = [], set()
    for method in methods:
        recipe = args.recipes.replace("{method}", method)
        recipe_path = recipe if os.path.isabs(recipe) else os.path.join(args.repo_root, recipe)
        base_config = load_recipe(recipe_path)
        if base_config.get("stage") != method:
            raise PlanError(f"recipe {recipe} has `stage: {base_config.get('stage')}`, expected `{method}`")
        for lr, beta in grid_points(method, sft_lrs, lrs, betas):
            config = {**base_config, **overrides}
            config.setdefault("dataset_dir", "data")  # LLaMA-Factory's default
            resolve_paths(config, args.repo_root)
            if lr is not None:
                config["learning_rate"] = lr
            if beta is not None:
                config["pref_beta"] = beta
            for key in ("learning_rate",) + (("pref_beta",) if method != "sft" else ()):
                if key not in config:
                    raise PlanError(f"recipe {recipe} has no `{key}` and no grid value was given")
            if args.global_batch:
                set_global_batch(config, args.global_batch, args.num_gpus, recipe)
            try:
                check_dataset(config, recipe)
            except MissingDatasetFile as error:
                if not args.dry_run:
                    raise
                warnings.add(str(error))
            name = run_name(config)
            config["output_dir"] = os.path.join(args.output_root, name)
            if "ref_logps_cache_dir" not in overrides:
                if config.get("precompute_ref_logps") is True:
                    config["ref_logps_cache_dir"] = os.path.join(args.output_root, REF_LOGPS_DIR)
                else:  # the recipe's cache directory means nothing once --set turns precomputing off
                    config.pop("ref_logps_cache_dir", None)
            runs.append((name, method, config, recipe))

    for warning in sorted(warnings):
        print(f"reproduce.sh: warning: {warning}", file=sys.stderr)
    names = [run[0] for run in runs]
    if len(set(names)) != len(names):
        raise PlanError(f"the grid repeats a run: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    models = {(run[2].get("model_name_or_path"), run[2].get("template")) for run in runs}
    if len(models) != 1:
        raise PlanError(f"all methods must start from one base model and template, got {sorted(map(str, models))}")
    return models.pop(), runs


def render(config: dict, recipe: str) -> str:
    return HEADER.format(recipe=recipe) + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def summary(config: dict, num_gpus: int) -> str:
    per_device = config.get("per_device_train_batch_size", 8)
    accumulation = config.get("gradient_accumulation_steps", 1)
    text = f"stage={config['stage']} learning_rate={format_number(float(config['learning_rate']))}"
    if config["stage"] != "sft":
        text += f" pref_beta={format_number(float(config['pref_beta']))}"
    return text + (f" global_batch={per_device * accumulation * num_gpus}"
                   f" ({per_device} per device × GA {accumulation} × {num_gpus} GPU(s))")


def write_plan(args: argparse.Namespace) -> None:
    (model, template), runs = build_plan(args)
    rendered = [(name, method, config, render(config, recipe)) for name, method, config, recipe in runs]
    for name, _, _, text in rendered:
        existing = os.path.join(args.output_root, name, "train.yaml")
        if os.path.isfile(existing):
            with open(existing, encoding="utf-8") as f:
                if f.read() != text:
                    raise PlanError(
                        f"{existing} was written with other settings than this sweep's; use another "
                        f"--output_root, or delete {os.path.dirname(existing)} to retrain it"
                    )
    os.makedirs(args.staging_dir, exist_ok=True)
    print(f"base\t{model}\t{template}")
    for name, method, config, text in rendered:
        with open(os.path.join(args.staging_dir, f"{name}.yaml"), "w", encoding="utf-8") as f:
            f.write(text)
        print(f"run\t{name}\t{method}\t{config.get('finetuning_type', 'lora')}\t{summary(config, args.num_gpus)}")
    for cache_dir in dict.fromkeys(config["ref_logps_cache_dir"] for _, _, config, _ in rendered
                                   if config.get("ref_logps_cache_dir")):
        print(f"ref_logps\t{cache_dir}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llamafactory_minorsft.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--repo_root", required=True)
    parser.add_argument("--output_root", required=True)
    parser.add_argument("--staging_dir", required=True)
    parser.add_argument("--recipes", required=True, help="recipe path with {method}, relative to --repo_root")
    parser.add_argument("--methods", required=True)
    parser.add_argument("--sft_lrs", default="")
    parser.add_argument("--lrs", default="")
    parser.add_argument("--betas", default="")
    parser.add_argument("--model", default="")
    parser.add_argument("--template", default="")
    parser.add_argument("--dataset", default="")
    parser.add_argument("--dataset_dir", default="")
    parser.add_argument("--num_gpus", type=int, default=1)
    parser.add_argument("--global_batch", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dry_run", action="store_true", help="a missing dataset file is a warning, not an error")
    args = parser.parse_args(argv)
    args.output_root = os.path.abspath(args.output_root)
    return args


def main(argv=None) -> int:
    try:
        write_plan(parse_args(argv))
    except PlanError as error:
        print(f"reproduce.sh: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
