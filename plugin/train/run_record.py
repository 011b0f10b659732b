"""``minorsft_run.json``: what a run of the plugin's trainer was, written into its ``output_dir`` for the tools
that read runs (the sweep, the report), so that none of them parses log text.

Written by the main process at the end of ``train()``, atomically. Format 1::

    {"format": 1, "plugin_version": "0.1.0",
     "method": {"stage": "minorsft", "learning_rate": 2e-05, "pref_beta": 0.04, "seed": 42, "finetuning_type": "full",
                "deviation_metric": false, "use_dft_loss": false, "use_asft_loss": false, "asft_alpha": 0.1,
                "use_eaft_loss": false, "eaft_alpha": 1.0},
     "reference": {"mode": "precomputed", "pass": "computed", "seconds": 21.4, "cpu_seconds": 41.9,
                   "cache_file": "/abs/ref_logps/ref_logps-0123456789abcdef.pt"},
     "eval_sets": [{"name": "finance_qa_heldout", "kind": "domain", "metrics_prefix": "eval_finance_qa_heldout_"},
                   {"name": "smollm2_general_drift", "kind": "drift", "metrics_prefix": "eval_smollm2_general_drift_"}]}

``method`` holds the training keys that identify a method and a grid point (``stage`` as the user wrote it; for
``stage: dpo`` also ``pref_loss``).
``reference.mode`` is ``precomputed`` (``precompute_ref_logps``) or ``online``; for ``precomputed``, ``pass``
says whether this run ``computed`` the table (with its wall and CPU seconds on rank 0) or ``loaded`` it.
``eval_sets`` lists the evaluation sets in the order of ``eval_dataset``: ``kind`` is ``drift`` for a set whose
dataset_info.json entry is marked ``"drift_set": true`` (``minorsft drift-set`` writes the mark), else ``domain``;
``metrics_prefix`` is where its metrics are in ``trainer_state.json`` (``eval_<name>_`` with
``eval_on_each_dataset``, else ``eval_`` for all of them together, or for a ``val_size`` split named ``val_size``).
"""

import json
import os

RUN_RECORD_FILE = "minorsft_run.json"
RUN_RECORD_FORMAT = 1
DRIFT_SET_KEY = "drift_set"  # the dataset_info.json mark of a drift set
METHOD_KEYS = (
    "finetuning_type",
    "pref_beta",
    "deviation_metric",
    "use_dft_loss",
    "use_asft_loss",
    "asft_alpha",
    "use_eaft_loss",
    "eaft_alpha",
)


ONLINE_REFERENCE = {"mode": "online"}


def precomputed_reference(pass_: str | None, seconds: float | None, cpu_seconds: float | None, cache_file: str) -> dict:
    """``reference`` of a ``precompute_ref_logps`` run: ``pass_`` is ``computed``, ``loaded`` or None (never
    prepared); the seconds are the computing pass's, else None."""
    return {
        "mode": "precomputed",
        "pass": pass_,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "cache_file": os.path.abspath(cache_file),
    }


def eval_sets(data_args) -> list[dict]:
    """The evaluation sets of a run and their kinds, from ``eval_dataset`` and dataset_info.json."""
    if data_args is None:
        return []
    names = list(data_args.eval_dataset or [])
    if not names:
        return [{"name": "val_size", "kind": "domain", "metrics_prefix": "eval_"}] if data_args.val_size else []
    info = {}
    info_path = os.path.join(data_args.dataset_dir, "dataset_info.json")
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    return [
        {
            "name": name,
            "kind": "drift" if isinstance(info.get(name), dict) and info[name].get(DRIFT_SET_KEY) is True else "domain",
            "metrics_prefix": f"eval_{name}_" if data_args.eval_on_each_dataset else "eval_",
        }
        for name in names
    ]


def build(finetuning_args, training_args, data_args, reference: dict) -> dict:
    from .. import __version__

    user_keys = finetuning_args.to_dict()
    return {
        "format": RUN_RECORD_FORMAT,
        "plugin_version": __version__,
        "method": {
            "stage": user_keys["stage"],
            "learning_rate": training_args.learning_rate,
            "seed": training_args.seed,
            **{key: user_keys.get(key) for key in METHOD_KEYS},
            # LLaMA-Factory's DPO loss (its default, or the plugin's `minor_dpo`), in DPO records only.
            **({"pref_loss": user_keys.get("pref_loss")} if user_keys["stage"] == "dpo" else {}),
        },
        "reference": dict(reference),
        "eval_sets": eval_sets(data_args),
    }


def write(output_dir: str, record: dict) -> None:
    """Atomically: a temporary file beside it, renamed over it."""
    from ..files import write_text_atomically

    os.makedirs(output_dir, exist_ok=True)
    write_text_atomically(os.path.join(output_dir, RUN_RECORD_FILE), json.dumps(record, indent=1) + "\n")


def read(run_dir: str) -> dict | None:
    """The record of the run in ``run_dir``, or None where there is none."""
    path = os.path.join(run_dir, RUN_RECORD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
