"""A killed ``llamafactory-cli train`` re-run with the same command finishes the job, with the result of a run that
was never killed.

The tests SIGKILL a real ``llamafactory-cli train`` of ``stage: minorsft`` (precomputed reference log-probs, a
checkpoint every 2 of 6 steps, a final evaluation) by its own PID: during the reference pass (while its cache file
is written), between two steps, during a checkpoint save, during the final evaluation, one after the other, the
same command run again after each kill. The moment is exact: ``tests/fault_points`` holds the process there until
the kill. The last run must exit 0 with the uninterrupted run's final weights, final evaluation metrics and per-step
log, bitwise (one CPU, one seed), each step logged once. A MinorDPO run and a sweep's Slurm array task, each killed
during a checkpoint save and run again, too.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from helpers import (
    REPO_ROOT,
    TRAIN_ENV,
    run_llamafactory_train,
    tiny_train_config,
    write_pair_dataset,
    write_sft_dataset,
)

FAULT_POINTS = Path(__file__).resolve().parent / "fault_points"
# The Trainer averages these over the part of the run that the last launch trained; LLaMA-Factory's log line
# carries the wall-clock time.
NOT_COMPARED = frozenset(
    {
        "train_loss",
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "total_flos",
        "eval_runtime",
        "eval_samples_per_second",
        "eval_steps_per_second",
        "elapsed_time",
        "remaining_time",
        "throughput",
    }
)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_sft_dataset(directory, "tiny_sft", num_samples=16)
    write_sft_dataset(directory, "tiny_eval", num_samples=4)
    write_pair_dataset(directory, "tiny_pairs", num_pairs=16)
    write_pair_dataset(directory, "tiny_pairs_eval", num_pairs=4, first=16)
    return directory


def recipe(model_dir: Path, dataset_dir: Path) -> dict:
    """The run every test kills: 6 steps, checkpoint-2, -4 and -6, the final evaluation in 2 batches, the reference
    pass in batches of 2 (20 rows)."""
    config = tiny_train_config(
        model_dir,
        dataset_dir,
        output_dir=None,
        precompute_ref_logps=True,
        overwrite_output_dir=False,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        eval_dataset="tiny_eval",
        do_eval=True,
        per_device_eval_batch_size=2,
    )
    return config


@dataclass
class Outcome:
    """What a run leaves that must not depend on whether it was killed and re-run."""

    weights: dict
    evaluation: dict
    log_history: list  # the step and evaluation entries of trainer_state.json
    log_lines: list  # trainer_log.jsonl

    @classmethod
    def of(cls, output_dir: Path) -> "Outcome":
        def compared(entry: dict) -> dict:
            return {key: value for key, value in entry.items() if key not in NOT_COMPARED}

        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        lines = (output_dir / "trainer_log.jsonl").read_text().splitlines()
        return cls(
            weights=load_file(output_dir / "model.safetensors"),
            evaluation=compared(json.loads((output_dir / "eval_results.json").read_text())),
            log_history=[compared(entry) for entry in history if "loss" in entry or "eval_loss" in entry],
            log_lines=[compared(json.loads(line)) for line in lines],
        )

    def assert_equals(self, expected: "Outcome") -> None:
        import torch

        assert self.weights.keys() == expected.weights.keys()
        assert all(torch.equal(self.weights[name], tensor) for name, tensor in expected.weights.items())
        assert self.evaluation == expected.evaluation
        assert self.log_history == expected.log_history
        assert self.log_lines == expected.log_lines


def uninterrupted_run(config: dict, workdir: Path) -> "Outcome":
    result = run_llamafactory_train({**config, "output_dir": str(workdir / "out")}, workdir, env=TRAIN_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = Outcome.of(workdir / "out")
    assert [line["current_steps"] for line in outcome.log_lines if "loss" in line] == [1, 2, 3, 4, 5, 6]
    return outcome


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, dataset_dir) -> Outcome:
    return uninterrupted_run(recipe(tiny_model_dir, dataset_dir), tmp_path_factory.mktemp("uninterrupted"))


def pause_env(point: str, marker: Path) -> dict:
    return {
        **TRAIN_ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULT_POINTS), os.environ.get("PYTHONPATH")])),
        "MINORSFT_TEST_PAUSE_AT": point,
        "MINORSFT_TEST_PAUSED_FILE": str(marker),
        "PYTHONUNBUFFERED": "1",  # what the killed process said before the kill is in its log, to be read
    }


def kill_when_paused(
    command: list, point: str, workdir: Path, then=lambda: True, env: dict = None, timeout: float = 300
) -> None:
    """Start ``command``, wait until it holds at ``point`` and ``then()`` holds, and SIGKILL it (and, for a
    command that started children, its whole process group, as Slurm ends a job)."""
    marker = workdir / "paused"
    marker.unlink(missing_ok=True)  # an earlier kill's, in the same folder
    with open(workdir / "killed.log", "w") as log:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), **pause_env(point, marker)},
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            while not (marker.is_file() and then()):
                assert process.poll() is None, (workdir / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, f"never reached {point}"
                time.sleep(0.1)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert marker.read_text() == point


def kill_and_rerun(config: dict, workdir: Path, point: str, then=lambda: True) -> tuple:
    """``llamafactory-cli train`` killed at ``point``, then the same command again: (what the kill left, run again)."""
    workdir.mkdir(parents=True)
    config_path = workdir / "train.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    kill_when_paused(["llamafactory-cli", "train", str(config_path)], point, workdir, then)
    left = sorted(path.relative_to(workdir / "out").as_posix() for path in (workdir / "out").rglob("*"))
    rerun = run_llamafactory_train(config, workdir, env=TRAIN_ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return left, rerun.stdout + rerun.stderr


def logged_steps(output_dir: Path) -> list:
    path = output_dir / "trainer_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["current_steps"] for line in path.read_text().splitlines() if '"loss"' in line]


@pytest.fixture
def config(tmp_path, tiny_model_dir, dataset_dir) -> dict:
    return {**recipe(tiny_model_dir, dataset_dir), "output_dir": str(tmp_path / "run" / "out")}


@pytest.mark.slow
def test_a_run_killed_at_every_stage_and_rerun_each_time_ends_as_if_never_killed(tmp_path, config, uninterrupted):
    """One run killed four times, the same command run again after each kill, each re-run starting from what the
    kill before it left:

    1. at the end of the reference pass, while its cache file is written: to a temporary name, then renamed. The
       kill comes before the rename; the temporary file is then cut to half its length, as a kill during the write
       leaves it. It is never read (nor deleted: another run may be writing it into a shared cache folder): the
       re-run computes the pass again;
    2. between two steps, after step 3 was logged: the re-run resumes from checkpoint-2 and runs step 3 again,
       logged once;
    3. during a checkpoint save, checkpoint-4 with its weights written but not its optimizer state nor
       trainer_state.json: never resumed from, moved aside; the re-run resumes from checkpoint-2 and saves
       checkpoint-4 again;
    4. during the final evaluation, training finished and saved: the re-run resumes from checkpoint-6, trains
       nothing (the Trainer alone would train a 7th step), and evaluates.

    The last re-run ends with the uninterrupted run's weights, evaluation and logs, bitwise."""
    workdir = tmp_path / "run"
    output_dir = workdir / "out"
    workdir.mkdir()
    config_path = workdir / "train.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    command = ["llamafactory-cli", "train", str(config_path)]

    def left() -> list:
        return sorted(path.relative_to(output_dir).as_posix() for path in output_dir.rglob("*"))

    def killed_log() -> str:
        return (workdir / "killed.log").read_text(encoding="utf-8", errors="replace")

    kill_when_paused(command, "cache_replace", workdir)
    [staging] = output_dir.glob(".tmp-ref_logps-*")
    assert not list(output_dir.glob("ref_logps-*"))
    staging.write_bytes(staging.read_bytes()[: staging.stat().st_size // 2])
    cut = staging.read_bytes()

    kill_when_paused(command, "step_begin:3", workdir, then=lambda: logged_steps(output_dir) == [1, 2, 3])
    assert "Computed reference log-probs of 20 samples" in killed_log()
    assert staging.read_bytes() == cut  # left as it was
    assert len(list(output_dir.glob("ref_logps-*.pt"))) == 1
    assert "checkpoint-2/trainer_state.json" in left() and not any(name.startswith("checkpoint-4") for name in left())

    kill_when_paused(command, "save_optimizer:checkpoint-4", workdir)
    log = killed_log()
    assert f"Resuming training from {output_dir / 'checkpoint-2'}" in log
    assert "Dropped 1 line(s)" in log
    assert "checkpoint-4/model.safetensors" in left()
    assert "checkpoint-4/trainer_state.json" not in left() and "checkpoint-4/optimizer.pt" not in left()

    kill_when_paused(command, "evaluation_batch:2", workdir)
    log = killed_log()
    assert (
        f"Not resuming from {output_dir / 'checkpoint-4'}: it has no trainer_state.json (the Trainer writes it last: "
        f"its save was cut short). Moved it to {output_dir / 'incomplete-checkpoint-4'}" in log
    )
    assert f"Resuming training from {output_dir / 'checkpoint-2'}" in log
    assert not (output_dir / "incomplete-checkpoint-4" / "trainer_state.json").exists()
    assert (output_dir / "checkpoint-4" / "trainer_state.json").is_file()
    assert "model.safetensors" in left() and "eval_results.json" not in left()

    rerun = run_llamafactory_train(config, workdir, env=TRAIN_ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming training from {output_dir / 'checkpoint-6'}" in rerun.stdout + rerun.stderr
    assert not (output_dir / "checkpoint-7").exists()
    assert staging.read_bytes() == cut
    Outcome.of(output_dir).assert_equals(uninterrupted)


@pytest.mark.slow
def test_killed_minor_dpo_run_during_a_checkpoint_save(tmp_path, tiny_model_dir, dataset_dir):
    """The same for ``stage: dpo`` with ``pref_loss: minor_dpo`` and its reference pass: the re-run resumes from
    checkpoint-2, with the cached reference, to the uninterrupted run's result."""
    dpo = {"stage": "dpo", "pref_loss": "minor_dpo", "dataset": "tiny_pairs", "eval_dataset": "tiny_pairs_eval"}
    config = {**recipe(tiny_model_dir, dataset_dir), **dpo, "deviation_metric": True}
    expected = uninterrupted_run(config, tmp_path / "uninterrupted")
    output_dir = tmp_path / "run" / "out"
    config["output_dir"] = str(output_dir)
    left, log = kill_and_rerun(config, tmp_path / "run", "save_optimizer:checkpoint-4")
    assert "checkpoint-4/model.safetensors" in left and "checkpoint-4/trainer_state.json" not in left
    assert f"Moved it to {output_dir / 'incomplete-checkpoint-4'}" in log
    assert f"Resuming training from {output_dir / 'checkpoint-2'}" in log
    assert any("deviation/chosen" in entry for entry in expected.log_history)
    Outcome.of(output_dir).assert_equals(expected)


@pytest.mark.slow
def test_a_killed_slurm_array_task_runs_again_to_the_same_result(tmp_path, tiny_model_dir, dataset_dir, uninterrupted):
    """A sweep exported for Slurm; its array task (the sbatch script, run here as Slurm runs it) killed with its
    process group while its training saves checkpoint-4, then run again."""
    from llamafactory_minorsft import cli, sweep

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    minorsft = {
        key: value for key, value in recipe(tiny_model_dir, dataset_dir).items() if key != "overwrite_output_dir"
    }
    (recipes / "minorsft.yaml").write_text(yaml.safe_dump(minorsft))
    slurm_dir, out = tmp_path / "slurm", tmp_path / "sweep"
    checked = []
    original_check, sweep.check_training_configs = sweep.check_training_configs, checked.append
    try:
        exported = cli.main(
            ["sweep", "--repo_root", str(REPO_ROOT), "--demo", "--recipes", str(recipes / "{method}.yaml")]
            + ["--methods", "minorsft", "--tasks", "none", "--output_root", str(out), "--slurm_dir", str(slurm_dir)]
        )
    finally:
        sweep.check_training_configs = original_check
    assert exported == 0 and len(checked) == 1
    task = ["bash", str(slurm_dir / "train_eval.sbatch")]
    env = {"SLURM_ARRAY_TASK_ID": "0", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}

    workdir = tmp_path / "task"
    workdir.mkdir()
    kill_when_paused(task, "save_optimizer:checkpoint-4", workdir, env=env)
    [run_dir] = list(out.glob("minorsft_*"))
    assert (run_dir / "checkpoint-4" / "model.safetensors").is_file()
    assert not (run_dir / "checkpoint-4" / "trainer_state.json").exists()
    again = subprocess.run(task, capture_output=True, text=True, env={**os.environ, **env, **TRAIN_ENV}, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"# resume {run_dir.name} from {run_dir / 'checkpoint-2'}" in again.stdout
    Outcome.of(run_dir).assert_equals(uninterrupted)
