"""``minorsft report``: the results tables and charts of a sweep, like the paper's Figures 1 and 2.

``runs`` reads the run directories, ``plots`` draws the charts (and picks what they show: curves, trade-offs,
Pareto fronts), ``tables`` writes results.md and the CSV files, ``command`` is the subcommand."""

from .command import add_arguments, run

__all__ = ["add_arguments", "run"]
