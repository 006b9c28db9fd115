"""The performance model's step time under measured rates: what calibration fits against and reports."""

from __future__ import annotations

import dataclasses

from ..estimate.perf import shape_of, step_components
from ..recipe import Recipe


def hardware_rates(recipe: Recipe) -> tuple[float, float, float]:
    """(compute FLOP/s, memory B/s, fixed overhead s) of the recipe's hardware section."""
    s = shape_of(recipe)
    return s.compute_flops, s.hbm_bytes_s, s.overhead_s


def predict_step_s(recipe: Recipe, compute_flops: float, hbm_bytes_s: float, overhead_s: float = 0.0,
                   imbalance: float = 1.0) -> float:
    """The model's step time of `recipe` with these rates (overriding its hardware section's) and routing imbalance."""
    from ..strategy import Strategy

    p = Strategy.from_recipe(recipe)[0]
    s = dataclasses.replace(shape_of(recipe, imbalance), compute_flops=compute_flops, hbm_bytes_s=hbm_bytes_s,
                            overhead_s=overhead_s)
    return float(step_components(s, p.tp, p.pp, p.ep, p.dp, p.zero_stage, p.micro_batch_size,
                                 p.activation_checkpointing, autoep=p.moe_backend == "autoep")["step"])


def calibrated_prediction(recipe: Recipe, overrides: list[str], imbalance: float = 1.0) -> float:
    """The model's step time of `recipe` (its layout, synthetic data, no resume) with the `--set` overrides that
    calibration produced applied, at routing `imbalance`."""
    from ..recipe import recipe_from_dict

    raw = recipe.model_dump()
    calibrated = recipe_from_dict({**raw, "train": {**raw["train"], "resume": "never"},
                                   "data": {"source": "synthetic"}}, overrides)
    return predict_step_s(calibrated, *hardware_rates(calibrated), imbalance=imbalance)
