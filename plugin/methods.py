"""The methods a sweep trains and a report compares: one table, read by both.

MinorSFT (Eq. 7) and SFT using DPO (Eq. 3) are this plugin's stages, SFT is the paper's baseline, and DFT,
ASFT and EAFT are LLaMA-Factory 0.9.5's own SFT losses that also aim at less drift (docs/method.md, "SFT
variants as baselines"). The three variants are ``stage: sft`` with one flag set; their deviation (Eq. 8)
is logged with ``deviation_metric: true``, as for SFT.
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
    )
}
PAPER_METHODS = ("sft", "sft_dpo", "minorsft")
BASELINES = ("dft", "asft", "eaft")


def method_of(config: dict) -> str:
    """The method a training config trains: its stage, and for ``stage: sft`` the variant flag it sets."""
    stage = str(config.get("stage", ""))
    matching = [
        method.name
        for method in METHODS.values()
        if method.stage == stage and all(bool(config.get(key, False)) == value for key, value in method.flags.items())
    ]
    if stage == "sft":
        variants = [name for name in matching if METHODS[name].flags]
        if len(variants) > 1:
            raise ValueError(f"a training config sets more than one SFT variant: {', '.join(variants)}")
        return variants[0] if variants else "sft"
    if not matching:
        raise ValueError(f"`stage: {stage}` is none of the methods {', '.join(METHODS)}")
    return matching[0]


def format_number(value: float) -> str:
    """Short and stable, for run names and tables: 5e-06 -> 5e-6, 0.0001 -> 1e-4, 2.5e-05 -> 2.5e-5, 0.04 -> 0.04."""
    if value == 0 or abs(value) >= 1e-3:
        return f"{value:g}"
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
