"""``minorsft report`` on hand-made DPO and MinorDPO run directories whose numbers are known: the section of
results.md and ``dpo_deviation.png`` (the report on SFT runs: ``test_report.py``)."""

import json
from pathlib import Path

import yaml
from llamafactory_minorsft.cli import main
from llamafactory_minorsft.methods import method_of

from helpers import write_run_record


def write_dpo_run(root: Path, name: str, config: dict, steps: list) -> Path:
    """``steps``: per step (chosen deviation, rejected deviation, active fraction or None); the held-out values are
    the training ones plus 0.01, logged at the last step."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "train.yaml").write_text(yaml.safe_dump(config))
    history = []
    for step, (chosen, rejected, active) in enumerate(steps, start=1):
        entry = {"step": step, "loss": 0.69, "deviation/chosen": chosen, "deviation/rejected": rejected}
        if active is not None:
            entry["rejected_active"] = active
        history.append(entry)
    last_chosen, last_rejected, _ = steps[-1]
    history.append(
        {
            "step": len(steps),
            "eval_finance_pref_heldout_loss": 0.6,
            "eval_finance_pref_heldout_deviation/chosen": last_chosen + 0.01,
            "eval_finance_pref_heldout_deviation/rejected": last_rejected + 0.01,
        }
    )
    (run_dir / "trainer_state.json").write_text(json.dumps({"global_step": len(steps), "log_history": history}))
    write_run_record(run_dir, config)
    return run_dir


def test_report_shows_both_answers_deviation_and_the_active_rejected_terms(tmp_path):
    root = tmp_path / "sweep"
    common = {"stage": "dpo", "learning_rate": 1.0e-6, "pref_beta": 0.1, "deviation_metric": True}
    minor = {**common, "pref_loss": "minor_dpo"}
    for seed, last_active in ((1, 0.25), (2, 0.75)):
        steps = [(0.0, 0.0, 0.0), (0.02, -0.01, 0.5), (0.04, -0.03, last_active)]
        write_dpo_run(root, f"minor_dpo_lr1e-6_beta0.1_seed{seed}", {**minor, "seed": seed}, steps)
    write_dpo_run(root, "dpo_lr1e-6_beta0.1", common, [(0.0, 0.0, None), (0.01, -0.05, None), (0.02, -0.11, None)])
    assert method_of(common) == "dpo" and method_of(minor) == "minor_dpo"

    out = tmp_path / "report"
    assert main(["report", str(root), "--output_dir", str(out)]) == 0
    text = (out / "results.md").read_text(encoding="utf-8")
    section = text[text.index("## Preference pairs: DPO and MinorDPO") :]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in section.splitlines() if "lr 1e-6" in line}
    assert set(rows) == {"MinorDPO (lr 1e-6, β 0.1)", "DPO (lr 1e-6, β 0.1)"}
    minor_row, dpo_row = rows["MinorDPO (lr 1e-6, β 0.1)"], rows["DPO (lr 1e-6, β 0.1)"]
    assert minor_row[1:6] == ["2", "0.0400", "-0.0300", "0.0500", "-0.0200"]
    # Active fraction: the mean over steps (0, 0.5, 0.5 on average over the seeds) and the last step (the seeds' mean).
    assert minor_row[6].rstrip(" |") == "33.3 / 50.0"
    assert dpo_row[1:4] == ["1", "0.0200", "-0.1100"] and dpo_row[6].rstrip(" |") == "—"
    assert (out / "dpo_deviation.png").stat().st_size > 0
