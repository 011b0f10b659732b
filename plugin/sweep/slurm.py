"""``minorsft sweep --slurm_dir DIR``: the checked plan as Slurm jobs instead of running it.

DIR receives plan.json (the plan, every run's checked training config included), one .sbatch script per
job, submit.sh and README.txt. Each job runs this driver on the plan: ``minorsft sweep --plan DIR/plan.json``
with ``--run_index $SLURM_ARRAY_TASK_ID`` (train then evaluate one run) or ``--job prepare|base|report``.
Jobs: prepare (only for modes that prepare the base model: --demo, --figure1, --figure1_full), base (the base model's
evaluation, its own job), train_eval (the array, one task per run, after prepare), report (once all the
others ended, whether or not they failed: ``afterany``).
"""

import dataclasses
import os
import shlex
import sys

from ..files import UsageError, staged_dir, write_text_atomically
from .steps import Sweep, say

SWEEP_FLAGS = ("demo", "figure1", "figure1_full", "lora", "slurm_dir", "slurm_header")


def export(plan, settings, check_configs) -> int:
    """``settings``: the ``SweepSettings`` (--slurm_dir, --slurm_header, --dry-run)."""
    slurm_dir = os.path.abspath(os.path.expanduser(settings.slurm_dir))
    if os.path.exists(slurm_dir) and (not os.path.isdir(slurm_dir) or os.listdir(slurm_dir)):
        raise UsageError(f"--slurm_dir {settings.slurm_dir} exists and is not an empty folder; pick a new or empty one")
    header = ""
    if settings.slurm_header:
        path = os.path.abspath(os.path.expanduser(settings.slurm_header))
        if not os.path.isfile(path):
            raise UsageError(f"--slurm_header {settings.slurm_header}: no such file ({path})")
        with open(path, encoding="utf-8") as f:
            header = f.read().rstrip("\n") + "\n"
    sweep = Sweep(plan, settings.dry_run)
    sweep.announce()
    check_configs(plan)
    sweep.check_data()  # a wrong data folder stops here; each job checks again where it runs
    # In a job the GPUs are the ones Slurm allocated: only their count is the plan's.
    job_plan = dataclasses.replace(plan, launch=[])
    files = job_files(job_plan, slurm_dir, header)
    if settings.dry_run:
        for name, text in files.items():
            say(f"# would write {os.path.join(slurm_dir, name)}:")
            say(text if name != "plan.json" else "#   (the plan: every run's training config, as JSON)")
        say("# dry run: nothing was written")
        return 0
    with staged_dir(slurm_dir, prefix=".slurm-") as staging:
        os.makedirs(os.path.join(staging, "logs"))
        for name, text in files.items():
            write_text_atomically(os.path.join(staging, name), text)
        os.chmod(os.path.join(staging, "submit.sh"), 0o755)
    say(
        f"# wrote {len(plan.runs)} array task(s) and their jobs into {slurm_dir}; submit them with "
        f"`bash {os.path.join(slurm_dir, 'submit.sh')}`"
    )
    return 0


def job_files(plan, slurm_dir: str, header: str) -> dict:
    def sbatch(job: str, what: str, task_args: str, array: bool = False, gpus: bool = True) -> str:
        lines = ["#!/bin/bash", f"#SBATCH --job-name=minorsft-{job}"]
        if array:
            lines.append(f"#SBATCH --array=0-{len(plan.runs) - 1}")
        log = f"{job}-%A_%a.out" if array else f"{job}-%j.out"
        lines.append(f"#SBATCH --output={os.path.join(slurm_dir, 'logs', log)}")
        if gpus and plan.gpu:
            lines.append(f"#SBATCH --gres=gpu:{plan.num_gpus}")
        command = (
            f"exec {shlex.quote(sys.executable)} -m llamafactory_minorsft.cli sweep "
            f"--plan {shlex.quote(os.path.join(slurm_dir, 'plan.json'))} {task_args}"
        )
        return (
            "\n".join(lines)
            + "\n"
            + header
            + f"# {what} (written by `minorsft sweep --slurm_dir`)\n"
            + f"cd {shlex.quote(os.getcwd())}\n{command}\n"
        )

    files = {"plan.json": plan.to_json() + "\n"}
    if plan.prepare:
        files["prepare.sbatch"] = sbatch(
            "prepare", "Prepares the base model and data of the mode", "--job prepare", gpus=False
        )
    files["base.sbatch"] = sbatch("base", "Evaluates the base model on the benchmarks", "--job base")
    files["train_eval.sbatch"] = sbatch(
        "train_eval",
        "One run per array task: trains it, then evaluates it",
        '--run_index "$SLURM_ARRAY_TASK_ID"',
        array=True,
    )
    files["report.sbatch"] = sbatch("report", "Writes the report of every run", "--job report", gpus=False)

    def path(name: str) -> str:
        return shlex.quote(os.path.join(slurm_dir, name))

    after = ' "--dependency=afterok:$prepare"' if plan.prepare else ""
    submit = [
        "#!/usr/bin/env bash",
        "# Submits the sweep's jobs in order (written by `minorsft sweep --slurm_dir`).",
        "set -euo pipefail",
        'submit() { local id; id="$(sbatch --parsable "$@")"; echo "${id%%;*}"; }',
    ]
    if plan.prepare:
        submit.append(f'prepare="$(submit {path("prepare.sbatch")})"')
    submit += [
        f'base="$(submit{after} {path("base.sbatch")})"',
        f'runs="$(submit{after} {path("train_eval.sbatch")})"',
        f'report="$(submit "--dependency=afterany:$runs:$base" {path("report.sbatch")})"',
        f'echo "submitted: base model $base, {len(plan.runs)} run(s) as array $runs, report $report; '
        f'logs in {os.path.join(slurm_dir, "logs")}"',
    ]
    files["submit.sh"] = "\n".join(submit) + "\n"
    files["README.txt"] = (
        f"The sweep into {plan.output_root} as Slurm jobs: `bash submit.sh` submits them in order "
        f"({'prepare, then ' if plan.prepare else ''}the base model's evaluation and the array of {len(plan.runs)} "
        "run(s), one task per run, then the report once all ended). Logs: logs/. Partition, account, time: "
        "edit the .sbatch files. Written by `minorsft sweep --slurm_dir`; plan.json holds the checked plan.\n"
    )
    return files


def read_plan_for_task(args) -> tuple:
    """(plan, JobSelection) for ``--plan FILE`` with ``--run_index N`` or ``--job NAME``. ``--repo_root`` (which
    reproduce.sh passes) changes nothing: the plan's paths are absolute."""
    from .options import OPTIONS
    from .plan import JobSelection, Plan

    others = [f"--{option.name}" for option in OPTIONS if getattr(args, option.name) is not None]
    others += [f"--{name}" for name in SWEEP_FLAGS if getattr(args, name)]
    if others:
        raise UsageError(f"--plan runs a written plan; it takes no {', '.join(others)}")
    if (args.run_index is None) == (args.job is None):
        raise UsageError("--plan needs one of --run_index N and --job prepare|base|report")
    if not os.path.isfile(args.plan):
        raise UsageError(f"--plan {args.plan}: no such file")
    with open(args.plan, encoding="utf-8") as f:
        plan = Plan.from_json(f.read())
    if args.job:
        return plan, JobSelection(args.job)
    if not args.run_index.isdigit() or int(args.run_index) >= len(plan.runs):
        raise UsageError(
            f"--run_index {args.run_index}: the plan has {len(plan.runs)} run(s), 0 to {len(plan.runs) - 1}"
        )
    return plan, JobSelection("run", int(args.run_index))
