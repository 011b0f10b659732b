"""The modes ``minorsft bench`` measures: each one's LLaMA-Factory arguments, the mode it is compared with, and the
targets of its ratios. An evaluation mode times the batches of one evaluation instead of optimizer steps."""

PAIR_DATASET = "bench_pairs"  # the synthetic preference pairs of the DPO modes

# mode -> (LLaMA-Factory arguments, the mode it is compared with: plain SFT, or LLaMA-Factory's online DPO)
MODES = {
    "sft": ({"stage": "sft", "finetuning_type": "full"}, None),
    "sft_dpo": ({"stage": "sft_dpo", "finetuning_type": "full"}, "sft"),
    "minorsft": ({"stage": "minorsft", "finetuning_type": "full"}, "sft"),
    "minorsft_precomputed": ({"stage": "minorsft", "finetuning_type": "full", "precompute_ref_logps": True}, "sft"),
    "sft_lora": ({"stage": "sft", "finetuning_type": "lora"}, None),
    "minorsft_lora": ({"stage": "minorsft", "finetuning_type": "lora"}, "sft_lora"),
    "minorsft_lora_precomputed": (
        {"stage": "minorsft", "finetuning_type": "lora", "precompute_ref_logps": True},
        "sft_lora",
    ),
    # LLaMA-Factory's DPO (sigmoid, a reference copy or disabled adapters every step) against the plugin's.
    "dpo": ({"stage": "dpo", "finetuning_type": "full"}, None),
    "dpo_precomputed": ({"stage": "dpo", "finetuning_type": "full", "precompute_ref_logps": True}, "dpo"),
    "minor_dpo": ({"stage": "dpo", "pref_loss": "minor_dpo", "finetuning_type": "full"}, "dpo"),
    "minor_dpo_precomputed": (
        {"stage": "dpo", "pref_loss": "minor_dpo", "finetuning_type": "full", "precompute_ref_logps": True},
        "dpo",
    ),
    "dpo_lora": ({"stage": "dpo", "finetuning_type": "lora"}, None),
    "minor_dpo_lora_precomputed": (
        {"stage": "dpo", "pref_loss": "minor_dpo", "finetuning_type": "lora", "precompute_ref_logps": True},
        "dpo_lora",
    ),
    # An evaluation of the training set (no training): LLaMA-Factory's, and the plugin's with the exact KL, whose
    # reference copy stays loaded for it.
    "eval": ({"stage": "sft", "finetuning_type": "full"}, None),
    "eval_kl": ({"stage": "sft", "finetuning_type": "full", "kl_metric": True}, "eval"),
}
EVAL_MODES = ("eval", "eval_kl")
DEFAULT_MODES = tuple(
    mode for mode, (arguments, _) in MODES.items() if arguments["stage"] != "dpo" and mode not in EVAL_MODES
)

# The memory target of a precomputed run against an online one with a reference copy: the online run's memory less
# the copy's weights (computed per run from the copy's parameters).
WITHOUT_REFERENCE = "online less the reference copy"
# Targets (step-time ratio, memory ratio) of issues 6 and 18; None for the online full copy, whose memory bound is
# SFT + the reference weights + 5 % (computed per run from the parameter count).
TARGETS = {
    "sft_dpo": (1.40, None),
    "minorsft": (1.40, None),
    "minorsft_precomputed": (1.05, 1.03),
    "minorsft_lora": (1.45, 1.05),
    "minorsft_lora_precomputed": (1.05, 1.03),
    "dpo_precomputed": (0.85, WITHOUT_REFERENCE),
    "minor_dpo": (1.05, 1.03),
    "minor_dpo_precomputed": (0.85, WITHOUT_REFERENCE),
    "minor_dpo_lora_precomputed": (0.85, 1.03),
}
