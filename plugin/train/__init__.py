"""Training: the math (``losses``), the trainer of the plugin's stages (``trainer``), the table of precomputed
reference log-probs and its cache file (``ref_cache``), and ``minorsft_run.json`` (``run_record``). Nothing here
imports the experiment tools (sweep, report, bench)."""
