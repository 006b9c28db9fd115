"""Model states per rank: the estimate against the tensors of live DeepSpeed engines on CPU ranks (launched through
the real deepspeed launcher), and against DeepSpeed's own partitioning and memory formula where they model the same
thing."""

import pytest

from benchmarks.memory_accuracy import launch_state_measurement, state_rows
from moe_model import MoEConfig
from moe_model.estimate.memory import Assumptions, model_states, partition_balanced, stage_layers
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
    """Where both model the same thing (pure data parallelism, ZeRO-2, bf16, no offload) DeepSpeed's
    `estimate_zero2_model_states_mem_needs` is 2P + 18P/N: our params + grads + optimizer + the fp32 gradient
    partition of the step (which DeepSpeed counts as resident)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = MoEConfig()  # the seed's shape
    params = rank_params(cfg, layers=cfg.num_hidden_layers, first=True, last=True, tp=1, ep=1)
    for gpus in (1, 8, 64):
        states = model_states(params, precision="bf16", zero_stage=2, dp=gpus, ep=1, pp=1,
                              assumptions=Assumptions(foreach_adam_temporary=False))
        _, deepspeed_gpu_bytes = estimate_zero2_model_states_mem_needs(params.total, num_gpus_per_node=gpus,
                                                                       cpu_offload=False)
        ours = states.params_bytes + states.grads_bytes + states.optimizer_bytes + states.step_transient_bytes
        assert abs(ours - deepspeed_gpu_bytes) <= 2, (gpus, ours, deepspeed_gpu_bytes)


@pytest.mark.multirank
@pytest.mark.parametrize("case_set", ["test-dp1", "test-dp2"])
def test_model_states_match_live_engines(case_set, tmp_path):
    """fp32 engines built by the training code (ZeRO 0/1/2 on dp 1 and 2, ep 2 on dp 2, a checkpointed pp 2 pipeline):
    params, gradients (largest while backward runs), optimizer states (after the step) and reduction buckets within
    2%; the saved activations of the engine's module (DeepSpeed's MoE layer where ep = 2) and of a pipeline stage's
    forward pass within 5%."""
    rows = state_rows(launch_state_measurement(case_set, tmp_path / "states.json"))
    kinds = {r["kind"] for r in rows}
    assert {"states.params", "states.grads", "states.optimizer", "states.buckets"} <= kinds
    if case_set == "test-dp2":  # also an expert-parallel engine and a checkpointed 2-stage pipeline
        assert any(r["kind"].startswith("activations (DeepSpeed MoE") for r in rows)
        assert any(r["kind"].startswith("activations (pipeline stage") for r in rows)
    for r in rows:
        tolerance = 0.05 if r["kind"].startswith("activations") else 0.02
        assert abs(r["estimate"] - r["measured"]) <= tolerance * max(r["measured"], 1), r
