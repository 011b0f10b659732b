"""The project's finance preference pairs (``data/finance_pref_demo.json``) are what their script generates: questions
of the finance Q&A generator, its correct answer chosen, a wrong one of its own making rejected."""

import json
import subprocess
import sys

from helpers import REPO_ROOT


def test_the_preference_set_is_what_its_script_generates(tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "data" / "make_finance_pref_demo.py"),
            "--output",
            str(tmp_path / "pairs.json"),
        ],
        check=True,
        capture_output=True,
    )
    committed = (REPO_ROOT / "data" / "finance_pref_demo.json").read_text(encoding="utf-8")
    assert (tmp_path / "pairs.json").read_text(encoding="utf-8") == committed
    pairs = json.loads(committed)
    assert len(pairs) >= 120 and len({(pair["instruction"], pair["input"]) for pair in pairs}) == len(pairs)
    assert all(set(pair) == {"system", "instruction", "input", "chosen", "rejected"} for pair in pairs)
    assert all(pair["chosen"] and pair["rejected"] and pair["chosen"] != pair["rejected"] for pair in pairs)
    # A wrong answer of the right form: a worked solution against a worked solution, a letter against a letter.
    letters = [pair for pair in pairs if pair["instruction"].endswith("答案：")]
    assert letters and all(len(pair["chosen"]) == len(pair["rejected"]) == 1 for pair in letters)
    info = json.loads((REPO_ROOT / "data" / "dataset_info.json").read_text())
    for name, split in (
        ("finance_pref_demo", None),
        ("finance_pref_train", "train[:120]"),
        ("finance_pref_heldout", "train[120:]"),
    ):
        assert info[name]["file_name"] == "finance_pref_demo.json" and info[name]["ranking"] is True
        assert info[name].get("split") == split
        assert set(info[name]["columns"].values()) == {"system", "instruction", "input", "chosen", "rejected"}
