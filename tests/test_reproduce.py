"""``minorsft sweep`` (``bash reproduce.sh``): the grid it plans, its checks, resuming a real (tiny) sweep
after a kill, a sweep that cannot reach the benchmark data, the SFT variants, the --figure1 preset, the
Slurm export, and the files of the checkout that runs it. The real sweeps evaluate on the in-repository
benchmark fixtures.

The plans and dry runs run in this process (``sweep_cli``), with LLaMA-Factory's check of the training configs
stood in for: that check is a child process that imports LLaMA-Factory, and is tested on its own
(``test_a_config_that_llamafactory_refuses...``) and in every real sweep."""

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from llamafactory_minorsft import cli, sweep

from helpers import BENCHMARK_FIXTURES, REPO_ROOT, read_log_history, write_sft_dataset

SCRIPT = REPO_ROOT / "reproduce.sh"
# Environment variables the sweep reads: the tests set them explicitly or not at all.
SCRIPT_VARIABLES = (
    "DEMO",
    "DRY_RUN",
    "LORA",
    "FIGURE1",
    *(option.env for option in sweep.options.OPTIONS),
    "CUDA_VISIBLE_DEVICES",
    "MINORSFT_EVAL_DATA_DIR",
)
BENCHMARKS = {"ceval": ("val", "ceval-exam"), "financeiq": ("test", "FinanceIQ"), "fineval": ("val", "fineval")}


def script_env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in SCRIPT_VARIABLES}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # minorsft, llamafactory-cli
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def reproduce(*args, env=None, script: Path = SCRIPT, **kwargs) -> subprocess.CompletedProcess:
    """``bash reproduce.sh ARGS`` in a child process, as a user runs it."""
    return subprocess.run(
        ["bash", str(script), *args],
        check=False,
        capture_output=True,
        text=True,
        env=script_env(**(env or {})),
        timeout=kwargs.pop("timeout", 120),
        **kwargs,
    )


@dataclass
class SweepResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def sweep_cli(monkeypatch, capsys):
    """``minorsft sweep --repo_root <this checkout> ARGS`` (what reproduce.sh runs) in this process, with only the
    given environment variables of the sweep set; LLaMA-Factory's check of the configs is stood in for by one
    that records the runs it was given (``checked``) and says when, in the output, it was called."""
    checked = []

    def check(plan):
        checked.append([run.name for run in plan.runs])
        print(f"# (test) {len(plan.runs)} training config(s) handed to the check")

    monkeypatch.setattr(sweep, "check_training_configs", check)

    def run(*args: str, env: dict = None) -> SweepResult:
        for name in SCRIPT_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        try:
            returncode = cli.main(["sweep", "--repo_root", str(REPO_ROOT), *args])
        except SystemExit as error:  # argparse refusing a flag
            returncode = error.code
        out, err = capsys.readouterr()
        return SweepResult(returncode, out, err)

    run.checked = checked
    return run


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


def test_dry_run_lists_exactly_the_papers_grid_and_runs_nothing(tmp_path, sweep_cli):
    out = tmp_path / "sweep"
    result = sweep_cli("--dry-run", "--gpus", "0,1,2,3,4,5,6,7", "--output_root", str(out))
    assert result.returncode == 0, result.stderr
    runs = planned_runs(result.stdout)
    expected = [f"sft_lr{lr}" for lr in ("5e-6", "1e-5", "2e-5", "3e-5")] + [
        f"{method}_lr{lr}_beta{beta}"
        for method in ("sft_dpo", "minorsft")
        for lr in ("1e-5", "2e-5", "3e-5")
        for beta in ("0.02", "0.04", "0.08")
    ]
    assert list(runs) == expected
    # The recipes' global batch 64 = 2 per device × GA 4 × 8 GPUs, as their comments say.
    assert all("global_batch=64 (2 per device × GA 4 × 8 GPU(s))" in summary for summary in runs.values())
    assert runs["minorsft_lr2e-5_beta0.04"].startswith("stage=minorsft learning_rate=2e-5 pref_beta=0.04 ")

    trains = commands(result.stdout, "llamafactory-cli train")
    assert [command[-1] for command in trains] == [str(out / name / "train.yaml") for name in expected]
    assert all(command[:2] == ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7"] for command in trains)

    # The data of each benchmark is checked before any training; no data folder given: the Hub's.
    checks = data_checks(result.stdout)
    assert [(option(c, "--task"), option(c, "--split")) for c in checks] == [
        ("ceval", "val"),
        ("financeiq", "test"),
        ("fineval", "val"),
    ]
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
        str(out / name) for name in expected
    }
    assert {
        option(c, "--output_dir") for c in evals if option(c, "--model_name_or_path") == str(out / "sft_lr1e-5")
    } == {str(out / "sft_lr1e-5" / "eval" / task) for task in BENCHMARKS}

    [report] = commands(result.stdout, "minorsft report")
    assert report[report.index("report") + 1 : -3] == [str(out / "base")] + [str(out / name) for name in expected]
    assert report[-3:] == ["--output_dir", str(out / "report"), "--overwrite"]  # a resumed sweep rewrites it
    assert not out.exists()
    assert "domain_corpus.json, which does not exist" in result.stderr  # a warning under --dry-run
    # Every run's config goes to LLaMA-Factory's argument parsing before anything else.
    assert sweep_cli.checked == [expected]
    assert result.stdout.index("# (test) 22 training config(s) handed to the check") < result.stdout.index(
        "--check_data"
    )
    assert f"# reference log-probs: cached in {out / 'ref_logps'}, one pass" in result.stdout


def test_the_eval_data_folder_comes_from_the_flag_or_minorsft_eval_data_dir(tmp_path, sweep_cli):
    from_env = sweep_cli(
        "--dry-run",
        "--demo",
        "--output_root",
        str(tmp_path / "o"),
        env={"MINORSFT_EVAL_DATA_DIR": str(BENCHMARK_FIXTURES)},
    )
    assert from_env.returncode == 0, from_env.stderr
    assert f"# evaluation data: {BENCHMARK_FIXTURES} (from MINORSFT_EVAL_DATA_DIR)" in from_env.stdout
    for command in evaluations(from_env.stdout) + data_checks(from_env.stdout):
        assert option(command, "--data_dir") == str(BENCHMARK_FIXTURES / BENCHMARKS[option(command, "--task")][1])

    elsewhere = tmp_path / "data"
    for _, folder in BENCHMARKS.values():
        (elsewhere / folder).mkdir(parents=True)
    flag = sweep_cli(
        "--dry-run",
        "--demo",
        "--output_root",
        str(tmp_path / "o"),
        "--eval_data_dir",
        str(elsewhere),
        env={"MINORSFT_EVAL_DATA_DIR": str(BENCHMARK_FIXTURES)},
    )
    assert {option(c, "--data_dir") for c in data_checks(flag.stdout)} == {
        str(elsewhere / f) for _, f in BENCHMARKS.values()
    }


@pytest.mark.parametrize("how", ["--eval_data_dir", "MINORSFT_EVAL_DATA_DIR"])
def test_a_wrong_eval_data_folder_stops_the_sweep_before_any_work(tmp_path, sweep_cli, how):
    out = tmp_path / "out"

    def run(folder):
        flag = ["--eval_data_dir", str(folder)] if how == "--eval_data_dir" else []
        return sweep_cli(
            "--demo",
            "--output_root",
            str(out),
            "--tasks",
            "ceval",
            *flag,
            env={"MINORSFT_EVAL_DATA_DIR": str(folder)} if not flag else {},
        )

    missing = run(tmp_path / "nowhere")
    assert missing.returncode == 2 and f"{how} {tmp_path / 'nowhere'} has no ceval-exam/ folder" in missing.stderr
    (tmp_path / "empty" / "ceval-exam").mkdir(parents=True)  # there, but without a single question
    empty = run(tmp_path / "empty")
    assert empty.returncode == 2, empty.stdout + empty.stderr
    assert "minorsft sweep: the ceval benchmark data cannot be used: " in empty.stderr
    assert "--check_data --data_dir" in empty.stderr and "exited 2" in empty.stderr
    assert not out.exists() and "Traceback" not in empty.stderr


def test_flags_override_the_grid_and_win_over_environment_variables(tmp_path, sweep_cli):
    result = sweep_cli(
        "--dry-run",
        "--methods",
        "minorsft,sft",
        "--sft_lrs",
        "1e-5",
        "--lrs",
        "2e-5",
        "--betas",
        "0.04 0.16",
        "--gpus",
        "0,1",
        "--model",
        "Qwen/Qwen2-1.5B-Instruct",
        "--tasks",
        "fineval",
        "--eval_max_samples",
        "50",
        "--output_root",
        str(tmp_path / "o"),
        env={"BETAS": "0.5", "SFT_LRS": "9e-5"},
    )
    assert result.returncode == 0, result.stderr
    runs = planned_runs(result.stdout)
    assert list(runs) == ["minorsft_lr2e-5_beta0.04", "minorsft_lr2e-5_beta0.16", "sft_lr1e-5"]
    assert "(2 per device × GA 16 × 2 GPU(s))" in runs["sft_lr1e-5"]
    evals = evaluations(result.stdout)
    assert {option(c, "--task") for c in evals} == {"fineval"} and len(evals) == 4
    assert {option(c, "--max_samples") for c in evals} == {"50"}
    assert "Qwen/Qwen2-1.5B-Instruct" in {option(c, "--model_name_or_path") for c in evals}

    from_env = sweep_cli("--dry-run", "--gpus", "0", env={"METHODS": "sft_dpo", "LRS": "3e-5", "BETAS": "0.1"})
    assert list(planned_runs(from_env.stdout)) == ["sft_dpo_lr3e-5_beta0.1"]


def test_lora_and_demo_modes_pick_their_recipes_and_grids(tmp_path, sweep_cli):
    lora = sweep_cli("--dry-run", "--lora", "--gpus", "0", "--methods", "sft", "--output_root", str(tmp_path / "lora"))
    assert list(planned_runs(lora.stdout)) == ["sft_lr5e-5", "sft_lr1e-4", "sft_lr2e-4", "sft_lr3e-4"]
    assert not (tmp_path / "lora").exists()
    assert "(4 per device × GA 16 × 1 GPU(s))" in planned_runs(lora.stdout)["sft_lr1e-4"]

    out = tmp_path / "demo"
    demo = sweep_cli("--demo", "--dry-run", "--output_root", str(out))
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


def sweep_flags() -> set:
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    return {flag for action in parser._actions for flag in action.option_strings}


def test_help_and_the_readmes_document_every_flag():
    result = reproduce("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: minorsft sweep")
    flags = sweep_flags()
    assert {
        "--demo",
        "--figure1",
        "--dry-run",
        "--dry_run",
        "--lora",
        "--set",
        "--seeds",
        "--asft_alphas",
        "--slurm_dir",
        "--run_index",
    } <= flags
    text = " ".join(result.stdout.split())
    for option in sweep.options.OPTIONS:  # each option's variable and its defaults, as the preset table has them
        assert f"[{option.env}; default " in text, option.name
    lrs = "[LRS; default 1e-5 2e-5 3e-5, --lora: 1e-4 2e-4 3e-4, --demo: the recipe's, --figure1: 5e-5 1e-4"
    assert lrs + ", --figure1_full: 5e-5 1e-4]" in text
    # docs/sweep.md and examples/README.md name every flag users type (not the Slurm jobs' own).
    docs = (REPO_ROOT / "docs" / "sweep.md").read_text() + (REPO_ROOT / "examples" / "README.md").read_text()
    for flag in flags - {"-h", "--help", "--dry_run", "--plan", "--run_index", "--job"}:
        assert re.search(rf"`[^`]*{re.escape(flag)}\b", docs), f"{flag} is not in docs/sweep.md"


@pytest.fixture
def plan_of(monkeypatch):
    """The plan that `minorsft sweep --repo_root REPO_ROOT ARGS` runs, built in-process (without LLaMA-Factory's
    check); by default this checkout, as its reproduce.sh passes it; ``repo_root=None``: no --repo_root."""
    for name in SCRIPT_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def plan(*args: str, repo_root: Path | None = REPO_ROOT) -> sweep.plan.Plan:
        parser = argparse.ArgumentParser()
        sweep.add_arguments(parser)
        arguments = parser.parse_args((["--repo_root", str(repo_root)] if repo_root else []) + list(args))
        return sweep.plan.build_plan(sweep.options.resolve_settings(arguments))

    return plan


def planned_demo_yaml(plan_of, tmp_path: Path, name: str, *args: str) -> dict:
    """The train.yaml that the sweep writes for run ``name`` of the demo recipes."""
    plan = plan_of("--demo", "--output_root", str(tmp_path / "out"), *args)
    [run] = [run for run in plan.runs if run.name == name]
    return yaml.safe_load(run.train_yaml)


def test_the_training_yaml_is_the_recipe_with_the_grid_point_and_overrides(tmp_path, plan_of):
    config = planned_demo_yaml(
        plan_of,
        tmp_path,
        "minorsft_lr3e-5_beta0.08",
        "--methods",
        "minorsft",
        "--lrs",
        "3e-5",
        "--betas",
        "0.08",
        "--gpus",
        "0,1",
        "--global_batch",
        "16",
        "--set",
        "cutoff_len=128",
        "--set",
        "max_samples=10",
    )
    recipe = yaml.safe_load((REPO_ROOT / "examples" / "demo" / "minorsft_smollm2.yaml").read_text())
    changed = {key: value for key, value in config.items() if recipe.get(key) != value}
    expected = {
        "learning_rate": 3e-5,
        "pref_beta": 0.08,
        "gradient_accumulation_steps": 2,
        "cutoff_len": 128,
        "max_samples": 10,
        "output_dir": str(tmp_path / "out" / "minorsft_lr3e-5_beta0.08"),
        "dataset_dir": str(REPO_ROOT / "data"),
        "ref_logps_cache_dir": str(tmp_path / "out" / "ref_logps"),  # the sweep's one cache, not the recipe's
        # --demo trains the model it prepares, at its absolute path, whether or not it is there yet.
        "model_name_or_path": str(REPO_ROOT / "models" / "SmolLM2-135M-Instruct"),
    }
    assert changed == expected and recipe["precompute_ref_logps"] is True

    # A cache directory given with --set is the user's choice and stays.
    mine = planned_demo_yaml(
        plan_of, tmp_path, "sft_lr5e-5", "--methods", "sft", "--set", f"ref_logps_cache_dir={tmp_path}"
    )
    assert mine["ref_logps_cache_dir"] == str(tmp_path)
    # With precomputing turned off the runs have no cache directory (LLaMA-Factory would refuse one).
    online = planned_demo_yaml(
        plan_of, tmp_path, "sft_lr5e-5", "--methods", "sft", "--set", "precompute_ref_logps=false"
    )
    assert online["precompute_ref_logps"] is False and "ref_logps_cache_dir" not in online


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--methods", "sft,ppo"],
            "--methods: unknown method `ppo` (valid: sft, sft_dpo, minorsft, sft_sample, dft, asft, eaft, dpo, "
            "minor_dpo, or all, baselines, preference)",
        ),
        (["--lrs", "1e-5,abc"], "--lrs: `abc` is not a number"),
        (["--betas", "x"], "--betas: `x` is not a number"),
        (["--asft_alphas", "0.1 strong", "--methods", "asft"], "--asft_alphas: `strong` is not a number"),
        (["--seeds", "1.5"], "--seeds: `1.5` is not an integer"),
        (["--figure1"], "--demo and --figure1: choose one mode"),
        (["--run_index", "0"], "--run_index needs --plan"),
        (["--global_batch", "6"], "global batch 6 is not a multiple of per_device_train_batch_size 4 × 1 GPU(s)"),
        (["--betas", "0.04,-1"], "--betas: β must be finite and > 0"),
        (["--sft_dpo_betas", "inf"], "--sft_dpo_betas: β must be finite and > 0"),
        (["--lrs", "2e-5,fast"], "--lrs: `fast` is not a number"),
        (["--tasks", "mmlu"], "--tasks: unknown benchmark mmlu"),
        (["--gpus", "first"], "--gpus first is not a comma-separated list of GPU ids"),
        (["--dataset", "nope"], "dataset `nope` is not in"),
        (["--set", "cutoff_len"], "--set `cutoff_len` is not KEY=VALUE"),
        (["--recipes", "examples/sft_qwen2.yaml", "--methods", "minorsft"], "has `stage: sft`, expected `minorsft`"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_input_stops_before_any_work_with_a_clear_message(tmp_path, sweep_cli, args, message):
    out = tmp_path / "out"
    result = sweep_cli("--demo", "--output_root", str(out), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not out.exists()


def test_a_missing_corpus_and_a_run_made_with_other_settings_are_refused(tmp_path, sweep_cli):
    out = tmp_path / "out"
    result = sweep_cli("--gpus", "0", "--output_root", str(out))
    assert result.returncode == 2 and not out.exists()
    assert (
        f"dataset `domain_corpus` points to {REPO_ROOT / 'data' / 'domain_corpus.json'}, which does not exist"
        in result.stderr
    )

    (out / "sft_lr5e-5").mkdir(parents=True)
    (out / "sft_lr5e-5" / "train.yaml").write_text("stage: sft\nlearning_rate: 5.0e-5\n")
    result = sweep_cli("--demo", "--output_root", str(out))
    assert result.returncode == 2
    assert f"{out / 'sft_lr5e-5' / 'train.yaml'} was written with other settings" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["sft_lr5e-5"]


def test_the_demo_data_set_is_what_its_script_generates(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "data" / "make_finance_qa_demo.py"), "--output", str(tmp_path / "demo.json")],
        check=True,
        capture_output=True,
    )
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


def test_the_demo_model_goes_with_the_demo_recipes_only(tmp_path, plan_of):
    demo = plan_of("--demo", "--output_root", str(tmp_path / "out"))
    assert demo.base_model == str(REPO_ROOT / "models" / "SmolLM2-135M-Instruct")
    assert [step.what for step in demo.prepare] == ["the demo model"]
    own = plan_of(
        "--demo",
        "--recipes",
        "examples/{method}_qwen2.yaml",
        "--dataset",
        "finance_qa_demo",
        "--output_root",
        str(tmp_path / "out"),
    )
    assert own.base_model == "Qwen/Qwen2-7B-Instruct" and own.prepare == []
    assert {run.config["model_name_or_path"] for run in own.runs} == {"Qwen/Qwen2-7B-Instruct"}


def test_the_recipes_data_models_and_outputs_are_the_repository_roots(tmp_path, plan_of, monkeypatch):
    """--repo_root (reproduce.sh: its own folder), else the current folder: the preset's recipes, their relative
    paths, the model it prepares and the default output root are there; paths typed by the user are not."""
    other = tmp_path / "checkout"
    for folder in ("examples/demo", "data"):
        (other / folder).mkdir(parents=True)
    for recipe in (REPO_ROOT / "examples" / "demo").glob("*_smollm2.yaml"):
        (other / "examples" / "demo" / recipe.name).write_text(recipe.read_text())
    write_sft_dataset(other / "data", "finance_qa_demo")
    from_flag = plan_of("--demo", repo_root=other)
    monkeypatch.chdir(other)
    started_there = plan_of("--demo", repo_root=None)
    for plan in (from_flag, started_there):
        assert plan.output_root == str(other / "saves" / "demo")
        assert plan.base_model == str(other / "models" / "SmolLM2-135M-Instruct")
        assert plan.prepare[0].command[-1] == plan.base_model
        for run in plan.runs:
            assert run.recipe == str(other / "examples" / "demo" / f"{run.config['stage']}_smollm2.yaml")
            assert run.config["dataset_dir"] == str(other / "data")
            assert run.config["output_dir"] == str(other / "saves" / "demo" / run.name)
    # A path typed on the command line is the user's, relative to the current folder.
    monkeypatch.chdir(tmp_path)
    typed = plan_of("--demo", "--output_root", "mine", "--methods", "sft", repo_root=other)
    assert typed.output_root == str(tmp_path / "mine")
    with pytest.raises(sweep.options.UsageError, match=f"--repo_root {tmp_path / 'gone'}: no such file or folder"):
        plan_of("--demo", repo_root=tmp_path / "gone")


def test_the_sft_variants_train_from_the_sft_recipe_with_their_flags_over_their_grids(tmp_path, plan_of):
    plan = plan_of(
        "--demo",
        "--methods",
        "baselines,sft",
        "--sft_lrs",
        "1e-5 2e-5",
        "--asft_alphas",
        "0.05,0.1",
        "--seeds",
        "1 2",
        "--output_root",
        str(tmp_path / "out"),
    )
    names = [run.name for run in plan.runs]
    assert names == [f"dft_lr{lr}_seed{seed}" for lr in ("1e-5", "2e-5") for seed in (1, 2)] + [
        f"asft_lr{lr}_alpha{alpha}_seed{seed}"
        for lr in ("1e-5", "2e-5")
        for alpha in ("0.05", "0.1")
        for seed in (1, 2)
    ] + [f"eaft_lr{lr}_alpha1_seed{seed}" for lr in ("1e-5", "2e-5") for seed in (1, 2)] + [
        f"sft_lr{lr}_seed{seed}" for lr in ("1e-5", "2e-5") for seed in (1, 2)
    ]
    recipe = yaml.safe_load((REPO_ROOT / "examples" / "demo" / "sft_smollm2.yaml").read_text())
    by_name = {run.name: yaml.safe_load(run.train_yaml) for run in plan.runs}
    config = by_name["asft_lr2e-5_alpha0.05_seed2"]
    changed = {key: value for key, value in config.items() if recipe.get(key) != value}
    assert {key: changed[key] for key in ("use_asft_loss", "asft_alpha", "learning_rate", "seed")} == {
        "use_asft_loss": True,
        "asft_alpha": 0.05,
        "learning_rate": 2e-5,
        "seed": 2,
    }
    assert set(changed) - {"use_asft_loss", "asft_alpha", "learning_rate", "seed"} <= {
        "output_dir",
        "dataset_dir",
        "ref_logps_cache_dir",
        "model_name_or_path",
    }  # as for every run
    assert config["stage"] == "sft" and config["deviation_metric"] is True
    eaft = by_name["eaft_lr1e-5_alpha1_seed1"]
    assert eaft["use_eaft_loss"] is True and eaft["eaft_alpha"] == 1.0 and eaft["deviation_metric"] is True
    assert by_name["dft_lr1e-5_seed1"]["use_dft_loss"] is True and "dft_alpha" not in by_name["dft_lr1e-5_seed1"]
    assert not any(key.startswith("use_") for key in by_name["sft_lr1e-5_seed1"])
    # Without --seeds the names stay the paper's and the recipe's seed stays.
    [run] = plan_of("--demo", "--methods", "dft", "--output_root", str(tmp_path / "out")).runs
    assert run.name == "dft_lr5e-5" and run.config["seed"] == recipe["seed"]


def test_a_config_that_llamafactory_refuses_stops_the_sweep_naming_the_run_and_the_key(tmp_path, capsys, monkeypatch):
    """The real check: LLaMA-Factory's argument parsing and the plugin's checks, in a child process."""
    for name in SCRIPT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    arguments = ["--lora", "--methods", "sft,asft", "--sft_lrs", "1e-4", "--gpus", "0", "--dataset", "finance_qa_demo"]
    returncode = cli.main(["sweep", "--repo_root", str(REPO_ROOT), *arguments, "--output_root", str(out)])
    stdout, stderr = capsys.readouterr()
    assert returncode == 2, stdout + stderr
    assert "LLaMA-Factory refuses the training config of 1 of the 2 run(s):" in stderr
    assert re.search(
        r"run asft_lr1e-4_alpha0\.1 \(.*examples/sft_qwen2_lora\.yaml with the sweep's settings\): "
        r"`use_asft_loss: true` with `finetuning_type: lora` needs `ref_model`",
        stderr,
    )
    assert "llamafactory-cli train" not in stdout and not out.exists()


def test_the_figure1_presets_plan_the_core_grid_of_each_regime(tmp_path, sweep_cli):
    out = tmp_path / "figure1"
    result = sweep_cli("--figure1", "--dry-run", "--output_root", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    runs = planned_runs(result.stdout)
    # The cheap regime: SFT at 1x, Eq. 5 at 1x and 2x, MinorSFT at 1x and 2x at beta 0.04 and 0.1, SFT using DPO
    # at 1x and 2x at beta 0.04 only (--sft_dpo_betas), two seeds each.
    expected = [
        f"{name}_seed{seed}"
        for name in (
            "sft_lr5e-5",
            "sft_sample_lr5e-5",
            "sft_sample_lr1e-4",
            "minorsft_lr5e-5_beta0.04",
            "minorsft_lr5e-5_beta0.1",
            "minorsft_lr1e-4_beta0.04",
            "minorsft_lr1e-4_beta0.1",
            "sft_dpo_lr5e-5_beta0.04",
            "sft_dpo_lr1e-4_beta0.04",
        )
        for seed in (1, 2)
    ]
    assert sorted(runs) == sorted(expected) and len(runs) == 18
    trains = commands(result.stdout, "llamafactory-cli train")
    assert len(trains) == 18
    model = str(REPO_ROOT / "models" / "SmolLM2-135M-Instruct-float32")
    [prepare] = commands(result.stdout, "minorsft demo-model")
    assert option(prepare, "--output_dir") == model and option(prepare, "--dtype") == "float32"
    # The drift set is committed: nothing is sampled at run time.
    assert (REPO_ROOT / "data" / "smollm2_general_drift.json").is_file()
    assert not commands(result.stdout, "minorsft drift-set")
    # The paper-like regime: full fine-tuning of the bf16 model, beta 0.04 only, two seeds.
    full = sweep_cli("--figure1_full", "--dry-run", "--output_root", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    assert sorted(planned_runs(full.stdout)) == sorted(
        f"{name}_seed{seed}"
        for name in (
            "sft_lr5e-5",
            "sft_sample_lr5e-5",
            "sft_sample_lr1e-4",
            "minorsft_lr5e-5_beta0.04",
            "minorsft_lr1e-4_beta0.04",
            "sft_dpo_lr5e-5_beta0.04",
            "sft_dpo_lr1e-4_beta0.04",
        )
        for seed in (1, 2)
    )
    [prepare] = commands(full.stdout, "minorsft demo-model")
    assert option(prepare, "--output_dir") == str(REPO_ROOT / "models" / "SmolLM2-135M-Instruct")
    # No benchmark (`--tasks none`): no data check, no evaluation.
    assert not evaluations(result.stdout) and "--check_data" not in result.stdout
    assert "benchmarks: none (--tasks none)" in result.stdout and "# evaluation data" not in result.stdout
    assert not out.exists()
    # With a benchmark asked for, the same plan evaluates every run and the base model on it.
    with_benchmark = sweep_cli("--figure1", "--dry-run", "--tasks", "financeiq", "--output_root", str(out))
    evals = evaluations(with_benchmark.stdout)
    assert {option(c, "--task") for c in evals} == {"financeiq"} and len(evals) == 19
    # A flag still wins over the preset.
    fewer = sweep_cli(
        "--figure1",
        "--dry-run",
        "--lrs",
        "2e-4",
        "--betas",
        "0.04",
        "--seeds",
        "",
        "--methods",
        "minorsft",
        "--output_root",
        str(out),
    )
    assert list(planned_runs(fewer.stdout)) == ["minorsft_lr2e-4_beta0.04"]


# --- the Slurm export -------------------------------------------------------------------------------------------


def test_a_slurm_export_into_a_non_empty_folder_is_refused_and_a_dry_run_writes_nothing(tmp_path, sweep_cli):
    slurm_dir = tmp_path / "slurm"
    slurm_dir.mkdir()
    (slurm_dir / "earlier.sbatch").write_text("kept")
    refused = sweep_cli("--demo", "--slurm_dir", str(slurm_dir), "--output_root", str(tmp_path / "out"))
    assert refused.returncode == 2
    assert f"--slurm_dir {slurm_dir} exists and is not an empty folder; pick a new or empty one" in refused.stderr
    assert [p.name for p in slurm_dir.iterdir()] == ["earlier.sbatch"] and not (tmp_path / "out").exists()

    dry = sweep_cli(
        "--demo",
        "--dry-run",
        "--slurm_dir",
        str(tmp_path / "new"),
        "--output_root",
        str(tmp_path / "out"),
        "--eval_data_dir",
        str(BENCHMARK_FIXTURES),
    )
    assert dry.returncode == 0, dry.stderr
    assert f"# would write {tmp_path / 'new' / 'train_eval.sbatch'}:" in dry.stdout
    assert "#SBATCH --array=0-2" in dry.stdout
    assert not (tmp_path / "new").exists() and not (tmp_path / "out").exists()


def test_the_slurm_export_writes_one_array_task_per_run_and_submits_the_jobs_in_order(tmp_path, sweep_cli):
    slurm_dir, out = tmp_path / "slurm", tmp_path / "out"
    header = tmp_path / "cluster.sbatch"
    header.write_text("#SBATCH --partition=gpu\n#SBATCH --account=lab\n")
    result = sweep_cli(
        "--demo",
        "--methods",
        "sft,minorsft",
        "--gpus",
        "0,1",
        "--global_batch",
        "8",
        "--eval_data_dir",
        str(BENCHMARK_FIXTURES),
        "--slurm_dir",
        str(slurm_dir),
        "--slurm_header",
        str(header),
        "--output_root",
        str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in slurm_dir.iterdir()) == [
        "README.txt",
        "base.sbatch",
        "logs",
        "plan.json",
        "prepare.sbatch",
        "report.sbatch",
        "submit.sh",
        "train_eval.sbatch",
    ]
    assert not out.exists()  # nothing run
    array = (slurm_dir / "train_eval.sbatch").read_text()
    assert "#SBATCH --array=0-1\n" in array and "#SBATCH --gres=gpu:2\n" in array
    assert f"#SBATCH --output={slurm_dir}/logs/train_eval-%A_%a.out" in array
    assert "#SBATCH --partition=gpu\n#SBATCH --account=lab\n" in array
    assert f'--plan {slurm_dir}/plan.json --run_index "$SLURM_ARRAY_TASK_ID"' in array
    assert "--gres" not in (slurm_dir / "report.sbatch").read_text()
    text = (slurm_dir / "plan.json").read_text()
    assert sweep.plan.Plan.from_json(text).to_json() + "\n" == text  # the jobs read back the plan that was written
    plan = json.loads(text)
    assert [run["name"] for run in plan["runs"]] == ["sft_lr5e-5", "minorsft_lr1e-4_beta0.04"]
    assert plan["launch"] == [] and plan["num_gpus"] == 2  # the job's GPUs are the ones Slurm allocates
    assert plan["runs"][0]["config"]["gradient_accumulation_steps"] == 1  # 8 = 4 per device × 1 × 2 GPUs

    # submit.sh with an sbatch that records what it is asked (there is no Slurm here).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        '#!/bin/bash\necho "$*" >>"$SBATCH_CALLS"\necho "$((100 + $(wc -l <"$SBATCH_CALLS")));cluster"\n'
    )
    (bin_dir / "sbatch").chmod(0o755)
    calls = tmp_path / "calls"
    submitted = subprocess.run(
        ["bash", str(slurm_dir / "submit.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_CALLS": str(calls)},
        check=True,
    )
    assert calls.read_text().splitlines() == [
        f"--parsable {slurm_dir}/prepare.sbatch",
        f"--parsable --dependency=afterok:101 {slurm_dir}/base.sbatch",
        f"--parsable --dependency=afterok:101 {slurm_dir}/train_eval.sbatch",
        f"--parsable --dependency=afterany:103:102 {slurm_dir}/report.sbatch",
    ]
    assert "2 run(s) as array 103, report 104" in submitted.stdout


# --- a real sweep on a tiny model: kill, re-run, resume ----------------------------------------------------


def write_tiny_recipes(recipes: Path, model_dir: Path, dataset_dir) -> Path:
    """The tests' recipes: SFT (with the deviation) and MinorSFT on the tiny model, 4 steps, a checkpoint every 2,
    precomputed reference log-probs. ``dataset_dir`` as the recipe says it (relative ones are the repository's)."""
    recipes.mkdir(parents=True)
    for method, extra in (("sft", {"deviation_metric": True}), ("minorsft", {"pref_beta": 0.5})):
        config = {
            "model_name_or_path": str(model_dir),
            "stage": method,
            **extra,
            "precompute_ref_logps": True,
            "do_train": True,
            "finetuning_type": "full",
            "dataset": "tiny_sft",
            "dataset_dir": str(dataset_dir),
            "template": "default",
            "cutoff_len": 64,
            "per_device_train_batch_size": 2,
            "learning_rate": 1.0e-3,
            "max_steps": 4,
            "logging_steps": 1,
            "save_steps": 2,
            "report_to": "none",
            "seed": 42,
            "dataloader_num_workers": 0,
            "preprocessing_num_workers": 1,
        }
        (recipes / f"{method}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return recipes


@pytest.fixture
def tiny_recipes(tmp_path, tiny_model_dir) -> Path:
    data_dir = write_sft_dataset(tmp_path / "data", "tiny_sft", num_samples=16)
    return write_tiny_recipes(tmp_path / "recipes", tiny_model_dir, data_dir)


def tiny_sweep_args(recipes: Path, out: Path, data_dir: Path) -> list:
    return [
        "--demo",
        "--recipes",
        str(recipes / "{method}.yaml"),
        "--methods",
        "sft minorsft",
        "--tasks",
        "ceval",
        "--eval_max_samples",
        "4",
        "--eval_data_dir",
        str(data_dir),
        "--output_root",
        str(out),
    ]


def wait_until(condition, process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the sweep ended before the condition held"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_work(
    tmp_path, tiny_recipes, tiny_model_dir, benchmark_fixtures_dir, sweep_cli
):
    """One tiny sweep, re-run after what can stop one: a kill (finished work is kept, the rest done), nothing
    (only the report), a training cut off between two checkpoints (it resumes from the last complete one)
    together with failing evaluations (reported at the end; the sweep goes on). The first two runs are reproduce.sh's;
    the later ones, whose configs LLaMA-Factory has checked by then, run in this process (``sweep_cli``)."""
    out = tmp_path / "sweep"
    args = tiny_sweep_args(tiny_recipes, out, benchmark_fixtures_dir)
    first, second = out / "sft_lr0.001", out / "minorsft_lr0.001_beta0.5"

    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(
            ["bash", str(SCRIPT), *args], stdout=log, stderr=subprocess.STDOUT, env=script_env(), start_new_session=True
        )
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

    # A second re-run has nothing left to do but the report (what it would run: --dry-run).
    again = sweep_cli("--dry-run", *args)
    assert again.returncode == 0
    assert len(re.findall(r"^# skip ", again.stdout, flags=re.MULTILINE)) == 2 + 3  # two trainings, three evaluations
    assert "llamafactory-cli train" not in again.stdout and not evaluations(again.stdout)
    assert len(commands(again.stdout, "minorsft report")) == 1

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
    # The first run made the reference pass, the second loaded it (their run records): one pass, in the sweep's
    # cache, which the report and the sweep's last line say.
    assert (records[first.name]["reference_passes"], records[second.name]["reference_loads"]) == ("1", "1")
    [cache_file] = (out / "ref_logps").iterdir()
    for run_dir in (first, second):
        assert yaml.safe_load((run_dir / "train.yaml").read_text())["ref_logps_cache_dir"] == str(out / "ref_logps")
    seconds = json.loads((first / "minorsft_run.json").read_text())["reference"]["seconds"]
    note = re.search(
        r"^- (Reference log-probs \(`precompute_ref_logps`\): 1 pass, ([0-9.]+) s \([0-9.]+ s CPU\): "
        rf"{first.name.replace('.', '[.]')} computed them into `{re.escape(str(cache_file))}`; loaded from the cache, "
        rf"without a pass of their own, by {second.name.replace('.', '[.]')}\.)$",
        (out / "report" / "results.md").read_text(),
        flags=re.MULTILINE,
    )
    assert note and note[2] == f"{seconds:.1f}"
    assert f"\n# {note[1]}\n" in result.stdout
    assert {p.name for p in (out / "report").iterdir()} == {
        "results.md",
        "results.csv",
        "settings.csv",
        "deviation.png",
        "accuracy.png",
        "drift_accuracy.png",  # no drift set: no learning_drift.png
    }

    # A kill between the checkpoints at steps 2 and 4 leaves checkpoint-2, and checkpoint-4 cut off before its
    # trainer_state.json was written; no final weights, no evaluation. The re-run resumes it from checkpoint-2.
    # Its evaluations fail (a prompt file that is not there): that of base, redone first, and the resumed run's.
    # Both are said at the end, after the steps that follow them ran: the training, the next evaluation, the report.
    for name in ("trainer_state.json", "model.safetensors", "checkpoint-4/trainer_state.json"):
        (second / name).unlink()
    shutil.rmtree(second / "eval")
    shutil.rmtree(out / "base" / "eval" / "ceval")
    shutil.rmtree(out / "report")
    result = sweep_cli(*args, "--eval_args", "--prompt /nowhere/prompt.txt")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"# resume {second.name} from {second / 'checkpoint-2'}" in result.stdout
    assert "Resuming training from checkpoint with epoch 0 and global step 2" in result.stdout
    # The resumed policy is no longer the reference: the sweep's cache holds it.
    assert f"Loaded reference log-probs of 16 samples from {out / 'ref_logps'}" in result.stdout
    assert [entry["step"] for entry in read_log_history(second) if "loss" in entry] == [1, 2, 3, 4]
    assert (second / "trainer_state.json").is_file()
    assert "# minorsft sweep: 2 step(s) failed; re-run the same command to retry them:" in result.stdout
    assert f"#   evaluation of base on ceval (log: {out / 'base' / 'eval' / 'ceval.log'})" in result.stdout
    assert f"#   evaluation of {second.name} on ceval (log: {second / 'eval' / 'ceval.log'})" in result.stdout
    assert "/nowhere/prompt.txt" in (second / "eval" / "ceval.log").read_text()
    assert (first / "eval" / "ceval" / "results.json").is_file()  # finished: not evaluated again
    assert (out / "report" / "results.md").is_file()  # the report still ran


def snapshot(root: Path) -> dict:
    """{path: (size, mtime)} of every file under ``root`` but Git's, the virtual environment's and the tools' caches."""
    files = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [
            name for name in subfolders if name not in (".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache")
        ]
        for name in names:
            stat = os.lstat(os.path.join(folder, name))
            files[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.mark.slow
def test_a_second_clone_sweeps_its_own_files_and_without_benchmark_data_trains_and_reports(tmp_path, tiny_model_dir):
    """A second clone, run with this checkout's Python, whose plugin is installed from this checkout: the clone's
    reproduce.sh reads the clone's recipes and data and writes into the clone; nothing of this checkout changes.

    Offline as a clean clone may be: no eval data folder and HF_HUB_OFFLINE=1 (conftest). One run, the SFT
    baseline with deviation_metric, its reference pass in the sweep's cache (a second run loading it:
    test_a_killed_sweep_resumes_without_redoing_finished_work)."""
    import llamafactory_minorsft

    assert Path(llamafactory_minorsft.__file__).resolve().is_relative_to(REPO_ROOT)  # the premise: installed from here
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
    write_sft_dataset(clone / "data", "tiny_sft", num_samples=16)  # beside the clone's own datasets
    write_tiny_recipes(clone / "examples" / "tiny", tiny_model_dir, "data")  # `dataset_dir: data`, the clone's
    before = snapshot(REPO_ROOT)
    result = reproduce(
        "--demo",
        "--recipes",
        "examples/tiny/{method}.yaml",
        "--methods",
        "sft",
        script=clone / "reproduce.sh",
        cwd=clone,
        timeout=900,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert snapshot(REPO_ROOT) == before
    out = clone / "saves" / "demo"  # the --demo preset's output root, in the clone
    run = out / "sft_lr0.001"
    config = yaml.safe_load((run / "train.yaml").read_text())
    assert config["dataset_dir"] == str(clone / "data") and config["output_dir"] == str(run)

    # LLaMA-Factory checked the run's config before any work (the in-process tests stand in for that check).
    checked = "# checked the 1 training config(s) with LLaMA-Factory's argument parsing and the plugin's checks"
    assert result.stdout.index(checked) < result.stdout.index("llamafactory-cli train")

    # Said once, before any training, with both ways to get the data; no evaluation tried, no traceback.
    assert log.count("the benchmark data cannot be reached") == 1
    assert log.index("the benchmark data cannot be reached") < log.index("llamafactory-cli train")
    assert (
        "--eval_data_dir DIR or MINORSFT_EVAL_DATA_DIR=DIR" in log and "network access to the Hugging Face Hub" in log
    )
    assert not evaluations(result.stdout) and "Traceback" not in log and "step(s) failed" not in log

    # The reference pass, in the sweep's cache; the run's record says it made it.
    [cache_file] = (out / "ref_logps").iterdir()
    assert cache_file.name.startswith("ref_logps-") and cache_file.suffix == ".pt"
    assert (run / "train.log").read_text().count("Computed reference log-probs") == 1
    record = json.loads((run / "minorsft_run.json").read_text())
    assert (record["reference"]["pass"], record["reference"]["cache_file"]) == ("computed", str(cache_file))
    assert config["ref_logps_cache_dir"] == str(out / "ref_logps")
    assert len([e for e in read_log_history(run) if "deviation" in e]) == 4

    # The report: every run, accuracy not measured and why, the pass and its time; the log repeats the pass.
    markdown = (out / "report" / "results.md").read_text()
    assert (
        "**Accuracy was not measured on FinanceIQ, fineval, ceval-exam: the benchmark data could not be reached ("
        in markdown
    )
    seconds = record["reference"]["seconds"]
    note = re.search(
        r"^- (Reference log-probs \(`precompute_ref_logps`\): 1 pass, ([0-9.]+) s \([0-9.]+ s CPU\): "
        r"sft_lr0\.001 computed them into `.*`\.)$",
        markdown,
        flags=re.MULTILINE,
    )
    assert note and note[2] == f"{seconds:.1f}"
    assert f"\n# {note[1]}\n" in result.stdout
    with open(out / "report" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["run_dir"]).name for r in rows] == ["base", run.name]
    assert all(r["accuracy_ceval"] == "" and r["best"] == "False" for r in rows)
    assert all((folder / "eval" / "fineval.skipped").is_file() for folder in [out / "base", run])


@pytest.mark.slow
def test_the_slurm_jobs_run_the_whole_sweep_task_by_task(tmp_path, tiny_recipes, benchmark_fixtures_dir, sweep_cli):
    """The generated scripts, run here one after the other as Slurm would (an sbatch file is a bash script)."""
    slurm_dir, out = tmp_path / "slurm", tmp_path / "sweep"
    exported = sweep_cli(*tiny_sweep_args(tiny_recipes, out, benchmark_fixtures_dir), "--slurm_dir", str(slurm_dir))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert not (slurm_dir / "prepare.sbatch").exists()  # the tiny recipes' model needs no preparing

    def job(script: str, **env) -> None:
        done = subprocess.run(
            ["bash", str(slurm_dir / script)], capture_output=True, text=True, env=script_env(**env), timeout=900
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    job("base.sbatch")
    runs = [out / "sft_lr0.001", out / "minorsft_lr0.001_beta0.5"]
    for index in range(len(runs)):
        job("train_eval.sbatch", SLURM_ARRAY_TASK_ID=str(index))
    job("report.sbatch")
    for directory in [out / "base", *runs]:
        assert (directory / "eval" / "ceval" / "results.json").is_file()
    for run in runs:
        assert (run / "trainer_state.json").is_file()
        assert yaml.safe_load((run / "train.yaml").read_text()) == next(
            entry["config"]
            for entry in json.loads((slurm_dir / "plan.json").read_text())["runs"]
            if entry["name"] == run.name
        )
    with open(out / "report" / "results.csv", newline="") as f:
        assert [Path(row["run_dir"]).name for row in csv.DictReader(f)] == ["base"] + [run.name for run in runs]
