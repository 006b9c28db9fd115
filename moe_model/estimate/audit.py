"""`moe audit RECIPE`: every statement of the recipe's `claims` section checked against figures computed here.

    claim                 computed by                                             accepted when
    total_params          params.count_params (exact, tested against numel)       within 1%
    gpus                  tp * pp * dp (DeepSpeed carves ep out of dp: ep | dp)    equal
    experts_per_gpu       num_local_experts / ep                                  equal
    memory_per_gpu_gb     estimate(...).peak.total_bytes / 1e9                    within 10%
    step_latency_s        perf.performance(...).step_time_s                       within 25%
    throughput_seq_per_s  perf.performance(...).throughput_seq_per_s              within 25%
The 25% band is the accuracy expected of an uncalibrated roofline model (REFERENCES.md: 10-20% for spec-sheet
models, plus the overlap and interconnect assumptions). A latency or throughput claim for a layout that does not fit
memory is wrong whatever its number: the plan cannot run. dp is the recipe's `parallel.dp` (else ep, and the
finding says it was assumed). Exit 1 when any claim is wrong.
"""

from __future__ import annotations

from ..recipe import Recipe
from ..units import GB
from .estimate import estimate
from .params import count_params

TOLERANCE = {"total_params": 0.01, "memory_per_gpu_gb": 0.10, "step_latency_s": 0.25, "throughput_seq_per_s": 0.25}


def _close(stated: float, computed: float, tol: float) -> bool:
    return abs(stated - computed) <= tol * abs(computed)


def audit(recipe: Recipe) -> list[dict]:
    claims = recipe.claims
    est = estimate(recipe)
    p, m = est.strategy, recipe.model
    perf = est.performance
    findings = []

    def add(claim, stated, computed, ok, why):
        findings.append({"claim": claim, "stated": stated, "computed": computed, "ok": bool(ok), "why": why})

    if claims.total_params is not None:
        c = count_params(recipe.moe_config())
        ok = _close(claims.total_params, c.total, TOLERANCE["total_params"])
        matrices = "three-matrix gated silu" if m.hidden_act == "silu" else "two-matrix gelu"
        add("total_params", claims.total_params, c.total, ok,
            f"{m.num_hidden_layers} layers x {m.num_local_experts} experts x {matrices} FFN of "
            f"{m.hidden_size}x{m.intermediate_size} ({c.expert:,} expert parameters) plus attention, routers, norms "
            f"and the {m.vocab_size}-token embedding and head give {c.total:,} ({c.total / 1e9:.2f} B)"
            + ("." if ok else f", not {claims.total_params / 1e9:g} B."))
    if claims.gpus is not None:
        gpus = est.gpus
        ok = claims.gpus == gpus
        if ok:
            why = f"tp{p.tp} x pp{p.pp} x dp{est.dp} = {gpus} GPUs."
        elif claims.gpus == gpus * p.ep:
            why = (f"the claim multiplies ep={p.ep} into the world size, but DeepSpeed carves expert-parallel groups "
                   f"out of the data-parallel ranks (ep divides dp), so tp{p.tp} x pp{p.pp} x dp{est.dp} = {gpus}.")
        else:
            why = f"the layout tp{p.tp} x pp{p.pp} x dp{est.dp} uses {gpus} GPUs, not {claims.gpus}."
        if est.dp_assumed:
            why = why[:-1] + " (dp not set in the recipe: assumed = ep)."
        add("gpus", claims.gpus, gpus, ok, why)
    if claims.experts_per_gpu is not None:
        per = m.num_local_experts / p.ep
        ok = abs(claims.experts_per_gpu - per) < 1e-9
        add("experts_per_gpu", claims.experts_per_gpu, per, ok,
            f"{m.num_local_experts} experts per layer split over ep={p.ep} leave {per:g} on each rank"
            + ("." if ok else f", not {claims.experts_per_gpu:g}."))
    fit_note = "." if est.fits else (f"; but the layout does not fit: its peak rank needs "
                                     f"{est.peak.total_bytes / GB:.1f} GB of {est.budget_bytes / GB:g} GB, so the "
                                     "plan cannot run at all.")
    if claims.memory_per_gpu_gb is not None:
        peak_gb = est.peak.total_bytes / GB
        ok = _close(claims.memory_per_gpu_gb, peak_gb, TOLERANCE["memory_per_gpu_gb"])
        add("memory_per_gpu_gb", claims.memory_per_gpu_gb, peak_gb, ok,
            f"the estimator's peak rank (stage {est.peak.stage}, {est.peak.in_flight} micro-batches in flight) needs "
            f"{peak_gb:.1f} GB including optimizer states, activations and reserve" + fit_note)
    bottleneck = max(perf.breakdown, key=perf.breakdown.get)
    if claims.step_latency_s is not None:
        ok = _close(claims.step_latency_s, perf.step_time_s, TOLERANCE["step_latency_s"]) and est.fits
        add("step_latency_s", claims.step_latency_s, perf.step_time_s, ok,
            f"the roofline model predicts {perf.step_time_s:.3f} s per step of {recipe.train.global_batch_size} x "
            f"{recipe.train.seq_len} tokens ({perf.micro_batches:g} micro-batches, bubble "
            f"{perf.bubble_fraction:.0%}, largest term {bottleneck})" + fit_note)
    if claims.throughput_seq_per_s is not None:
        ok = _close(claims.throughput_seq_per_s, perf.throughput_seq_per_s, TOLERANCE["throughput_seq_per_s"]) \
            and est.fits
        add("throughput_seq_per_s", claims.throughput_seq_per_s, perf.throughput_seq_per_s, ok,
            f"a global batch of {recipe.train.global_batch_size} sequences every {perf.step_time_s:.3f} s is "
            f"{perf.throughput_seq_per_s:.1f} sequences/s at {perf.mfu:.1%} MFU" + fit_note)
    return findings
