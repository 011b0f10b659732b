"""``minorsft bench``: step time and peak memory of each training mode against plain SFT or LLaMA-Factory's online
DPO, and of an evaluation with and without ``kl_metric``. ``command`` runs the modes (``modes``), each in a fresh
``worker`` process, and writes the ratios (``summary``)."""

from .command import add_arguments, run

__all__ = ["add_arguments", "run"]
