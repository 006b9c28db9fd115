"""PNG plots drawn on matplotlib `Figure`s of their own (no pyplot, no display, no process-wide backend switch:
`savefig` renders PNG with Agg). Each function takes plain data (metrics.jsonl lines, `moe estimate --json` stages,
`moe plan --json` candidates), writes one PNG whole or not at all, and returns its path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

from ..estimate.planner import pareto_indices

MEMORY_PARTS = (("params_bytes", "parameters"), ("grads_bytes", "gradients"), ("optimizer_bytes", "optimizer"),
                ("activations_bytes", "activations"), ("imbalance_headroom_bytes", "imbalance headroom"),
                ("other_bytes", "other"))


def _save(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_losses(metrics: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Training loss and lm loss per logged step, the validation loss where it was measured; aux loss below."""
    train = [m for m in metrics if "loss" in m]
    val = [m for m in metrics if m.get("val_loss") is not None]
    fig = Figure(figsize=(8, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    steps = [m["step"] for m in train]
    top.plot(steps, [m["loss"] for m in train], label="train loss", color="tab:blue")
    if all(m.get("lm_loss") is not None for m in train):
        top.plot(steps, [m["lm_loss"] for m in train], label="train lm loss", color="tab:blue", ls="--", lw=0.8)
    if val:
        top.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="validation loss",
                 color="tab:orange")
    top.set_ylabel("loss (nats per token)")
    top.set_title(title or "loss")
    top.grid(alpha=0.3)
    top.legend()
    aux = [m for m in train if m.get("aux_loss") is not None]
    bottom.plot([m["step"] for m in aux], [m["aux_loss"] for m in aux], color="tab:green")
    bottom.axhline(1.0, color="gray", lw=0.8, ls=":")
    bottom.set_ylabel("aux loss\n(1 = balanced)")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    return _save(fig, path)


def plot_expert_load(metrics: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Heatmaps of expert load: layers x experts (each expert's routes over all logged steps, over the layer's
    mean: 1 is balanced, 0 an expert that got nothing) and layers x steps (the busiest expert over the mean)."""
    rows = [m for m in metrics if m.get("expert_load_max_over_mean_per_layer")]
    if not rows:
        raise ValueError("no logged step carries expert_load_max_over_mean_per_layer")
    matrices = [np.asarray(m["expert_tokens"], dtype=float) for m in rows if m.get("expert_tokens")]
    panels = 2 if matrices else 1
    fig = Figure(figsize=(6 * panels + 1, 4.5))
    axes = fig.subplots(1, panels, squeeze=False)
    axes = axes[0]
    if matrices:
        total_LE = np.sum(matrices, axis=0)
        share_LE = total_LE / np.maximum(total_LE.mean(axis=1, keepdims=True), 1e-12)
        image = axes[0].imshow(share_LE, aspect="auto", cmap="viridis", interpolation="nearest")
        axes[0].set_xlabel("expert")
        axes[0].set_ylabel("layer")
        axes[0].set_title(f"routes per expert / layer mean ({len(matrices)} logged steps)")
        fig.colorbar(image, ax=axes[0])
    by_step = np.asarray([m["expert_load_max_over_mean_per_layer"] for m in rows], dtype=float).T  # layers x steps
    steps = np.asarray([m["step"] for m in rows], dtype=float)
    gaps = np.diff(steps) if len(steps) > 1 else np.ones(1)
    step_edges = np.concatenate([[steps[0] - gaps[0] / 2], (steps[:-1] + steps[1:]) / 2, [steps[-1] + gaps[-1] / 2]])
    layer_edges = np.arange(by_step.shape[0] + 1) - 0.5
    image = axes[-1].pcolormesh(step_edges, layer_edges, by_step, cmap="magma")
    axes[-1].invert_yaxis()
    axes[-1].set_xlabel("optimizer step")
    axes[-1].set_ylabel("layer")
    axes[-1].set_title("busiest expert / mean, per layer")
    fig.colorbar(image, ax=axes[-1])
    for ax in axes:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_memory(stages: list[dict[str, Any]], budget_bytes: float, path: Path, title: str = "") -> Path:
    """One stacked bar per pipeline stage's rank (the `stages` of `moe estimate --json`), with the GPU budget."""
    if not stages:
        raise ValueError("no stages to plot")
    fig = Figure(figsize=(max(5, 1.2 * len(stages) + 3), 5))
    ax = fig.subplots()
    x = np.arange(len(stages))
    bottom = np.zeros(len(stages))
    for key, label in MEMORY_PARTS:
        values = np.asarray([s.get(key, 0) for s in stages], dtype=float) / 1e9
        ax.bar(x, values, bottom=bottom, label=label)
        bottom += values
    ax.axhline(budget_bytes / 1e9, color="red", ls="--", label=f"budget {budget_bytes / 1e9:.0f} GB")
    ax.set_xticks(x, [f"stage {s.get('stage', i)}" for i, s in enumerate(stages)])
    ax.set_ylabel("GB per rank")
    ax.set_title(title or "memory per rank, by pipeline stage")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_pareto(candidates: list[dict[str, Any]], path: Path, title: str = "", own: dict | None = None) -> Path:
    """GPUs against step time for the candidates of `moe plan --json`; the Pareto front (fewer GPUs or a shorter
    step, not both beaten) is joined and labelled with its layouts. Candidates without a step time are left out.
    `own`: the recipe's own strategy (`moe plan`'s), marked with a star."""
    timed = [c for c in candidates if c.get("step_time_s") is not None and c.get("gpus")]
    if not timed:
        raise ValueError("no candidate has both gpus and step_time_s")
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for fits, color, label in ((True, "tab:blue", "fits"), (False, "tab:gray", "does not fit")):
        group = [c for c in timed if bool(c.get("fits", True)) == fits]
        if group:
            ax.scatter([c["gpus"] for c in group], [c["step_time_s"] for c in group], c=color, s=18, label=label,
                       alpha=0.7)
    fitting = [c for c in timed if c.get("fits", True)]
    front = [fitting[i] for i in pareto_indices([(c["gpus"], c["step_time_s"]) for c in fitting])]
    if own and own.get("gpus") and own.get("step_time_s") is not None:
        ax.scatter([own["gpus"]], [own["step_time_s"]], marker="*", s=160, color="tab:orange", zorder=3,
                   label="recipe's own" + ("" if own.get("fits", True) else " (does not fit)"))
    if front:
        ax.plot([c["gpus"] for c in front], [c["step_time_s"] for c in front], "o-", color="tab:red",
                label="Pareto front")
        for c in front:
            p = c.get("parallel", {})
            label = " ".join(f"{k}{p[k]}" for k in ("tp", "pp", "ep", "dp") if k in p)
            ax.annotate(label, (c["gpus"], c["step_time_s"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain = FormatStrFormatter("%g")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("step time (s)")
    ax.set_title(title or "strategies: GPUs vs step time")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)
