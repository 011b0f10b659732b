"""``minorsft sweep --methods dpo,minor_dpo``: DPO and MinorDPO over their own learning-rate × β grid on preference
pairs, from one recipe, every config checked with LLaMA-Factory's parsing and the plugin's checks (the rest of the
sweep: ``test_reproduce.py``)."""

import pytest
import yaml
from llamafactory_minorsft import cli
from llamafactory_minorsft.sweep.options import OPTIONS, parse_methods

from helpers import REPO_ROOT


@pytest.fixture
def no_sweep_variables(monkeypatch):
    for option in OPTIONS:
        if option.env:
            monkeypatch.delenv(option.env, raising=False)


@pytest.mark.slow
def test_preference_methods_sweep_their_own_grid_from_the_minordpo_recipe(tmp_path, capsys, no_sweep_variables):
    out = tmp_path / "out"
    arguments = ["--demo", "--methods", "dpo,minor_dpo", "--dpo_lrs", "5e-6 1e-5", "--dpo_betas", "0.1,0.3"]
    assert (
        cli.main(
            [
                "sweep",
                "--repo_root",
                str(REPO_ROOT),
                *arguments,
                "--tasks",
                "none",
                "--output_root",
                str(out),
                "--slurm_dir",
                str(tmp_path / "slurm"),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "checked the 8 training config(s) with LLaMA-Factory's argument parsing" in stdout
    plan = yaml.safe_load((tmp_path / "slurm" / "plan.json").read_text())
    runs = {run["name"]: run for run in plan["runs"]}
    assert sorted(runs) == sorted(
        f"{method}_lr{lr}_beta{beta}"
        for method in ("dpo", "minor_dpo")
        for lr in ("5e-6", "1e-5")
        for beta in ("0.1", "0.3")
    )
    for name, run in runs.items():
        config = run["config"]
        assert run["recipe"].endswith("examples/demo/minordpo_smollm2.yaml")
        assert config["stage"] == "dpo" and config["dataset"] == "finance_pref_train"
        assert config["pref_loss"] == ("minor_dpo" if name.startswith("minor_dpo") else "sigmoid")
        assert config["deviation_metric"] is True and config["dataloader_drop_last"] is True
        assert config["ref_logps_cache_dir"] == str(out / "ref_logps")  # one reference pass for the whole grid
        assert f"pref_loss={config['pref_loss']}" in run["summary"]


def test_all_methods_are_the_supervised_ones_and_preference_the_pairs_ones():
    """`all` keeps meaning every method on (prompt, response) data: the preference methods start from another base
    model (the SFT stage's output) on another dataset, so they are a group of their own."""
    assert [method.name for method in parse_methods("all")] == [
        "sft",
        "sft_dpo",
        "minorsft",
        "sft_sample",
        "dft",
        "asft",
        "eaft",
    ]
    assert [method.name for method in parse_methods("preference")] == ["dpo", "minor_dpo"]
