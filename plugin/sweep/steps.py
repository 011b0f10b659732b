"""Running a sweep's plan (``sweep.Plan``): the benchmark data check, preparing the base model, training,
evaluation and the report, each a subprocess whose output is shown and appended to its log file.

Finished work is judged by its outputs and skipped; an unfinished training resumes from its last complete
checkpoint. A failed step is reported at the end and the sweep goes on (exit status 1).
"""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from ..files import UsageError, write_text_atomically
from .plan import WHOLE_SWEEP, JobSelection

PLAIN_WORD = re.compile(r"[][A-Za-z0-9_./,=:@%+{}-]+")


def show(command: list) -> str:
    """A command as it can be pasted back into a shell; plain words stay unquoted."""
    return " ".join(word if PLAIN_WORD.fullmatch(word) else shlex.quote(word) for word in command)


def say(text: str = "") -> None:
    print(text, flush=True)


def child_env() -> dict:
    """The console scripts (minorsft, llamafactory-cli) of this Python come after the user's PATH."""
    env = dict(os.environ)
    scripts = os.path.dirname(sys.executable)
    if scripts not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = env.get("PATH", "") + os.pathsep + scripts
    return env


def execute(command: list, log: str, dry_run: bool) -> int:
    """Print the command; unless a dry run, run it with its output shown and appended to ``log``."""
    say(show(command))
    if dry_run:
        return 0
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "ab") as log_file:
        log_file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {show(command)}\n".encode())
        log_file.flush()
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env())
        except OSError as error:
            message = f"{command[0]}: {error.strerror}\n".encode()
            log_file.write(message)
            sys.stdout.buffer.write(message)
            return 127
        with process.stdout:
            while chunk := os.read(process.stdout.fileno(), 65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                log_file.write(chunk)
        return process.wait()


class Sweep:
    def __init__(self, plan, dry_run: bool):
        self.plan = plan
        self.dry_run = dry_run
        self.failed = []
        self.unreachable = {}  # task -> why its data cannot be reached

    # --- before any work ---------------------------------------------------------------------------------

    def check_data(self) -> None:
        """``minorsft eval --check_data --json`` per benchmark: usable, unreachable (expected without a data folder:
        the sweep trains and reports without that accuracy), or bad input, which stops the sweep."""
        for task in self.plan.tasks:
            check = ["minorsft", "eval", "--task", task.name, "--split", task.split, "--check_data"]
            if task.data_dir:
                check += ["--data_dir", task.data_dir]
            check.append("--json")
            if self.dry_run:
                say(show(check))
                continue
            answer = subprocess.run(check, capture_output=True, text=True, env=child_env())
            try:
                status = json.loads(answer.stdout)
            except json.JSONDecodeError:  # it failed before it could answer: its error output says why
                status = {"status": None, "reason": " ".join(answer.stderr.strip().splitlines()[-1:])}
            # What failed; the ways out are said below, once.
            reason = status.get("reason", "")
            if status.get("status") == "unreachable" and not task.data_dir:
                self.unreachable[task.name] = reason
            elif status.get("status") != "usable":
                raise UsageError(
                    f"the {task.name} benchmark data cannot be used: {reason or 'no message'} "
                    f"(`{show(check)}` exited {answer.returncode})"
                )

    def announce(self) -> None:
        plan = self.plan
        tasks = [task.name for task in plan.tasks]
        say(
            f"# minorsft sweep: {len(plan.runs)} run(s) into {plan.output_root}, base model {plan.base_model}, "
            f"benchmarks: {' '.join(tasks) or 'none (--tasks none)'}"
        )
        if not tasks:
            return
        source = f"{plan.eval_data_dir} (from {plan.eval_data_from})" if plan.eval_data_dir else "the Hugging Face Hub"
        sample = (
            f", {plan.eval_max_samples} questions per benchmark (seed {plan.eval_seed})"
            if plan.eval_max_samples
            else ""
        )
        say(f"# evaluation data: {source}{sample}")

    def say_unreachable(self) -> None:
        for cache_dir in self.plan.ref_logps_dirs:
            say(
                f"# reference log-probs: cached in {cache_dir}, one pass per reference model and data, shared by "
                "the runs"
            )
        if not self.unreachable:
            return
        say("#")
        say(f"# Accuracy will NOT be measured on {' '.join(self.unreachable)}: the benchmark data cannot be reached.")
        for task, reason in self.unreachable.items():
            say(f"#   {task}: {reason}")
        say("# The runs are trained and reported without it. To measure it, re-run the same command (finished")
        say("# trainings are kept) with the data reachable, in either of two ways:")
        say("#   --eval_data_dir DIR or MINORSFT_EVAL_DATA_DIR=DIR, a folder holding ceval-exam/, FinanceIQ/, fineval/")
        say("#   network access to the Hugging Face Hub (HF_HUB_OFFLINE unset)")
        say("#")

    # --- the steps -----------------------------------------------------------------------------------------

    def prepare(self) -> bool:
        """The mode's base model and data (--demo, --figure1), logged into OUTPUT_ROOT/prepare.log."""
        for step in self.plan.prepare:
            say()
            say(f"# prepare {step.what}")
            if step.creates and os.path.exists(step.creates):
                say(f"# skip: {step.creates} exists")
                continue
            if execute(step.command, os.path.join(self.plan.output_root, "prepare.log"), self.dry_run):
                self.failed.append(f"preparing {step.what} (log: {self.plan.output_root}/prepare.log)")
                return False
        return True

    def evaluate(self, name: str, directory: str, model: str, adapter: str | None) -> None:
        plan = self.plan
        for task in plan.tasks:
            out = os.path.join(directory, "eval", task.name)
            results = os.path.join(out, "results.json")
            skipped = os.path.join(directory, "eval", f"{task.name}.skipped")
            if task.name in self.unreachable and not os.path.isfile(results):
                if not self.dry_run:  # said once, up front; the file tells the report why there is no accuracy
                    os.makedirs(os.path.dirname(skipped), exist_ok=True)
                    write_text_atomically(skipped, self.unreachable[task.name] + "\n")
                continue
            say(f"# evaluate {name} on {task.name}")
            if os.path.isfile(results):
                say(f"# skip evaluation of {name} on {task.name}: finished ({results})")
                continue
            if not self.dry_run and os.path.exists(skipped):
                os.remove(skipped)
            command = [
                "minorsft",
                "eval",
                "--task",
                task.name,
                "--split",
                task.split,
                "--model_name_or_path",
                model,
                "--output_dir",
                out,
                "--seed",
                str(plan.eval_seed),
                "--mode",
                "logits",
            ]
            if task.data_dir:
                command += ["--data_dir", task.data_dir]
            if adapter:
                command += ["--adapter_name_or_path", adapter]
            if plan.base_template:
                command += ["--template", plan.base_template]
            if plan.eval_max_samples:
                command += ["--max_samples", str(plan.eval_max_samples)]
            if plan.eval_batch_size:
                command += ["--batch_size", str(plan.eval_batch_size)]
            command += plan.eval_args
            if os.path.isdir(out):
                command.append("--overwrite")  # leftovers of an interrupted evaluation
            log = os.path.join(directory, "eval", f"{task.name}.log")
            if execute(plan.launch + command, log, self.dry_run):
                self.failed.append(f"evaluation of {name} on {task.name} (log: {log})")

    def evaluate_base(self) -> None:
        base = os.path.join(self.plan.output_root, "base")
        if not self.dry_run:
            os.makedirs(base, exist_ok=True)
            write_text_atomically(
                os.path.join(base, "model.yaml"),
                f"model_name_or_path: {self.plan.base_model}\ntemplate: {self.plan.base_template}\n",
            )
        say()
        self.evaluate("base", base, self.plan.base_model, None)

    def train(self, run) -> bool:
        run_dir = run.config["output_dir"]
        say()
        say(f"# train {run.name}: {run.summary}")
        if training_finished(run_dir):
            say(f"# skip training {run.name}: finished ({run_dir}/trainer_state.json)")
            return True
        extra = []
        checkpoint = last_complete_checkpoint(run_dir)
        if checkpoint:
            say(f"# resume {run.name} from {checkpoint}")
            extra = [f"resume_from_checkpoint={checkpoint}"]
        elif os.path.isdir(run_dir):
            extra = ["overwrite_output_dir=true"]  # leftovers of a launch that saved no checkpoint: start afresh
        train_yaml = os.path.join(run_dir, "train.yaml")
        if self.dry_run:
            say(f"# write {train_yaml}")
        else:
            os.makedirs(run_dir, exist_ok=True)
            write_text_atomically(train_yaml, run.train_yaml)
            # A checkpoint without trainer_state.json was cut off while saving; it cannot be resumed.
            for path in glob.glob(os.path.join(run_dir, "checkpoint-*")):
                if os.path.isdir(path) and not os.path.exists(os.path.join(path, "trainer_state.json")):
                    shutil.rmtree(path)
        log = os.path.join(run_dir, "train.log")
        if execute(self.plan.launch + ["llamafactory-cli", "train", train_yaml, *extra], log, self.dry_run):
            self.failed.append(f"training {run.name} (log: {log})")
            return False
        return True

    def train_and_evaluate(self, run) -> None:
        if self.train(run):
            run_dir = run.config["output_dir"]
            if run.finetuning_type == "lora":
                self.evaluate(run.name, run_dir, self.plan.base_model, run_dir)
            else:
                self.evaluate(run.name, run_dir, run_dir, None)

    def report(self) -> None:
        plan = self.plan
        say()
        say("# report")
        report_dir = os.path.join(plan.output_root, "report")
        command = [
            "minorsft",
            "report",
            os.path.join(plan.output_root, "base"),
            *self.run_dirs(),
            "--output_dir",
            report_dir,
            "--overwrite",
        ]
        log = os.path.join(plan.output_root, "report.log")
        if execute(command, log, self.dry_run):
            self.failed.append(f"report (log: {log})")
        elif not self.dry_run:
            # The reference passes of the whole sweep, from the runs' records, as the report counts them.
            from ..report.runs import read_run_record, reference_use
            from ..report.tables import reference_note

            uses = [(os.path.basename(path), reference_use(read_run_record(path))) for path in self.run_dirs()]
            note = reference_note([(name, use) for name, use in uses if use])
            if note:
                say(f"# {note}")

    def run_dirs(self) -> list:
        """This sweep's runs and every other run a sweep wrote into the same output root: a preset split into
        parts by --methods (docs/sweep.md) gets one report of all its parts."""
        planned = [run.config["output_dir"] for run in self.plan.runs]
        earlier = sorted(
            os.path.dirname(path)
            for path in glob.glob(os.path.join(self.plan.output_root, "*", "train.yaml"))
            if os.path.dirname(path) not in planned
        )
        return planned + earlier

    def finish(self) -> int:
        say()
        if self.failed:
            say(f"# minorsft sweep: {len(self.failed)} step(s) failed; re-run the same command to retry them:")
            for item in self.failed:
                say(f"#   {item}")
            return 1
        say(
            "# dry run: nothing was run"
            if self.dry_run
            else f"# done: {os.path.join(self.plan.output_root, 'report', 'results.md')}"
        )
        return 0


def training_finished(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "trainer_state.json")) and bool(
        glob.glob(os.path.join(run_dir, "*.safetensors")) or glob.glob(os.path.join(run_dir, "*.bin"))
    )


def last_complete_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint-N whose trainer_state.json was written (the Trainer writes it last)."""
    steps = []
    for path in glob.glob(os.path.join(run_dir, "checkpoint-*")):
        step = os.path.basename(path).removeprefix("checkpoint-")
        if step.isdigit() and os.path.isfile(os.path.join(path, "trainer_state.json")):
            steps.append(int(step))
    return os.path.join(run_dir, f"checkpoint-{max(steps)}") if steps else None


def run_plan(plan, dry_run: bool, selection: JobSelection = WHOLE_SWEEP, check_configs=None) -> int:
    """The whole sweep, or one job of its Slurm export."""
    sweep = Sweep(plan, dry_run)
    job = selection.job
    if job == "all":
        sweep.announce()
        check_configs(plan)
    if job in ("all", "base", "run"):
        sweep.check_data()
        sweep.say_unreachable()
    if job in ("all", "prepare") and not sweep.prepare():
        return sweep.finish()
    if job in ("all", "base"):
        sweep.evaluate_base()
    if job == "all":
        for run in plan.runs:
            sweep.train_and_evaluate(run)
    if job == "run":
        sweep.train_and_evaluate(plan.runs[selection.run_index])
    if job in ("all", "report"):
        sweep.report()
    return sweep.finish()
