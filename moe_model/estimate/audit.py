"""`moe audit RECIPE`: every statement of the recipe's `claims` section checked against figures computed here, and
the plan's own figures checked against each other.

Claims against computed figures (`audit`); a memory claim is for the whole model (one copy of its states, the whole
global batch's activations) unless its name says per GPU:

    claim                        computed by                                                    accepted when
    total_params                 params.count_params (exact, tested against numel)              within 1%
    gpus                         Strategy.gpus: tp * pp * dp (DeepSpeed carves ep out of dp)    equal
    experts_per_gpu              num_local_experts / ep                                         equal
    layers_per_stage             memory.stage_layers (DeepSpeed's partition_balanced)           equal on every stage
    hidden_per_tp_rank           num_attention_heads * head_dim / tp (the attention width a     equal
                                 tensor-parallel rank holds; the residual stream is not split)
    heads_per_tp_rank            num_attention_heads / tp                                       equal
    effective_batch_size         train.global_batch_size (sequences per optimizer step)         equal
    gradient_accumulation_steps  Strategy.micro_batches: micro-batches per step per dp rank     equal
    memory_per_gpu_gb            estimate(...).peak.total_bytes                                 within 10%
    param/gradient/optimizer_    memory.model_states of the whole model (dp 1: one copy,        within 10%
      memory_gb                  the recipe's precision and optimizer)
    activation_memory_gb         activations.stage_activations: one forward of the whole        within 10%
                                 global batch on the unsplit model, the plan's checkpointing
    total_memory_gb              the four lines above                                           within 10%
    fits_gpu_memory              estimate(...).fits                                             equal
    step_latency_s               perf.performance(...).step_time_s                              within 25%
    throughput_seq_per_s         perf.performance(...).throughput_seq_per_s                     within 25%
    mfu                          perf.performance(...).mfu                                      within 25%
    memory_efficiency            the peak rank's bytes / the GPU's memory                       within 10%
The 25% band is the accuracy expected of an uncalibrated roofline model (REFERENCES.md: 10-20% for spec-sheet
models, plus the overlap and interconnect assumptions); 10% is the memory estimator's (exact to the byte on CPU
ranks, plus the allocator assumptions). A latency, throughput or MFU claim for a layout that does not fit memory is
wrong whatever its number: the plan cannot run. dp is the recipe's `parallel.dp` (else ep, and the finding says it
was assumed). A layout the project refuses to train (`Strategy.training_problem`, e.g. ep smaller than tp) is a
finding of its own (`claim: layout`), with the rule and the reason.

The plan's internal consistency (`consistency`), where its own figures imply each other (each check needs all of
its figures stated; memory figures are rounded, "~60 GB", so they must agree within 2%; what two time projections
imply is held to the 25% band each of them is accepted in):
    param_memory_gb      = total_params x the recipe's bytes per parameter
    gradient_memory_gb   = param_memory_gb x (gradient bytes / parameter bytes of `memory.model_states`)
    optimizer_memory_gb  = param_memory_gb x (optimizer bytes / parameter bytes of `memory.model_states`)
    total_memory_gb      = param + activation + gradient + optimizer memory (all four stated)
    throughput_seq_per_s = batch / step_latency_s
    effective_batch_size = throughput_seq_per_s x step_latency_s
    mfu                  = model FLOPs of a step (perf.model_flops_per_step) / (step_latency_s x gpus x peak FLOPs)

Ambiguity: a plan's "batch" may be the global batch or each data-parallel replica's. The recipe's
`train.global_batch_size` is read as the global batch (sequences per optimizer step); where dp > 1 and the verdict
depends on it, the finding also gives the figure and the verdict under the other reading (global batch = batch x
dp). Other ambiguous claims (gpus, hidden_per_tp_rank, mfu, memory_efficiency) say likewise which reading they use.
Every finding: `claim, stated, computed, ok, why` (DESIGN.md), plus `interpretation` (the reading used, or None),
`computed_other_interpretation` and `verdict_other_interpretation` ("right"/"wrong"; None where there is no other
reading). `why` is one sentence that starts with the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..recipe import Recipe, RecipeError
from ..units import GB
from .activations import MicroBatch, stage_activations
from .estimate import Estimate, estimate
from .memory import PRECISION_BYTES, ModelStates, grad_accum_dtype, model_states, stage_layers
from .params import count_params
from .perf import model_flops_per_step, shape_of
from .shapes import dims, rank_params

TOLERANCE = {"total_params": 0.01, "memory_per_gpu_gb": 0.10, "step_latency_s": 0.25, "throughput_seq_per_s": 0.25,
             "param_memory_gb": 0.10, "gradient_memory_gb": 0.10, "optimizer_memory_gb": 0.10,
             "activation_memory_gb": 0.10, "total_memory_gb": 0.10, "mfu": 0.25, "memory_efficiency": 0.10}
# memory lines are arithmetic on rounded figures ("~60 GB": two or three significant digits); time figures are
# projections, each accepted within the performance model's band, so what two of them imply is held to that band
CONSISTENCY_TOLERANCE = {"memory": 0.02, "time": TOLERANCE["step_latency_s"]}
ADAM_MOMENTS = 2  # what a plan's "Adam: 2x parameters" counts: the two moments at the parameters' precision
GLOBAL = "the batch is the global batch (train.global_batch_size, sequences per optimizer step)"


def _close(stated: float, computed: float, tol: float) -> bool:
    return abs(stated - computed) <= tol * abs(computed)


def _g(value: float) -> str:
    """A figure for a sentence: integers with separators, others to 4 significant digits (never a trailing '.')."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.4g}"


def finding(claim: str, stated: Any, computed: Any, ok: bool, why: str, *, interpretation: str | None = None,
            computed_other: Any = None, ok_other: bool | None = None) -> dict:
    """One finding: DESIGN.md's keys, then the reading used and the verdict under the other one (None: no other).
    `why` is the reason without its verdict: the verdict word is prefixed here."""
    return {"claim": claim, "stated": stated, "computed": computed, "ok": bool(ok),
            "why": f"{'right' if ok else 'wrong'}: {why}", "interpretation": interpretation,
            "computed_other_interpretation": computed_other,
            "verdict_other_interpretation": None if ok_other is None else ("right" if ok_other else "wrong")}


@dataclass(frozen=True)
class WholeModel:
    """One copy of the model's states and one forward of `batch` sequences on the unsplit model."""

    batch: int
    states: ModelStates
    activations_bytes: int

    @property
    def total_bytes(self) -> int:
        s = self.states
        return s.params_bytes + s.grads_bytes + s.optimizer_bytes + self.activations_bytes


def whole_model(recipe: Recipe, est: Estimate, batch: int) -> WholeModel:
    """The whole-model memory lines: `memory.model_states` of every parameter on one rank (dp 1: nothing
    partitioned, the recipe's precision and ZeRO stage pick the optimizer), and the activations one forward of the
    whole `batch` saves (balanced routing, the plan's activation checkpointing)."""
    cfg = recipe.moe_config()
    L = cfg.num_hidden_layers
    whole = rank_params(cfg, layers=range(L), first=True, last=True, tp=1, ep=1)
    states = model_states(whole, precision=recipe.train.precision, zero_stage=est.zero_stage, dp=1, ep=1, pp=1,
                          assumptions=est.assumptions)
    mb = MicroBatch(batch, recipe.train.seq_len, PRECISION_BYTES[recipe.train.precision])
    acts = stage_activations(cfg, mb, layers=range(L), first=True, last=True, pp=1, in_flight=1,
                             checkpointing=est.strategy.activation_checkpointing, imbalance=1.0)
    return WholeModel(batch=batch, states=states, activations_bytes=acts.activations_bytes)


@dataclass(frozen=True)
class Readings:
    """The figures of the recipe under the global-batch reading (`est`, `whole`) and, where dp > 1, under the
    per-replica one (`other_*`: the global batch is the recipe's batch x dp; None where dp = 1 or that batch breaks
    a layout rule)."""

    recipe: Recipe
    est: Estimate
    whole: WholeModel
    other_recipe: Recipe | None
    other_est: Estimate | None
    other_whole: WholeModel | None

    @property
    def batch(self) -> int:
        return self.recipe.train.global_batch_size

    @property
    def other_note(self) -> str:
        return (f"read as {_g(self.batch)} sequences per replica ({_g(self.other_recipe.train.global_batch_size)} in "
                f"all over dp={self.est.dp})")


def readings(recipe: Recipe) -> Readings:
    est = estimate(recipe)
    other_recipe = other_est = other_whole = None
    if est.dp > 1:
        train = recipe.train.model_copy(update={"global_batch_size": recipe.train.global_batch_size * est.dp})
        candidate = recipe.model_copy(update={"train": train})
        try:
            other_est = estimate(candidate)
            other_recipe = candidate
            other_whole = whole_model(candidate, other_est, train.global_batch_size)
        except RecipeError:  # that batch breaks a rule (micro_batch x dp must divide it): no other reading
            other_est = None
    return Readings(recipe, est, whole_model(recipe, est, recipe.train.global_batch_size), other_recipe, other_est,
                    other_whole)


def _fit_note(est: Estimate) -> str:
    return "" if est.fits else (f"; but the layout does not fit: its peak rank needs {est.peak.total_bytes / GB:.1f} "
                                f"GB of {est.budget_bytes / GB:g} GB, so the plan cannot run at all")


def _layout(est: Estimate) -> str:
    p = est.strategy
    return f"tp{p.tp} pp{p.pp} ep{p.ep} dp{p.dp}"


def audit(recipe: Recipe, r: Readings | None = None) -> list[dict]:
    """One finding per stated claim (the module docstring's table), then a `layout` finding where the project
    refuses to train the recipe's layout."""
    r = r or readings(recipe)
    claims, est, m = recipe.claims, r.est, recipe.model
    p, perf = est.strategy, est.performance
    other = r.other_est
    findings = []
    add = findings.append

    if claims.total_params is not None:
        c = count_params(recipe.moe_config())
        ok = _close(claims.total_params, c.total, TOLERANCE["total_params"])
        matrices = "three-matrix gated silu" if m.hidden_act == "silu" else "two-matrix gelu"
        add(finding("total_params", claims.total_params, c.total, ok,
                    f"{m.num_hidden_layers} layers x {m.num_local_experts} experts x {matrices} FFN of "
                    f"{m.hidden_size}x{m.intermediate_size} ({c.expert:,} expert parameters) plus attention, routers, "
                    f"norms and the {m.vocab_size}-token embedding and head give {c.total:,} ({c.total / 1e9:.2f} B)"
                    + ("." if ok else f", not {claims.total_params / 1e9:g} B.")))
    if claims.gpus is not None:
        gpus = est.gpus
        ok = claims.gpus == gpus
        fourth_axis = p.tp * p.pp * p.ep * p.dp
        if ok:
            why = f"tp{p.tp} x pp{p.pp} x dp{est.dp} = {gpus} GPUs"
        elif claims.gpus == fourth_axis and p.ep > 1:
            why = (f"the claim multiplies ep={p.ep} into the world size, but DeepSpeed carves expert-parallel groups "
                   f"out of the data-parallel ranks (ep divides dp), so tp{p.tp} x pp{p.pp} x dp{est.dp} = {gpus}")
        else:
            why = f"the layout tp{p.tp} x pp{p.pp} x dp{est.dp} uses {gpus} GPUs, not {claims.gpus}"
        if est.dp_assumed:
            why += " (dp not set in the recipe: assumed = ep)"
        extra = {}
        if p.ep > 1:
            extra = {"interpretation": "ep is carved out of dp (DeepSpeed: world = tp x pp x dp, ep divides dp)",
                     "computed_other": fourth_axis, "ok_other": claims.gpus == fourth_axis}
            why += (f"; read with ep as a fourth axis (tp x pp x ep x dp = {fourth_axis}) the count would be "
                    f"{'right' if extra['ok_other'] else 'wrong'}, but in DeepSpeed that many GPUs is the layout "
                    f"tp{p.tp} pp{p.pp} dp{p.ep * p.dp}, not the one stated")
        add(finding("gpus", claims.gpus, gpus, ok, why + ".", **extra))
    if claims.experts_per_gpu is not None:
        per = m.num_local_experts / p.ep
        ok = abs(claims.experts_per_gpu - per) < 1e-9
        add(finding("experts_per_gpu", claims.experts_per_gpu, per, ok,
                    f"{m.num_local_experts} experts per layer split over ep={p.ep} leave {per:g} on each rank"
                    + ("." if ok else f", not {claims.experts_per_gpu:g}.")))
    if claims.layers_per_stage is not None:
        layers = stage_layers(m.num_hidden_layers, p.pp)
        ok = all(claims.layers_per_stage == n for n in layers)
        split = ", ".join(str(n) for n in layers)
        add(finding("layers_per_stage", claims.layers_per_stage, max(layers), ok,
                    f"DeepSpeed's partition_balanced puts the {m.num_hidden_layers} decoder layers on pp={p.pp} "
                    f"stages as {split}" + ("." if ok else f", not {_g(claims.layers_per_stage)} on every stage.")))
    if claims.hidden_per_tp_rank is not None:
        cfg = recipe.moe_config()
        width = dims(cfg).Dq  # the query projection's width, which tensor parallelism splits by heads
        per = width / p.tp
        ok = claims.hidden_per_tp_rank == per
        ok_other = claims.hidden_per_tp_rank == cfg.hidden_size
        add(finding("hidden_per_tp_rank", claims.hidden_per_tp_rank, per, ok,
                    f"each of tp={p.tp} ranks holds {per:g} of the attention's {cfg.num_attention_heads} heads x "
                    f"{cfg.head_dim} = {width} projection columns; read as the residual stream split over tp it "
                    f"would be {'right' if ok_other else 'wrong'}: Megatron-style tensor parallelism keeps every "
                    f"rank's hidden state {cfg.hidden_size} wide.",
                    interpretation="the attention projection width per tensor-parallel rank (heads x head_dim / tp)",
                    computed_other=cfg.hidden_size, ok_other=ok_other))
    if claims.heads_per_tp_rank is not None:
        per = m.num_attention_heads / p.tp
        ok = claims.heads_per_tp_rank == per
        add(finding("heads_per_tp_rank", claims.heads_per_tp_rank, per, ok,
                    f"{m.num_attention_heads} attention heads over tp={p.tp} leave {per:g} on each rank"
                    + ("." if ok else f", not {_g(claims.heads_per_tp_rank)}.")))
    if claims.effective_batch_size is not None:
        ok = claims.effective_batch_size == r.batch
        extra, why = {}, f"the recipe's global batch is {r.batch} sequences per optimizer step"
        if r.other_recipe is not None:
            other_batch = r.other_recipe.train.global_batch_size
            extra = {"interpretation": GLOBAL, "computed_other": other_batch,
                     "ok_other": claims.effective_batch_size == other_batch}
            why += (f" ({r.batch // est.dp} on each of the dp={est.dp} replicas); {r.other_note} the claim "
                    f"(batch x dp = {other_batch}) would be {'right' if extra['ok_other'] else 'wrong'}")
        add(finding("effective_batch_size", claims.effective_batch_size, r.batch, ok, why + ".", **extra))
    if claims.gradient_accumulation_steps is not None:
        steps = est.micro_steps
        ok = claims.gradient_accumulation_steps == steps
        why = (f"{r.batch} sequences over dp={est.dp} replicas of micro-batch {p.micro_batch_size} make {steps} "
               f"micro-batch{'es' if steps != 1 else ''} per step")
        if p.pp > 1:
            why += (f", which through pp={p.pp} stages leaves a pipeline bubble of {perf.bubble_fraction:.0%} "
                    f"((pp - 1) / (m + pp - 1))")
        extra = {}
        if r.other_recipe is not None:
            other_steps = r.other_est.micro_steps
            extra = {"interpretation": GLOBAL, "computed_other": other_steps,
                     "ok_other": claims.gradient_accumulation_steps == other_steps}
            why += (f"; {r.other_note} it would be {other_steps}, and the claim "
                    f"{'right' if extra['ok_other'] else 'wrong'}")
        add(finding("gradient_accumulation_steps", claims.gradient_accumulation_steps, steps, ok, why + ".", **extra))
    if claims.memory_per_gpu_gb is not None:
        peak_gb = est.peak.total_bytes / GB
        ok = _close(claims.memory_per_gpu_gb, peak_gb, TOLERANCE["memory_per_gpu_gb"])
        add(finding("memory_per_gpu_gb", claims.memory_per_gpu_gb, peak_gb, ok,
                    f"the estimator's peak rank (stage {est.peak.stage}, {est.peak.in_flight} micro-batches in "
                    f"flight) needs {peak_gb:.1f} GB including optimizer states, activations and reserve"
                    + _fit_note(est) + "."))
    findings += _memory_lines(recipe, r)
    if claims.fits_gpu_memory is not None:
        ok = claims.fits_gpu_memory == est.fits
        add(finding("fits_gpu_memory", claims.fits_gpu_memory, est.fits, ok,
                    f"the estimator's peak rank (stage {est.peak.stage}) needs {est.peak.total_bytes / GB:.1f} GB of "
                    f"{est.budget_bytes / GB:g} GB per GPU, so the layout {'fits' if est.fits else 'does not fit'}."))
    bottleneck = max(perf.breakdown, key=perf.breakdown.get)
    timed = (("step_latency_s", claims.step_latency_s, lambda e: e.performance.step_time_s),
             ("throughput_seq_per_s", claims.throughput_seq_per_s, lambda e: e.performance.throughput_seq_per_s),
             ("mfu", claims.mfu, lambda e: e.performance.mfu))
    for name, stated, figure in timed:
        if stated is None:
            continue
        computed = figure(est)
        ok = _close(stated, computed, TOLERANCE[name]) and est.fits
        if name == "step_latency_s":
            why = (f"the roofline model predicts {perf.step_time_s:.3f} s per step of {r.batch} x "
                   f"{recipe.train.seq_len} tokens ({perf.micro_batches:g} micro-batches, bubble "
                   f"{perf.bubble_fraction:.0%}, largest term {bottleneck})")
        elif name == "throughput_seq_per_s":
            why = (f"a global batch of {r.batch} sequences every {perf.step_time_s:.3f} s is "
                   f"{perf.throughput_seq_per_s:.1f} sequences/s at {perf.mfu:.1%} MFU")
        else:
            why = (f"the step's model FLOPs over (step time x {est.gpus} GPUs x {recipe.hardware.peak_tflops:g} "
                   f"TFLOPS) give {perf.mfu:.1%}")
        why += _fit_note(est)
        extra = {}
        if name == "mfu":
            assumed = recipe.hardware.mfu
            extra = {"interpretation": "the MFU of the plan's whole step (model FLOPs / (step time x GPUs x peak))",
                     "computed_other": assumed, "ok_other": _close(stated, assumed, TOLERANCE["mfu"])}
            why += (f"; read as the matmul efficiency the hardware section assumes (hardware.mfu = {assumed:g}, an "
                    f"input, not a result) it would be {'right' if extra['ok_other'] else 'wrong'}")
        elif other is not None:
            other_value = figure(other)
            extra = {"interpretation": GLOBAL, "computed_other": other_value,
                     "ok_other": _close(stated, other_value, TOLERANCE[name]) and other.fits}
            why += (f"; {r.other_note} the model predicts {_g(other_value)}, and the claim would be "
                    f"{'right' if extra['ok_other'] else 'wrong'}")
        add(finding(name, stated, computed, ok, why + ".", **extra))
    if claims.memory_efficiency is not None:
        used = est.peak.total_bytes / est.budget_bytes
        balance = sum(s.total_bytes for s in est.stages) / len(est.stages) / est.peak.total_bytes
        ok = _close(claims.memory_efficiency, used, TOLERANCE["memory_efficiency"]) and est.fits
        ok_other = _close(claims.memory_efficiency, balance, TOLERANCE["memory_efficiency"])
        add(finding("memory_efficiency", claims.memory_efficiency, used, ok,
                    f"the peak rank uses {used:.0%} of its GPU's {est.budget_bytes / GB:g} GB"
                    + ("" if est.fits else " (more than 100%: it does not fit)")
                    + f"; read as the balance between ranks (mean rank over peak rank, every stage's rank "
                      f"{', '.join(f'{s.total_bytes / GB:.1f}' for s in est.stages)} GB) it is {balance:.0%}, and "
                      f"the claim would be {'right' if ok_other else 'wrong'}.",
                    interpretation="the share of each GPU's memory the peak rank uses",
                    computed_other=balance, ok_other=ok_other))
    problem = p.training_problem()
    if problem:
        field, message = problem
        add(finding("layout", _layout(est), f"refused ({field})", False,
                    f"the project refuses to train this layout ({field}: {message}): DeepSpeed's expert groups are "
                    f"consecutive ranks, so with ep={p.ep} under tp={p.tp} tensor-parallel peers hold the same "
                    "experts and DeepSpeed's global grad norm cannot count them exactly once, which makes gradient "
                    "clipping use a wrong norm."))
    return findings


def _memory_lines(recipe: Recipe, r: Readings) -> list[dict]:
    """The whole-model memory claims: parameters, gradients, optimizer, activations and their total."""
    claims, w = recipe.claims, r.whole
    s = w.states
    P = count_params(recipe.moe_config()).total
    per_param = lambda nbytes: nbytes / P  # noqa: E731
    precision = recipe.train.precision
    out = []
    lines = (("param_memory_gb", claims.param_memory_gb, s.params_bytes,
              f"{P:,} parameters x {per_param(s.params_bytes):g} bytes ({precision})"),
             ("gradient_memory_gb", claims.gradient_memory_gb, s.grads_bytes,
              f"{P:,} gradients x {per_param(s.grads_bytes):g} bytes ({s.optimizer_kind}, accumulated in "
              f"{grad_accum_dtype(precision, recipe.parallel.zero_stage)})"),
             ("optimizer_memory_gb", claims.optimizer_memory_gb, s.optimizer_bytes,
              f"{s.optimizer_kind} keeps {per_param(s.optimizer_bytes):g} bytes per parameter (fp32 master weights "
              f"where separate and Adam's two fp32 moments) for {P:,} parameters"))
    for name, stated, nbytes, how in lines:
        if stated is not None:
            computed = nbytes / GB
            ok = _close(stated, computed, TOLERANCE[name])
            out.append(finding(name, stated, computed, ok, f"{how} = {_g(computed)} GB for the whole model."))
    for name, stated, pick in (("activation_memory_gb", claims.activation_memory_gb, lambda x: x.activations_bytes),
                               ("total_memory_gb", claims.total_memory_gb, lambda x: x.total_bytes)):
        if stated is None:
            continue
        computed = pick(w) / GB
        ok = _close(stated, computed, TOLERANCE[name])
        if name == "activation_memory_gb":
            why = (f"one forward of the whole global batch ({r.batch} x {recipe.train.seq_len} tokens) on the unsplit "
                   f"model saves {_g(computed)} GB for backward with activation checkpointing "
                   f"{'on' if r.est.strategy.activation_checkpointing else 'off'} (logits and the fp32 loss head "
                   "included)")
        else:
            why = (f"parameters {_g(s.params_bytes / GB)} + gradients {_g(s.grads_bytes / GB)} + optimizer "
                   f"{_g(s.optimizer_bytes / GB)} + activations {_g(w.activations_bytes / GB)} = {_g(computed)} GB")
        extra = {}
        if r.other_whole is not None:
            other_value = pick(r.other_whole) / GB
            extra = {"interpretation": GLOBAL, "computed_other": other_value,
                     "ok_other": _close(stated, other_value, TOLERANCE[name])}
            why += (f"; {r.other_note} it would be {_g(other_value)} GB, and the claim "
                    f"{'right' if extra['ok_other'] else 'wrong'}")
        out.append(finding(name, stated, computed, ok, why + ".", **extra))
    return out


def consistency(recipe: Recipe, r: Readings | None = None) -> list[dict]:
    """The plan's figures against each other (the module docstring's list): `stated` is the plan's figure,
    `computed` what its other figures imply."""
    r = r or readings(recipe)
    c, est = recipe.claims, r.est
    s = r.whole.states
    tol, time_tol = CONSISTENCY_TOLERANCE["memory"], CONSISTENCY_TOLERANCE["time"]
    out = []

    def check(name, stated, implied, why, tol=tol, **extra):
        ok = _close(stated, implied, tol)
        verdict = "agrees" if ok else "does not agree"
        out.append(finding(name, stated, implied, ok, f"{why}, which {verdict} with the stated {_g(stated)}"
                                                      + extra.pop("tail", "") + ".", **extra))

    b = PRECISION_BYTES[recipe.train.precision]
    if c.param_memory_gb is not None and c.total_params is not None:
        check("param_memory_gb = total_params x bytes", c.param_memory_gb, c.total_params * b / GB,
              f"the stated {_g(c.total_params / 1e9)} B parameters x {b} bytes ({recipe.train.precision}) = "
              f"{_g(c.total_params * b / GB)} GB", tail=" (whether the parameter count is right is total_params' "
                                                       "finding)")
    if c.param_memory_gb is not None:
        for name, stated, nbytes, what in (
                ("gradient_memory_gb = param_memory_gb x gradient bytes per parameter byte", c.gradient_memory_gb,
                 s.grads_bytes, "gradients"),
                ("optimizer_memory_gb = param_memory_gb x optimizer bytes per parameter byte", c.optimizer_memory_gb,
                 s.optimizer_bytes, "optimizer states")):
            if stated is None:
                continue
            ratio = nbytes / s.params_bytes
            extra = {}
            why = (f"{s.optimizer_kind if what != 'gradients' else 'DeepSpeed'} holds {ratio:g}x the parameters' "
                   f"bytes in {what}, so the stated parameter memory implies {_g(c.param_memory_gb)} x {ratio:g} = "
                   f"{_g(c.param_memory_gb * ratio)} GB")
            if what != "gradients":
                plan_rule = ADAM_MOMENTS * c.param_memory_gb
                extra = {"interpretation": "Adam as DeepSpeed runs it in mixed precision (memory.py): fp32 master "
                                          "weights and two fp32 moments",
                         "computed_other": plan_rule, "ok_other": _close(stated, plan_rule, tol),
                         "tail": (f"; under the plan's own rule (Adam's {ADAM_MOMENTS} moments at the parameters' "
                                  f"precision, {_g(plan_rule)} GB) it would agree, but that rule leaves out the fp32 "
                                  "master weights and the moments' fp32 width")}
            check(name, stated, c.param_memory_gb * ratio, why, **extra)
    parts = {"param": c.param_memory_gb, "activation": c.activation_memory_gb, "gradient": c.gradient_memory_gb,
             "optimizer": c.optimizer_memory_gb}
    stated_parts = {k: v for k, v in parts.items() if v is not None}
    if c.total_memory_gb is not None and len(stated_parts) == len(parts):
        check("total_memory_gb = sum of the memory lines", c.total_memory_gb, sum(stated_parts.values()),
              " + ".join(f"{k} {_g(v)}" for k, v in stated_parts.items())
              + f" = {_g(sum(stated_parts.values()))} GB")
    other_batch = r.other_recipe.train.global_batch_size if r.other_recipe is not None else None
    if c.throughput_seq_per_s is not None and c.step_latency_s is not None:
        implied = r.batch / c.step_latency_s
        extra = {}
        if other_batch:
            other = other_batch / c.step_latency_s
            extra = {"interpretation": GLOBAL, "computed_other": other,
                     "ok_other": _close(c.throughput_seq_per_s, other, time_tol),
                     "tail": f"; {r.other_note} it would be {_g(other)} sequences/s, and would "
                             f"{'agree' if _close(c.throughput_seq_per_s, other, time_tol) else 'not agree'}"}
        check("throughput_seq_per_s = batch / step_latency_s", c.throughput_seq_per_s, implied,
              f"{r.batch} sequences / the stated {_g(c.step_latency_s)} s per step = {_g(implied)} sequences/s",
              tol=time_tol, **extra)
        if c.effective_batch_size is not None:
            check("effective_batch_size = throughput_seq_per_s x step_latency_s", c.effective_batch_size,
                  c.throughput_seq_per_s * c.step_latency_s,
                  f"the stated {_g(c.throughput_seq_per_s)} sequences/s x {_g(c.step_latency_s)} s per step = "
                  f"{_g(c.throughput_seq_per_s * c.step_latency_s)} sequences per step", tol=time_tol,
                  tail=" under any reading of the batch")
    if c.mfu is not None and c.step_latency_s is not None:
        gpus = c.gpus if c.gpus is not None else est.gpus
        peak = recipe.hardware.peak_tflops * 1e12

        def implied_mfu(rec):
            return model_flops_per_step(shape_of(rec)) / (c.step_latency_s * gpus * peak)

        extra = {}
        if r.other_recipe is not None:
            other = implied_mfu(r.other_recipe)
            extra = {"interpretation": GLOBAL, "computed_other": other, "ok_other": _close(c.mfu, other, time_tol),
                     "tail": f"; {r.other_note} it would be {_g(other)}, and would "
                             f"{'agree' if _close(c.mfu, other, time_tol) else 'not agree'}"}
        check("mfu = model FLOPs / (step_latency_s x gpus x peak)", c.mfu, implied_mfu(recipe),
              f"a step of {r.batch} x {recipe.train.seq_len} tokens is {model_flops_per_step(shape_of(recipe)):.3g} "
              f"model FLOPs, in the stated {_g(c.step_latency_s)} s on {'the stated' if c.gpus else 'the layout of'} "
              f"{gpus} GPUs of {recipe.hardware.peak_tflops:g} TFLOPS = an MFU of {_g(implied_mfu(recipe))}",
              tol=time_tol, **extra)
    return out


def audit_report(recipe: Recipe) -> dict:
    """Everything `moe audit` prints: the findings (claims and a refused layout), the consistency checks, the counts
    of right and wrong findings (a refused layout counts as wrong), whether the layout is refused and the count of
    failed consistency checks."""
    r = readings(recipe)
    findings, checks = audit(recipe, r), consistency(recipe, r)
    return {"recipe": recipe.name, "findings": findings, "consistency": checks,
            "right": sum(f["ok"] for f in findings), "wrong": sum(not f["ok"] for f in findings),
            "layout_refused": any(f["claim"] == "layout" for f in findings),
            "inconsistent": sum(not f["ok"] for f in checks)}


