"""Pictures and documents of runs and plans: the plotting functions (plots.py), a run's PNGs (run.py, behind
`moe report RUN_DIR`), the seed plan's review (seed_review.py, `make plan`) and how a strategy reads (strategy.py).
Reads estimate/ and a run's files; imports nothing of train/, calibrate/ or the CLI."""

from .plots import plot_expert_load, plot_losses, plot_memory, plot_pareto

__all__ = ["plot_expert_load", "plot_losses", "plot_memory", "plot_pareto"]
