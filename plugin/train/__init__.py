"""Training: the math (``losses``), the trainer of the plugin's stages (``trainer``) and the precomputed
reference log-probs (``ref_cache``). Nothing here imports the experiment tools (sweep, report, bench)."""
