"""The method table that the sweep and the report share."""

import pytest
from llamafactory_minorsft.methods import METHODS, method_of


@pytest.mark.parametrize(
    ("config", "method"),
    [
        ({"stage": "sft"}, "sft"),
        ({"stage": "sft", "use_dft_loss": False}, "sft"),
        ({"stage": "sft", "use_dft_loss": True}, "dft"),
        ({"stage": "sft", "use_asft_loss": True, "asft_alpha": 0.1}, "asft"),
        ({"stage": "sft", "use_eaft_loss": True}, "eaft"),
        ({"stage": "minorsft", "pref_beta": 0.04}, "minorsft"),
        ({"stage": "sft_dpo"}, "sft_dpo"),
        ({"stage": "dpo"}, "dpo"),  # LLaMA-Factory's default loss, sigmoid
        ({"stage": "dpo", "pref_loss": "sigmoid"}, "dpo"),
        ({"stage": "dpo", "pref_loss": "minor_dpo", "pref_beta": 0.1}, "minor_dpo"),
    ],
)
def test_method_of_a_training_config(config, method):
    assert method_of(config) == method


def test_each_method_is_found_from_its_own_stage_and_flags():
    for method in METHODS.values():
        assert method_of({"stage": method.stage, **method.flags}) == method.name


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"stage": "sft", "use_dft_loss": True, "use_eaft_loss": True}, "more than one SFT variant: dft, eaft"),
        ({"stage": "dpo", "pref_loss": "ipo"}, "`stage: dpo` with `pref_loss: ipo` is none of the methods"),
        ({"stage": "ppo"}, "`stage: ppo` is none of the methods"),
    ],
)
def test_configs_of_no_single_method_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        method_of(config)
