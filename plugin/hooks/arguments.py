"""The plugin's training keys and stages in LLaMA-Factory's argument classes, and the checks that refuse bad
values when the arguments are parsed (before any model or data is loaded).

LLaMA-Factory runs both new stages through its own SFT workflow (data pipeline, collator, ``load_model``,
``CustomSeq2SeqTrainer``), so after validation ``FinetuningArguments.stage`` reads ``"sft"`` to LLaMA-Factory
and ``FinetuningArguments.sft_objective`` keeps the method (``"sft"``, ``"minorsft"``, ``"sft_dpo"`` or
``"sft_sample"``);
``to_dict()`` reports the stage the user asked for. The new keys are ``MinorSFTArguments``, mixed into
``FinetuningArguments`` as LLaMA-Factory mixes in its own groups (``RLHFArguments``, ``LoraArguments``, ...).
LLaMA-Factory's ``pref_loss`` gains one more value, ``minor_dpo`` (MinorDPO, Eq. 2), for its own ``stage: dpo``.
"""

import base64
import contextlib
import dataclasses
import functools
import json
import math
import os
import typing
from typing import Literal

from ..errors import UsageError
from ..files import check_creatable_folder
from ..train import BETA_STAGES, MINOR_DPO, PLUGIN_STAGES
from . import resume

LLAMAFACTORY_STAGES = ("pt", "sft", "rm", "ppo", "dpo", "kto")
VALID_STAGES = LLAMAFACTORY_STAGES + PLUGIN_STAGES
# LLaMA-Factory's own SFT loss variants (its `compute_loss_func`): kept, with the deviation logged beside them.
SFT_LOSS_VARIANTS = ("use_dft_loss", "use_asft_loss", "use_eaft_loss")
REFERENCE_FREE_LOSSES = ("orpo", "simpo")  # LLaMA-Factory's `pref_loss` values that use no reference model
# The keys that route `stage: dpo` to the plugin's DPO trainer (besides `pref_loss: minor_dpo`).
DPO_PLUGIN_KEYS = ("deviation_metric", "kl_metric", "precompute_ref_logps")


@dataclasses.dataclass
class MinorSFTArguments:
    r"""Arguments pertaining to MinorSFT, SFT using DPO and the deviation metric (llamafactory-minorsft)."""

    deviation_metric: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Log the deviation from the reference model (MinorSFT paper, Eq. 8) for `stage: sft`, and for "
            "`stage: dpo` on the chosen and the rejected responses; the loss is unchanged. Always on for `minorsft` "
            "and `sft_dpo`."
        },
    )
    precompute_ref_logps: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs of every train and eval sample once, before the first update, "
            "cache them and release the reference (no reference forward per step, no reference copy in memory)."
        },
    )
    ref_logps_cache_dir: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Directory of the precomputed reference log-probs (default: `output_dir`)."},
    )
    kl_metric: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Log `eval_kl` on every evaluation set: the exact KL(pi_ref || pi_theta) of the next-token "
            "distributions over the whole vocabulary, per label position, averaged per sample, then over samples. "
            "Keeps the reference model for the evaluations."
        },
    )


def patch_finetuning_arguments(module) -> None:
    base = module.FinetuningArguments
    pref_losses = (*typing.get_args(base.__dataclass_fields__["pref_loss"].type), MINOR_DPO)

    @dataclasses.dataclass
    class FinetuningArguments(MinorSFTArguments, base):
        stage: Literal[VALID_STAGES] = dataclasses.field(
            default="sft",
            metadata={
                "help": "Which stage will be performed in training. `minorsft` (MinorSFT, Eq. 7), `sft_dpo` "
                "(SFT using DPO, Eq. 3; both use `pref_beta` as beta) and `sft_sample` (raw SFT per sample, Eq. 5) "
                "come from llamafactory-minorsft."
            },
        )
        pref_loss: Literal[pref_losses] = dataclasses.field(
            default="sigmoid",
            metadata={
                "help": "The type of DPO loss to use. `minor_dpo` (MinorDPO, Eq. 2: the rejected response is "
                "penalised only while its log-ratio is > 0) comes from llamafactory-minorsft."
            },
        )

        def __post_init__(self):
            validate_finetuning_arguments(self)
            self.sft_objective = self.stage if self.stage in PLUGIN_STAGES else "sft"
            if self.stage in PLUGIN_STAGES:
                self.stage = "sft"
            super().__post_init__()

        def to_dict(self):
            args = super().to_dict()
            if self.sft_objective in PLUGIN_STAGES:
                args["stage"] = self.sft_objective
            return args

    # Pickled arguments (and LLaMA-Factory's own references) resolve to the patched class.
    FinetuningArguments.__module__ = base.__module__
    FinetuningArguments.__qualname__ = base.__qualname__
    module.FinetuningArguments = FinetuningArguments


def validate_finetuning_arguments(args) -> None:
    """Checks that need only FinetuningArguments; run when the arguments are parsed."""
    if args.stage not in VALID_STAGES:
        raise UsageError(f"Unknown `stage: {args.stage}`. Valid stages: {', '.join(VALID_STAGES)}.")
    if args.stage == "dpo" or args.pref_loss == MINOR_DPO:
        validate_preference_arguments(args)
    if args.deviation_metric and args.stage not in ("sft", "dpo"):
        raise UsageError(
            f"`deviation_metric: true` is for `stage: sft` (the baseline of the paper's Figure 1) and `stage: dpo`; "
            f"`stage: {args.stage}` "
            + ("logs the deviation always." if args.stage in PLUGIN_STAGES else "does not support it.")
        )
    if args.kl_metric and args.stage not in ("sft", "dpo", *PLUGIN_STAGES):
        raise UsageError(
            f"`kl_metric: true` is for the SFT stages (`sft`, {', '.join(f'`{stage}`' for stage in PLUGIN_STAGES)}) "
            f"and `stage: dpo`; `stage: {args.stage}` does not support it."
        )
    if args.stage == "sft" and (args.deviation_metric or args.kl_metric):
        check_sft_loss_variant(args, "`deviation_metric: true`" if args.deviation_metric else "`kl_metric: true`")
    # `stage: dpo` without a reference (orpo, simpo) is refused by validate_preference_arguments.
    uses_reference = args.stage in (*PLUGIN_STAGES, "dpo") or args.deviation_metric
    if args.precompute_ref_logps and not uses_reference:
        raise UsageError(
            "`precompute_ref_logps: true` precomputes the reference log-probs of the training steps of "
            f"{', '.join(f'`stage: {stage}`' for stage in PLUGIN_STAGES)}, `stage: dpo` or `deviation_metric: true`; "
            f"`stage: {args.stage}`"
            + (" with only `kl_metric` runs the reference at evaluation alone." if args.kl_metric else " uses none.")
        )
    if args.ref_logps_cache_dir is not None and not args.precompute_ref_logps:
        raise UsageError(
            "`ref_logps_cache_dir` is set but `precompute_ref_logps` is false; set it to true or drop the key."
        )
    if args.ref_logps_cache_dir is not None:  # found out here, not after the whole reference pass
        check_creatable_folder(args.ref_logps_cache_dir, "`ref_logps_cache_dir`")
    if args.stage not in PLUGIN_STAGES:
        return
    if args.stage in BETA_STAGES and not (math.isfinite(args.pref_beta) and args.pref_beta > 0):
        raise UsageError(
            f"`pref_beta` must be finite and > 0 for `stage: {args.stage}` (it is beta of Eq. 3/7; the paper's best "
            f"is 0.04), got {args.pref_beta}."
        )
    conflicting = [key for key in SFT_LOSS_VARIANTS if getattr(args, key)]
    if conflicting:
        raise UsageError(f"`{conflicting[0]}` replaces the SFT loss and cannot be combined with `stage: {args.stage}`.")
    _refuse_own_trainers(args, f"`stage: {args.stage}`")


def _refuse_own_trainers(args, what: str) -> None:
    for key in ("use_mca", "use_hyper_parallel"):
        if getattr(args, key):
            raise UsageError(f"`{key}: true` runs its own trainer; {what} does not support it.")


def validate_preference_arguments(args) -> None:
    """``pref_loss: minor_dpo`` (MinorDPO, Eq. 2) and the plugin's keys on ``stage: dpo``: combinations that cannot work
    or have no defined meaning."""
    if args.pref_loss == MINOR_DPO:
        if args.stage != "dpo":
            raise UsageError(
                f"`pref_loss: {MINOR_DPO}` is a loss of `stage: dpo` (MinorDPO, Eq. 2, on preference pairs); "
                f"`stage: {args.stage}` does not use `pref_loss`. Set `stage: dpo`, or drop the key."
            )
        if not (math.isfinite(args.pref_beta) and args.pref_beta > 0):
            raise UsageError(f"`pref_beta` must be finite and > 0 for `pref_loss: {MINOR_DPO}`, got {args.pref_beta}.")
        if args.dpo_label_smoothing > 1e-6:
            raise UsageError(
                f"`dpo_label_smoothing` cannot be combined with `pref_loss: {MINOR_DPO}`: LLaMA-Factory defines it "
                "only for `pref_loss: sigmoid` (cDPO), and MinorDPO (Eq. 2) has no label-smoothed form."
            )
        if args.ld_alpha is not None:
            raise UsageError(
                f"`ld_alpha` cannot be combined with `pref_loss: {MINOR_DPO}`: LLaMA-Factory weights only the "
                "policy's log-probs by it, not the reference's, so r ≠ 0 before the first update and Eq. 2's "
                "max(0, r_l) would switch on that weighting rather than on drift. Drop `ld_alpha`."
            )
    keys = [key for key in DPO_PLUGIN_KEYS if getattr(args, key)]
    if args.stage != "dpo" or not (keys or args.pref_loss == MINOR_DPO):
        return
    if keys and args.pref_loss in REFERENCE_FREE_LOSSES:
        raise UsageError(
            f"`{keys[0]}: true` compares the policy with the reference model, and `pref_loss: {args.pref_loss}` uses "
            "none. Use a `pref_loss` with a reference (sigmoid, minor_dpo, ...), or drop the key."
        )
    _refuse_own_trainers(args, f"`{keys[0]}: true`" if keys else f"`pref_loss: {MINOR_DPO}`")


def check_sft_loss_variant(args, key: str) -> None:
    """``deviation_metric`` or ``kl_metric`` beside LLaMA-Factory's SFT loss variants: combinations that cannot
    run."""
    _refuse_own_trainers(args, key)
    variants = [key for key in SFT_LOSS_VARIANTS if getattr(args, key)]
    if len(variants) > 1:
        # LLaMA-Factory picks the first loss function but still runs ASFT's reference forward and hands its
        # logits to that function in place of `num_items_in_batch`.
        raise UsageError(
            f"`{variants[0]}` and `{variants[1]}` are both true; LLaMA-Factory trains with one SFT loss variant "
            "at a time. Keep one of them."
        )
    if args.use_asft_loss and args.finetuning_type == "lora" and args.ref_model is None:
        raise UsageError(
            "`use_asft_loss: true` with `finetuning_type: lora` needs `ref_model`: LLaMA-Factory loads no reference "
            "model for LoRA, and its ASFT loss calls one on every step. Set `ref_model` to the starting model."
        )


def validate_data_arguments(data_args, model_args, finetuning_args, training_args=None) -> None:
    """Checks that need the data, model (and training) arguments; run before anything is loaded."""
    from llamafactory.data.parser import get_dataset_list

    method = finetuning_args.sft_objective
    if method == "sft":
        method = "sft` with `" + ("deviation_metric" if finetuning_args.deviation_metric else "kl_metric")
    for key in ("dataset", "eval_dataset"):
        names = getattr(data_args, key) or []
        for name, attr in zip(names, get_dataset_list(names, data_args.dataset_dir)):
            if attr.ranking:
                raise UsageError(
                    f"`{key}: {name}` is a preference (ranking) dataset in "
                    f"{data_args.dataset_dir}/dataset_info.json; `stage: {method}` trains on supervised "
                    "(prompt, response) data. Give an SFT dataset, or use `stage: dpo` for preference data."
                )
    if data_args.packing and not data_args.neat_packing:
        raise UsageError(
            f"`packing: true` merges samples into one sequence, so `stage: {method}` cannot compute per-sample "
            "log-probs. Use `neat_packing: true` (per-sample log-probs are computed per packed segment)."
        )
    if finetuning_args.precompute_ref_logps and data_args.streaming:
        raise UsageError(
            "`precompute_ref_logps: true` looks samples up by their row in the dataset, which `streaming: true` does "
            "not have; turn one of them off."
        )
    if finetuning_args.sft_objective == "sft" and model_args.enable_liger_kernel:
        raise UsageError(
            f"`{method.split('`')[-1]}: true` needs the logits, which `enable_liger_kernel: true` does not materialise "
            "in `stage: sft`; turn one of them off."
        )
    if finetuning_args.kl_metric:
        check_kl_metric_evaluation(data_args, training_args)


def validate_preference_data_arguments(data_args, finetuning_args, training_args=None) -> None:
    """``stage: dpo`` with the plugin's keys: checks of the data (and training) arguments, before anything loads."""
    from llamafactory.data.parser import get_dataset_list

    what = f"`pref_loss: {finetuning_args.pref_loss}`"
    for key in ("dataset", "eval_dataset"):
        names = getattr(data_args, key) or []
        for name, attr in zip(names, get_dataset_list(names, data_args.dataset_dir)):
            if not attr.ranking:
                raise UsageError(
                    f"`{key}: {name}` is not a preference dataset in {data_args.dataset_dir}/dataset_info.json; "
                    f"`stage: dpo` with {what} trains on (prompt, chosen, rejected) pairs. Give a dataset whose "
                    'entry has `"ranking": true` and chosen/rejected columns.'
                )
    if finetuning_args.precompute_ref_logps and data_args.streaming:
        raise UsageError(
            "`precompute_ref_logps: true` looks pairs up by their row in the dataset, which `streaming: true` does "
            "not have; turn one of them off."
        )
    if finetuning_args.kl_metric:
        check_kl_metric_evaluation(data_args, training_args)


def check_kl_metric_evaluation(data_args, training_args) -> None:
    """``kl_metric`` is measured on evaluation sets: there must be one, evaluated by its loss."""
    if not data_args.eval_dataset and not data_args.val_size:
        raise UsageError(
            "`kl_metric: true` logs the KL on the evaluation sets, and there is none: set `eval_dataset` (or "
            "`val_size`), or drop the key."
        )
    if data_args.streaming:
        # Not refused for a known fault: a streamed evaluation could not be run here (LLaMA-Factory 0.9.5 stops
        # reading a local JSON dataset in streaming mode, also without the plugin), so its result is unchecked.
        raise UsageError(
            "`kl_metric: true` with `streaming: true` is not supported (untested); evaluate a map-style eval set."
        )
    if training_args is not None and training_args.predict_with_generate:
        raise UsageError(
            "`kl_metric: true` is computed from the evaluation's forward pass, which `predict_with_generate: true` "
            "replaces by generation; turn one of them off."
        )


# --- llamafactory.hparams.parser: checks that need several argument groups; resuming a killed run ---------


def sets_plugin_keys(finetuning_args) -> bool:
    """A plugin stage or any of the plugin's keys; without them a run is LLaMA-Factory's own, and the plugin changes
    nothing of what it does or writes."""
    return (
        finetuning_args.sft_objective in PLUGIN_STAGES
        or finetuning_args.pref_loss == MINOR_DPO
        or any(getattr(finetuning_args, field.name) != field.default for field in dataclasses.fields(MinorSFTArguments))
    )


def patch_parser(module) -> None:
    module._parse_train_args = functools.partial(parse_train_args, module._parse_train_args)


def parse_train_args(lf_parse_train_args, args=None):
    """LLaMA-Factory's parsing of the training arguments, then, for a run of the plugin, the checks that need several
    argument groups, and the checkpoints that a kill cut short moved aside before LLaMA-Factory picks the one to
    resume from (``resume``)."""
    parsed = lf_parse_train_args(args)
    _, data_args, training_args, finetuning_args, _ = parsed
    if sets_plugin_keys(finetuning_args):
        validate_parsed_arguments(data_args, training_args)
        resume.prepare_resume(training_args)
    return parsed


def validate_parsed_arguments(data_args, training_args) -> None:
    """What LLaMA-Factory would find only after loading the model, for the plugin's runs."""
    check_creatable_folder(training_args.output_dir, "`output_dir`")
    if data_args.cutoff_len < 1:
        raise UsageError(
            f"`cutoff_len` must be at least 1 (got {data_args.cutoff_len}): samples are cut to that many tokens."
        )


# --- llamafactory.hparams.training_args: the DeepSpeed config file -------------------------------


def patch_training_arguments(module) -> None:
    base = module.TrainingArguments

    class TrainingArguments(base):
        def __post_init__(self):
            check_deepspeed_config(self.deepspeed)
            super().__post_init__()

    TrainingArguments.__module__ = base.__module__
    TrainingArguments.__qualname__ = base.__qualname__
    module.TrainingArguments = TrainingArguments


def check_deepspeed_config(value) -> None:
    """The ``deepspeed:`` file exists and holds a JSON object; run when the arguments are parsed.

    transformers reads the file itself, but reports a broken one only as ``Expecting value: line 1
    column 1`` (no file, no key) and a missing one without saying where a relative path was looked up.
    It also accepts a dict and base64-encoded JSON, which are left to it.
    """
    if not isinstance(value, str) or value.lstrip().startswith("{"):
        return
    if not os.path.isfile(value):
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            json.loads(base64.urlsafe_b64decode(value).decode("utf-8"))
            return
        raise UsageError(
            f"`deepspeed: {value}` is not a file (a relative path is resolved against the working directory, "
            f"{os.getcwd()}; the repository's recipes are run from its root)."
        )
    try:
        with open(value, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"`deepspeed: {value}` is not valid JSON: {error}.") from None
    if not isinstance(config, dict):
        raise UsageError(f"`deepspeed: {value}` must hold a JSON object, found a {type(config).__name__}.")
