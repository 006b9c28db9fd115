"""`moe plan`: search every legal parallel strategy, keep those that fit the GPU budget, rank them.

The space: tp among the divisors of `gpus_per_node` (tp stays inside a node), pp from 1 to the number of layers (each
stage then holds at least one MoE layer: every layer is one), ep among the divisors of the expert count, dp and the
micro-batch among the divisors of the global batch (micro_batch * dp must divide it), ZeRO 0-3, activation
checkpointing off/on, the MoE backend (`legacy` or `autoep`, `Strategy.moe_backend`) and tp*pp*dp <= --max-gpus. A
combination is legal when `Strategy`'s rules accept it (`layout_problem`, DeepSpeed's: tp | heads, ep | experts,
ep | dp, ZeRO-3 only with AutoEP where ep > 1 and only with pp 1, ZeRO <= 1 with pp > 1, AutoEP only for gated
dropless experts at tp 1; `training_problem`: ep a multiple of tp when both exceed 1; `batch_divides`).

Fit: the memory estimator's peak rank (estimate.py) against `hardware.gpu_memory_gb`. The estimator takes ~1 ms per
layout; the search uses `FastMemory.peak_bytes_many`, the same formulas with every stage's parts cached by the
arguments they depend on, and only the earliest stage of each (layers, first, last) kind evaluated: a stage's total
grows with its in-flight micro-batches and earlier stages hold more (1F1B: min(m, pp - s)); the parts are added up by
the estimator's own `peak_total`. tests/test_planner.py checks it equals `estimate(...).peak.total_bytes` on a
sample. The step time is `perf.step_components` on numpy arrays (the very function the full path calls on scalars).

Objectives: latency = shortest step (ties: fewer GPUs); throughput = most sequences per second (with a fixed global
batch this is 1 / step time, the same order as latency; ties: fewer GPUs); cost = fewest GPU-seconds per step
(gpus x step time; ties: shorter step). The Pareto front: the fitting strategies no other beats on both GPUs and
step time.
"""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace
from dataclasses import asdict, dataclass, field

import numpy as np

from ..recipe import Recipe, RecipeError
from ..strategy import FIELDS, Strategy, batch_divides
from ..units import divisors
from .activations import MicroBatch, stage_activations
from .estimate import budget_bytes, estimate, peak_total
from .memory import (PRECISION_BYTES, Assumptions, grad_accum_dtype, model_states, stage_ranges,
                     zero2_gradient_elements, zero3_residency, zero3_settings, zero_flat_groups)
from .perf import shape_of, stage_table, step_components
from .shapes import dims, layer_table, rank_params

OBJECTIVES = ("latency", "throughput", "cost")
BACKENDS = ("legacy", "autoep")  # column 7 of the grid (tp pp ep dp zero B ckpt backend): the index into this
_CONFIG_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                  "num_experts_per_tok", "router_z_loss_coef", "intermediate_size", "hidden_act", "capacity_factor",
                  "min_capacity", "vocab_size", "num_hidden_layers", "tie_word_embeddings")


def _unique_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(keys, axis=0, return_inverse=True) for small non-negative ints, through one mixed-radix code
    (np.unique on rows sorts lexicographically and is several times slower)."""
    keys = keys.astype(np.int64)
    radix = keys.max(axis=0) + 1
    code = np.zeros(len(keys), dtype=np.int64)
    for j in range(keys.shape[1]):
        code = code * radix[j] + keys[:, j]
    _, first, inv = np.unique(code, return_index=True, return_inverse=True)
    return keys[first], inv


class FastMemory:
    """Peak bytes of a layout with the estimator's formulas, parts cached (see the module docstring)."""

    def __init__(self, recipe: Recipe, assumptions: Assumptions = Assumptions()):
        cfg = recipe.moe_config()
        # a plain copy of the attributes the formulas read: PretrainedConfig's attribute lookup is slow; with the
        # `shapes.Dims` names too, so the shape arithmetic takes it as it is
        self.cfg = SimpleNamespace(**{**asdict(dims(cfg)), **{name: getattr(cfg, name) for name in _CONFIG_FIELDS}})
        self.model, self.table = cfg, layer_table(cfg)  # the parameters a stage holds: its layers' rows
        self.precision = recipe.train.precision
        self.b = PRECISION_BYTES[self.precision]
        self.S = recipe.train.seq_len
        self.gbs = recipe.train.global_batch_size
        self.a = assumptions
        self.states = functools.lru_cache(maxsize=None)(self._states)
        self.acts_line = functools.lru_cache(maxsize=None)(self._acts_line)
        self.kinds = functools.lru_cache(maxsize=None)(self._kinds)

    def _kinds(self, pp: int) -> tuple[tuple[range, bool, bool, int], ...]:
        """(the stage's layers, first, last, earliest stage) per distinct stage kind (the same layer rows, ends)."""
        seen: dict[tuple, tuple[range, int]] = {}
        for s, held in enumerate(stage_ranges(self.cfg.num_hidden_layers, pp)):
            seen.setdefault((tuple(self.table[i] for i in held), s == 0, s == pp - 1), (held, s))
        return tuple((held, first, last, s) for (_, first, last), (held, s) in seen.items())

    def _states(self, held, first, last, tp, ep, zero, dp, pp_multi, autoep, ckpt):
        """The model states' parts of a stage holding layers `held` (`autoep` matters at ZeRO-2 and 3, `ckpt` at
        ZeRO-3 only: callers pass False elsewhere)."""
        params = rank_params(self.model, layers=held, first=first, last=last, tp=tp, ep=ep)
        zero3 = (zero3_residency(self.cfg, layers=len(held), first=first, last=last, tp=tp, ep=ep, autoep=autoep,
                                 checkpointing=ckpt, assumptions=self.a) if zero == 3 else None)
        zero2 = (zero2_gradient_elements(zero_flat_groups(self.model, layers=held, first=first, last=last, tp=tp, ep=ep,
                                                          autoep=autoep), dp=dp, ep=ep)
                 if zero == 2 and PRECISION_BYTES[grad_accum_dtype(self.precision, 2)] == self.b else None)
        st = model_states(params, precision=self.precision, zero_stage=zero, dp=dp, ep=ep, pp=2 if pp_multi else 1,
                          assumptions=self.a, zero3=zero3, zero2_gradients=zero2)
        return st.params_bytes + st.grads_bytes + st.optimizer_bytes, st.bucket_bytes, st.step_transient_bytes

    def _acts_line(self, B, tp, ep, backend, held, first, last, pp_multi, ckpt):
        """(bytes at one micro-batch in flight, bytes per extra one) of a stage holding layers `held`: every term of
        `stage_activations` is constant or proportional to the in-flight count, so two evaluations give all of them
        exactly. `ep`: the legacy layer's buffers depend only on whether ep > 1 (callers pass min(ep, 2)), AutoEP's
        rows on ep. The model's own config, not the plain copy: each layer is priced by its kind (few distinct calls,
        cached)."""
        mb = MicroBatch(B, self.S, self.b, tp=tp, ep=ep, moe_backend=BACKENDS[backend],
                        triton=self.a.autoep_triton_kernels)
        pp = 2 if pp_multi else 1
        one, two = (stage_activations(self.model, mb, layers=held, first=first, last=last, pp=pp, in_flight=f,
                                      checkpointing=ckpt, imbalance=self.a.imbalance) for f in (1, 2))
        return one.backward_peak_bytes, two.backward_peak_bytes - one.backward_peak_bytes

    def peak_bytes_many(self, grid: np.ndarray) -> np.ndarray:
        """Peak bytes of every row (tp pp ep dp zero B ckpt backend) of `grid`: each stage kind's parts are computed once
        per distinct argument tuple (np.unique) and broadcast back, then added up by `estimate.peak_total`."""
        peak = np.zeros(len(grid), dtype=np.int64)
        m_all = self.gbs // (grid[:, 5] * grid[:, 3])
        for pp in np.unique(grid[:, 1]).tolist():
            sel = np.flatnonzero(grid[:, 1] == pp)
            g = grid[sel]
            tp, ep, dp, zero, B, ckpt, backend = g[:, 0], g[:, 2], g[:, 3], g[:, 4], g[:, 5], g[:, 6], g[:, 7]
            m = m_all[sel]
            best = np.zeros(len(sel), dtype=np.int64)
            z3 = zero == 3
            for held, first, last, s in self.kinds(pp):
                uniq, inv = _unique_rows(np.stack([tp, ep, zero, dp, backend * (zero >= 2), ckpt * z3], axis=1))
                svals = np.array([self.states(held, first, last, int(a), int(e), int(z), int(d), pp > 1, bool(k),
                                              bool(c)) for a, e, z, d, k, c in uniq.tolist()],
                                 dtype=np.int64).reshape(-1, 3)[inv.reshape(-1)]
                in_flight = np.minimum(m, pp - s)
                ep_key = np.where(backend == 1, ep, np.minimum(ep, 2))
                uniq, inv = _unique_rows(np.stack([B, tp, ep_key, backend, ckpt], axis=1))
                line = np.array([self.acts_line(int(b), int(a), int(e), int(k), held, first, last, pp > 1, bool(c))
                                 for b, a, e, k, c in uniq.tolist()], dtype=np.int64).reshape(-1, 2)[inv.reshape(-1)]
                avals = line[:, 0] + (in_flight - 1) * line[:, 1]
                _, _, total = peak_total(svals[:, 0], svals[:, 1], svals[:, 2], avals, self.a)
                best = np.maximum(best, total)
            peak[sel] = best
        return peak

@dataclass
class Plan:
    recipe: str
    objective: str
    max_gpus: int | None
    searched: int
    legal: int
    fitting: int
    search_time_s: float
    candidates: list[dict]  # fitting, best first
    pareto: list[dict]
    own: dict | None  # the recipe's own strategy, evaluated by the full estimator
    own_rank: int | None  # where it would sit among the fitting candidates (1-based), None when it does not fit
    hardware: dict = field(default_factory=dict)

    def as_json(self, top: int = 50) -> dict:
        return {"recipe": self.recipe, "objective": self.objective, "max_gpus": self.max_gpus,
                "searched": self.searched, "legal": self.legal, "fitting": self.fitting,
                "search_time_s": self.search_time_s,
                "candidates": self.candidates[:top] if top else self.candidates,
                "pareto": self.pareto, "recipe_strategy": self.own, "recipe_strategy_rank": self.own_rank,
                "hardware_assumed": self.hardware}


def _rank_key(objective: str):
    if objective == "latency":
        return lambda c: (c["step_time_s"], c["gpus"])
    if objective == "throughput":
        return lambda c: (-c["throughput_seq_per_s"], c["gpus"])
    return lambda c: (c["gpus"] * c["step_time_s"], c["step_time_s"])


def enumerate_legal(recipe: Recipe, max_gpus: int | None = None) -> tuple[int, np.ndarray]:
    """(combinations searched, legal strategies as an int array with columns tp pp ep dp zero B ckpt backend, the
    backend an index into `BACKENDS`): those that `Strategy.training_problem`, `Strategy.layout_problem` and the
    global-batch rule (`batch_divides`) accept."""
    m, hw, gbs = recipe.model, recipe.hardware, recipe.train.global_batch_size
    tps, pps, eps = divisors(hw.gpus_per_node), range(1, m.num_hidden_layers + 1), divisors(m.num_local_experts)
    batch = divisors(gbs)
    micro_batches = {dp: [B for B, ok in zip(batch, batch_divides(gbs, np.array(batch), dp)) if ok] for dp in batch}
    searched = 0
    rows = []
    for tp in tps:
        # AutoEP's own rule (`Strategy.autoep_problem`: model and tp only) asked once per tp, not per combination
        backends = [(i, name) for i, name in enumerate(BACKENDS)
                    if name != "autoep" or Strategy(tp=tp).autoep_problem(m) is None]
        for pp in pps:
            for ep in eps:
                for dp in batch:
                    gpus_ok = max_gpus is None or tp * pp * dp <= max_gpus
                    for zero in (0, 1, 2, 3):
                        searched += 2 * len(batch) * len(BACKENDS)
                        for backend, name in backends:
                            if not gpus_ok:
                                continue
                            strategy = Strategy(tp=tp, pp=pp, ep=ep, dp=dp, zero_stage=zero, moe_backend=name)
                            if strategy.training_problem() or strategy.layout_problem(m, hw.gpus_per_node):
                                continue
                            for B in micro_batches[dp]:
                                rows.append((tp, pp, ep, dp, zero, B, 0, backend))
                                rows.append((tp, pp, ep, dp, zero, B, 1, backend))
    return searched, np.array(rows, dtype=np.int64).reshape(-1, 8)


def evaluate(recipe: Recipe, grid: np.ndarray, assumptions: Assumptions = Assumptions()) -> dict[str, np.ndarray]:
    """Peak bytes and step time of every row of `grid` (fast path)."""
    fast = FastMemory(recipe, assumptions)
    peak = fast.peak_bytes_many(grid)
    s = shape_of(recipe, assumptions.imbalance, zero3_settings(assumptions))
    table = stage_table(s, int(grid[:, 1].max()) if len(grid) else 1)  # each pp's stage kinds (layers, dense ones)
    tp, pp, ep, dp, zero, B, ckpt = (grid[:, i].astype(np.float64) for i in range(7))
    c = step_components(s, tp, grid[:, 1], ep, dp, zero, B, ckpt, pp_table=table, autoep=grid[:, 7] == 1)
    step = np.asarray(c["step"], dtype=np.float64)
    return {"peak": peak, "step": step, "gpus": grid[:, 0] * grid[:, 1] * grid[:, 3],
            "fits": peak <= budget_bytes(recipe)}


def strategy_of_row(row) -> Strategy:
    """The `Strategy` of one grid row (tp pp ep dp zero B ckpt backend)."""
    return Strategy(*row[:6], activation_checkpointing=bool(row[6]), moe_backend=BACKENDS[row[7]])


def _candidate(row, peak, step, gbs, fits=True) -> dict:
    """A candidate of `moe plan`'s JSON for a grid row: `Strategy.as_parallel` of `strategy_of_row`, written out
    (the grid's columns are `strategy.FIELDS` in order; tens of thousands of rows make the Strategy detour count)."""
    tp, pp, ep, dp, zero, B, ckpt, backend = row
    parallel = dict(zip(FIELDS, (tp, pp, ep, dp, zero, B, bool(ckpt), BACKENDS[backend])))
    return {"parallel": parallel, "gpus": tp * pp * dp, "step_time_s": float(step),
            "throughput_seq_per_s": gbs / float(step), "peak_bytes": int(peak), "fits": bool(fits)}


def full_candidate(recipe: Recipe, strategy: Strategy | dict, assumptions: Assumptions = Assumptions()) -> dict:
    """One strategy (or a candidate's `parallel` mapping) through the full estimator and performance model (the
    reference for the fast path); `auto` resolved to the backend the run would take."""
    strategy = (strategy if isinstance(strategy, Strategy) else Strategy.of(strategy)).with_backend(recipe.model)
    est = estimate(recipe, assumptions=assumptions, strategy=strategy)
    perf = est.performance
    return {"parallel": strategy.as_parallel(), "gpus": est.gpus, "step_time_s": perf.step_time_s,
            "throughput_seq_per_s": perf.throughput_seq_per_s, "peak_bytes": est.peak.total_bytes,
            "fits": est.fits, "mfu": perf.mfu}


def pareto_indices(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimised), sorted by the first; of
    equal points, the first listed."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_front(candidates: list[dict]) -> list[dict]:
    """Fitting strategies not beaten on both GPUs and step time, by GPUs ascending."""
    return [candidates[i] for i in pareto_indices([(c["gpus"], c["step_time_s"]) for c in candidates])]


def plan(recipe: Recipe, max_gpus: int | None = None, objective: str = "latency",
         assumptions: Assumptions = Assumptions()) -> Plan:
    if objective not in OBJECTIVES:
        raise RecipeError("--objective", f"{objective!r} is not one of {', '.join(OBJECTIVES)}")
    if max_gpus is not None and max_gpus < 1:
        raise RecipeError("--max-gpus", f"must be at least 1, got {max_gpus}")
    start = time.perf_counter()
    searched, grid = enumerate_legal(recipe, max_gpus)
    ev = evaluate(recipe, grid, assumptions)
    gbs = recipe.train.global_batch_size
    idx = np.flatnonzero(ev["fits"])
    candidates = [_candidate(row, peak, step, gbs) for row, peak, step in
                  zip(grid[idx].tolist(), ev["peak"][idx].tolist(), ev["step"][idx].tolist())]
    key = _rank_key(objective)
    candidates.sort(key=key)
    elapsed = time.perf_counter() - start
    own, own_rank = None, None
    try:
        strategy, dp_assumed = recipe.strategy()
        own = full_candidate(recipe, strategy, assumptions)
        own["dp_assumed"] = dp_assumed
        if own["fits"]:
            own_rank = 1 + sum(1 for c in candidates if key(c) < key(own))
    except RecipeError as err:
        own = {"error": str(err)}
    hw = recipe.hardware
    return Plan(recipe=recipe.name, objective=objective, max_gpus=max_gpus, searched=searched, legal=len(grid),
                fitting=len(candidates), search_time_s=elapsed, candidates=candidates, pareto=pareto_front(candidates),
                own=own, own_rank=own_rank,
                hardware={"gpus_per_node": hw.gpus_per_node, "intra_node_gbps": hw.intra_node_gbps,
                          "inter_node_gbps": hw.inter_node_gbps, "note": "interconnect figures are ASSUMED"})
