"""``minorsft sweep`` (``bash reproduce.sh``): the paper's sweep, planned, checked, run, evaluated and reported.

``options``: the flags, their environment variables and the mode presets. ``plan``: one training YAML per
method and grid point, built from the recipes and checked before any work. ``steps`` runs a plan (training,
evaluation, report, with skipping and resuming), ``slurm`` writes it as a Slurm job array instead.

Runs with ``precompute_ref_logps: true`` all cache the reference log-probs in ``<output_root>/ref_logps/``
(``--set ref_logps_cache_dir=DIR`` for another): the cache file is keyed on the reference model, the
tokenised data, the template and ``cutoff_len``, so the whole grid on one model and data, the SFT
baseline's ``deviation_metric`` included, makes one reference pass.
"""

import argparse
import sys

from .options import METAVARS, MODE_FLAGS, OPTIONS, PRESETS, Option, resolve_settings
from .plan import build_plan, check_training_configs

DESCRIPTION = """\
The paper's sweep (arXiv 2408.10642 §4), also run as `bash reproduce.sh`: trains every method at every grid
point with `llamafactory-cli train`, evaluates the base model and each run with `minorsft eval` on each
benchmark, then writes the report (results.md, results.csv, deviation.png, accuracy.png) with
`minorsft report` into OUTPUT_ROOT/report.

Files come from the checkout that runs the sweep, its repository root: --repo_root DIR, which reproduce.sh
sets to its own folder (`minorsft sweep`: the current folder). The mode's recipes, data/, prepared models/ and
default OUTPUT_ROOT are there, and relative paths inside the recipes are resolved against it; paths typed on
the command line are relative to the current folder.

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
every --lrs × --betas pair; DPO and MinorDPO (--methods preference, on preference pairs, from the minordpo
recipe) at every --dpo_lrs × --dpo_betas pair, with dataloader_drop_last so that every micro-batch is full (DPO's
sigmoid averages each micro-batch, MinorDPO the global batch: equal micro-batches make the two agree); each point
once per --seeds value. An empty grid ("") means the recipe's value.

Slurm: --slurm_dir DIR writes the sweep as Slurm jobs instead of running it (DIR must be new or empty):
plan.json (the checked training configs), train_eval.sbatch (a job array, one task per run: train, then
evaluate), base.sbatch (the base model's evaluation, a job of its own), prepare.sbatch (--demo, --figure1,
--figure1_full: the base model, before the others), report.sbatch (after all of them) and submit.sh, which
submits them in that order. Each task runs `minorsft sweep --plan DIR/plan.json --run_index N` (or
--job base|prepare|report). Partition, account, time limit: add #SBATCH lines in --slurm_header FILE, or
edit the .sbatch files.

Examples:
  bash reproduce.sh --demo
  bash reproduce.sh --dry-run
  bash reproduce.sh --dataset my_corpus --gpus 0,1,2,3 --output_root saves/qwen2-sweep
  bash reproduce.sh --lora --methods minorsft --lrs 2e-4 --betas "0.02 0.04" --gpus 0
  bash reproduce.sh --methods baselines --sft_lrs 1e-5 --asft_alphas "0.05 0.1" --seeds "1 2 3"
  bash reproduce.sh --demo --methods dpo,minor_dpo --dpo_lrs "5e-6 1e-5" --dpo_betas "0.1 0.3"
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
    modes.add_argument(
        "--demo",
        action="store_true",
        help="the same pipeline on 2 CPU cores in under 15 minutes: "
        "SmolLM2-135M-Instruct (prepared with `minorsft demo-model` if missing), examples/demo/ "
        "recipes, one grid point per method, 30 questions per benchmark [DEMO=1]",
    )
    modes.add_argument(
        "--figure1",
        action="store_true",
        help="the CPU Figure 1 experiment, cheap regime (docs/results.md): SFT, Eq. 5, MinorSFT (β 0.04 and 0.1) "
        "and SFT using DPO on SmolLM2-135M-Instruct (float32), its last 6 layers, examples/figure1/ recipes, two "
        "seeds, no benchmark (the held-out set and the drift set measure, with the exact KL) [FIGURE1=1]",
    )
    modes.add_argument(
        "--figure1_full",
        action="store_true",
        help="the CPU Figure 1 experiment, paper-like regime (docs/results.md): the same methods (β 0.04) with "
        "full fine-tuning, 256-token cut-off, examples/figure1_full/ recipes, two seeds [FIGURE1_FULL=1]",
    )
    modes.add_argument("--lora", action="store_true", help="the single-GPU LoRA recipes and grid [LORA=1]")
    parser.add_argument(
        "--repo_root",
        metavar="DIR",
        help="the checkout whose recipes, data/, models/ and default output root the sweep uses "
        "(reproduce.sh: its own folder; default: the current folder)",
    )
    modes.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="print every command (and what would be skipped) without running or writing anything [DRY_RUN=1]",
    )
    options = parser.add_argument_group(
        "options (each also read from the environment variable in brackets; a flag wins)"
    )
    for option in OPTIONS:
        kwargs = {"action": "append"} if option.name == "set" else {}
        options.add_argument(
            f"--{option.name}",
            metavar=METAVARS.get(option.name, "LIST"),
            help=option.help + _defaults_text(option),
            **kwargs,
        )
    slurm = parser.add_argument_group("Slurm (see below)")
    slurm.add_argument(
        "--slurm_dir", help="write the sweep as a Slurm job array into this new or empty folder instead of running it"
    )
    slurm.add_argument("--slurm_header", help="a file of #SBATCH lines (partition, account, time) added to every job")
    slurm.add_argument("--plan", help="run (part of) a plan written by --slurm_dir; no other sweep flags")
    slurm.add_argument("--run_index", help="with --plan: train and evaluate this run only (0-based)")
    slurm.add_argument("--job", choices=("prepare", "base", "report"), help="with --plan: only this job")


def run(args: argparse.Namespace) -> int:
    from . import slurm, steps

    sys.stdout.reconfigure(line_buffering=True)
    if args.plan:
        plan, selection = slurm.read_plan_for_task(args)
        return steps.run_plan(plan, dry_run=args.dry_run, selection=selection)
    settings = resolve_settings(args)
    plan = build_plan(settings)
    if settings.slurm_dir:
        return slurm.export(plan, settings, check_training_configs)
    return steps.run_plan(plan, dry_run=settings.dry_run, check_configs=check_training_configs)
