"""``minorsft bench``: step time and peak memory of each training mode, as ratios to plain SFT.

Every mode runs in a fresh subprocess (``python -m llamafactory_minorsft.bench.worker SPEC RESULT``)
through LLaMA-Factory's ``run_exp`` on the same model, synthetic data, batch and precision: warm-up
steps, then N timed optimizer steps (the time between consecutive step ends, so data loading,
forward, backward and the optimizer all count). Peak memory is the subprocess's peak RSS as the
kernel reports it to the parent (``wait4``), and on a GPU ``torch.cuda.max_memory_allocated``. With
``--repeats R`` the modes run R times, interleaved (odd repeats in reverse order), so drifting load
on a shared machine hits every mode alike; each ratio is the median over repeats of the mode against
the same repeat's baseline.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ..files import UsageError, add_overwrite_argument, checked_output_dir, local_path, staged_dir
from .modes import DEFAULT_MODES, EVAL_MODES, MODES, PAIR_DATASET
from .summary import markdown_table, summarize

# Architectures of the random-initialised GPU models (Qwen2's published configs).
RANDOM_INIT = {
    "qwen2-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model_name_or_path", required=True, help="local model directory (its tokenizer is used throughout)"
    )
    parser.add_argument("--template", default="smollm2", help="LLaMA-Factory chat template (default: smollm2)")
    parser.add_argument(
        "--random_init",
        choices=sorted(RANDOM_INIT),
        help="benchmark a random-initialised model of this architecture with --model_name_or_path's tokenizer",
    )
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated, from: {', '.join(MODES)} (default: %(default)s; the DPO modes train on preference "
        "pairs against LLaMA-Factory's online DPO, e.g. --modes dpo,dpo_precomputed,minor_dpo_precomputed; eval and "
        "eval_kl time the batches of one evaluation without and with kl_metric)",
    )
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per mode (default: 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (default: 2, at least 1)")
    parser.add_argument("--batch_size", type=int, default=2, help="per-device batch size (default: 2)")
    parser.add_argument(
        "--cutoff_len", type=int, default=256, help="tokens per sample; every sample is this long (default: 256)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="run all modes this many times, interleaved (default: 1)"
    )
    parser.add_argument("--lora_rank", type=int, default=8, help="LoRA rank for the *_lora modes (default: 8)")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train in bf16 (default: on with a GPU, off on CPU)",
    )
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        help="step-time ratios on the workers' CPU time or on wall time (default: cpu without a GPU, "
        "wall with one); both are reported",
    )
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the workers (default: inherited)")
    parser.add_argument(
        "--output_dir", default="bench_out", help="directory for bench.json and bench.md (default: %(default)s)"
    )
    add_overwrite_argument(parser)


def _check(args) -> tuple:
    """(modes, model directory, output folder), the paths absolute; refused before any run."""
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise UsageError(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    for mode in modes:
        baseline = MODES[mode][1]
        if baseline is not None and baseline not in modes:
            raise UsageError(f"--modes: {mode} is compared with {baseline}; add {baseline}")
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1 or args.batch_size < 1 or args.cutoff_len < 16:
        raise UsageError("--steps, --warmup, --repeats and --batch_size must be >= 1, --cutoff_len >= 16")
    # The workers run in their own folders: every path they get is absolute, resolved here against the folder
    # the command was started in.
    model = local_path(args.model_name_or_path, "--model_name_or_path")
    if not (Path(model) / "config.json").is_file():
        raise UsageError(f"--model_name_or_path {model}: no config.json there (a local model directory is needed)")
    return modes, model, checked_output_dir(args.output_dir, args.overwrite)


# --- inputs ------------------------------------------------------------------------------------------


def write_dataset(directory: Path, num_samples: int, cutoff_len: int) -> None:
    """Alpaca-format samples, a prompt of about a quarter of ``cutoff_len`` tokens and a response longer
    than the rest, so that every tokenised sample is exactly ``cutoff_len`` tokens and every step does
    the same work; and as preference pairs (``PAIR_DATASET``), two such responses to each prompt."""
    words = ("profit", "ledger", "asset", "ratio", "bond", "yield", "equity", "margin", "audit", "cash")

    def text(seed: int, length: int) -> str:
        return " ".join(words[(seed + j) % len(words)] for j in range(length))

    rows = [
        {
            "instruction": f"Explain item {i} of the annual report: " + text(i, cutoff_len // 4),
            "input": "",
            "output": text(i + 3, 2 * cutoff_len),
        }
        for i in range(num_samples)
    ]
    pairs = [
        {
            "instruction": row["instruction"],
            "input": "",
            "chosen": row["output"],
            "rejected": text(i + 5, 2 * cutoff_len),
        }
        for i, row in enumerate(rows)
    ]
    columns = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
    info = {
        "bench": {"file_name": "bench.json"},
        PAIR_DATASET: {"file_name": f"{PAIR_DATASET}.json", "ranking": True, "columns": columns},
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.json").write_text(json.dumps(rows), encoding="utf-8")
    (directory / f"{PAIR_DATASET}.json").write_text(json.dumps(pairs), encoding="utf-8")
    (directory / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")


def write_random_model(architecture: str, tokenizer_dir: str, target: Path, bf16: bool) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        **RANDOM_INIT[architecture],
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16" if bf16 else "float32",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16 if bf16 else torch.float32)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def train_arguments(mode: str, args, model_dir: str, data_dir: Path, output_dir: Path, bf16: bool) -> dict:
    evaluation = {"do_train": False, "do_eval": True, "eval_dataset": "bench"} if mode in EVAL_MODES else {}
    return {
        **MODES[mode][0],
        "model_name_or_path": model_dir,
        "do_train": True,
        "dataset": PAIR_DATASET if MODES[mode][0]["stage"] == "dpo" else "bench",
        "dataset_dir": str(data_dir),
        "template": args.template,
        "cutoff_len": args.cutoff_len,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": args.warmup + args.steps,
        "learning_rate": 1.0e-5,
        "logging_steps": args.warmup + args.steps,  # no logging between timed steps
        "save_strategy": "no",
        "report_to": "none",
        "plot_loss": False,
        "bf16": bf16,
        "pref_beta": 0.04,
        "seed": 0,
        **({"lora_rank": args.lora_rank, "lora_target": "all"} if MODES[mode][0]["finetuning_type"] == "lora" else {}),
        **evaluation,
    }


def run_worker(spec: dict, work_dir: Path, env: dict) -> dict:
    spec_path, result_path, log_path = work_dir / "spec.json", work_dir / "result.json", work_dir / "worker.log"
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llamafactory_minorsft.bench.worker", str(spec_path), str(result_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work_dir,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(
            f"worker failed (exit {proc.returncode}); last lines of {log_path}:\n"
            + "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        )
    result = json.loads(result_path.read_text())
    result["peak_rss_kb"] = usage.ru_maxrss  # Linux: kilobytes
    return result


# --- the subcommand ------------------------------------------------------------------------------------


def run(args) -> int:
    modes, model, output_dir = _check(args)
    import torch

    gpu = torch.cuda.is_available()
    bf16 = gpu if args.bf16 is None else args.bf16
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory(prefix="minorsft-bench-") as scratch:
        scratch = Path(scratch)
        num_samples = (args.warmup + args.steps) * args.batch_size
        write_dataset(scratch / "data", num_samples, args.cutoff_len)
        model_dir = model
        if args.random_init:
            model_dir = str(write_random_model(args.random_init, model, scratch / "model", bf16))
        runs = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            # Odd repeats run the modes in reverse order, so a load that drifts during the run hits both ends alike.
            for mode in modes if repeat % 2 == 0 else modes[::-1]:
                work_dir = scratch / f"{mode}-{repeat}"
                work_dir.mkdir()
                spec = {
                    "args": train_arguments(mode, args, model_dir, scratch / "data", work_dir / "out", bf16),
                    "warmup": args.warmup,
                    "time_forward_pass": mode == "sft",
                }
                print(f"[bench] repeat {repeat + 1}/{args.repeats}: {mode} ...", flush=True)
                result = run_worker(spec, work_dir, env)
                print(
                    f"[bench]   median step {statistics.median(result['step_s']):.3f} s "
                    f"(CPU {statistics.median(result['step_cpu_s']):.3f} s), "
                    f"peak RSS {result['peak_rss_kb'] / 1024:.0f} MiB",
                    flush=True,
                )
                runs[mode].append(result)

    clock = args.clock or ("wall" if gpu else "cpu")
    summary = summarize(modes, runs, "step_cpu_s" if clock == "cpu" else "step_s")
    report = {
        "command": "minorsft bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "settings": {
            **vars(args),
            "model_name_or_path": model,
            "output_dir": output_dir,
            "bf16": bf16,
            "train_samples": num_samples,
        },
        "machine": {
            "device": torch.cuda.get_device_name() if gpu else "cpu",
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "omp_num_threads": env.get("OMP_NUM_THREADS"),
        },
        "modes": summary,
        "runs": runs,
    }
    table = markdown_table(summary, gpu)
    with staged_dir(output_dir, prefix=".bench-") as staging:
        (Path(staging) / "bench.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (Path(staging) / "bench.md").write_text(table, encoding="utf-8")
    print(table)
    return 0
