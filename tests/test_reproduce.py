"""``reproduce.sh``: the grid it plans, its checks, resuming a real (tiny) sweep after a kill, and a sweep
that cannot reach the benchmark data. The real sweeps evaluate on the in-repository benchmark fixtures."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from llamafactory_minorsft import sweep

from conftest import BENCHMARK_FIXTURES, REPO_ROOT, read_log_history, write_sft_dataset

SCRIPT = REPO_ROOT / "reproduce.sh"
# Environment variables reproduce.sh reads: the tests set them explicitly or not at all.
SCRIPT_VARIABLES = ("DEMO", "DRY_RUN", "LORA", "OUTPUT_ROOT", "METHODS", "SFT_LRS", "LRS", "BETAS", "RECIPES", "MODEL",
                    "TEMPLATE", "DATASET", "DATASET_DIR", "TRAIN_SET", "GPUS", "GLOBAL_BATCH", "TASKS", "EVAL_DATA_DIR",
                    "EVAL_MAX_SAMPLES", "EVAL_SEED", "EVAL_BATCH_SIZE", "EVAL_ARGS", "CUDA_VISIBLE_DEVICES",
                    "MINORSFT_EVAL_DATA_DIR")
BENCHMARKS = {"ceval": ("val", "ceval-exam"), "financeiq": ("test", "FinanceIQ"), "fineval": ("val", "fineval")}


def script_env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in SCRIPT_VARIABLES}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # minorsft, llamafactory-cli
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def reproduce(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, capture_output=True, text=True,
                          env=script_env(**(env or {})), timeout=kwargs.pop("timeout", 120), **kwargs)


def planned_runs(stdout: str) -> dict:
    """{run name: summary} from the `# train NAME: SUMMARY` lines of the script's output."""
    return dict(re.findall(r"^# train (\S+): (.*)$", stdout, flags=re.MULTILINE))


def commands(stdout: str, program: str) -> list:
    return [line.split() for line in stdout.splitlines() if program in line and not line.startswith("#")]


def evaluations(stdout: str) -> list:
    return [command for command in commands(stdout, "minorsft eval") if "--check_data" not in command]


def data_checks(stdout: str) -> list:
    return [command for command in commands(stdout, "minorsft eval") if "--check_data" in command]


def option(command: list, name: str):
    return command[command.index(name) + 1] if name in command else None


# --- the plan (--dry-run) ------------------------------------------------------------------------------------


def test_dry_run_lists_exactly_the_papers_grid_and_runs_nothing(tmp_path):
    out = tmp_path / "sweep"
    result = reproduce("--dry-run", "--gpus", "0,1,2,3,4,5,6,7", "--output_root", str(out))
    assert result.returncode == 0, result.stderr
    runs = planned_runs(result.stdout)
    expected = [f"sft_lr{lr}" for lr in ("5e-6", "1e-5", "2e-5", "3e-5")] + [
        f"{method}_lr{lr}_beta{beta}" for method in ("sft_dpo", "minorsft")
        for lr in ("1e-5", "2e-5", "3e-5") for beta in ("0.02", "0.04", "0.08")]
    assert list(runs) == expected
    # The recipes' global batch 64 = 2 per device × GA 4 × 8 GPUs, as their comments say.
    assert all("global_batch=64 (2 per device × GA 4 × 8 GPU(s))" in summary for summary in runs.values())
    assert runs["minorsft_lr2e-5_beta0.04"].startswith("stage=minorsft learning_rate=2e-5 pref_beta=0.04 ")

    trains = commands(result.stdout, "llamafactory-cli train")
    assert [command[-1] for command in trains] == [str(out / name / "train.yaml") for name in expected]
    assert all(command[:2] == ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7"] for command in trains)

    # The data of each benchmark is checked before any training; no data folder given: the Hub's.
    checks = data_checks(result.stdout)
    assert [(option(c, "--task"), option(c, "--split")) for c in checks] == [("ceval", "val"), ("financeiq", "test"),
                                                                             ("fineval", "val")]
    assert result.stdout.index("--check_data") < result.stdout.index("llamafactory-cli train")
    evals = evaluations(result.stdout)
    assert len(evals) == 3 * (1 + len(expected))
    for command in evals + checks:
        split, _ = BENCHMARKS[option(command, "--task")]
        assert option(command, "--split") == split and "--data_dir" not in command
    for command in evals:
        assert option(command, "--mode") == "logits"
        assert option(command, "--seed") == "42" and "--max_samples" not in command
    assert {option(c, "--model_name_or_path") for c in evals} == {"Qwen/Qwen2-7B-Instruct"} | {
        str(out / name) for name in expected}
    assert {option(c, "--output_dir") for c in evals if option(c, "--model_name_or_path") == str(out / "sft_lr1e-5")} \
        == {str(out / "sft_lr1e-5" / "eval" / task) for task in BENCHMARKS}

    [report] = commands(result.stdout, "minorsft report")
    assert report[report.index("report") + 1:-3] == [str(out / "base")] + [str(out / name) for name in expected]
    assert report[-3:] == ["--output_dir", str(out / "report"), "--overwrite"]  # a resumed sweep rewrites it
    assert not out.exists()
    assert "domain_corpus.json, which does not exist" in result.stderr  # a warning under --dry-run
    assert f"# reference log-probs: cached in {out / 'ref_logps'}, one pass" in result.stdout


def test_the_eval_data_folder_comes_from_the_flag_or_minorsft_eval_data_dir(tmp_path):
    from_env = reproduce("--dry-run", "--demo", "--output_root", str(tmp_path / "o"),
                         env={"MINORSFT_EVAL_DATA_DIR": str(BENCHMARK_FIXTURES)})
    assert from_env.returncode == 0, from_env.stderr
    assert f"# evaluation data: {BENCHMARK_FIXTURES} (from MINORSFT_EVAL_DATA_DIR)" in from_env.stdout
    for command in evaluations(from_env.stdout) + data_checks(from_env.stdout):
        assert option(command, "--data_dir") == str(BENCHMARK_FIXTURES / BENCHMARKS[option(command, "--task")][1])

    elsewhere = tmp_path / "data"
    for _, folder in BENCHMARKS.values():
        (elsewhere / folder).mkdir(parents=True)
    flag = reproduce("--dry-run", "--demo", "--output_root", str(tmp_path / "o"), "--eval_data_dir", str(elsewhere),
                     env={"MINORSFT_EVAL_DATA_DIR": str(BENCHMARK_FIXTURES)})
    assert {option(c, "--data_dir") for c in data_checks(flag.stdout)} == {str(elsewhere / f) for _, f in
                                                                           BENCHMARKS.values()}


@pytest.mark.parametrize("how", ["--eval_data_dir", "MINORSFT_EVAL_DATA_DIR"])
def test_a_wrong_eval_data_folder_stops_the_sweep_before_any_work(tmp_path, how):
    out = tmp_path / "out"
    def run(folder):
        flag = ["--eval_data_dir", str(folder)] if how == "--eval_data_dir" else []
        return reproduce("--demo", "--output_root", str(out), "--tasks", "ceval", *flag,
                         env={"MINORSFT_EVAL_DATA_DIR": str(folder)} if not flag else {})

    missing = run(tmp_path / "nowhere")
    assert missing.returncode == 2 and f"{how} {tmp_path / 'nowhere'} has no ceval-exam/ folder" in missing.stderr
    (tmp_path / "empty" / "ceval-exam").mkdir(parents=True)  # there, but without a single question
    empty = run(tmp_path / "empty")
    assert empty.returncode == 2, empty.stdout + empty.stderr
    assert "reproduce.sh: the ceval benchmark data cannot be used: " in empty.stderr
    assert "--check_data --data_dir" in empty.stderr and "exited 2" in empty.stderr
    assert not out.exists() and "Traceback" not in empty.stderr


def test_flags_override_the_grid_and_win_over_environment_variables(tmp_path):
    result = reproduce("--dry-run", "--methods", "minorsft,sft", "--sft_lrs", "1e-5", "--lrs", "2e-5",
                       "--betas", "0.04 0.16", "--gpus", "0,1", "--model", "Qwen/Qwen2-1.5B-Instruct",
                       "--tasks", "fineval", "--eval_max_samples", "50", "--output_root", str(tmp_path / "o"),
                       env={"BETAS": "0.5", "SFT_LRS": "9e-5"})
    assert result.returncode == 0, result.stderr
    runs = planned_runs(result.stdout)
    assert list(runs) == ["minorsft_lr2e-5_beta0.04", "minorsft_lr2e-5_beta0.16", "sft_lr1e-5"]
    assert "(2 per device × GA 16 × 2 GPU(s))" in runs["sft_lr1e-5"]
    evals = evaluations(result.stdout)
    assert {option(c, "--task") for c in evals} == {"fineval"} and len(evals) == 4
    assert {option(c, "--max_samples") for c in evals} == {"50"}
    assert "Qwen/Qwen2-1.5B-Instruct" in {option(c, "--model_name_or_path") for c in evals}

    from_env = reproduce("--dry-run", "--gpus", "0", env={"METHODS": "sft_dpo", "LRS": "3e-5", "BETAS": "0.1"})
    assert list(planned_runs(from_env.stdout)) == ["sft_dpo_lr3e-5_beta0.1"]


def test_lora_and_demo_modes_pick_their_recipes_and_grids(tmp_path):
    lora = reproduce("--dry-run", "--lora", "--gpus", "0", "--methods", "sft")
    assert list(planned_runs(lora.stdout)) == ["sft_lr5e-5", "sft_lr1e-4", "sft_lr2e-4", "sft_lr3e-4"]
    assert "(4 per device × GA 16 × 1 GPU(s))" in planned_runs(lora.stdout)["sft_lr1e-4"]

    out = tmp_path / "demo"
    demo = reproduce("--demo", "--dry-run", "--output_root", str(out))
    assert demo.returncode == 0, demo.stderr
    assert demo.stderr == ""  # the demo data set is in the repository
    runs = planned_runs(demo.stdout)
    assert list(runs) == ["sft_lr5e-5", "sft_dpo_lr1e-4_beta0.04", "minorsft_lr1e-4_beta0.04"]
    assert all("(4 per device × GA 1 × 1 GPU(s))" in summary for summary in runs.values())
    [prepare] = commands(demo.stdout, "minorsft demo-model")
    assert option(prepare, "--output_dir") == str(REPO_ROOT / "models" / "SmolLM2-135M-Instruct")
    evals = evaluations(demo.stdout)
    assert len(evals) == 12 and {option(c, "--max_samples") for c in evals} == {"30"}
    assert {option(c, "--template") for c in evals} == {"smollm2"}
    assert not out.exists()


def test_help_documents_every_flag_the_script_accepts():
    result = reproduce("--help")
    assert result.returncode == 0
    options = SCRIPT.read_text().split('case "$1" in', 1)[1].split("esac", 1)[0].replace("\\\n", "")
    flags = {flag.strip() for line in options.splitlines() if line.strip().startswith("-")
             for flag in line.strip().split(")", 1)[0].split("|")}
    assert {"--demo", "--dry-run", "--lora", "--set", "--output_root", "--eval_args", "-h"} <= flags
    for flag in flags - {"--dry_run"}:  # an alias of --dry-run
        assert re.search(rf"^\s+(-h, )?{re.escape(flag)}\b", result.stdout, flags=re.MULTILINE), (
            f"{flag} is not in --help"
        )


def planned_demo_yaml(tmp_path: Path, name: str, *args: str) -> dict:
    """The train.yaml that the sweep's plan writes for run ``name`` of the demo recipes."""
    staging = tmp_path / "staging"
    assert sweep.main(["--repo_root", str(REPO_ROOT), "--output_root", str(tmp_path / "out"), "--staging_dir",
                       str(staging), "--recipes", "examples/demo/{method}_smollm2.yaml", *args]) == 0
    return yaml.safe_load((staging / f"{name}.yaml").read_text())


def test_the_training_yaml_is_the_recipe_with_the_grid_point_and_overrides(tmp_path):
    config = planned_demo_yaml(tmp_path, "minorsft_lr3e-5_beta0.08", "--methods", "minorsft", "--lrs", "3e-5",
                               "--betas", "0.08", "--num_gpus", "2", "--global_batch", "16",
                               "--set", "cutoff_len=128", "--set", "max_samples=10")
    recipe = yaml.safe_load((REPO_ROOT / "examples" / "demo" / "minorsft_smollm2.yaml").read_text())
    changed = {key: value for key, value in config.items() if recipe.get(key) != value}
    expected = {
        "learning_rate": 3e-5, "pref_beta": 0.08, "gradient_accumulation_steps": 2, "cutoff_len": 128,
        "max_samples": 10, "output_dir": str(tmp_path / "out" / "minorsft_lr3e-5_beta0.08"),
        "dataset_dir": str(REPO_ROOT / "data"),
        "ref_logps_cache_dir": str(tmp_path / "out" / "ref_logps"),  # the sweep's one cache, not the recipe's
    }
    local_model = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
    if local_model.exists():  # a relative model path is made absolute only when it exists (else: a Hub id)
        expected["model_name_or_path"] = str(local_model)
    assert changed == expected and recipe["precompute_ref_logps"] is True

    # A cache directory given with --set is the user's choice and stays.
    mine = planned_demo_yaml(tmp_path, "sft_lr5e-5", "--methods", "sft", "--set", f"ref_logps_cache_dir={tmp_path}")
    assert mine["ref_logps_cache_dir"] == str(tmp_path)
    # With precomputing turned off the runs have no cache directory (LLaMA-Factory would refuse one).
    online = planned_demo_yaml(tmp_path, "sft_lr5e-5", "--methods", "sft", "--set", "precompute_ref_logps=false")
    assert online["precompute_ref_logps"] is False and "ref_logps_cache_dir" not in online


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "sft,dpo"], "--methods: unknown method `dpo` (valid: sft, sft_dpo, minorsft)"),
        (["--global_batch", "6"], "global batch 6 is not a multiple of per_device_train_batch_size 4 × 1 GPU(s)"),
        (["--betas", "0.04,-1"], "--betas: β must be > 0"),
        (["--lrs", "2e-5,fast"], "--lrs: `fast` is not a number"),
        (["--tasks", "mmlu"], "--tasks: unknown benchmark mmlu"),
        (["--gpus", "first"], "--gpus first is not a comma-separated list of GPU ids"),
        (["--dataset", "nope"], "dataset `nope` is not in"),
        (["--set", "cutoff_len"], "--set `cutoff_len` is not KEY=VALUE"),
        (["--recipes", "examples/sft_qwen2.yaml", "--methods", "minorsft"], "has `stage: sft`, expected `minorsft`"),
        (["--frobnicate"], "unknown argument --frobnicate"),
    ],
)
def test_bad_input_stops_before_any_work_with_a_clear_message(tmp_path, args, message):
    out = tmp_path / "out"
    result = reproduce("--demo", "--output_root", str(out), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not out.exists()


def test_a_missing_corpus_and_a_run_made_with_other_settings_are_refused(tmp_path):
    out = tmp_path / "out"
    result = reproduce("--gpus", "0", "--output_root", str(out))
    assert result.returncode == 2 and not out.exists()
    assert f"dataset `domain_corpus` points to {REPO_ROOT / 'data' / 'domain_corpus.json'}, which does not exist" \
        in result.stderr

    (out / "sft_lr5e-5").mkdir(parents=True)
    (out / "sft_lr5e-5" / "train.yaml").write_text("stage: sft\nlearning_rate: 5.0e-5\n")
    result = reproduce("--demo", "--output_root", str(out))
    assert result.returncode == 2
    assert f"{out / 'sft_lr5e-5' / 'train.yaml'} was written with other settings" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["sft_lr5e-5"]


def test_the_demo_data_set_is_what_its_script_generates(tmp_path):
    subprocess.run([sys.executable, str(REPO_ROOT / "data" / "make_finance_qa_demo.py"), "--output",
                    str(tmp_path / "demo.json")], check=True, capture_output=True)
    committed = (REPO_ROOT / "data" / "finance_qa_demo.json").read_text(encoding="utf-8")
    assert (tmp_path / "demo.json").read_text(encoding="utf-8") == committed
    rows = json.loads(committed)
    assert len(rows) >= 300 and len({(row["instruction"], row["input"]) for row in rows}) == len(rows)
    assert all(set(row) == {"system", "instruction", "input", "output"} and row["output"] for row in rows)
    letters = [row["output"] for row in rows if row["instruction"].endswith("答案：")]
    assert len(letters) >= 60 and set(letters) == {"A", "B", "C", "D"}
    info = json.loads((REPO_ROOT / "data" / "dataset_info.json").read_text())
    assert info["finance_qa_demo"]["file_name"] == "finance_qa_demo.json"
    assert set(info["finance_qa_demo"]["columns"].values()) == {"system", "instruction", "input", "output"}


# --- a real sweep on a tiny model: kill, re-run, resume ----------------------------------------------------


@pytest.fixture
def tiny_recipes(tmp_path, tiny_model_dir) -> Path:
    data_dir = write_sft_dataset(tmp_path / "data", "tiny_sft", num_samples=16)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for method, extra in (("sft", {"deviation_metric": True}), ("minorsft", {"pref_beta": 0.5})):
        config = {"model_name_or_path": str(tiny_model_dir), "stage": method, **extra, "precompute_ref_logps": True,
                  "do_train": True,
                  "finetuning_type": "full", "dataset": "tiny_sft", "dataset_dir": str(data_dir),
                  "template": "default", "cutoff_len": 64, "per_device_train_batch_size": 2,
                  "learning_rate": 1.0e-3, "max_steps": 4, "logging_steps": 1, "save_steps": 2,
                  "report_to": "none", "seed": 42, "dataloader_num_workers": 0, "preprocessing_num_workers": 1}
        (recipes / f"{method}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return recipes


def tiny_sweep_args(recipes: Path, out: Path, data_dir: Path) -> list:
    return ["--demo", "--recipes", str(recipes / "{method}.yaml"), "--methods", "sft minorsft",
            "--tasks", "ceval", "--eval_max_samples", "4", "--eval_data_dir", str(data_dir),
            "--output_root", str(out)]


def wait_until(condition, process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the sweep ended before the condition held"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_work(tmp_path, tiny_recipes, tiny_model_dir,
                                                             benchmark_fixtures_dir):
    out = tmp_path / "sweep"
    args = tiny_sweep_args(tiny_recipes, out, benchmark_fixtures_dir)
    first, second = out / "sft_lr0.001", out / "minorsft_lr0.001_beta0.5"

    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(["bash", str(SCRIPT), *args], stdout=log, stderr=subprocess.STDOUT,
                                   env=script_env(), start_new_session=True)
        try:
            wait_until(lambda: (first / "trainer_state.json").is_file(), process, timeout=600)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    finished_state = (first / "trainer_state.json").read_text()
    assert yaml.safe_load((first / "train.yaml").read_text())["model_name_or_path"] == str(tiny_model_dir)
    assert not (second / "trainer_state.json").exists()

    result = reproduce(*args, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"# skip training {first.name}: finished" in result.stdout
    assert (first / "trainer_state.json").read_text() == finished_state
    assert (first / "train.log").read_text().count("=== ") == 1  # launched once, by the first invocation
    assert (second / "train.log").read_text().count("=== ") == 1
    assert "Loaded reference log-probs" in (second / "train.log").read_text()  # the first run's pass

    # A second re-run has nothing left to do but the report.
    again = reproduce(*args, timeout=300)
    assert again.returncode == 0
    assert len(re.findall(r"^# skip ", again.stdout, flags=re.MULTILINE)) == 2 + 3  # two trainings, three evaluations
    assert "llamafactory-cli train" not in again.stdout and "minorsft eval" not in again.stdout

    # The report holds exactly the numbers of the runs' own outputs.
    with open(out / "report" / "results.csv", newline="") as f:
        records = {Path(row["run_dir"]).name: row for row in csv.DictReader(f)}
    assert list(records) == ["base", first.name, second.name]
    for name, record in records.items():
        results = json.loads((out / name / "eval" / "ceval" / "results.json").read_text())
        assert float(record["accuracy_ceval"]) == results["accuracy"]
        assert int(record["num_questions_ceval"]) == results["num_questions"] == 4
    for run_dir in (first, second):
        deviations = [entry["deviation"] for entry in read_log_history(run_dir) if "deviation" in entry]
        assert len(deviations) == 4 and abs(deviations[0]) < 1e-6
        assert float(records[run_dir.name]["final_train_deviation"]) == deviations[-1]
    assert records[second.name]["beta"] == "0.5" and records[first.name]["method"] == "sft"
    assert {p.name for p in (out / "report").iterdir()} == {
        "results.md",
        "results.csv",
        "settings.csv",
        "deviation.png",
        "accuracy.png",
        "drift_accuracy.png",  # no drift set: no learning_drift.png
    }


@pytest.mark.slow
def test_an_interrupted_training_continues_from_its_last_complete_checkpoint(tmp_path, tiny_recipes,
                                                                           benchmark_fixtures_dir):
    out = tmp_path / "sweep"
    args = tiny_sweep_args(tiny_recipes, out, benchmark_fixtures_dir) + ["--methods", "minorsft"]
    run_dir = out / "minorsft_lr0.001_beta0.5"
    assert reproduce(*args, timeout=900).returncode == 0
    # What a kill between the checkpoints at steps 2 and 4 leaves: checkpoint-2, and checkpoint-4 cut off
    # before its trainer_state.json was written; no final weights, no evaluation.
    for name in ("trainer_state.json", "model.safetensors", "checkpoint-4/trainer_state.json"):
        (run_dir / name).unlink()
    subprocess.run(["rm", "-rf", str(run_dir / "eval")], check=True)

    result = reproduce(*args, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"# resume {run_dir.name} from {run_dir / 'checkpoint-2'}" in result.stdout
    assert "Resuming training from checkpoint with epoch 0 and global step 2" in result.stdout
    # The resumed policy is no longer the reference: the sweep's cache holds it.
    assert f"Loaded reference log-probs of 16 samples from {out / 'ref_logps'}" in result.stdout
    history = read_log_history(run_dir)
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]
    assert (run_dir / "eval" / "ceval" / "results.json").is_file()


@pytest.mark.slow
def test_without_benchmark_data_a_sweep_trains_reports_and_pays_one_reference_pass(tmp_path, tiny_recipes):
    """A clean clone offline: no eval data folder and HF_HUB_OFFLINE=1 (conftest). Three runs on one reference
    model and data, the SFT baseline with deviation_metric among them."""
    out = tmp_path / "sweep"
    result = reproduce("--demo", "--recipes", str(tiny_recipes / "{method}.yaml"), "--methods", "sft minorsft",
                       "--betas", "0.5 1", "--output_root", str(out), timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    runs = [out / "sft_lr0.001", out / "minorsft_lr0.001_beta0.5", out / "minorsft_lr0.001_beta1"]

    # Said once, before any training, with both ways to get the data; no evaluation tried, no traceback.
    assert log.count("the benchmark data cannot be reached") == 1
    assert log.index("the benchmark data cannot be reached") < log.index("llamafactory-cli train")
    assert (
        "--eval_data_dir DIR or MINORSFT_EVAL_DATA_DIR=DIR" in log and "network access to the Hugging Face Hub" in log
    )
    assert not evaluations(result.stdout) and "Traceback" not in log and "step(s) failed" not in log

    # One reference pass for the three runs, in the sweep's cache.
    assert [path.name for path in (out / "ref_logps").iterdir()] == [
        next(path.name for path in (out / "ref_logps").glob("ref_logps-*.pt"))]
    train_logs = [(run / "train.log").read_text() for run in runs]
    assert [train_log.count("Computed reference log-probs") for train_log in train_logs] == [1, 0, 0]
    assert [train_log.count("Loaded reference log-probs") for train_log in train_logs] == [0, 1, 1]
    assert result.stdout.count("Computed reference log-probs") == 1
    for run in runs:
        assert yaml.safe_load((run / "train.yaml").read_text())["ref_logps_cache_dir"] == str(out / "ref_logps")
        assert len([e for e in read_log_history(run) if "deviation" in e]) == 4

    # The report: every run, accuracy not measured and why, the one pass and its time; the log repeats the pass.
    markdown = (out / "report" / "results.md").read_text()
    assert "**Accuracy was not measured on FinanceIQ, fineval, ceval-exam: the benchmark data could not be reached (" \
        in markdown
    assert re.search(r"^- Reference log-probs \(`precompute_ref_logps`\): 1 pass, [0-9.]+ s \([0-9.]+ s CPU\): "
                     r"sft_lr0\.001 computed them into `.*`; loaded from the cache, without a pass of their own, by "
                     r"minorsft_lr0\.001_beta0\.5, minorsft_lr0\.001_beta1\.$", markdown, flags=re.MULTILINE)
    assert re.search(r"^# Reference log-probs \(`precompute_ref_logps`\): 1 pass, ", result.stdout, flags=re.MULTILINE)
    with open(out / "report" / "results.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert [Path(r["run_dir"]).name for r in records] == ["base"] + [run.name for run in runs]
    assert all(r["accuracy_ceval"] == "" and r["best"] == "False" for r in records)
    assert all((run / "eval" / "fineval.skipped").is_file() for run in [out / "base", *runs])
