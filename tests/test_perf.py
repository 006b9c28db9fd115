"""The performance model: FLOPs against multiply-adds counted by hand for a tiny shape, the roofline, the 1F1B
bubble, link placement of TP/EP/DP traffic, the training rule and the wiring into `moe estimate`; the MoE backends'
rows and all-to-all bytes (AutoEP's against DeepSpeed's own permutation sizes), the ZeRO stages' collectives, and
ZeRO-3's parameter gathers against a live engine's."""

import dataclasses
import json
import math

import pytest

from moe_model.cli import main
from moe_model.estimate.estimate import estimate
from moe_model.estimate.perf import (Shape, layer_forward_flops, model_flops_per_step, performance, shape_of,
                                     step_components)
from moe_model.strategy import training_problem
from moe_model.recipe import RecipeError, load_recipe, recipe_from_dict
from tests.conftest import ROOT

SEED = str(ROOT / "recipes/seed_4b.yaml")
SEED_PLAN = str(ROOT / "recipes/seed_plan.yaml")

# hidden 8, 2 query heads and 1 kv head of width 4, 4 experts of width 16, top-2, vocab 32, 6 tokens, 2 layers
TINY = {"vocab_size": 32, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "num_local_experts": 4,
        "num_experts_per_tok": 2, "max_position_embeddings": 64}


def tiny(act="gelu", **sections):
    raw = {"name": "tiny", "model": {**TINY, "hidden_act": act},
           "train": {"seq_len": 6, "global_batch_size": 4, "precision": "fp32"}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return recipe_from_dict(raw)


def macs_by_hand(S, act):
    """Multiply-adds of one decoder layer's forward for one sequence, each matmul written out (tp 1)."""
    D, Hq, Hkv, d, E, k, I = 8, 2, 1, 4, 4, 2, 16
    q = S * D * (Hq * d)  # [S, D] x [D, Hq*d]
    kv = 2 * S * D * (Hkv * d)  # k and v: [S, D] x [D, Hkv*d]
    o = S * (Hq * d) * D
    causal_pairs = sum(1 for i in range(S) for j in range(S) if j <= i)  # query i sees keys 0..i
    scores = Hq * causal_pairs * d  # q_i . k_j per head
    values = Hq * causal_pairs * d  # p_ij * v_j per head
    router = S * D * E
    per_expert_row = (2 if act == "gelu" else 3) * D * I  # gelu: up, down; silu: gate, up, down
    experts = S * k * per_expert_row
    return {"proj": q + kv + o, "sdpa": scores + values, "router": router, "experts": experts, "pairs": causal_pairs}


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_layer_flops_are_twice_the_multiply_adds_counted_by_hand(act):
    s = shape_of(tiny(act))
    S = s.S
    ref = macs_by_hand(S, act)
    f = {name: float(v) for name, v in layer_forward_flops(s, 1, 1, 2).items()}
    assert f["qkv"] + f["o_proj"] == 2 * ref["proj"]
    assert f["router"] == 2 * ref["router"]
    assert f["experts"] == 2 * ref["experts"]
    # the model halves the full S x S scores (Megatron's convention, S^2/2 pairs); the exact causal count has the
    # diagonal too, S(S+1)/2: the two differ by the factor S / (S + 1)
    assert f["sdpa"] == pytest.approx(2 * ref["sdpa"] * S / (S + 1), rel=1e-12)
    # a step: forward + backward (2x), 3x the forward of every layer and the LM head [S, D] x [D, V]
    head = S * 8 * 32
    layer = 2 * (ref["proj"] + ref["router"] + ref["experts"]) + 2 * ref["sdpa"] * S / (S + 1)
    forward = 2 * layer + 2 * head  # 2 layers and the head, per sequence
    assert model_flops_per_step(s) == pytest.approx(3 * 4 * forward, rel=1e-12)  # global batch 4


def test_ep1_with_tp_runs_the_experts_on_every_tp_rank_and_ep_splits_them():
    s = shape_of(tiny())
    own_block = float(layer_forward_flops(s, 1, 2, 1)["experts"])
    deepspeed = float(layer_forward_flops(s, 1, 2, 2)["experts"])
    assert own_block == 2 * deepspeed == 2 * macs_by_hand(6, "gelu")["experts"]


def free_links():
    """Hardware where memory traffic and links cost nothing: the step is compute alone."""
    return {"hbm_bandwidth_tbps": 1e12, "intra_node_gbps": 1e15, "inter_node_gbps": 1e15}


@pytest.mark.parametrize("ckpt", [False, True])
def test_compute_bound_step_is_flops_over_peak_times_mfu(ckpt):
    r = tiny(hardware={"peak_tflops": 100, "mfu": 0.5, **free_links()},
             parallel={"tp": 1, "pp": 1, "ep": 1, "dp": 1, "micro_batch_size": 2, "activation_checkpointing": ckpt,
                       "zero_stage": 1})
    ref = macs_by_hand(6, "gelu")
    layer = 2 * (ref["proj"] + ref["router"] + ref["experts"])
    sdpa = 2 * ref["sdpa"] * 6 / 7  # its backward recomputes the scores: 2.5x the forward, not 2x
    head = 2 * 6 * 8 * 32
    seqs = 4  # global batch, one rank: 2 micro-batches of 2
    flops = seqs * (2 * layer * (3 + ckpt) + 2 * sdpa * (1 + ckpt + 2.5) + 3 * head)
    assert performance(r).step_time_s == pytest.approx(flops / (100e12 * 0.5), rel=1e-6)


def test_memory_bound_op_is_bytes_over_bandwidth_times_utilisation():
    # a huge peak: every op takes its memory time; halving the bandwidth utilisation doubles the step
    hw = {"peak_tflops": 1e12, "intra_node_gbps": 1e15, "inter_node_gbps": 1e15}
    a = performance(tiny(hardware={**hw, "bandwidth_utilization": 0.8})).step_time_s
    b = performance(tiny(hardware={**hw, "bandwidth_utilization": 0.4})).step_time_s
    assert b == pytest.approx(2 * a, rel=1e-9)


def test_one_f_one_b_bubble():
    r = load_recipe(SEED, ["parallel.pp=4", "parallel.dp=8", "parallel.micro_batch_size=2"])
    p = performance(r)
    m = 128 / (2 * 8)
    assert p.micro_batches == m and p.bubble_fraction == pytest.approx(3 / (m + 3))
    busy, bubble = p.breakdown["pipeline_busy (m x slowest stage)"], p.breakdown["pipeline_bubble"]
    assert bubble / (busy + bubble) == pytest.approx(3 / (m + 3), rel=1e-12)


def shape(**changes):
    base = dict(D=1024, Dq=1024, Dkv=1024, E=64, k=2, I=2048, g=2, V=32000, L=16, tied=False, S=1024,
                global_batch=64, b=2, compute_flops=240e12, hbm_bytes_s=1.44e12, gpus_per_node=8,
                intra_bytes_s=400e9, inter_bytes_s=50e9, peak_flops=400e12)
    return Shape(**{**base, **changes})


def test_tp_all_reduce_ring_volume_on_intra_node_links():
    s = shape()
    c = step_components(s, 4, 1, 1, 1, 1, 2, False)
    T = 2 * 1024
    assert float(c["tp_comm"]) == pytest.approx(4 * 2 * 3 / 4 * 2 * T * 1024 / 400e9, rel=1e-12)
    c = step_components(s, 4, 1, 1, 1, 1, 2, True)  # recompute repeats the 2 forward all-reduces
    assert float(c["tp_comm"]) == pytest.approx(6 * 2 * 3 / 4 * 2 * T * 1024 / 400e9, rel=1e-12)


def test_ep_all_to_all_goes_inter_node_when_the_group_spans_nodes():
    T = 1024
    bytes_per_rank = 2 * T * 1024 * 2  # k * T * D * b
    inside = step_components(shape(), 1, 1, 8, 8, 1, 1, False)
    assert float(inside["ep_comm"]) == pytest.approx(4 * bytes_per_rank * 7 / 8 / 400e9, rel=1e-12)
    across = step_components(shape(), 1, 1, 16, 16, 1, 1, False)  # 8 peers in the node, 8 in the other
    assert float(across["ep_comm"]) == pytest.approx(4 * bytes_per_rank * 8 / 16 / 50e9, rel=1e-12)


def test_dp_reduction_uses_inter_node_links_beyond_a_node():
    intra = step_components(shape(global_batch=8), 1, 1, 1, 8, 1, 1, False)
    inter = step_components(shape(global_batch=16), 1, 1, 1, 16, 1, 1, False)
    dense = 16 * (4 * 1024 * 1024 + 2 * 1024 + 1024 * 64) + 2 * 32000 * 1024 + 1024
    expert = 16 * 64 * 2 * 2048 * 1024
    ref = lambda n, bw: 2 * (n - 1) / n * 2 * (dense + expert) / bw  # noqa: E731  ep 1: experts over dp too
    assert float(intra["dp_reduce"]) == pytest.approx(ref(8, 400e9), rel=1e-12)
    assert float(inter["dp_reduce"]) == pytest.approx(ref(16, 50e9), rel=1e-12)


def test_training_rule_ep_multiple_of_tp():
    assert training_problem(2, 4) is None and training_problem(4, 1) is None
    field, message = training_problem(4, 2)
    assert field == "parallel.ep" and "multiple of tp" in message


def test_estimate_json_carries_the_performance_model(capsys):
    code = main(["estimate", SEED, "--json"])
    out = json.loads(capsys.readouterr().out)
    perf = performance(load_recipe(SEED), dp=8)
    assert code == 0
    assert out["step_time_s"] == pytest.approx(perf.step_time_s) and out["step_time_s"] > 0
    assert out["throughput_seq_per_s"] == pytest.approx(128 / perf.step_time_s)
    assert 0 < out["mfu"] < 0.6  # below the matmul efficiency: attention, memory-bound ops and comms cost time
    assert out["performance"]["breakdown_s"]


def test_estimate_and_performance_agree_on_layout():
    r = load_recipe(SEED_PLAN)
    est = estimate(r)
    assert est.performance.gpus == est.gpus == 128
    with pytest.raises(RecipeError):
        performance(r, tp=3)


def test_calibrate_refit_reproduces_a_runs_step_time(tmp_path):
    from moe_model.calibrate.refit import measured_step_time, refit_factor, refit_overrides, run_recipe

    recipe = tiny(parallel={"dp": 1})
    (tmp_path / "run.json").write_text(json.dumps({"recipe": recipe.model_dump()}))
    lines = [{"step": 1, "step_time_s": 9.0}] + [{"step": i, "step_time_s": t} for i, t in
                                                 enumerate([0.02, 0.03, 0.025], start=2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    measured, used = measured_step_time(tmp_path)
    assert (measured, used) == (0.025, 3)  # the first (warm-up) record is left out; the median of the rest
    ran = run_recipe(tmp_path)
    f = refit_factor(ran, measured)
    refit = load_recipe_like(ran, refit_overrides(ran, f))
    assert performance(refit, dp=1).step_time_s == pytest.approx(measured, rel=1e-5)


def load_recipe_like(recipe, overrides):
    return recipe_from_dict(recipe.model_dump(), overrides)


# ---- the MoE backends and the ZeRO stages (estimate/traffic.py) ----

def test_autoep_rows_are_what_deepspeeds_permutation_sizes_for_the_routed_counts():
    """4 experts, top-1, 2 ranks of 90 tokens at skew 2: 180 routed copies, the mean expert load 45, the busiest 90 and
    the other three 30 each. Rank 0 holds experts 0 and 1: it receives 90 + 30 rows and DeepSpeed's own permutation
    (`generate_permute_indices`, per source rank's counts) rounds them to 96 + 32 for the grouped GEMM."""
    import torch
    from deepspeed.moe.ep_kernels import generate_permute_indices

    from moe_model.estimate.traffic import autoep_rows

    s = shape(E=4, k=1)
    received, computed = autoep_rows(s, 90, 2, 2.0)
    counts = torch.tensor([45, 15, 45, 15])  # [source rank 0: experts 0, 1; source rank 1: experts 0, 1]
    _, m_sizes, _ = generate_permute_indices(counts, 2, 2, 256, 8, use_cpu=True)
    assert received == int(counts.sum()) == 120
    assert computed == int(m_sizes.sum()) == 128
    assert autoep_rows(s, 90, 2, 1.0)[0] == 90  # balanced: the rank's own T*k routed copies, nothing more


@pytest.mark.parametrize("skew", [1.0, 3.0])
def test_all_to_all_bytes_per_backend(skew):
    """AutoEP moves the routed rows the busiest rank receives (T*k when balanced), the legacy layer E buffers of the
    busiest expert's depth C = ceil(s*T*k/E): 4 exchanges a layer, (e-1)/e of each leaving the rank."""
    s = dataclasses.replace(shape(), imbalance=skew)
    T, k, E, e, D, b = 1024, 2, 64, 8, 1024, 2
    hot = skew * e * T * k / E
    received = hot + (E // e - 1) * (e * T * k - hot) / (E - 1)
    depth = math.ceil(skew * T * k / E)
    autoep = step_components(s, 1, 1, e, e, 1, 1, False, autoep=True)
    legacy = step_components(s, 1, 1, e, e, 1, 1, False)
    assert float(autoep["ep_comm"]) == pytest.approx(4 * received * D * b * (e - 1) / e / 400e9, rel=1e-12)
    assert float(legacy["ep_comm"]) == pytest.approx(4 * E * depth * D * b * (e - 1) / e / 400e9, rel=1e-12)
    if skew == 1.0:
        assert received == T * k == E * depth
    else:  # the legacy layer computes and sends the padding; AutoEP does not
        assert float(autoep["ep_comm"]) < float(legacy["ep_comm"]) / 2
        assert layer_forward_flops(s, 1, 1, e, True)["experts"] < layer_forward_flops(s, 1, 1, e)["experts"] / 2


def test_performance_prices_the_backend_the_strategy_resolves_to():
    silu = load_recipe(SEED, ["model.hidden_act=silu", "parallel.dp=8"])
    auto, legacy = performance(silu), performance(silu, moe_backend="legacy")
    assert auto.moe_backend == "autoep" and legacy.moe_backend == "legacy"
    assert auto.per_micro_batch["comm.ep_all_to_all"] < legacy.per_micro_batch["comm.ep_all_to_all"]
    assert performance(load_recipe(SEED, ["parallel.dp=8"])).moe_backend == "legacy"  # gelu: AutoEP cannot run it


def test_zero2_reduce_scatters_every_micro_batch_and_zero0_1_at_the_step():
    s = shape(global_batch=64)
    m = 64 / (2 * 8)  # micro-batch 2, dp 8
    one = step_components(s, 1, 1, 1, 8, 1, 2, False)
    two = step_components(s, 1, 1, 1, 8, 2, 2, False)
    zero = step_components(s, 1, 1, 1, 8, 0, 2, False)
    assert float(zero["dp_reduce"]) == float(one["dp_reduce"])  # all-reduce = reduce-scatter + all-gather
    assert float(two["dp_reduce"]) == pytest.approx(float(one["dp_reduce"]) * (m + 1) / 2, rel=1e-12)
    assert float(one["zero3_gather"]) == float(two["zero3_gather"]) == 0.0


def tensors_by_hand(E_local, gated_autoep):
    """(gathered, persistent) elements of the seed-shaped rank (ep 8, the default threshold 1e5), tensor by tensor."""
    D, V, L = 1024, 32000, 16
    attention = [D * 1024] * 4 + [D]  # q, k, v, o, input norm
    moe_dense = [D, 64 * D]  # post-attention norm, router [E, D]
    experts = [E_local * 2048 * D] * (3 if gated_autoep else 2)
    layer = attention + moe_dense + experts
    ends = [V * D, D, V * D]  # embedding, final norm, LM head
    tensors = layer * L + ends
    return sum(n for n in tensors if n > 100_000), sum(n for n in tensors if n <= 100_000)


@pytest.mark.parametrize("micro_batch", [1, 4])
def test_zero3_gathers_every_partitioned_tensor_each_micro_batch_and_reduce_scatters_its_gradients(micro_batch):
    """The seed's rank with gated experts on AutoEP at ep 8 (8 experts: gate, up, down [8, 2048, 1024] each) and
    dp 16: every tensor above the persistence threshold all-gathered in each micro-batch's forward, nothing again in
    the backward (the default reuse distance and look-ahead keep them), the small ones once after the step; dense
    over dp 16, experts over dp/ep = 2; gradients reduce-scattered each micro-batch, as ZeRO-2 does, which instead
    all-gathers the updated weights once after the step."""
    s = shape(global_batch=64, g=3)
    dp, ep, b, bw = 16, 8, 2, 50e9  # 16 data-parallel ranks span two nodes
    m = 64 / (micro_batch * dp)
    gathered, persistent = tensors_by_hand(8, gated_autoep=True)
    experts = 16 * 3 * 8 * 2048 * 1024
    ring = lambda n: (n - 1) / n  # noqa: E731
    gathers = b * (ring(dp) * (gathered - experts) + ring(dp // ep) * experts)
    after_step = b * ring(dp) * persistent
    z3 = step_components(s, 1, 1, ep, dp, 3, micro_batch, False, autoep=True)
    assert float(z3["zero3_gather"]) == pytest.approx((m * gathers + after_step) / bw, rel=1e-12)
    z2 = step_components(s, 1, 1, ep, dp, 2, micro_batch, False, autoep=True)
    once = float(z2["dp_reduce"]) / (m + 1)  # one reduce-scatter of every gradient
    assert float(z3["dp_reduce"]) == pytest.approx(m * once, rel=1e-12)


def test_zero3_gathers_again_in_the_backward_what_the_reuse_distance_released():
    """With DeepSpeed's look-ahead off, the layers whose backward lies beyond stage3_max_reuse_distance are gathered
    again: none at an unbounded distance, all (and the embedding, and the head at 0) at none, in between the earlier
    layers, more of them as the distance shrinks."""
    from moe_model.estimate.traffic import Zero3Settings, zero3_gathers

    s = shape()
    at = lambda reuse: zero3_gathers(s, layers=16, first=1, last=1, tp=1, ep=8,  # noqa: E731
                                     zero3=Zero3Settings(max_reuse_distance=reuse, prefetch_bucket_size=0))
    never, always = at(10**15), at(0)
    assert never.backward_dense == never.backward_expert == 0
    assert (always.backward_dense, always.backward_expert) == (always.forward_dense, always.forward_expert)
    between = [at(r) for r in (2 * 10**8, 5 * 10**8, 10**9)]
    regathered = [g.backward_expert / (8 * 2 * 2048 * 1024) for g in between]
    assert regathered == sorted(regathered, reverse=True) and 0 < regathered[-1] < regathered[0] < 16
    assert all(r == int(r) for r in regathered)  # whole layers


@pytest.mark.multirank
@pytest.mark.parametrize("ep,ckpt,reuse,bucket,live", [
    (1, True, 1_000_000, 0, 10**9),  # the model's own block, recompute: the reuse distance alone keeps the last layers
    (2, False, 0, 50_000_000, 300_000),  # AutoEP: the prefetcher's look-ahead alone, capped by max_live_parameters
])
def test_zero3_gathers_equal_a_live_engines(tmp_path, ep, ckpt, reuse, bucket, live):
    """A ZeRO-3 engine on 2 CPU ranks (tiny_cpu, persistence threshold 1000 so that both kinds of tensor occur):
    the elements DeepSpeed's coordinator all-gathers per micro-batch (forward + backward; it books a prefetch issued
    in the forward, or a recomputed forward, as forward) and those it keeps whole equal `zero3_gathers`."""
    from moe_model.estimate.traffic import Zero3Settings, zero3_gathers
    from tests.launch import failure, launch

    sets = ["parallel.pp=1", f"parallel.ep={ep}", "parallel.dp=2", "parallel.zero_stage=3",
            "train.global_batch_size=8", f"parallel.activation_checkpointing={str(ckpt).lower()}"]
    result = launch(2, *sets, script="tests/distributed/zero3_traffic.py",
                    extra_args=("--out", str(tmp_path), "--persistence", "1000", "--reuse", str(reuse),
                                "--prefetch", str(bucket), "--max-live", str(live)))
    assert result.returncode == 0, failure(result)
    live_engine = json.loads((tmp_path / "zero3.json").read_text())
    assert live_engine["zero_stage"] == 3
    assert ("AutoEPMoELayer" in live_engine["modules"]) == (ep > 1)
    recipe = load_recipe(str(ROOT / "recipes/tiny_cpu.yaml"), sets)
    g = zero3_gathers(recipe.moe_config(), layers=4, first=1, last=1, tp=1, ep=ep, ckpt=ckpt, autoep=ep > 1,
                      zero3=Zero3Settings(1000, reuse, bucket, live))
    regathered = g.backward_dense + g.backward_expert
    assert 0 < regathered < g.forward_dense + g.forward_expert  # the case keeps some layers and releases others
    for kind in ("dense", "expert"):
        engine = live_engine.get(f"forward_{kind}", 0) + live_engine.get(f"backward_{kind}", 0)
        assert engine == getattr(g, f"forward_{kind}") + getattr(g, f"backward_{kind}"), kind
        assert live_engine[f"persistent_{kind}"] == getattr(g, f"persistent_{kind}"), kind


# ---- the families' blocks: dense FFN layers, shared experts, the routed width, q/k norms (estimate/perf.py) ----

TINY_GLM = str(ROOT / "recipes/tiny_glm4_moe.yaml")  # dense layer 0, one shared expert, routed width 32, q/k norm
TINY_QWEN2 = str(ROOT / "recipes/tiny_qwen2_moe.yaml")  # shared expert of 64 with its gate, routed width 32


def family(path=TINY_GLM, *sets):
    return load_recipe(path, ["train.seq_len=16", "train.global_batch_size=8", *sets])


def attention_flops(S, D, Dq, Dkv):
    """q, k, v, o projections and the causal-halved scores and values of one sequence's layer (the model's rule)."""
    return 2 * S * D * (Dq + 2 * Dkv) + 2 * S * Dq * D + 2 * S * S * Dq


def test_a_dense_first_configs_step_flops_are_the_sum_of_its_layers():
    """tiny GLM: 4 layers, the first a dense FFN of width 128, the others router + 2 of 8 routed experts of width 32 +
    a shared FFN of 32; gated (g 3), hidden 64, 4 query and 2 key/value heads of 16, vocabulary 256."""
    s = shape_of(family())
    S, D, Dq, Dkv, g = 16, 64, 64, 32, 3
    assert (s.I, s.I_dense, s.I_shared, s.dense_layers, s.shared_gate) == (32, 128, 32, (0,), False)
    dense = attention_flops(S, D, Dq, Dkv) + 2 * S * D * 128 * g
    moe = attention_flops(S, D, Dq, Dkv) + 2 * S * D * 8 + 2 * S * 2 * D * 32 * g + 2 * S * D * 32 * g
    forward = dense + 3 * moe + 2 * S * D * 256
    assert model_flops_per_step(s) == pytest.approx(3 * 8 * forward, rel=1e-12)
    per = lambda dense_layer: sum(float(v) for v in layer_forward_flops(s, 1, 1, 1, dense=dense_layer).values())  # noqa: E731
    assert per(True) == pytest.approx(dense, rel=1e-12) and per(False) == pytest.approx(moe, rel=1e-12)


def test_shared_experts_add_exactly_their_flops_on_every_tp_rank():
    """Qwen2-MoE's shared FFN of 64 and its D -> 1 gate: 2*T*D*64*g + 2*T*D more per MoE layer, whole on each tp
    rank (replicated over tp like the norms), nothing else changed."""
    with_shared = shape_of(family(TINY_QWEN2))
    without = dataclasses.replace(with_shared, I_shared=0, shared_gate=False)
    T, D, g = 16, 64, 3
    shared = 2 * T * D * 64 * g + 2 * T * D
    assert model_flops_per_step(with_shared) - model_flops_per_step(without) == pytest.approx(3 * 8 * 4 * shared)
    for tp in (1, 2):
        f = layer_forward_flops(with_shared, 1, tp, 1)
        assert float(f["shared_experts"]) == shared
        assert float(f["qkv"]) == float(layer_forward_flops(without, 1, tp, 1)["qkv"])


def test_the_routed_experts_run_at_the_expert_width_not_the_dense_width():
    """Qwen3-30B-A3B: experts of 768 (`moe_intermediate_size`), intermediate_size 6144 belongs to no layer."""
    s = shape_of(load_recipe(str(ROOT / "recipes/qwen3_30b_a3b.yaml")))
    assert (s.I, s.I_dense, s.dense_layers) == (768, 0, ())
    T = s.S
    assert float(layer_forward_flops(s, 1, 1, 1)["experts"]) == 2 * T * 8 * s.D * 768 * 3


def test_a_stage_holding_a_dense_layer_is_faster_and_sends_no_all_to_all_for_it():
    """pp 2 over 4 layers: stage 0 holds layers 0 and 1. With layer 0 dense its layers cost one MoE layer (with its
    all-to-all) and one dense layer, less than two MoE layers; the last stage is the same either way."""
    sets = ["parallel.pp=2", "parallel.ep=2", "parallel.dp=2", "parallel.micro_batch_size=1"]
    dense_first = shape_of(family(TINY_GLM, *sets))
    all_moe = dataclasses.replace(dense_first, dense_layers=())
    a, b = (step_components(s, 1, 2, 2, 2, 1, 1, False) for s in (dense_first, all_moe))
    assert float(a["first_t"]) < float(b["first_t"]) and float(a["last_t"]) == float(b["last_t"])
    per_moe = float(a["layer_t"]) + float(a["tp_comm"]) + float(a["ep_comm"])
    per_dense = sum(float(v) for v in a["dense_layer_times"].values()) + float(a["tp_comm_dense"])
    assert float(a["first_t"]) == pytest.approx(per_moe + per_dense + float(a["emb_t"]) + float(a["p2p"]),
                                                rel=1e-12)
    assert float(a["dense_layer_times"]["router"]) == float(a["dense_layer_times"]["experts"]) == 0.0
    assert float(a["ep_comm"]) > 0 and per_dense < per_moe
    # the report's per-micro-batch terms name the parts this model has (a Mixtral-shaped one's stay as they were)
    assert {"compute.dense_ffn", "compute.shared_experts"} <= set(performance(family(TINY_GLM, *sets)).per_micro_batch)
    assert not {"compute.dense_ffn", "compute.shared_experts"} & set(performance(tiny(), dp=1).per_micro_batch)


def test_a_mixtral_shaped_config_prices_the_same_with_or_without_its_layer_rows():
    """The families' path (layer rows from `layer_table`) gives a Mixtral-shaped model exactly the widths' figures."""
    s = shape_of(tiny("silu", parallel={"pp": 1}))
    bare = dataclasses.replace(s, rows=())
    assert s.I_shared == s.I_dense == 0 and s.rows
    for zero in (0, 1, 2, 3):
        a = step_components(s, 1, 1, 2, 2, zero, 1, True, autoep=zero == 3)
        b = step_components(bare, 1, 1, 2, 2, zero, 1, True, autoep=zero == 3)
        assert float(a["step"]) == float(b["step"]) and float(a["zero3_gather"]) == float(b["zero3_gather"])


def test_stage_params_by_layer_kind_are_the_stages_own_rows():
    """`traffic.stage_params` (counts of MoE and dense layers, as the grid needs) equals `shapes.rank_params` of the
    stage's layer range, and ZeRO-3's parts of a family layer add up to it (gathered + kept whole)."""
    from moe_model.estimate.memory import stage_ranges
    from moe_model.estimate.shapes import rank_params
    from moe_model.estimate.traffic import Zero3Settings, stage_params, zero3_gathers

    r = family(TINY_GLM, "model.num_hidden_layers=7", "model.dense_layers=[0,3]")
    cfg, s = r.moe_config(), shape_of(r)
    for pp in (1, 2, 3):
        for i, held in enumerate(stage_ranges(7, pp)):
            first, last = int(i == 0), int(i == pp - 1)
            dense = sum(1 for j in held if j in cfg.dense_layers)
            for tp, ep in ((1, 1), (2, 4)):
                want = rank_params(cfg, layers=held, first=first, last=last, tp=tp, ep=ep)
                got = stage_params(s, layers=len(held), first=first, last=last, tp=tp, ep=ep, dense_layers=dense)
                assert got == want
                for threshold in (0, 1000, 10**9):
                    g = zero3_gathers(s, layers=len(held), first=first, last=last, tp=tp, ep=ep, dense_layers=dense,
                                      zero3=Zero3Settings(persistence_threshold=threshold))
                    assert g.forward_dense + g.persistent_dense == want.dense
                    assert g.forward_expert + g.persistent_expert == want.expert
                    assert (threshold == 10**9) == (g.forward_dense == g.forward_expert == 0)


@pytest.mark.parametrize("sets", [[], ["model.num_hidden_layers=9", "model.dense_layers=[0,1,5]"]])
def test_the_grid_path_equals_the_scalar_path_with_dense_layers(sets):
    """The planner's numpy grid (`stage_table` of every pp) and a single strategy's call give the same step, stage
    kinds with dense layers in the first and in middle stages included."""
    import numpy as np

    from moe_model.estimate.perf import stage_table

    s = shape_of(family(TINY_GLM, *sets))
    rows = [(tp, pp, ep, dp, zero, B, ckpt) for tp in (1, 2) for pp in range(1, s.L + 1) for ep in (1, 2)
            for dp in (2, 4) for zero in ((0, 1) if pp > 1 else (0, 1, 2, 3)) for B in (1, 2) for ckpt in (0, 1)]
    grid = np.array(rows, dtype=np.int64)
    tp, _, ep, dp, zero, B, ckpt = (grid[:, i].astype(np.float64) for i in range(7))
    c = step_components(s, tp, grid[:, 1], ep, dp, zero, B, ckpt, pp_table=stage_table(s, s.L))
    for i in range(0, len(rows), 7):
        one = step_components(s, *rows[i][:6], bool(rows[i][6]))
        assert float(one["step"]) == pytest.approx(float(c["step"][i]), rel=1e-12), rows[i]


@pytest.mark.parametrize("path", [TINY_QWEN2, TINY_GLM, str(ROOT / "recipes/tiny_deepseek_v3.yaml"),
                                  str(ROOT / "recipes/tiny_cpu.yaml")])
def test_model_flops_equal_torchs_count_of_the_real_models_forward(path):
    """torch's FlopCounterMode on the model's own forward (eager attention, ep 1, dropless: the experts run exactly
    the T*k routed rows however the router balances them): its matmuls are the model's FLOPs, the attention's two
    batched products halved for causality as the time model counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from moe_model import MoEForCausalLM

    recipe = family(path)
    cfg = recipe.moe_config()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg).eval()
    B, S = 2, 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, cfg.vocab_size, (B, S)))
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(ops) <= {"aten.mm", "aten.addmm", "aten.bmm"}, ops
    counted = ops.get("aten.mm", 0) + ops.get("aten.addmm", 0) + ops["aten.bmm"] / 2
    assert model_flops_per_step(shape_of(recipe)) == 3 * (8 // B) * counted
