"""``minorsft report``: the results tables and charts of a sweep, like the paper's Figures 1 and 2."""

from .runs import add_arguments, run

__all__ = ["add_arguments", "run"]
