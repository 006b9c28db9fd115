"""Model states per rank: the estimate against the tensors of live DeepSpeed engines on CPU ranks (launched through
the real deepspeed launcher), and against DeepSpeed's own partitioning and memory formula where they model the same
thing."""

import pytest
import torch

from benchmarks.memory_accuracy import STATE_MODEL, launch_state_measurement, state_rows
from moe_model import MoEConfig, MoEForCausalLM
from moe_model.estimate.memory import (Assumptions, model_states, partition_balanced, stage_layers, stage_ranges,
                                       zero2_gradient_elements, zero3_residency, zero_flat_groups)
from moe_model.estimate.params import count_params
from moe_model.estimate.shapes import rank_params


@pytest.mark.parametrize("layers,pp", [(16, 4), (16, 3), (5, 2), (7, 4), (4, 4), (3, 2)])
def test_stage_split_is_deepspeeds(layers, pp):
    from deepspeed.runtime.utils import partition_balanced as deepspeed_partition_balanced

    weights = [0] + [1] * layers + [0]  # PipelineModule(partition_method="type:DecoderLayerPipe")
    assert partition_balanced(weights, pp) == list(deepspeed_partition_balanced(weights, pp))
    assert sum(stage_layers(layers, pp)) == layers


@pytest.mark.parametrize("shape,tp,pp,ep", [
    (dict(hidden_act="gelu"), 1, 1, 1), (dict(hidden_act="gelu"), 2, 2, 4), (dict(hidden_act="gelu"), 4, 4, 8),
    (dict(hidden_act="silu", num_key_value_heads=4), 1, 3, 2),
    (dict(hidden_act="silu", num_key_value_heads=4), 4, 2, 8),
    (dict(tie_word_embeddings=True), 2, 1, 2),  # tied embeddings need pp 1
])
def test_ranks_hold_every_parameter_exactly_once(shape, tp, pp, ep):
    cfg = MoEConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=8,
                    num_local_experts=8, num_experts_per_tok=2, **shape)
    counts = count_params(cfg)
    layers = stage_layers(cfg.num_hidden_layers, pp)
    held = [rank_params(cfg, layers=n, first=s == 0, last=s == pp - 1, tp=tp, ep=ep) for s, n in enumerate(layers)]
    assert sum(h.expert for h in held) * ep == counts.expert
    # attention is split over tp, everything else dense is replicated on the tp ranks
    attention = cfg.num_hidden_layers * 2 * cfg.hidden_size * (8 * 8 + 8 * (cfg.num_key_value_heads or 8)) // tp
    assert sum(h.dense for h in held) == counts.non_expert - attention * (tp - 1)


def test_zero2_model_states_agree_with_deepspeeds_own_formula():
    """Where both model the same thing (pure data parallelism, ZeRO-2, bf16 accumulated in bf16 as DeepSpeed's
    default, no offload) DeepSpeed's `estimate_zero2_model_states_mem_needs` is 2P + 18P/N: our params + grads +
    optimizer + the fp32 gradient partition of the step (which DeepSpeed counts as resident). The project's fp32
    accumulation holds the partition in fp32 through the backward (2P/N more) and steps on it without a copy."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = MoEConfig()  # the seed's shape
    params = rank_params(cfg, layers=cfg.num_hidden_layers, first=True, last=True, tp=1, ep=1)
    for gpus in (1, 8, 64):
        states = model_states(params, precision="bf16", zero_stage=2, dp=gpus, ep=1, pp=1,
                              assumptions=Assumptions(foreach_adam_temporary=False), grad_accum="bf16")
        _, deepspeed_gpu_bytes = estimate_zero2_model_states_mem_needs(params.total, num_gpus_per_node=gpus,
                                                                       cpu_offload=False)
        ours = states.params_bytes + states.grads_bytes + states.optimizer_bytes + states.step_transient_bytes
        assert abs(ours - deepspeed_gpu_bytes) <= 2, (gpus, ours, deepspeed_gpu_bytes)
        fp32 = model_states(params, precision="bf16", zero_stage=2, dp=gpus, ep=1, pp=1,
                            assumptions=Assumptions(foreach_adam_temporary=False))
        assert abs(fp32.grads_bytes - states.grads_bytes - 2 * params.total / gpus) <= 1
        assert fp32.step_transient_bytes == 0 and fp32.optimizer_bytes == states.optimizer_bytes


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe", "deepseek_v3", "cpu"])
def test_zero2_flat_groups_are_the_models_parameters_in_order(kind):
    """`zero_flat_groups` at ep 1 (one stage): the decay (ndim >= 2) and no-decay groups `train/engine.param_groups`
    builds, tensor by tensor in the model's own order; the gradient elements of the busiest rank are those of the whole
    tensors DeepSpeed's own `get_partition_info` puts in each rank's partition (the group padded to 2 * dp)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from moe_model.recipe import load_recipe
    from tests.conftest import ROOT

    cfg = load_recipe(ROOT / f"recipes/tiny_{kind}.yaml", ["model.num_hidden_layers=5"]).moe_config()
    with torch.device("meta"):
        params = list(MoEForCausalLM(cfg).parameters())
    groups = [[p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]]
    ours = zero_flat_groups(cfg, layers=range(5), first=True, last=True, tp=1, ep=1, autoep=False)
    assert ours == [([p.numel() for p in g], False) for g in groups]
    for dp in (2, 3, 8):
        held = []
        for rank in range(dp):
            sizes = [-(-sum(p.numel() for p in g) // (2 * dp)) * 2 for g in groups]
            held.append(sum(sum(p.numel() for p in DeepSpeedZeroOptimizer.get_partition_info(None, g, size, rank)[0])
                            for g, size in zip(groups, sizes)))
        assert zero2_gradient_elements(ours, dp=dp, ep=1) == max(held) >= sum(p.numel() for p in params) / dp


def test_zero3_holds_whole_only_what_deepspeed_keeps_whole():
    """ZeRO-3's parameters: the partition, plus what is held whole beside it only where the partition group has
    more than one rank; with persistence, reuse and prefetch all off nothing is held whole."""
    cfg = MoEConfig(**STATE_MODEL)  # the experts' gate_up (8 x 256 x 64) is above the persistence threshold

    def states(dp, ep, autoep, **knobs):
        a = Assumptions(**knobs)
        params = rank_params(cfg, layers=4, first=True, last=True, tp=1, ep=ep)
        z = zero3_residency(cfg, layers=4, first=True, last=True, tp=1, ep=ep, autoep=autoep, checkpointing=False,
                            assumptions=a)
        return params, model_states(params, precision="fp32", zero_stage=3, dp=dp, ep=ep, pp=1, assumptions=a,
                                    zero3=z)

    params, off = states(2, 1, False, zero3_param_persistence_threshold=0, zero3_max_reuse_distance=0,
                         zero3_prefetch_bucket_elements=0)
    assert off.params_bytes == 4 * params.total / 2 == off.grads_bytes
    params, default = states(2, 1, False)  # small tensors persistent, gate_up kept by the reuse distance
    assert default.params_bytes == 4 * (params.total / 2 + params.total)
    params, autoep = states(2, 2, True)  # dp = ep: each expert's partition is the whole expert
    assert autoep.params_bytes == 4 * (params.dense / 2 + params.dense + params.expert)
    assert autoep.optimizer_bytes == 12 * (params.dense / 2 + params.expert)


@pytest.mark.multirank
@pytest.mark.parametrize("case_set", ["test-dp1", "test-dp2"])
def test_model_states_match_live_engines(case_set, tmp_path):
    """fp32 engines built by the training code (ZeRO 0/1/2 on dp 1 and 2, ep 2 on both MoE backends, ZeRO-3 on dp 2
    and dp 2 x ep 2 AutoEP, a checkpointed pp 2 pipeline, ZeRO-2 on a dense-first family block, whose whole-tensor
    gradients outgrow the partition by 22%) and two bf16 ones on dp 2 (ZeRO-1 legacy ep 2, ZeRO-2;
    model states only): params, gradients (largest while backward runs),
    optimizer states (after the step) and reduction buckets within 1%; what the engine's module (the legacy MoE
    layer or AutoEP where ep = 2) and a pipeline stage's forward save, byte for byte; the activations a real step
    holds when its backward starts (every storage its ops create, tracked) within 2%."""
    rows = state_rows(launch_state_measurement(case_set, tmp_path / "states.json"))
    kinds = {r["kind"] for r in rows}
    assert {"states.params", "states.grads", "states.optimizer", "states.buckets",
            "activations alive at backward (real step)"} <= kinds
    if case_set == "test-dp1":  # the held-out config: the saved tensors miss the logits the step holds
        held_out = {r["kind"]: r for r in rows if r["config"].endswith("held-out")}
        assert held_out["activations (engine module)"]["measured"] == 12_507_172
        assert held_out["activations alive at backward (real step)"]["estimate"] == 13_555_748
    if case_set == "test-dp2":  # expert parallelism on both backends, ZeRO-3, a checkpointed 2-stage pipeline
        assert {"activations (DeepSpeed MoE layer)", "activations (AutoEP layer)",
                "activations (pipeline stage, per micro-batch)"} <= kinds
        assert sum("ZeRO-3" in r["config"] and "AutoEP" in r["config"] for r in rows) >= 6
        # bf16 accumulated in fp32: BF16_Optimizer (ZeRO-1, legacy experts) and ZeRO-2's fp32 partition
        assert sum(r["config"].endswith("bf16") and r["kind"].startswith("states.") for r in rows) == 8
    for r in rows:
        if r["kind"].startswith("activations ("):
            assert r["estimate"] == r["measured"], r  # derived term by term from the forward: exact
        tolerance = 0.02 if r["kind"].startswith("activations") else 0.01
        assert abs(r["estimate"] - r["measured"]) <= tolerance * max(r["measured"], 1), r


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe"])
@pytest.mark.parametrize("pp,ep", [(1, 1), (3, 2), (4, 4)])
def test_a_family_stage_holds_the_parameters_of_its_own_layers(kind, pp, ep):
    """`rank_params` of each pipeline stage (its layers' `shapes.layer_table` rows: dense first layers, shared
    experts, biases, q/k norms) against the numel of the model's own parameters of that stage's layers, the
    embedding on the first stage and the final norm and head on the last; each expert tensor's share is 1/ep."""
    from moe_model.recipe import load_recipe
    from tests.conftest import ROOT

    cfg = load_recipe(ROOT / f"recipes/tiny_{kind}.yaml", ["model.num_hidden_layers=5"]).moe_config()
    with torch.device("meta"):
        named = list(MoEForCausalLM(cfg).named_parameters())
    for s, held in enumerate(stage_ranges(cfg.num_hidden_layers, pp)):
        first, last = s == 0, s == pp - 1
        dense = expert = 0
        for name, p in named:
            parts = name.split(".")
            layer = int(parts[2]) if parts[1] == "layers" else None
            mine = layer in held if layer is not None else (first if "embed_tokens" in name else last)
            if mine and ".mlp.experts." in name:
                expert += p.numel() // ep
            elif mine:
                dense += p.numel()
        assert rank_params(cfg, layers=held, first=first, last=last, tp=1, ep=ep) == (dense, expert), (kind, s)
