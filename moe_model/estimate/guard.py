"""The launch guard: refuse a run whose peak rank does not fit, before any rank allocates, and say what would fit.

`launch_refusal(recipe, world_size)` is None when the estimate fits. Otherwise it is one message naming the peak
rank, its three largest consumers, and two or three concrete changes (recipe overrides, or a different number of
GPUs) that make every rank fit, each with the bytes it saves on the peak rank. Every suggestion comes from running
the estimate again with the change applied, never from a rule of thumb; changes that keep the number of GPUs come
first, then the ones needing fewest GPUs.

The GPU budget (`card_budget`, the one home of the rule) is the smaller of the recipe's `hardware.gpu_memory_gb` and
the card's memory where the caller passes it (`card_bytes`: the launch path reads it on the ranks' CUDA device,
`moe_model/train/device.py`; this module stays arithmetic, and `moe estimate` passes none). The refusal's first line
says which of the two bound it.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from ..recipe import Recipe, RecipeError, recipe_from_dict
from .estimate import Estimate, budget_bytes, estimate
from ..units import GB, divisors
from .memory import Assumptions
from .params import count_params


@dataclass(frozen=True)
class Change:
    overrides: tuple[str, ...]  # --set assignments
    gpus: int  # GPUs the changed run needs
    peak_bytes: int
    fits: bool

    def describe(self, base: Estimate) -> str:
        sets = " ".join(f"--set {o}" for o in self.overrides)
        gpus = "" if self.gpus == base.gpus else f" on {self.gpus} GPUs"
        saved = base.peak.total_bytes - self.peak_bytes
        return f"{sets}{gpus}: peak {self.peak_bytes / GB:.1f} GB, saves {saved / GB:.1f} GB"


def candidate_overrides(recipe: Recipe, base: Estimate) -> list[dict[str, object]]:
    """Single changes worth trying: each is a dict of recipe fields (dotted) to new values."""
    p, m, t = recipe.parallel, recipe.model, recipe.train
    out: list[dict[str, object]] = []
    if not p.activation_checkpointing:
        out.append({"parallel.activation_checkpointing": True})
    micro = p.micro_batch_size // 2
    while micro >= 1:
        out.append({"parallel.micro_batch_size": micro})
        micro //= 2
    # illegal changes are left to `Strategy`'s rules: `_try` drops what the recipe check refuses
    if p.zero_stage < 3:  # ZeRO-3 where the rules allow it (pp 1; AutoEP where ep > 1)
        out.append({"parallel.zero_stage": p.zero_stage + 1})
    for ep in divisors(m.num_local_experts):
        if ep > p.ep and base.dp % ep == 0:  # on the same dp (an unset dp would otherwise follow ep)
            out.append({"parallel.ep": ep})
    for factor in (2, 4):
        out.append({"parallel.dp": base.dp * factor})
        out.append({"parallel.pp": p.pp * factor})
        out.append({"parallel.tp": p.tp * factor})
    seq = t.seq_len // 2
    if seq >= 128:
        out.append({"train.seq_len": seq})
    return out


def _overrides(change: dict[str, object]) -> tuple[str, ...]:
    return tuple(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items())


def _try(recipe: Recipe, change: dict[str, object], assumptions: Assumptions, pin_dp: int | None) -> Change | None:
    raw = recipe.model_dump()
    for key, value in change.items():
        section, field = key.split(".")
        raw[section][field] = value
    if pin_dp is not None and "parallel.dp" not in change:
        raw["parallel"]["dp"] = pin_dp
    try:
        result = estimate(recipe_from_dict(raw), assumptions=assumptions)
    except (RecipeError, ValueError):
        return None
    return Change(_overrides(change), result.gpus, result.peak.total_bytes, result.fits)


def suggest_changes(recipe: Recipe, base: Estimate, assumptions: Assumptions, limit: int = 3) -> list[Change]:
    """Up to `limit` changes that fit: single ones, then pairs when fewer than `limit` singles fit. One per kind of
    change (the least drastic that fits); same GPU count first, then fewest GPUs, fewest fields, smallest peak."""
    singles = candidate_overrides(recipe, base)
    # a launch fixed dp through its world size: judge every change on the same data-parallel degree
    pin_dp = base.dp if recipe.parallel.dp is None and not base.dp_assumed else None
    tried = [c for c in (_try(recipe, change, assumptions, pin_dp) for change in singles) if c is not None]
    # one suggestion per kind of change (the fields it sets): the least drastic one that fits, i.e. the largest peak
    per_kind: dict[frozenset[str], Change] = {}

    def keep(change: Change) -> None:
        kind = frozenset(o.split("=")[0] for o in change.overrides)
        if change.fits and (kind not in per_kind or change.peak_bytes > per_kind[kind].peak_bytes):
            per_kind[kind] = change

    for change in tried:
        keep(change)
    if len(per_kind) < limit:  # pairs of changes that do not fit alone (a pair with one that fits adds nothing)
        alone = {c.overrides: c.fits for c in tried}
        for a, b in itertools.combinations(singles, 2):
            if set(a) & set(b) or any(alone.get(_overrides(c), True) for c in (a, b)):
                continue
            change = _try(recipe, {**a, **b}, assumptions, pin_dp)
            if change is not None:
                keep(change)
    def rank(c: Change) -> tuple:
        changes_the_problem = any(o.startswith("train.") for o in c.overrides)  # a shorter sequence: last resort
        return (changes_the_problem, c.gpus > base.gpus, c.gpus, len(c.overrides), c.peak_bytes)

    ranked = sorted(per_kind.values(), key=rank)
    return ranked[:limit]


def card_budget(recipe: Recipe, card_bytes: int | None = None, card_name: str = "card") -> tuple[Recipe, str]:
    """(the recipe a launch is judged by, the words naming what bounds its GPU budget).

    The budget is the smaller of `hardware.gpu_memory_gb` and `card_bytes` (the card's total memory; None: no card
    known, as before launch). Where the card is smaller, the returned recipe carries the card's figure as
    `hardware.gpu_memory_gb`, so that the estimate and every suggested change are judged by it."""
    if card_bytes is None:
        return recipe, "hardware.gpu_memory_gb"
    if card_bytes >= budget_bytes(recipe):
        return recipe, f"hardware.gpu_memory_gb; the {card_name} has {card_bytes / GB:.1f} GB"
    raw = recipe.model_dump()
    raw["hardware"]["gpu_memory_gb"] = card_bytes / GB
    return (recipe_from_dict(raw), f"the {card_name}'s memory, below hardware.gpu_memory_gb "
                                   f"{recipe.hardware.gpu_memory_gb:g} GB")


def launch_refusal(recipe: Recipe, world_size: int | None = None, assumptions: Assumptions = Assumptions(),
                   card_bytes: int | None = None, card_name: str = "card") -> str | None:
    """None when every rank fits the GPU budget (`card_budget`); otherwise the multi-line refusal (see module
    docstring)."""
    recipe, bound_by = card_budget(recipe, card_bytes, card_name)
    base = estimate(recipe, world_size, assumptions)
    if base.fits:
        return None
    peak = base.peak
    top = sorted(peak.consumers().items(), key=lambda kv: -kv[1])[:3]
    lines = [
        f"moe: refusing to launch {recipe.name}: rank {peak.first_rank} "
        + (f"(pipeline stage {peak.stage} of 0..{base.pp - 1}; every rank of that stage alike) " if base.pp > 1
           else "(every rank alike) ")
        + f"needs {peak.total_bytes / GB:.1f} GB of the {base.budget_bytes / GB:.1f} GB per GPU (budget: {bound_by}; "
        f"tp{base.tp} pp{base.pp} ep{base.ep} dp{base.dp}, {base.gpus} GPUs, ZeRO-{base.zero_stage}, "
        f"{base.precision}).",
        "  largest consumers on that rank: " + ", ".join(f"{name} {value / GB:.1f} GB" for name, value in top),
    ]
    changes = suggest_changes(recipe, base, assumptions)
    if changes:
        lines.append("  changes that fit (estimate re-run with each):")
        lines += [f"    {change.describe(base)}" for change in changes]
    else:
        lines.append("  no single change or pair of changes tried (checkpointing, micro-batch, ZeRO stage, ep, dp, "
                     "pp, tp, seq_len) fits; see `moe estimate` for the per-stage table")
    return "\n".join(lines)


def host_resident(recipe: Recipe, assumptions: Assumptions = Assumptions()) -> Assumptions:
    """The estimate's assumptions for what a CPU rank really holds in the host's memory. A page is resident only once
    touched, so two GPU-side terms shrink: no CUDA context or communicator reserve, and of DeepSpeed's gradient
    reduction bucket (5e8 elements whatever the model) only the part gradients can fill, at most the model's
    parameter count. (Measured: 8 ranks of recipes/tiny_cpu.yaml run in a few GB, where the GPU-side figure would
    be 3.6 GB per rank, 2 GB of it the untouched bucket.)"""
    elements = min(assumptions.reduce_bucket_elements, count_params(recipe.moe_config()).total)
    return dataclasses.replace(assumptions, reserve_bytes=0, reduce_bucket_elements=elements)


def host_memory_refusal(recipe: Recipe, world_size: int | None, local_ranks: int, available_bytes: float,
                        assumptions: Assumptions = Assumptions()) -> str | None:
    """CPU ranks allocate from the host's memory, not from `hardware.gpu_memory_gb`: None when the estimate's peak
    rank times `local_ranks` (the ranks this host runs) fits `available_bytes` (the host's MemAvailable, read by the
    caller: this module stays pure); otherwise one line naming both figures and the first change that keeps the
    number of ranks and fits (the GPU guard's suggestions, judged against the host's share per rank)."""
    assumptions = host_resident(recipe, assumptions)
    base = estimate(recipe, world_size, assumptions)
    needed = base.peak.total_bytes * local_ranks
    if needed <= available_bytes:
        return None
    ranks = (f"{local_ranks} CPU ranks on this host need about {needed / GB:.1f} GB (the peak rank's "
             f"{base.peak.total_bytes / GB:.1f} GB x {local_ranks})" if local_ranks > 1 else
             f"its CPU rank needs about {needed / GB:.1f} GB")
    line = (f"moe: refusing to launch {recipe.name}: {ranks} but this host has {available_bytes / GB:.1f} GB of "
            "memory available")
    share_gb = available_bytes / local_ranks / GB
    fix = None
    if share_gb > 0:
        raw = recipe.model_dump()
        raw["hardware"]["gpu_memory_gb"] = share_gb  # the host's share per rank as the budget every change is judged by
        as_host = recipe_from_dict(raw)
        same_ranks = [c for c in suggest_changes(as_host, estimate(as_host, world_size, assumptions), assumptions)
                      if c.gpus == base.gpus]
        fix = same_ranks[0] if same_ranks else None
    if fix is None:
        return line + "; use fewer ranks or a smaller micro-batch, sequence or model (see moe estimate)"
    return line + f"; e.g. {' '.join(f'--set {o}' for o in fix.overrides)} (peak {fix.peak_bytes / GB:.1f} GB per rank)"
