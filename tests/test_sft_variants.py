"""LLaMA-Factory's own SFT loss variants (DFT, ASFT, EAFT) with ``deviation_metric: true``.

The plugin only adds the logged deviation: the losses and the trained weights must be those of
LLaMA-Factory alone, through the real ``llamafactory-cli train``.
"""

from pathlib import Path

import pytest
import torch
from llamafactory_minorsft.hooks import training
from safetensors.torch import load_file

from helpers import read_log_history, run_llamafactory_train, tiny_train_config, write_sft_dataset

VARIANTS = {
    "dft": {"use_dft_loss": True},
    "eaft": {"use_eaft_loss": True, "eaft_alpha": 0.5},
    "asft": {"use_asft_loss": True, "asft_alpha": 0.5},
}


# LLaMA-Factory's `create_ref_model` logs this each time it loads a copy of the starting model.
REFERENCE_LOADED = "Created reference model from the model itself."


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return write_sft_dataset(tmp_path_factory.mktemp("data"), "tiny_sft", num_samples=8)


def train(tmp_path, model_dir, dataset_dir, name, **overrides):
    output_dir = tmp_path / name / "out"
    config = tiny_train_config(
        model_dir, dataset_dir, output_dir, stage="sft", pref_beta=None, max_steps=3, learning_rate=5.0e-3, **overrides
    )
    result = run_llamafactory_train(config, tmp_path / name)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = [entry for entry in read_log_history(output_dir) if "loss" in entry]
    return logs, load_file(output_dir / "model.safetensors"), (result.stdout + result.stderr).count(REFERENCE_LOADED)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, extra",
    [("dft", {}), ("eaft", {}), ("asft", {}), ("asft", {"precompute_ref_logps": True})],
    ids=["dft", "eaft", "asft", "asft-precompute"],
)
def test_variant_keeps_llamafactory_loss_and_weights_and_logs_the_deviation(
    tmp_path, tiny_model_dir, dataset_dir, variant, extra
):
    alone_logs, alone_weights, alone_copies = train(tmp_path, tiny_model_dir, dataset_dir, "alone", **VARIANTS[variant])
    metric_logs, metric_weights, metric_copies = train(
        tmp_path, tiny_model_dir, dataset_dir, "metric", deviation_metric=True, **VARIANTS[variant], **extra
    )
    assert [entry["step"] for entry in metric_logs] == [1, 2, 3]
    assert [entry["loss"] for entry in metric_logs] == pytest.approx([entry["loss"] for entry in alone_logs], rel=1e-6)
    assert "deviation" not in alone_logs[0]
    # One reference copy: for ASFT the very one LLaMA-Factory loads for its KL term, shared with the deviation.
    assert (alone_copies, metric_copies) == ((1, 1) if variant == "asft" else (0, 1))
    for name, value in alone_weights.items():
        torch.testing.assert_close(metric_weights[name], value, rtol=1e-5, atol=1e-6)
    # Step 1 sees the starting model, which is the reference; later steps see the trained one.
    assert abs(metric_logs[0]["deviation"]) < 1e-5
    assert metric_logs[0]["logps/policy"] == pytest.approx(metric_logs[0]["logps/ref"], abs=1e-4)
    assert abs(metric_logs[-1]["deviation"]) > 1e-3


def parse(tmp_path, **overrides):
    from llamafactory.hparams import get_train_args

    args = {
        "model_name_or_path": "unused",
        "stage": "sft",
        "do_train": True,
        "dataset": "tiny_sft",
        "template": "default",
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        "finetuning_type": "full",
        **overrides,
    }
    return get_train_args(args)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_with_deviation_metric_is_parsed_and_routed_to_the_plugin(tmp_path, variant):
    _, _, _, finetuning_args, _ = parse(tmp_path, deviation_metric=True, **VARIANTS[variant])
    assert training.uses_plugin_trainer(finetuning_args)
    assert finetuning_args.sft_objective == "sft"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stage": "minorsft", "pref_beta": 0.1, "use_asft_loss": True}, r"`use_asft_loss` replaces the SFT loss"),
        ({"stage": "sft_dpo", "pref_beta": 0.1, "use_eaft_loss": True}, r"`use_eaft_loss` replaces the SFT loss"),
        (
            {"deviation_metric": True, "use_asft_loss": True, "finetuning_type": "lora"},
            r"`use_asft_loss: true` with `finetuning_type: lora` needs `ref_model`",
        ),
        (
            {"deviation_metric": True, "use_dft_loss": True, "use_asft_loss": True},
            r"`use_dft_loss` and `use_asft_loss` are both true",
        ),
        (
            {"deviation_metric": True, "use_eaft_loss": True, "use_hyper_parallel": True},
            r"`use_hyper_parallel: true` runs its own trainer; `deviation_metric: true` does not support it",
        ),
    ],
    ids=["minorsft-asft", "sft_dpo-eaft", "asft-lora-without-ref_model", "two-variants", "hyper_parallel"],
)
def test_impossible_combinations_are_refused_at_parse_time(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        parse(tmp_path, **overrides)
    assert not (tmp_path / "out").exists()
