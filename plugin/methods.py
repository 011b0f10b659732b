"""The methods a sweep trains and a report compares: one table, read by both.

MinorSFT (Eq. 7) and SFT using DPO (Eq. 3) are this plugin's stages, SFT is the paper's baseline, and DFT,
ASFT and EAFT are LLaMA-Factory 0.9.5's own SFT losses that also aim at less drift (docs/method.md, "SFT
variants as baselines"). The three variants are ``stage: sft`` with one flag set; their deviation (Eq. 8)
is logged with ``deviation_metric: true``, as for SFT.

DPO (Eq. 1) and MinorDPO (Eq. 2) train on preference pairs: LLaMA-Factory's ``stage: dpo`` with ``pref_loss:
sigmoid`` or the plugin's ``minor_dpo``, from one recipe (``minordpo``), their deviation logged on both responses.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str  # the --methods value and the run-name prefix
    label: str  # tables and legends
    stage: str  # LLaMA-Factory's `stage`
    flags: dict = field(default_factory=dict)  # training keys the method sets on top of its stage's recipe
    uses_beta: bool = False  # trained over a grid of `pref_beta`: its own option (``beta_grid``), else --betas
    beta_grid: str = "betas"
    alpha_key: str | None = None  # the variant's own strength parameter, a grid of its own (`--<alpha_key>s`)
    alpha_default: float | None = None  # that grid's default: LLaMA-Factory 0.9.5's default of the key
    sft_lr_grid: bool = True  # the SFT learning-rate grid (else MinorSFT's and SFT-using-DPO's)
    lr_grid: str | None = None  # a learning-rate grid of its own (its option's name), in place of those two
    recipe: str | None = None  # its name in --recipes' {method} pattern (default: its stage)
    preference: bool = False  # trains on preference pairs (stage dpo), not on (prompt, response) samples

    @property
    def recipe_name(self) -> str:
        return self.recipe or self.stage


METHODS = {
    method.name: method
    for method in (
        Method("sft", "SFT", "sft"),
        Method("sft_dpo", "SFT using DPO", "sft_dpo", uses_beta=True, beta_grid="sft_dpo_betas", sft_lr_grid=False),
        Method("minorsft", "MinorSFT", "minorsft", uses_beta=True, sft_lr_grid=False),
        # Eq. 5, MinorSFT without its coefficient: the control that separates the coefficient from the
        # per-sample weighting, trained on MinorSFT's learning rates.
        Method("sft_sample", "SFT per sample (Eq. 5)", "sft_sample", sft_lr_grid=False),
        Method("dft", "DFT", "sft", {"use_dft_loss": True}),
        Method("asft", "ASFT", "sft", {"use_asft_loss": True}, alpha_key="asft_alpha", alpha_default=0.1),
        Method("eaft", "EAFT", "sft", {"use_eaft_loss": True}, alpha_key="eaft_alpha", alpha_default=1.0),
        *(
            Method(
                name,
                label,
                "dpo",
                {"pref_loss": pref_loss},
                uses_beta=True,
                beta_grid="dpo_betas",
                lr_grid="dpo_lrs",
                recipe="minordpo",
                preference=True,
            )
            for name, label, pref_loss in (("dpo", "DPO", "sigmoid"), ("minor_dpo", "MinorDPO", "minor_dpo"))
        ),
    )
}
PAPER_METHODS = ("sft", "sft_dpo", "minorsft")
BASELINES = ("dft", "asft", "eaft")
PREFERENCE_METHODS = tuple(name for name, method in METHODS.items() if method.preference)
# LLaMA-Factory's defaults of the flags that are not booleans.
FLAG_DEFAULTS = {"pref_loss": "sigmoid"}


def _sets(config: dict, key: str, value) -> bool:
    if isinstance(value, bool):
        return bool(config.get(key, False)) == value
    return config.get(key, FLAG_DEFAULTS[key]) == value


def method_of(config: dict) -> str:
    """The method a training config trains: its stage, and for ``stage: sft`` the variant flag it sets."""
    stage = str(config.get("stage", ""))
    matching = [
        method.name
        for method in METHODS.values()
        if method.stage == stage and all(_sets(config, key, value) for key, value in method.flags.items())
    ]
    if stage == "sft":
        variants = [name for name in matching if METHODS[name].flags]
        if len(variants) > 1:
            raise ValueError(f"a training config sets more than one SFT variant: {', '.join(variants)}")
        return variants[0] if variants else "sft"
    if not matching:
        what = (
            f"`stage: {stage}` with `pref_loss: {config.get('pref_loss')}`" if stage == "dpo" else f"`stage: {stage}`"
        )
        raise ValueError(f"{what} is none of the methods {', '.join(METHODS)}")
    return matching[0]


def format_number(value: float) -> str:
    """Short and stable, for run names and tables: 5e-06 -> 5e-6, 0.0001 -> 1e-4, 2.5e-05 -> 2.5e-5, 0.04 -> 0.04."""
    if value == 0 or abs(value) >= 1e-3:
        return f"{value:g}"
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
