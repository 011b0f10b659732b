"""``minorsft bench``: bad arguments are refused before any run; a tiny run writes its table and JSON.

Nothing here asserts a timing: the bench measures, these tests check that it measures what it says.
"""

import json
import os
import subprocess
import sys

import pytest
from llamafactory_minorsft import bench, cli

from conftest import OFFLINE_ENV


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modes", "sft,fastest"], "unknown mode(s) fastest"),
        (["--modes", "minorsft_precomputed"], "compared with sft; add sft"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_bad_arguments_are_refused_before_any_run(tiny_model_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as refused:
        cli.main(["bench", "--model", str(tiny_model_dir), "--output", str(tmp_path / "out"), *argv])
    assert message in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_model_directory_is_required(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        cli.main(["bench", "--model", str(tmp_path), "--output", str(tmp_path / "out")])


def test_synthetic_samples_fill_cutoff_len(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    bench.write_dataset(tmp_path, num_samples=3, cutoff_len=64)
    rows = json.loads((tmp_path / "bench.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(rows) == 3 and len({row["output"] for row in rows}) == 3
    for row in rows:
        assert len(tokenizer(row["output"]).input_ids) > 64 > len(tokenizer(row["instruction"]).input_ids)


@pytest.mark.slow
def test_tiny_bench_writes_table_and_json(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, **OFFLINE_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "llamafactory_minorsft.cli", "bench", "--model", str(tiny_model_dir),
         "--modes", "sft,minorsft_precomputed,minorsft", "--steps", "2", "--warmup", "1", "--cutoff-len", "32",
         "--repeats", "2", "--threads", "1", "--output", str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["settings"]["train_samples"] == (1 + 2) * 2
    for mode in ("sft", "minorsft_precomputed", "minorsft"):
        runs = report["runs"][mode]
        assert len(runs) == 2
        for run in runs:
            assert len(run["step_s"]) == len(run["step_cpu_s"]) == 2
            assert run["peak_rss_kb"] > run["import_rss_kb"] > 0
    precomputed = report["modes"]["minorsft_precomputed"]
    assert precomputed["vs"] == "sft" and len(precomputed["step_ratio_per_repeat"]) == 2
    assert precomputed["step_target"] == 1.05 and precomputed["memory_target"] == 1.03
    assert precomputed["precompute_s"] > 0 and report["modes"]["sft"]["forward_pass_s"] > 0
    # The online copy's memory bound is SFT + the copy's own weights (fp32 here, like the policy) + 5 %.
    online = report["modes"]["minorsft"]
    copy_bytes = report["runs"]["minorsft"][0]["ref_param_bytes"]
    assert copy_bytes == report["runs"]["minorsft"][0]["param_bytes"]
    sft_kb = [run["peak_rss_kb"] - run["import_rss_kb"] for run in report["runs"]["sft"]]
    base_kb = sorted(sft_kb)[0] / 2 + sorted(sft_kb)[1] / 2
    assert online["memory_target"] == pytest.approx(1.05 * (base_kb + copy_bytes / 1024) / base_kb)
    assert "ref_param_bytes" not in report["runs"]["minorsft_precomputed"][0]  # no reference held in training
    table = (out / "bench.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and rows[2].startswith("| minorsft_precomputed | sft |")
    assert table in proc.stdout
