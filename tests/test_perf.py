"""The performance model: FLOPs against multiply-adds counted by hand for a tiny shape, the roofline, the 1F1B
bubble, link placement of TP/EP/DP traffic, the training rule and the wiring into `moe estimate`."""

import json

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
    layer = 2 * (ref["proj"] + ref["router"] + ref["experts"]) + 2 * ref["sdpa"] * 6 / 7
    head = 2 * 6 * 8 * 32
    seqs = 4  # global batch, one rank: 2 micro-batches of 2
    flops = seqs * (2 * layer * (3 + ckpt) + 3 * head)
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
