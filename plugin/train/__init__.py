"""Training: the math (``losses``), the trainers of the plugin's SFT stages (``trainer``) and of ``stage: dpo``
(``dpo_trainer``), what both share about the reference (``reference``), the table of precomputed reference log-probs
and its cache file (``ref_cache``), and ``minorsft_run.json`` (``run_record``). Nothing here imports the hooks or the
experiment tools (sweep, report, bench)."""

PLUGIN_STAGES = ("minorsft", "sft_dpo", "sft_sample")  # the `stage` values the plugin adds
BETA_STAGES = ("minorsft", "sft_dpo")  # the stages whose loss has β (`pref_beta`)
MINOR_DPO = "minor_dpo"  # MinorDPO (Eq. 2): one more value of LLaMA-Factory's `pref_loss`
