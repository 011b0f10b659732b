"""LLaMA-Factory's own SFT loss and its variants (DFT, ASFT, EAFT) with ``deviation_metric: true``.

The plugin only adds the logged deviation: the losses and the trained weights must be those of
LLaMA-Factory alone. All runs train in one process (``train_in_one_process``), each through LLaMA-Factory's
``run_exp`` as ``llamafactory-cli train`` runs it.
"""

import pytest
import torch
from llamafactory_minorsft.hooks import training
from safetensors.torch import load_file

from helpers import read_log_history, tiny_train_config, train_in_one_process, write_sft_dataset

VARIANTS = {
    "sft": {},
    "dft": {"use_dft_loss": True},
    "eaft": {"use_eaft_loss": True, "eaft_alpha": 0.5},
    "asft": {"use_asft_loss": True, "asft_alpha": 0.5},
}
# Each case trains its variant with `deviation_metric: true` (and these keys), to compare with the variant alone.
CASES = {
    "sft": ("sft", {}),
    "dft": ("dft", {}),
    "eaft": ("eaft", {}),
    "asft": ("asft", {}),
    "asft-precompute": ("asft", {"precompute_ref_logps": True}),
}

# LLaMA-Factory's `create_ref_model` logs this each time it loads a copy of the starting model.
REFERENCE_LOADED = "Created reference model from the model itself."


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    workdir = tmp_path_factory.mktemp("variants")
    dataset_dir = write_sft_dataset(workdir / "data", "tiny_sft", num_samples=8)

    def config(name, **overrides):
        return tiny_train_config(
            tiny_model_dir,
            dataset_dir,
            workdir / name,
            stage="sft",
            pref_beta=None,
            max_steps=3,
            learning_rate=5.0e-3,
            **overrides,
        )

    configs = {f"{variant}-alone": config(f"{variant}-alone", **flags) for variant, flags in VARIANTS.items()}
    for case, (variant, extra) in CASES.items():
        configs[f"{case}-metric"] = config(f"{case}-metric", deviation_metric=True, **VARIANTS[variant], **extra)
    return dict(zip(configs, train_in_one_process(list(configs.values()), workdir)))


def trained(run):
    run.check()
    logs = [entry for entry in read_log_history(run.output_dir) if "loss" in entry]
    return logs, load_file(run.output_dir / "model.safetensors"), run.log.count(REFERENCE_LOADED)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_variant_keeps_llamafactory_loss_and_weights_and_logs_the_deviation(runs, case):
    variant = CASES[case][0]
    alone_logs, alone_weights, alone_copies = trained(runs[f"{variant}-alone"])
    metric_logs, metric_weights, metric_copies = trained(runs[f"{case}-metric"])
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
