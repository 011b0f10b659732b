"""llamafactory-minorsft: MinorSFT (arXiv 2408.10642) and SFT-using-DPO as LLaMA-Factory stages.

Importing this package is cheap (no torch, no LLaMA-Factory). The stages are activated by the
start-up hook in ``_autoload`` (installed as ``llamafactory_minorsft.pth``), which patches
LLaMA-Factory through ``integration`` when LLaMA-Factory is imported.
"""

__version__ = "0.1.0"

# The LLaMA-Factory releases whose internals ``integration`` was checked against.
SUPPORTED_LLAMAFACTORY = ">=0.9.5,<0.9.6"
