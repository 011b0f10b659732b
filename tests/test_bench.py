"""``minorsft bench``: bad arguments are refused before any run; a tiny run writes its table and JSON.

Nothing here asserts a timing: the bench measures, these tests check that it measures what it says.
"""

import json
import os
import subprocess
import sys

import pytest
from llamafactory_minorsft import cli
from llamafactory_minorsft.bench import command as bench
from llamafactory_minorsft.bench.summary import markdown_table, summarize

from helpers import OFFLINE_ENV


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modes", "sft,fastest"], "unknown mode(s) fastest"),
        (["--modes", "minorsft_precomputed"], "compared with sft; add sft"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_bad_arguments_are_refused_before_any_run(tiny_model_dir, tmp_path, capsys, argv, message):
    assert (
        cli.main(["bench", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"), *argv])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("minorsft bench: ") and message in err
    assert not (tmp_path / "out").exists()


def test_a_model_directory_is_required(tmp_path, capsys):
    assert cli.main(["bench", "--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_workers_get_paths_resolved_against_the_starting_folder(tiny_model_dir, tmp_path, monkeypatch):
    """The documented `--model_name_or_path models/X` from the repository root: the workers run in folders of
    their own, so what they are given must be absolute (a relative `models/X` there reads as a Hub id)."""
    (tmp_path / "models").symlink_to(tiny_model_dir.parent)
    monkeypatch.chdir(tmp_path)
    relative_model = f"models/{tiny_model_dir.name}"
    args = cli.build_parser(only="bench").parse_args(
        ["bench", "--model_name_or_path", relative_model, "--output_dir", "out", "--modes", "sft"]
    )
    modes, model, output_dir = bench._check(args)
    assert (modes, model, output_dir) == (["sft"], str(tmp_path / relative_model), str(tmp_path / "out"))
    spec = bench.train_arguments("sft", args, model, tmp_path / "data", tmp_path / "w", False)
    assert os.path.isabs(spec["model_name_or_path"]) and os.path.isdir(spec["model_name_or_path"])


def test_a_missing_model_path_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--model_name_or_path", "models/SmolLM2-135M-Instruct", "--output_dir", "out"]) == 2
    err = capsys.readouterr().err
    assert "--model_name_or_path models/SmolLM2-135M-Instruct: no such file or folder" in err
    assert str(tmp_path / "models" / "SmolLM2-135M-Instruct") in err
    assert not (tmp_path / "out").exists()


def test_synthetic_samples_fill_cutoff_len(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    bench.write_dataset(tmp_path, num_samples=3, cutoff_len=64)
    rows = json.loads((tmp_path / "bench.json").read_text())
    pairs = json.loads((tmp_path / "bench_pairs.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(rows) == len(pairs) == 3 and len({row["output"] for row in rows}) == 3
    for row, pair in zip(rows, pairs):
        assert len(tokenizer(row["output"]).input_ids) > 64 > len(tokenizer(row["instruction"]).input_ids)
        assert pair["chosen"] == row["output"] != pair["rejected"]
        assert len(tokenizer(pair["rejected"]).input_ids) > 64
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["bench_pairs"]["ranking"] is True


@pytest.mark.slow
def test_tiny_bench_writes_table_and_json(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, **OFFLINE_ENV}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamafactory_minorsft.cli",
            "bench",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--modes",
            "sft,minorsft_precomputed,minorsft,dpo,minor_dpo_precomputed,eval,eval_kl",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--cutoff_len",
            "32",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--output_dir",
            str(out),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["settings"]["train_samples"] == (1 + 2) * 2
    assert report["settings"]["model_name_or_path"] == str(tiny_model_dir)
    for mode in ("sft", "minorsft_precomputed", "minorsft", "dpo", "minor_dpo_precomputed", "eval", "eval_kl"):
        runs = report["runs"][mode]
        assert len(runs) == 1  # several repeats: test_the_summary_pairs_each_repeat_with_its_baseline
        for run in runs:
            assert len(run["step_s"]) == len(run["step_cpu_s"]) == 2
            assert run["peak_rss_kb"] > run["import_rss_kb"] > 0
    precomputed = report["modes"]["minorsft_precomputed"]
    assert precomputed["vs"] == "sft" and len(precomputed["step_ratio_per_repeat"]) == 1
    assert precomputed["step_target"] == 1.05 and precomputed["memory_target"] == 1.03
    assert precomputed["precompute_s"] > 0 and report["modes"]["sft"]["forward_pass_s"] > 0
    # The online copy's memory bound is SFT + the copy's own weights (fp32 here, like the policy) + 5 %.
    online = report["modes"]["minorsft"]
    copy_bytes = report["runs"]["minorsft"][0]["ref_param_bytes"]
    assert copy_bytes == report["runs"]["minorsft"][0]["param_bytes"]
    [sft] = report["runs"]["sft"]
    base_kb = sft["peak_rss_kb"] - sft["import_rss_kb"]
    assert online["memory_target"] == pytest.approx(1.05 * (base_kb + copy_bytes / 1024) / base_kb)
    assert "ref_param_bytes" not in report["runs"]["minorsft_precomputed"][0]  # no reference held in training
    # Precomputed MinorDPO against LLaMA-Factory's online DPO, whose reference copy it does without.
    dpo_copy = report["runs"]["dpo"][0]["ref_param_bytes"]
    [dpo] = report["runs"]["dpo"]
    dpo_kb = dpo["peak_rss_kb"] - dpo["import_rss_kb"]
    minor_dpo = report["modes"]["minor_dpo_precomputed"]
    assert minor_dpo["vs"] == "dpo" and minor_dpo["step_target"] == 0.85
    assert minor_dpo["memory_target"] == pytest.approx((dpo_kb - dpo_copy / 1024) / dpo_kb)
    assert "ref_param_bytes" not in report["runs"]["minor_dpo_precomputed"][0] and minor_dpo["precompute_s"] > 0
    # An evaluation (3 batches of 2, the first untimed) with the exact KL holds the reference copy; without, none.
    assert "ref_param_bytes" not in report["runs"]["eval"][0]
    assert report["runs"]["eval_kl"][0]["ref_param_bytes"] == report["runs"]["eval_kl"][0]["param_bytes"]
    assert report["modes"]["eval_kl"]["vs"] == "eval" and report["modes"]["eval_kl"]["step_target"] is None
    table = (out / "bench.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 8 and rows[2].startswith("| minorsft_precomputed | sft |")
    assert rows[5].startswith("| minor_dpo_precomputed | dpo |") and rows[7].startswith("| eval_kl | eval |")
    assert table in proc.stdout


def _worker_result(step_cpu_s: list, peak_rss_kb: int, **extra) -> dict:
    """What a bench worker reports, with made-up numbers: wall time twice the CPU time, 100 MB of imports."""
    return {
        "step_s": [2 * s for s in step_cpu_s],
        "step_cpu_s": step_cpu_s,
        "peak_rss_kb": peak_rss_kb,
        "import_rss_kb": 100_000,
        "param_bytes": 4 * 2**20,
        **extra,
    }


def test_the_summary_pairs_each_repeat_with_its_baseline():
    """Over two repeats: each mode's step time against the same repeat's SFT run, then the median; the online
    copy's memory bound from the SFT repeats' median and the copy's own weights."""
    runs = {
        "sft": [_worker_result([1.0, 1.2], 150_000), _worker_result([2.0, 2.2], 170_000)],
        "minorsft_precomputed": [
            _worker_result([1.1, 1.3], 151_000, precompute_s=0.5, precompute_cpu_s=0.9),
            _worker_result([2.0, 2.4], 171_000, precompute_s=0.7, precompute_cpu_s=1.1),
        ],
        "minorsft": [
            _worker_result([3.3, 3.3], 160_000, ref_param_bytes=2**20),
            _worker_result([4.2, 4.2], 180_000, ref_param_bytes=2**20),
        ],
    }
    summary = summarize(list(runs), runs, "step_cpu_s")
    precomputed, online = summary["minorsft_precomputed"], summary["minorsft"]
    assert precomputed["step_ratio_per_repeat"] == pytest.approx([1.2 / 1.1, 2.2 / 2.1])
    assert precomputed["step_ratio"] == pytest.approx((1.2 / 1.1 + 2.2 / 2.1) / 2)
    assert precomputed["memory_ratio"] == pytest.approx((51 / 50 + 71 / 70) / 2)
    assert (precomputed["precompute_s"], precomputed["step_target"]) == (pytest.approx(0.6), 1.05)
    assert online["step_ratio_per_repeat"] == pytest.approx([3.3 / 1.1, 4.2 / 2.1])
    assert online["memory_target"] == pytest.approx(1.05 * (60_000 + 1024) / 60_000)
    assert summary["sft"]["median_step_s_per_repeat"] == pytest.approx([2.2, 4.2])
    table = markdown_table(summary, gpu=False)
    assert "[1.09, 1.05]" in table and "minorsft_precomputed: one-off precompute pass 0.60 s" in table
