"""Pictures of runs and plans: `moe report RUN_DIR` (loss curves, expert load) and the plotting functions behind it."""

from .plots import plot_expert_load, plot_losses, plot_memory, plot_pareto

__all__ = ["plot_expert_load", "plot_losses", "plot_memory", "plot_pareto"]
