"""``minorsft eval``: accuracy of a LLaMA-Factory checkpoint on FinanceIQ, FinEval and C-Eval with the paper's
prompts. Benchmarks are data (``evaluation/`` at the top of the project); see its README."""

from .command import add_arguments, run

__all__ = ["add_arguments", "run"]
