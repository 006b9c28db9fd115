"""Activation bytes: the estimate's formulas against what autograd really saves (saved_tensors_hooks) in the real
model's forward, Mixtral's block and the families' (shared experts, dense layers, sigmoid and group-limited routing,
q/k norms, biases, clip_qkv, partial rotary), plus the rules for recomputation, pipeline in-flight micro-batches, each
stage's own layers and routing imbalance."""

import pytest
import torch

from benchmarks.memory_accuracy import (ACTIVATION_CASES, GLM_LIKE, QWEN3_MOE_LIKE, SMALL, ActivationCase,
                                       build_model, measure_activation_case, saved_tensor_bytes)
from moe_model import MoEConfig
from moe_model.estimate.activations import (MicroBatch, autoep_buffer_rows, decoder_layer, dense_ffn, dispatch_depth,
                                            experts_dispatched, recomputed_layer, rope_tables, shared_experts,
                                            stage_activations)
from moe_model.estimate.estimate import estimate
from moe_model.recipe import load_recipe
from tests.conftest import ROOT


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=lambda c: c.name)
def test_estimate_matches_what_autograd_saves(case, precision):
    result = measure_activation_case(case, precision)
    assert abs(result["error"]) <= 0.05, result
    # the formulas are derived term by term from the forward: they are exact, not merely close
    assert result["estimate"] == result["measured"], result


def test_sort_based_dispatch_saves_the_same_bytes_however_tokens_are_routed():
    """The model's own MoE block slices one buffer of T*k routed rows: skew changes nothing it saves."""
    balanced = ActivationCase("balanced", {**SMALL, "num_local_experts": 8}, 2, 32)
    skewed = ActivationCase("skewed", {**SMALL, "num_local_experts": 8}, 2, 32, skew=True)
    spread = measure_activation_case(balanced)
    piled = measure_activation_case(skewed)
    assert piled["busiest_expert_routes"] == 64 > spread["busiest_expert_routes"]
    assert piled["measured"] == spread["measured"] == piled["estimate"]


def test_one_recomputed_layer_is_one_layer_of_the_uncheckpointed_model():
    """Under checkpointing the backward recomputes one layer at a time; its bytes are one layer's full set, which is
    the difference the hooks see between a model with L + 1 layers and one with L (no checkpointing)."""
    shape = {**SMALL, "hidden_act": "silu", "num_local_experts": 8}
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    measured = [saved_tensor_bytes(build_model(ActivationCase("", {**shape, "num_hidden_layers": n}, 2, 24)), ids)
                for n in (2, 3)]
    mb = MicroBatch(2, 24, dtype_bytes=4)
    layer = decoder_layer(MoEConfig(**shape), mb).total
    assert measured[1] - measured[0] == layer
    # what recomputation adds on top of the checkpoints: the layer, less its input already held (fp32: x.float() is x)
    assert recomputed_layer(MoEConfig(**shape), mb, rope_inside=False) == layer - 2 * 24 * shape["hidden_size"] * 4


def test_dispatch_depth_follows_the_busiest_expert_and_the_capacity():
    cfg = MoEConfig(**{**SMALL, "num_local_experts": 8})  # k = 2
    mb = MicroBatch(2, 32, dtype_bytes=2, ep=2)  # T = 64, T*k/E = 16
    assert dispatch_depth(cfg, mb) == 16
    assert dispatch_depth(cfg, mb, imbalance=3.0) == 48
    assert dispatch_depth(cfg, mb, imbalance=100.0) == 64  # one expert takes each token at most once
    assert dispatch_depth(cfg, MicroBatch(2, 32, 2, tp=4, ep=4), imbalance=1.1) == 20  # ceil(17.6) up to tp's multiple
    capped = MoEConfig(**{**SMALL, "num_local_experts": 8, "capacity_factor": 1.25})
    assert dispatch_depth(capped, mb, imbalance=3.0) == 20  # a capacity fixes the depth: imbalance drops tokens
    # only the padded rows grow: per extra row its dispatch index (8 B), input (b*D) and gelu FFN (b*2I)
    grows = experts_dispatched(cfg, mb, imbalance=3.0).total - experts_dispatched(cfg, mb).total
    assert grows == (48 - 16) * 8 * (8 + 2 * cfg.hidden_size + 2 * 2 * cfg.intermediate_size)


def test_pipeline_stages_hold_one_f_one_b_micro_batches():
    """Stage i of pp holds min(m, pp - i) micro-batches; with checkpointing it adds one recomputed layer."""
    recipe = load_recipe(ROOT / "recipes/seed_4b.yaml",
                         ["parallel.pp=4", "parallel.ep=1", "parallel.dp=2", "parallel.micro_batch_size=4",
                          "train.global_batch_size=16", "train.seq_len=1024"])  # m = 16 / (4*2) = 2
    est = estimate(recipe)
    assert est.micro_steps == 2
    assert [s.in_flight for s in est.stages] == [2, 2, 2, 1]
    assert [s.layers for s in est.stages] == [4, 4, 4, 4]
    cfg, mb = recipe.moe_config(), MicroBatch(4, 1024, 2)
    one = stage_activations(cfg, mb, layers=4, first=False, last=False, pp=4, in_flight=1, checkpointing=True,
                            imbalance=1.0)
    two = stage_activations(cfg, mb, layers=4, first=False, last=False, pp=4, in_flight=2, checkpointing=True,
                            imbalance=1.0)
    held_per_micro_batch = one.saved_bytes - recomputed_layer(cfg, mb, rope_inside=True)
    assert two.saved_bytes - one.saved_bytes == held_per_micro_batch
    assert two.held_bytes == 2 * one.held_bytes


def test_imbalance_headroom_only_where_buffers_are_padded():
    seed = load_recipe(ROOT / "recipes/seed_4b.yaml")  # ep 8: DeepSpeed's layer, dropless
    assert estimate(seed).peak.imbalance_headroom_bytes > 0
    own_block = load_recipe(ROOT / "recipes/seed_4b.yaml", ["parallel.ep=1"])
    assert estimate(own_block).peak.imbalance_headroom_bytes == 0
    capped = load_recipe(ROOT / "recipes/seed_4b.yaml", ["model.capacity_factor=1.25"])
    assert estimate(capped).peak.imbalance_headroom_bytes == 0


@pytest.mark.parametrize("counts", [[10, 0, 27], [[5, 0, 13], [5, 0, 14]], [[1, 2], [3, 4], [0, 0], [9, 9]], [[64], [3]],
                                    [[0, 0, 0, 0], [0, 0, 0, 1]]])
def test_autoep_buffer_is_deepspeeds_padded_permutation(counts):
    """P, the rows of AutoEP's expert-major buffer, is the row count of DeepSpeed's own `permute_by_local_expert` for
    the N received rows (counts per source rank and local expert), and every expert's rounding fits inside it."""
    from deepspeed.module_inject.auto_ep_layer import permute_by_local_expert

    counts_SE = torch.tensor(counts)
    ep, local = (1, counts_SE.shape[0]) if counts_SE.ndim == 1 else tuple(counts_SE.shape)
    rows = int(counts_SE.sum())
    permuted_PD, _, aligned_E, _ = permute_by_local_expert(torch.zeros(rows, 3), counts_SE)
    cfg = MoEConfig(**{**SMALL, "hidden_act": "silu", "num_local_experts": local * ep})
    assert permuted_PD.shape[0] == autoep_buffer_rows(cfg, MicroBatch(1, 8, 4, ep=ep), rows)
    assert int(aligned_E.sum()) <= permuted_PD.shape[0]


def test_autoep_recomputes_one_autoep_layer():
    """Under checkpointing one converted layer is recomputed at a time: the hooks' difference between AutoEP models
    of 3 and 2 layers is the estimate's AutoEP layer."""
    shape = {**SMALL, "hidden_act": "silu", "num_local_experts": 8}
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    measured = [saved_tensor_bytes(build_model(ActivationCase("", {**shape, "num_hidden_layers": n}, 2, 24,
                                                              autoep=True)), ids) for n in (2, 3)]
    mb = MicroBatch(2, 24, dtype_bytes=4, moe_backend="autoep", triton=False)
    assert measured[1] - measured[0] == decoder_layer(MoEConfig(**shape), mb).total


def test_autoep_pads_only_the_rows_it_receives():
    """The seed made gated runs on AutoEP at ep 8 (auto): its routing-imbalance headroom (the busiest rank's extra
    received rows) is far below the legacy layer's, which pads every expert's buffer to the busiest expert's depth."""
    autoep = estimate(load_recipe(ROOT / "recipes/seed_4b.yaml", ["model.hidden_act=silu"]))
    legacy = estimate(load_recipe(ROOT / "recipes/seed_4b.yaml", ["model.hidden_act=silu",
                                                                  "parallel.moe_backend=legacy"]))
    assert (autoep.strategy.moe_backend, legacy.strategy.moe_backend) == ("autoep", "legacy")
    assert 0 < autoep.peak.imbalance_headroom_bytes < legacy.peak.imbalance_headroom_bytes / 4
    assert autoep.peak.activations_bytes < legacy.peak.activations_bytes


@pytest.mark.parametrize("family, added", [(GLM_LIKE, 2), (QWEN3_MOE_LIKE, 2)], ids=["moe layer", "dense layer"])
def test_a_family_layer_saves_its_own_kind(family, added):
    """The hooks' difference between a family model and the same model less one layer is `decoder_layer` of that
    layer's kind: GLM-like's third layer is an MoE layer (router, routed and shared experts), Qwen3-like's a dense
    FFN (`dense_layers` [2])."""
    fewer = {**family, "num_hidden_layers": added, "dense_layers": [i for i in family["dense_layers"] if i < added]}
    more = {**family, "num_hidden_layers": added + 1}
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    measured = [saved_tensor_bytes(build_model(ActivationCase("", shape, 2, 24)), ids) for shape in (fewer, more)]
    cfg = MoEConfig(**more)
    assert cfg.is_moe_layer(added) == (family is GLM_LIKE)
    assert measured[1] - measured[0] == decoder_layer(cfg, MicroBatch(2, 24, dtype_bytes=4), layer=added).total


def test_each_stage_prices_its_own_layers():
    """`stage_activations` over a stage's layer indices: a Mixtral-shaped model's numbers are those of the count (every
    layer an MoE layer), a dense-first model's first stage holds its dense layer, and the layer recomputed under
    checkpointing is the stage's largest."""
    mb = MicroBatch(2, 64, dtype_bytes=2)
    mixtral = MoEConfig(**{**SMALL, "hidden_act": "silu", "num_hidden_layers": 4})
    for ckpt in (False, True):
        by_count, by_range = (stage_activations(mixtral, mb, layers=layers, first=True, last=False, pp=2, in_flight=2,
                                                checkpointing=ckpt, imbalance=3.0) for layers in (2, range(0, 2)))
        assert by_count == by_range
    # a wide dense FFN: the dense layer is the largest, so recomputing it sets the checkpointed stage's peak
    glm = MoEConfig(**{**GLM_LIKE, "num_hidden_layers": 4, "intermediate_size": 256})
    moe_layer, dense_layer = decoder_layer(glm, mb, layer=1).total, decoder_layer(glm, mb, layer=0).total
    assert dense_layer > moe_layer
    stages = [stage_activations(glm, mb, layers=held, first=s == 0, last=s == 1, pp=2, in_flight=1,
                                checkpointing=False, imbalance=1.0) for s, held in enumerate([range(0, 2), range(2, 4)])]
    first_layers = stages[0].per_micro_batch["ffn.hidden"], stages[0].per_micro_batch["shared.ffn"]
    assert first_layers == (dense_ffn(glm, mb).items["ffn.hidden"], shared_experts(glm, mb).items["shared.ffn"])
    assert "ffn.hidden" not in stages[1].per_micro_batch
    assert stages[1].per_micro_batch["router.input"] == 2 * stages[0].per_micro_batch["router.input"]
    assert recomputed_layer(glm, mb, rope_inside=True, layers=range(0, 2)) == dense_layer + rope_tables(glm, mb).total
    assert recomputed_layer(glm, mb, rope_inside=True, layers=range(2, 4)) == moe_layer + rope_tables(glm, mb).total
    # the pipeline carry counts the MoE layers only: 2 losses and E loads for each of the 3
    assert stages[0].per_micro_batch["held.pipe_output_buffer"] == 2 * 128 * glm.hidden_size + 4 * (2 + 3 * 8)


def test_group_limited_choice_is_freed_before_the_backward():
    """What choosing experts by groups saves (each group's two best, the kept groups, the mask) lives on a branch of
    the graph the loss never reaches: the hooks see it saved, and it is freed by the time the forward returns."""
    from torch.multiprocessing.reductions import StorageWeakRef

    model = build_model(ActivationCase("", GLM_LIKE, 2, 16))
    refs = []

    def pack(t):
        refs.append((StorageWeakRef(t.untyped_storage()), t.dtype, tuple(t.shape)))
        return t
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids, use_cache=False)
    freed = {(dtype, shape) for ref, dtype, shape in refs if ref.expired()}
    T, G, E = 32, GLM_LIKE["n_group"], GLM_LIKE["num_local_experts"]
    assert freed == {(torch.int64, (T, G, 2)), (torch.int64, (T, GLM_LIKE["topk_group"])), (torch.bool, (T, E))}
    assert out.loss.requires_grad
