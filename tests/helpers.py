"""What the tests share besides fixtures: paths, the offline environment, tiny datasets and training configs,
and how to launch ``llamafactory-cli train`` (also on several CPU ranks)."""

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

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

# One OpenMP thread per training process: the test models gain nothing from more, and where the cores are shared (the
# pytest process, other test sessions, another rank) OpenMP's spinning threads make a step up to 13x slower.
TRAIN_ENV = {"OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one thread inside the pytest process, for a computation of its own (see TRAIN_ENV); also a
    decorator."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_sft_dataset(directory: Path, name: str = "tiny_sft", num_samples: int = 16, ranking: bool = False) -> Path:
    """A small alpaca-format dataset plus its dataset_info.json entry, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_samples):
        if ranking:
            rows.append(
                {
                    "instruction": f"Question {i}: what is {i} plus {i}?",
                    "input": "",
                    "chosen": f"{2 * i}",
                    "rejected": f"{2 * i + 1}",
                }
            )
        else:
            rows.append(
                {
                    "instruction": f"Question {i}: what is {i} plus {i}?",
                    "input": "",
                    "output": f"The answer is {2 * i}." + " Indeed." * (i % 4),
                }
            )
    (directory / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    info_path = directory / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    entry = {"file_name": f"{name}.json"}
    if ranking:
        entry.update(
            ranking=True,
            columns={"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
        )
    info[name] = entry
    info_path.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return directory


def write_pair_dataset(directory: Path, name: str = "tiny_pairs", num_pairs: int = 8, first: int = 0) -> Path:
    """A small preference dataset (rows ``first`` to ``first + num_pairs - 1``) plus its ranking dataset_info.json
    entry, in ``directory``. The rejected answer is a wrong one of the chosen answer's form, of another length."""
    rows = [
        {
            "instruction": f"Question {i}: what is {i} plus {i}?",
            "input": "",
            "chosen": f"The answer is {2 * i}." + " Indeed." * (i % 3),
            "rejected": f"The answer is {2 * i} plus one." + " Indeed." * (i % 2),
        }
        for i in range(first, first + num_pairs)
    ]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    info_path = directory / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {
        "file_name": f"{name}.json",
        "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
    }
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
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=workdir,
        env={**os.environ, **(env or {})},
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
    return {
        "FORCE_TORCHRUN": "1",
        "NNODES": "1",
        "NPROC_PER_NODE": str(num_processes),
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(extensions),
    }


ZERO3_CONFIG = REPO_ROOT / "examples" / "deepspeed" / "ds_z3_config.json"


def zero3_overrides() -> dict:
    """``tiny_train_config`` overrides for DeepSpeed ZeRO-3 with the repository's own config (the paper's
    recipes use it), on CPU ranks: without oneCCL DeepSpeed's CPU accelerator uses gloo. Launch with
    ``torchrun_env()``. The first run on a machine compiles DeepSpeed's shared-memory op (C++, once,
    cached in ~/.cache/torch_extensions)."""
    return {"deepspeed": str(ZERO3_CONFIG), "ddp_backend": "gloo"}


def read_log_history(output_dir: Path) -> list:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def write_run_record(run_dir: Path, config: dict, reference: dict | None = None) -> None:
    """The ``minorsft_run.json`` the plugin's trainer writes at the end of training, from a run's training config
    (``train.run_record``'s own functions; LLaMA-Factory's parsed arguments stood in for by the config's keys).
    ``reference``: the record's reference pass, e.g. ``{"mode": "precomputed", "pass": "loaded", ...}``."""
    from types import SimpleNamespace

    from llamafactory_minorsft.train import run_record

    eval_dataset = config.get("eval_dataset") or []
    if isinstance(eval_dataset, str):
        eval_dataset = [name.strip() for name in eval_dataset.split(",") if name.strip()]
    data_args = SimpleNamespace(
        eval_dataset=eval_dataset,
        val_size=config.get("val_size", 0.0),
        dataset_dir=str(config.get("dataset_dir", "data")),
        eval_on_each_dataset=bool(config.get("eval_on_each_dataset", False)),
    )
    finetuning_args = SimpleNamespace(to_dict=lambda: {"stage": config["stage"], **config})
    training_args = SimpleNamespace(learning_rate=config.get("learning_rate"), seed=config.get("seed", 42))
    record = run_record.build(finetuning_args, training_args, data_args, reference or {"mode": "online"})
    run_record.write(str(run_dir), record)


@dataclass
class FinishedRun:
    """One run of ``train_in_one_process``."""

    config: dict
    log: str  # everything the run printed
    error: str | None  # the traceback when the run raised, else None

    @property
    def output_dir(self) -> Path:
        return Path(self.config["output_dir"])

    def check(self) -> "FinishedRun":
        assert self.error is None, self.log[-3000:] + self.error
        return self


def train_in_one_process(configs: list[dict], workdir: Path, env: dict = None, timeout: int = 1800) -> list:
    """Train each config with LLaMA-Factory's ``run_exp`` (what ``llamafactory-cli train`` runs on one rank), one
    after another, in one new Python process that starts as the CLI's does (the plugin activated by its ``.pth``).
    A tiny run costs ~3 s there, against ~12 s as its own CLI launch, which spends most of that importing. A run
    that raises is recorded with its traceback, and the next one runs."""
    import subprocess

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "runs.json").write_text(json.dumps(configs), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, __file__, str(workdir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=workdir,
        env={**os.environ, **TRAIN_ENV, **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = []
    for index, config in enumerate(configs):
        error = workdir / f"run-{index}.error"
        log = (workdir / f"run-{index}.log").read_text(encoding="utf-8", errors="replace")
        runs.append(FinishedRun(config, log, error.read_text() if error.exists() else None))
    return runs


def _train_runs(workdir: Path) -> None:
    """The process of ``train_in_one_process``; each run's output, C-level writes included, goes to its own file."""
    import traceback

    os.environ.update(TRAIN_ENV)  # importing this file set OFFLINE_ENV's thread count; torch is not imported yet
    from llamafactory.train.tuner import run_exp

    for index, config in enumerate(json.loads((workdir / "runs.json").read_text(encoding="utf-8"))):
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(workdir / f"run-{index}.log", "w", encoding="utf-8") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                run_exp(args=config)
            except BaseException:  # SystemExit too
                (workdir / f"run-{index}.error").write_text(traceback.format_exc())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])


if __name__ == "__main__":
    _train_runs(Path(sys.argv[1]))
