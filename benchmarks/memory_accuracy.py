"""The memory estimator against measurement: prints a table (config, estimate, measured, error) and writes
benchmarks/results/memory_accuracy.json.

    .venv/bin/python benchmarks/memory_accuracy.py                     # everything that runs on CPU (~3 min here)
    .venv/bin/python benchmarks/memory_accuracy.py --only activations  # single process, seconds
    .venv/bin/python benchmarks/memory_accuracy.py --only states --sets dp2,ep2
    .venv/bin/python benchmarks/memory_accuracy.py --gpu               # adds torch.cuda.max_memory_allocated

What is measured:
- activations: the bytes autograd saves for backward in one forward of the real `MoEForCausalLM` (fp32 and bf16,
  CPU), seen through `torch.autograd.graph.saved_tensors_hooks`, each storage counted once and only while it is
  still alive when the forward returns, parameters left out; compared with `activations.model_saved`. The cases
  cover Mixtral's block and the families' (shared experts and their gate, dense layers, sigmoid and group-limited
  routing, q/k norms, biases, clip_qkv, partial rotary). The AutoEP cases convert the blocks with DeepSpeed's own
  AutoEP at ep = 1 in this process (`convert_to_autoep`).
- model states: the tensors live DeepSpeed engines hold on CPU ranks (fp32), built by the training code's own
  `build_engine` and stepped by its own step function: the module's parameters and gradients and everything the
  optimizer object reaches (`engine_state_bytes`), recorded as each gradient lands, after each backward, and around
  the optimizer step; compared with `memory.model_states` through the full `estimate` of the same recipe, stage by
  stage. `CASE_SETS` covers ZeRO 0/1/2/3 on dp 1, 2 and 4, expert parallelism (ep 2) on both MoE backends (the
  legacy layer, AutoEP), ZeRO-3 with AutoEP, and pipelines (pp 2, pp 2 x ep 2); each set is one launch through the
  real deepspeed launcher, the layout and backend resolved as `moe train` resolves them. On pp = 1 engines the
  engine's own module (DeepSpeed's legacy MoE layer or AutoEP where ep = 2) is also measured for activations, against
  the estimate at the routing measured on the ranks (each layer's dispatch depth; AutoEP: the rows each layer's
  experts receive, read from DeepSpeed's `permute_by_local_expert` as it runs).
- memory as spent: a third real step (the training code's step function), every storage its tensor ops create
  tracked: the bytes still alive when it calls `engine.backward` (`alive_for_backward`), against the estimate's
  saved + held activations (the logits the step keeps). The issue's held-out config is one
  of these cases (`HELD_OUT_MODEL`).
- GPU mode (only where CUDA is available): the allocator's peak over a training step on one GPU,
  `torch.cuda.max_memory_allocated`, against the estimate's total less the reserve outside PyTorch's allocator and
  the fragmentation allowance.

Run under the deepspeed launcher (`--measure-states OUT --cases SET`, `--measure-gpu OUT`), this file is also the
rank-side program of those measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moe_model import MoEConfig, MoEForCausalLM  # noqa: E402
from moe_model.launch import deepspeed_command, rank_env  # noqa: E402
from moe_model.estimate.activations import MicroBatch, model_saved  # noqa: E402
from moe_model.estimate.memory import Assumptions  # noqa: E402
from moe_model.estimate.shapes import unpriced_settings  # noqa: E402

RESULTS = ROOT / "benchmarks/results/memory_accuracy.json"


# ---------------------------------------------------------------------------------------------------------------
# activations: what autograd saves


def saved_tensor_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward and still holds when the
    forward returns (parameters excluded)."""
    return saved_tensor_bytes_and_output(model, input_ids)[0]


def parameter_storages(model: torch.nn.Module) -> set[int]:
    """The storages a module's parameters use now: their data (whole where ZeRO-3 gathered them) and ZeRO-3's
    partitions (`ds_tensor`)."""
    out = set()
    for p in model.parameters():
        out.add(p.untyped_storage().data_ptr())
        partition = getattr(p, "ds_tensor", None)
        if isinstance(partition, torch.Tensor):
            out.add(partition.untyped_storage().data_ptr())
    return out


class SavedStorages:
    """A `saved_tensors_hooks` pack hook that records each storage autograd saves, once, leaving out `skip`'s (the
    parameters' storages; `skip` is called again for a storage not in it where `refresh`, as ZeRO-3 gathers
    parameters during the forward). `nbytes` counts the storages still alive: a branch of the graph that the loss
    never reaches frees what it saved within the forward (group-limited routing's choice of groups and experts: only
    the indices leave it), and a freed storage's address can be handed to a later saved tensor, which a count by
    address alone would then miss."""

    def __init__(self, skip, refresh: bool = False):
        self.skip, self.refresh = skip, refresh
        self.excluded = skip()
        self.seen: dict[int, tuple[StorageWeakRef, int]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.seen and not self.seen[key][0].expired():
            return t  # counted already
        if self.refresh and key not in self.excluded:
            self.excluded = self.skip()
        if key not in self.excluded:
            self.seen[key] = (StorageWeakRef(storage), storage.nbytes())
        return t

    @property
    def nbytes(self) -> int:
        return sum(nbytes for ref, nbytes in self.seen.values() if not ref.expired())


def saved_tensor_bytes_and_output(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[int, Any]:
    """`saved_tensor_bytes` and the forward's output (its `expert_counts_LE` among others), counted by
    `SavedStorages`. A tensor on a parameter's storage is left out as the parameters are when it is saved (ZeRO-3
    gathers them during the forward)."""
    zero3 = any(hasattr(p, "ds_tensor") for p in model.parameters())
    saved = SavedStorages(lambda: parameter_storages(model), refresh=zero3)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    assert out.loss.requires_grad  # a training graph (its backward is not run: DeepSpeed owns that on ranks)
    return saved.nbytes, out


@dataclasses.dataclass(frozen=True)
class ActivationCase:
    name: str
    model: dict[str, Any]
    micro_batch: int
    seq_len: int
    checkpointing: bool = False
    skew: bool = False  # every token routed to experts 0..k-1: the busiest expert takes all T tokens
    autoep: bool = False  # the blocks converted to DeepSpeed's AutoEPMoELayer (ep = 1: one process, no exchange)


SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)

ACTIVATION_CASES = [
    ActivationCase("gelu E4 k2 B2 S16", {**SMALL, "hidden_act": "gelu"}, 2, 16),
    ActivationCase("silu E4 k2 B2 S16", {**SMALL, "hidden_act": "silu"}, 2, 16),
    ActivationCase("gelu E8 k1 B1 S64", {**SMALL, "num_local_experts": 8, "num_experts_per_tok": 1}, 1, 64),
    ActivationCase("silu E8 k3 B4 S32 L3", {**SMALL, "hidden_act": "silu", "num_local_experts": 8,
                                            "num_experts_per_tok": 3, "num_hidden_layers": 3}, 4, 32),
    ActivationCase("gelu E16 k2 B3 S128 MHA", {**SMALL, "num_local_experts": 16, "num_key_value_heads": 4}, 3, 128),
    ActivationCase("silu E4 k2 B2 S16 ckpt", {**SMALL, "hidden_act": "silu"}, 2, 16, checkpointing=True),
    ActivationCase("gelu E8 k2 B4 S64 ckpt", {**SMALL, "num_local_experts": 8}, 4, 64, checkpointing=True),
    ActivationCase("silu E8 k2 B2 S32 z-loss", {**SMALL, "hidden_act": "silu", "num_local_experts": 8,
                                               "router_z_loss_coef": 1e-3}, 2, 32),
    ActivationCase("gelu E8 k2 B2 S32 all tokens to 2 experts", {**SMALL, "num_local_experts": 8}, 2, 32, skew=True),
    ActivationCase("silu E8 k2 B2 S32 AutoEP", {**SMALL, "hidden_act": "silu", "num_local_experts": 8}, 2, 32,
                   autoep=True),
    ActivationCase("silu E8 k3 B4 S32 L3 AutoEP z-loss", {**SMALL, "hidden_act": "silu", "num_local_experts": 8,
                                                          "num_experts_per_tok": 3, "num_hidden_layers": 3,
                                                          "router_z_loss_coef": 1e-3}, 4, 32, autoep=True),
    ActivationCase("silu E4 k2 B2 S16 AutoEP ckpt", {**SMALL, "hidden_act": "silu"}, 2, 16, checkpointing=True,
                   autoep=True),
    ActivationCase("silu E8 k2 B2 S32 AutoEP all tokens to 2 experts", {**SMALL, "hidden_act": "silu",
                                                                         "num_local_experts": 8}, 2, 32, skew=True,
                   autoep=True),
]
# the families' blocks (issue 25; `tests/test_families.py` builds the same settings from transformers' configs), each
# at routed experts narrower than `intermediate_size`:
# Qwen2-MoE: a shared expert of its own width behind a sigmoid gate, q/k/v biases, softmax top-k not renormalised
QWEN2_MOE_LIKE = {**SMALL, "hidden_act": "silu", "num_local_experts": 8, "moe_intermediate_size": 16,
                  "num_shared_experts": 1, "shared_expert_intermediate_size": 40, "shared_expert_gate": True,
                  "attention_bias": True, "norm_topk_prob": False}
# GLM-4.5: a dense first layer, a shared expert of the routed width, sigmoid scores with a score bias, group-limited
# top-k (2 groups, 1 kept) and a routed scaling factor, q/k norm per head, q/k/v biases, half of each head rotated,
# head_dim != hidden / heads; and DeepSeek-V3's sequence-level balance loss
GLM_LIKE = {**SMALL, "hidden_act": "silu", "num_hidden_layers": 3, "num_local_experts": 8, "moe_intermediate_size": 16,
            "dense_layers": [0], "num_shared_experts": 1, "router_scoring": "sigmoid", "router_score_bias": True,
            "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "qk_norm": "head", "attention_bias": True,
            "head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5},
            "router_aux_loss_per_sequence": True}
# Qwen3-MoE: q/k norm per head, head_dim != hidden / heads, a dense last layer (`mlp_only_layers`)
QWEN3_MOE_LIKE = {**SMALL, "hidden_act": "silu", "num_hidden_layers": 3, "num_local_experts": 8,
                  "moe_intermediate_size": 24, "head_dim": 16, "qk_norm": "head", "dense_layers": [2]}
# OLMoE: q/k norm over the whole projection, q/k/v clipped, top-k not renormalised
OLMOE_LIKE = {**SMALL, "hidden_act": "silu", "num_local_experts": 8, "qk_norm": "projection", "clip_qkv": 0.5,
              "norm_topk_prob": False}
# DeepSeek-V3: multi-head latent attention (q through a rank-24 projection, a rank-16 kv latent, heads of 16 + 8
# dims, values 12 wide: zero-padded to 24 for the fused kernel; interleaved RoPE) over GLM's routed block
DEEPSEEK_V3_LIKE = {**SMALL, "hidden_act": "silu", "num_hidden_layers": 3, "num_local_experts": 8,
                    "num_key_value_heads": 4, "moe_intermediate_size": 16, "dense_layers": [0],
                    "num_shared_experts": 1, "router_scoring": "sigmoid", "router_score_bias": True, "n_group": 2,
                    "topk_group": 1, "routed_scaling_factor": 2.5, "q_lora_rank": 24, "kv_lora_rank": 16,
                    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12, "rope_interleave": True}
ACTIVATION_CASES += [
    ActivationCase("Qwen2-MoE-like shared expert + gate, qkv bias, top-k unnormalised", QWEN2_MOE_LIKE, 2, 16),
    ActivationCase("GLM-like dense first, shared, sigmoid groups, partial rotary", GLM_LIKE, 2, 16),
    ActivationCase("GLM-like dense first ckpt", GLM_LIKE, 2, 16, checkpointing=True),
    ActivationCase("Qwen3-like head q/k norm, head_dim 16, dense last", QWEN3_MOE_LIKE, 2, 32),
    ActivationCase("OLMoE-like projection q/k norm, clip_qkv", OLMOE_LIKE, 3, 16),
    ActivationCase("gelu dense first, shared + gate, o bias, sigmoid, z-loss",
                   {**SMALL, "num_hidden_layers": 3, "num_local_experts": 8, "moe_intermediate_size": 24,
                    "dense_layers": [0, 2], "num_shared_experts": 2, "shared_expert_gate": True,
                    "attention_out_bias": True, "router_scoring": "sigmoid", "router_z_loss_coef": 1e-3}, 2, 16),
    ActivationCase("Qwen3-like AutoEP", QWEN3_MOE_LIKE, 2, 32, autoep=True),
    ActivationCase("OLMoE-like AutoEP", OLMOE_LIKE, 3, 16, autoep=True),
    ActivationCase("Qwen2-MoE-like AutoEP", QWEN2_MOE_LIKE, 2, 16, autoep=True),
    ActivationCase("GLM-like AutoEP", GLM_LIKE, 2, 16, autoep=True),
    ActivationCase("GLM-like AutoEP ckpt", GLM_LIKE, 2, 16, checkpointing=True, autoep=True),
    ActivationCase("DeepSeek-V3-like MLA", DEEPSEEK_V3_LIKE, 2, 16),
    ActivationCase("MLA plain q, RoPE by halves, v as wide as q", {
        **DEEPSEEK_V3_LIKE, "q_lora_rank": None, "rope_interleave": False, "v_head_dim": 24}, 2, 24),
    ActivationCase("DeepSeek-V3-like MLA ckpt", DEEPSEEK_V3_LIKE, 2, 16, checkpointing=True),
    ActivationCase("DeepSeek-V3-like MLA AutoEP", DEEPSEEK_V3_LIKE, 2, 16, autoep=True),
]
ACTIVATION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def convert_to_autoep(model: MoEForCausalLM) -> None:
    """Every block as the autoep backend runs it on one expert-parallel rank: the project's adapter
    (`parallel.autoep.AutoEPBlock`) around the block, converted by DeepSpeed's own AutoEP with the DeepSpeed config
    section the training writes (`autoep_section`), as `deepspeed.initialize` converts it."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config

    from moe_model.modeling import MoESparseBlock
    from moe_model.parallel.autoep import AutoEPBlock, autoep_section

    for layer in model.model.layers:
        if isinstance(layer.mlp, MoESparseBlock):  # a dense FFN layer stays the model's (`parallel.layer`)
            layer.mlp = AutoEPBlock(layer.mlp)
    converter = AutoEP(model, parse_autoep_config(autoep_section(model.config, 1)))
    converter.replace_moe_layers(converter.ep_parser(), ep_size=1, ep_rank=0)


def build_model(case: ActivationCase, dtype: torch.dtype = torch.float32) -> MoEForCausalLM:
    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig(**case.model))
    if case.autoep:
        convert_to_autoep(model)
    model = model.to(dtype)
    if case.checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if case.skew:  # the real routing code runs on router logits that favour experts 0..k-1 by a wide margin
        bias_E = torch.zeros(case.model["num_local_experts"], dtype=dtype)
        bias_E[: case.model["num_experts_per_tok"]] = 1e4
        for i in model.config.moe_layers:
            layer = model.model.layers[i]
            gate = layer.mlp.moe.router.gate if case.autoep else layer.mlp.gate
            gate.register_forward_hook(lambda _module, _inputs, logits_TE: logits_TE + bias_E)
    return model


def measure_activation_case(case: ActivationCase, precision: str = "fp32") -> dict[str, Any]:
    model = build_model(case, ACTIVATION_DTYPES[precision])
    ids = torch.randint(0, case.model["vocab_size"], (case.micro_batch, case.seq_len),
                        generator=torch.Generator().manual_seed(1))
    measured, out = saved_tensor_bytes_and_output(model, ids)
    busiest = int(out.expert_counts_LE.max())
    if case.skew:
        assert busiest == case.micro_batch * case.seq_len, "the skewed router did not send every token to one expert"
    mb = MicroBatch(case.micro_batch, case.seq_len, dtype_bytes=torch.finfo(ACTIVATION_DTYPES[precision]).bits // 8,
                    moe_backend="autoep" if case.autoep else "legacy", triton=False)
    estimate = model_saved(model.config, mb, case.checkpointing).total
    return {**row("activations", f"{case.name} {precision}", estimate, measured), "busiest_expert_routes": busiest}


# ---------------------------------------------------------------------------------------------------------------
# model states: what a live DeepSpeed engine holds


def _walk(obj: Any, path: str, out: list[tuple[str, torch.Tensor]], seen: set[int], depth: int = 0) -> None:
    """Every tensor reachable from a DeepSpeed/torch optimizer object, with the attribute path that reaches it."""
    if depth > 10 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if not obj.is_meta:
            out.append((path, obj))
        return
    if isinstance(obj, torch.nn.Module):
        return  # the model's parameters are counted from the module itself
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, torch.Tensor):
                _walk(key, f"{path}[key]", out, seen, depth + 1)
            _walk(value, f"{path}[{key if isinstance(key, (str, int)) else type(key).__name__}]", out, seen, depth + 1)
        return
    if isinstance(obj, (list, tuple, set)):
        for i, value in enumerate(obj):
            _walk(value, f"{path}[{i}]", out, seen, depth + 1)
        return
    module = type(obj).__module__ or ""
    if (module.startswith("deepspeed") or module.startswith("torch.optim")) and hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            _walk(value, f"{path}.{key}", out, seen, depth + 1)


def engine_state_bytes(engine: Any) -> dict[str, int]:
    """Bytes of distinct storages an engine holds, by kind: params, grads, optimizer (master + moments), buckets.

    Parameters: the module's parameter storages (flat ZeRO buffers count once; ZeRO-3: the partitions' flat buffer,
    `ds_tensor`, and whatever is gathered whole at that moment). Gradients: `param.grad` and every optimizer buffer
    whose attribute path names a gradient (averaged_gradients, grads_in_partition, grad_partitions_flat_buffer, ...).
    Buckets: the gradient-reduction buckets (`ipg_*`). Optimizer: the rest the optimizer holds (Adam moments, fp32
    master weights). Works for any engine: pipeline and expert-parallel engines hold the same kinds of objects.
    """
    params = {}
    for p in engine.module.parameters():
        for tensor in (p, getattr(p, "ds_tensor", None)):
            if isinstance(tensor, torch.Tensor):
                params[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    found: list[tuple[str, torch.Tensor]] = []
    for p in engine.module.parameters():
        for name in ("grad", "grad_accum"):
            grad = getattr(p, name, None)
            if isinstance(grad, torch.Tensor):
                found.append((f"param.{name}", grad))
    _walk(engine.optimizer, "optimizer", found, set())
    totals = {"params": sum(params.values()), "grads": 0, "optimizer": 0, "buckets": 0}
    # a storage reached by several paths takes the most specific kind: ZeRO-2 points param.grad into its bucket
    priority = {"buckets": 0, "grads": 1, "optimizer": 2}
    kinds: dict[int, tuple[str, int]] = {}
    for path, tensor in found:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in params or storage.nbytes() == 0:
            continue
        if "ipg" in path:
            kind = "buckets"
        elif re.search(r"grad(?!_norm)", path):
            kind = "grads"
        else:
            kind = "optimizer"
        if key not in kinds or priority[kind] < priority[kinds[key][0]]:
            kinds[key] = (kind, storage.nbytes())
    for kind, nbytes in kinds.values():
        totals[kind] += nbytes
    return totals


@dataclasses.dataclass(frozen=True)
class StateCase:
    zero_stage: int
    micro_steps: int  # micro-batches per optimizer step on each data-parallel rank
    pp: int = 1
    ep: int = 1
    checkpointing: bool = False
    moe_backend: str = "auto"  # `parallel.moe_backend`; auto is AutoEP where ep > 1 (the state model is gated)
    shape: str = "state"  # a key of SHAPES
    precision: str = "fp32"  # bf16: model states only (the activation rows are measured in fp32)

    def strategy(self, world: int):
        from moe_model.strategy import Strategy

        return Strategy.from_recipe(state_recipe(self, world), world)[0]

    def name(self, world: int) -> str:
        dp = world // self.pp
        backend = " AutoEP" if self.strategy(world).moe_backend == "autoep" else " legacy" if self.ep > 1 else ""
        return (f"ZeRO-{self.zero_stage} pp{self.pp} ep{self.ep}{backend} dp{dp} m{self.micro_steps} {self.precision}"
                + (" ckpt" if self.checkpointing else "") + (f" {self.shape}" if self.shape != "state" else ""))


STATE_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, hidden_act="silu",
                   max_position_embeddings=64)
STATE_MICRO_BATCH, STATE_SEQ_LEN = 2, 16
# the held-out config: fp32, 2 layers, hidden 128, 4 gelu experts, vocab 512, micro-batch 2 x 256 tokens
HELD_OUT_MODEL = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_local_experts=4, num_experts_per_tok=2, hidden_act="gelu",
                      max_position_embeddings=256)
# the families' blocks (their activations are also measured in process, `ACTIVATION_CASES`):
# Qwen2-MoE's gated shared expert and q/k/v biases; GLM's dense first layer, shared expert, q/k norm, score bias
SHARED_EXPERT_MODEL = {**STATE_MODEL, "moe_intermediate_size": 32, "num_shared_experts": 1,
                       "shared_expert_intermediate_size": 96, "shared_expert_gate": True, "attention_bias": True,
                       "norm_topk_prob": False}
DENSE_FIRST_MODEL = {**STATE_MODEL, "moe_intermediate_size": 32, "dense_layers": [0], "num_shared_experts": 1,
                     "router_scoring": "sigmoid", "router_score_bias": True, "n_group": 2, "topk_group": 1,
                     "qk_norm": "head"}
SHAPES = {"state": (STATE_MODEL, STATE_MICRO_BATCH, STATE_SEQ_LEN), "held-out": (HELD_OUT_MODEL, 2, 256),
          "shared-expert": (SHARED_EXPERT_MODEL, STATE_MICRO_BATCH, STATE_SEQ_LEN),
          "dense-first": (DENSE_FIRST_MODEL, STATE_MICRO_BATCH, STATE_SEQ_LEN)}
STATE_CASES = [StateCase(0, 1), StateCase(1, 1), StateCase(1, 2), StateCase(2, 2)]
CASE_SETS = {  # name -> (ranks, cases); the launch of each set runs all its cases in one process group
    "test-dp1": (1, [StateCase(0, 1), StateCase(1, 2), StateCase(2, 1),  # tests/test_estimate_memory.py
                     StateCase(1, 1, shape="held-out")]),
    "test-dp2": (2, [StateCase(0, 1), StateCase(1, 2), StateCase(2, 2), StateCase(1, 2, ep=2, moe_backend="legacy"),
                     StateCase(1, 2, ep=2), StateCase(3, 2), StateCase(3, 2, ep=2),
                     StateCase(1, 2, pp=2, checkpointing=True),
                     # bf16's fp32 gradient accumulation: BF16_Optimizer's whole fp32 buffer, ZeRO-2's fp32 partition
                     StateCase(1, 2, ep=2, moe_backend="legacy", precision="bf16"), StateCase(2, 2, precision="bf16"),
                     StateCase(1, 2, ep=2, moe_backend="legacy", shape="shared-expert"),
                     # fp32 ZeRO-2 holds the gradients of the tensors across its partition's ends whole: here gate_up
                     # [8, 64, 64] of layer 2 on rank 0 (`memory.zero2_gradient_elements`). Before the pipeline: right
                     # after one, this pp 1 engine's build failed (DeepSpeed's `groups` still gave a model-parallel
                     # world > 1, so `_configure_distributed_model` asked the engine's mpu, None, for its rank)
                     StateCase(2, 2, shape="dense-first"),
                     StateCase(1, 2, pp=2, shape="dense-first")]),
    "dp1": (1, STATE_CASES + [StateCase(0, 1, shape="held-out")]),
    "dp2": (2, STATE_CASES + [StateCase(3, 1), StateCase(3, 2), StateCase(3, 1, checkpointing=True)]),
    "ep2": (2, [StateCase(0, 1, ep=2, moe_backend="legacy"), StateCase(1, 2, ep=2, moe_backend="legacy"),
                StateCase(2, 2, ep=2, moe_backend="legacy"),
                StateCase(1, 1, ep=2, checkpointing=True, moe_backend="legacy"),
                StateCase(0, 1, ep=2), StateCase(1, 2, ep=2), StateCase(2, 2, ep=2), StateCase(3, 1, ep=2),
                StateCase(3, 2, ep=2), StateCase(1, 1, ep=2, checkpointing=True)]),
    "pp2": (2, [StateCase(0, 2, pp=2), StateCase(1, 2, pp=2), StateCase(1, 2, pp=2, checkpointing=True)]),
    "pp2-ep2": (4, [StateCase(1, 2, pp=2, ep=2)]),
    "zero3-dp4": (4, [StateCase(3, 1), StateCase(3, 1, ep=2)]),  # experts partitioned over dp/ep = 2
}


def state_recipe(case: StateCase, world: int):
    """The recipe a state case trains: tiny, tp 1, the case's precision, ZeRO stage, pp, ep, backend and
    micro-batches."""
    from moe_model.recipe import recipe_from_dict

    dp = world // case.pp
    model, micro_batch, seq_len = SHAPES[case.shape]
    return recipe_from_dict({
        "name": "memory-accuracy", "model": model,
        "parallel": {"tp": 1, "pp": case.pp, "ep": case.ep, "dp": dp, "zero_stage": case.zero_stage,
                     "micro_batch_size": micro_batch, "activation_checkpointing": case.checkpointing,
                     "moe_backend": case.moe_backend},
        "train": {"global_batch_size": micro_batch * case.micro_steps * dp, "seq_len": seq_len,
                  "precision": case.precision, "steps": 10, "warmup_steps": 1},
        "tracking": {"wandb": {"mode": "disabled"}},
    })


def track_state_peaks(engine: Any) -> dict[str, int]:
    """Measure `engine_state_bytes` as every gradient lands, after every `engine.backward`, just before the
    optimizer's step and just after it; keep the largest of each kind."""
    peak = {"params": 0, "grads": 0, "optimizer": 0, "buckets": 0}

    def record() -> None:
        for kind, value in engine_state_bytes(engine).items():
            peak[kind] = max(peak[kind], value)

    def after(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            record()
            return result
        setattr(owner, name, wrapped)

    after(engine, "backward")  # DeepSpeedEngine; the pipeline engine's backward passes are measured per gradient
    # and inside backward, as each gradient lands (reduction buckets live only while backward runs)
    for param in engine.module.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(lambda _: record())
    original_step = engine.optimizer.step

    def step(*args, **kwargs):
        record()
        result = original_step(*args, **kwargs)
        record()
        return result
    engine.optimizer.step = step
    return peak


class AutoEPRows:
    """The routed rows N each AutoEP layer's experts receive on this rank, as they run: DeepSpeed's own
    `permute_by_local_expert` (deepspeed/module_inject/auto_ep_layer.py) is wrapped while the context is open and
    the rows it is handed (after the all-to-all) are recorded, layer by layer."""

    def __enter__(self) -> list[int]:
        from deepspeed.module_inject import auto_ep_layer

        self.module, self.original, self.rows = auto_ep_layer, auto_ep_layer.permute_by_local_expert, []

        def permute(tokens, local_counts):
            self.rows.append(int(tokens.shape[0]))
            return self.original(tokens, local_counts)
        auto_ep_layer.permute_by_local_expert = permute
        return self.rows

    def __exit__(self, *exc) -> None:
        self.module.permute_by_local_expert = self.original


class NewStorages(TorchDispatchMode):
    """Every storage a tensor op creates while the mode is on (not views, not in-place results: the outputs that
    share no input's storage), held by weak reference: `alive_bytes` sums those not freed since."""

    def __init__(self):
        super().__init__()
        self.made: dict[int, tuple[Any, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in inputs and (key not in self.made or self.made[key][0].expired()):
                    self.made[key] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def alive_bytes(self, leave_out: set[int]) -> int:
        return sum(n for key, (ref, n) in self.made.items() if not ref.expired() and key not in leave_out)


def alive_for_backward(engine: Any, step: Any, ids: torch.Tensor) -> tuple[int, Any]:
    """Memory as the real training step spends it, and the step's `StepStats`: the bytes of the storages the step's
    tensor ops created before it calls `engine.backward` and that are still alive at that call (`NewStorages`),
    parameters left out (ZeRO-3 gathers them: model states), plus the input ids (made before the step, held through
    it). Storages, not allocator events: gloo's communicators allocate and keep buffers of their own through the CPU
    allocator (up to 9% of these tiny steps, varying from run to run, seen with torch.profiler's `profile_memory`);
    on GPUs NCCL's live outside PyTorch's allocator, in the estimate's reserve."""
    tracker = NewStorages()
    alive: list[int] = []
    original = engine.backward

    def backward(*args, **kwargs):
        if not alive:  # the first backward of the step: stop tracking, count what is alive
            tracker.__exit__(None, None, None)
            # unreachable reference cycles first: storages that only wait for the garbage collector are not held
            # (left in, they came and went with its timing: +0.3% to +5% on the ep 2 cases from run to run)
            gc.collect()
            alive.append(tracker.alive_bytes(parameter_storages(engine.module)))
        return original(*args, **kwargs)
    engine.backward = backward
    tracker.__enter__()
    try:
        stats = step([ids])
    finally:
        if not alive:
            tracker.__exit__(None, None, None)
        engine.backward = original
    return alive[0] + ids.untyped_storage().nbytes(), stats


def measure_states_on_ranks(out_path: Path, cases: Iterable[StateCase]) -> None:
    """Rank-side program (run under the deepspeed launcher): build each case's engine with the training code's own
    `build_engine` (the layout and MoE backend resolved as `moe train` resolves them), run two optimizer steps with
    its own step function, and record each kind's largest bytes; then, on pp = 1, what the engine's module saves in
    one forward and what a third real step holds when its backward starts."""
    import torch.distributed as dist

    from moe_model.parallel import Layout
    from moe_model.train.distributed import init_distributed
    from moe_model.train.engine import build_engine

    rank, world = init_distributed()
    results = []
    for case in cases:
        recipe = state_recipe(case, world)
        layout = Layout.of(case.strategy(world))
        model, micro_batch, seq_len = SHAPES[case.shape]
        engine, step, _ = build_engine(recipe, layout)
        peak = track_state_peaks(engine)
        batch = functools.partial(torch.randint, 0, model["vocab_size"], (micro_batch, seq_len),
                                  generator=torch.Generator().manual_seed(layout.coords(rank)["data"]))
        for _ in range(2):  # the second step runs with the optimizer states in place
            step([batch() for _ in range(case.micro_steps)])
        result = {**dataclasses.asdict(case), "world": world, "rank": rank, "stage": layout.coords(rank)["pipe"],
                  **peak, "optimizer_class": type(engine.optimizer).__name__, "moe_backend": layout.moe_backend}
        # bf16 cases, and a block setting the activation model does not price (`shapes.UNPRICED_SETTINGS`): states only
        activations = case.precision == "fp32" and not unpriced_settings(recipe.moe_config())
        if activations and case.pp == 1 and not case.checkpointing:  # a third real step, as the trainer runs it
            with AutoEPRows() as rows:
                result["alive"], stats = alive_for_backward(engine, step, batch())
            result["alive_depths"], result["alive_rows"] = dispatch_depths(stats.expert_counts_LE), rows
        if activations and case.pp == 1:  # the engine's own module (DeepSpeed's MoE layer or AutoEP where ep > 1)
            with AutoEPRows() as rows:
                result["activations"], out = saved_tensor_bytes_and_output(engine.module, batch())
            result["depths"], result["rows"] = dispatch_depths(out.expert_counts_LE), rows
        elif activations and case.ep == 1:  # what one pipeline stage's forward saves, per micro-batch (largest)
            result["activations"] = pipeline_forward_saved_bytes(engine, step, case, batch)
        results.append(result)
        del engine, step
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        out_path.write_text(json.dumps([r for rank_results in gathered for r in rank_results], indent=2))
    # an explicit teardown: left to interpreter exit after several engines, a rank once aborted there ("terminate
    # called without an active exception", exit -6) after every figure was written
    dist.barrier()
    dist.destroy_process_group()


def pipeline_forward_saved_bytes(engine: Any, step: Any, case: StateCase, batch: Any) -> int:
    """Run one more optimizer step with the pipeline engine's forward passes under saved_tensors_hooks: the largest
    bytes one micro-batch's forward pass saves on this stage (parameters excluded, each storage once)."""
    from deepspeed.runtime.pipe import schedule

    largest = 0
    original = type(engine)._INSTRUCTION_MAP[schedule.ForwardPass]

    def forward_pass(self, *args, **kwargs):
        nonlocal largest
        saved = SavedStorages(lambda: parameter_storages(engine.module))
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            result = original(self, *args, **kwargs)
        largest = max(largest, saved.nbytes)
        return result
    # the engine dispatches its schedule through a class-level table: give this engine its own copy
    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, schedule.ForwardPass: forward_pass}
    step([batch() for _ in range(case.micro_steps)])
    del engine._INSTRUCTION_MAP
    return largest


def dispatch_depths(expert_counts_LE: torch.Tensor) -> list[int]:
    """Each MoE layer's buffer depth C in a forward: the busiest expert's load over the expert-parallel group (what
    DeepSpeed's legacy layer pads every expert to, dropless), from the routes each rank counted (the forward's
    output)."""
    import torch.distributed as dist

    depths = []
    for counts_E in expert_counts_LE:
        busiest = counts_E.max().reshape(1).clone()
        dist.all_reduce(busiest, op=dist.ReduceOp.MAX)  # over everything: each ep group's max is at most this
        depths.append(int(busiest))
    return depths


def launch_state_measurement(case_set: str, out_path: Path, timeout: int = 1800) -> list[dict[str, Any]]:
    """Run one of `CASE_SETS` through the real deepspeed launcher (a free port) and return every rank's peaks."""
    ranks = CASE_SETS[case_set][0]
    command = deepspeed_command(ranks, Path(__file__).resolve(), ["--measure-states", str(out_path), "--cases", case_set])
    env = rank_env(WANDB_MODE="disabled", WANDB_SILENT="true")
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"state measurement on {ranks} rank(s) failed:\n{result.stdout[-3000:]}\n"
                           f"{result.stderr[-3000:]}")
    return json.loads(out_path.read_text())


# what the CPU ranks run: no foreach AdamW temporary (the engines' AdamW is fused), AutoEP's PyTorch fallbacks
CPU_ASSUMPTIONS = Assumptions(foreach_adam_temporary=False, autoep_triton_kernels=False)


def estimate_states(case: StateCase, world: int, stage: int) -> dict[str, int]:
    """The estimate's model states for the rank of `stage` (`CPU_ASSUMPTIONS`)."""
    from moe_model.estimate.estimate import estimate

    est = estimate(state_recipe(case, world), world_size=world, assumptions=CPU_ASSUMPTIONS)
    states = est.stages[stage].states
    return {"params": states.params_bytes, "grads": states.grads_bytes, "optimizer": states.optimizer_bytes,
            "buckets": states.bucket_bytes}


def module_activations(case: StateCase, world: int, m: dict[str, Any], prefix: str = "") -> tuple[int, int]:
    """The estimate for one forward of a pp = 1 engine's module, at the routing the ranks measured (each layer's
    dispatch depth on DeepSpeed's legacy layer, its received rows on AutoEP): (saved by autograd, held otherwise
    through the backward: the logits)."""
    from moe_model.estimate.activations import logits_held

    cfg = state_recipe(case, world).moe_config()
    _, micro_batch, seq_len = SHAPES[case.shape]
    mb = MicroBatch(micro_batch, seq_len, dtype_bytes=4, ep=case.ep, moe_backend=m["moe_backend"], triton=False)
    legacy_layer = m["moe_backend"] == "legacy" and case.ep > 1
    saved = model_saved(cfg, mb, case.checkpointing, m[prefix + "depths"] if legacy_layer else None,
                        m[prefix + "rows"] if m["moe_backend"] == "autoep" else None).total
    return saved, logits_held(cfg, mb)


def _case(m: dict[str, Any]) -> StateCase:
    return StateCase(m["zero_stage"], m["micro_steps"], m["pp"], m["ep"], m["checkpointing"], m["moe_backend"],
                     m["shape"], m["precision"])


def state_rows(measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per kind for each case and pipeline stage: the model states of the stage's busiest rank (the estimate
    prices that one: ZeRO-2's fp32 gradients hold the tensors across each partition boundary whole, so ranks differ),
    the activations of its first rank."""
    rows, seen = [], set()
    for m in measured:
        case = _case(m)
        if (case, m["stage"]) in seen:
            continue
        seen.add((case, m["stage"]))
        est = estimate_states(case, m["world"], m["stage"])
        name = case.name(m["world"]) + (f" stage {m['stage']}" if case.pp > 1 else "")
        ranks = [r for r in measured if _case(r) == case and r["stage"] == m["stage"]]
        for kind in ("params", "grads", "optimizer", "buckets"):
            rows.append(row(f"states.{kind}", name, est[kind], max(r[kind] for r in ranks)))
        if "activations" in m and case.pp > 1:
            from moe_model.estimate.estimate import estimate

            stage = estimate(state_recipe(case, m["world"]), world_size=m["world"],
                             assumptions=CPU_ASSUMPTIONS).stages[m["stage"]]
            per_micro_batch = sum(v for k, v in stage.activations.per_micro_batch.items() if not k.startswith("held."))
            rows.append(row("activations (pipeline stage, per micro-batch)", name, per_micro_batch, m["activations"]))
        elif "activations" in m:
            saved, _ = module_activations(case, m["world"], m)
            autoep = m["moe_backend"] == "autoep"
            label = ("activations (AutoEP layer)" if autoep else "activations (DeepSpeed MoE layer)" if case.ep > 1
                     else "activations (engine module)")
            routing = f" N={m['rows']}" if autoep else f" C={m['depths']}" if case.ep > 1 else ""
            rows.append(row(label, name + routing, saved, m["activations"]))
        if "alive" in m:
            saved, held = module_activations(case, m["world"], m, "alive_")
            rows.append(row("activations alive at backward (real step)", name, saved + held, m["alive"]))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# GPU mode: max_memory_allocated of a real step


# big enough that activations, not the 1 GB gradient bucket, dominate; small enough for any 16 GB GPU
GPU_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                 hidden_act="gelu", max_position_embeddings=4096)
GPU_CASES = [  # (precision, zero_stage, micro-batch, seq_len, checkpointing)
    ("bf16", 1, 4, 2048, False),
    ("bf16", 1, 4, 2048, True),
    ("bf16", 0, 2, 4096, False),
    ("fp32", 2, 2, 1024, False),
]


def measure_gpu_on_rank(out_path: Path, case_index: int | None = None) -> None:
    """Rank-side program on one GPU: the allocator's peak over the second optimizer step (the first creates the
    optimizer states) against the estimate's allocated bytes (its total less the reserve outside PyTorch's allocator
    and the fragmentation allowance); also `max_memory_reserved` against the estimate less that reserve (what the
    caching allocator may hold, its fragmentation allowance included: the `reserved_bound` each row carries).
    `case_index`: only `GPU_CASES[case_index]`, so that each case runs in a process of its own (one case's cached
    blocks and engine never lift the next one's peak). Not run on the development machines, which have no GPU."""

    from moe_model.estimate.estimate import estimate
    from moe_model.parallel import Layout
    from moe_model.recipe import recipe_from_dict
    from moe_model.train.distributed import init_distributed
    from moe_model.train.engine import build_engine

    init_distributed()
    results = []
    cases = GPU_CASES if case_index is None else [GPU_CASES[case_index]]
    for precision, zero, micro, seq, ckpt in cases:
        recipe = recipe_from_dict({
            "name": "memory-accuracy-gpu", "model": GPU_MODEL,
            "parallel": {"tp": 1, "pp": 1, "ep": 1, "dp": 1, "zero_stage": zero, "micro_batch_size": micro,
                         "activation_checkpointing": ckpt},
            "train": {"global_batch_size": micro, "seq_len": seq, "precision": precision, "steps": 10,
                      "warmup_steps": 1},
            "tracking": {"wandb": {"mode": "disabled"}}})
        torch.cuda.empty_cache()
        engine, step, _ = build_engine(recipe, Layout(tp=1, pp=1, ep=1, dp=1))
        step([torch.randint(0, GPU_MODEL["vocab_size"], (micro, seq))])  # creates the optimizer states
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the steady state, not the engine's one-off flattening at start
        step([torch.randint(0, GPU_MODEL["vocab_size"], (micro, seq))])
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
        est = estimate(recipe, world_size=1)
        peak = est.peak
        allocated = peak.total_bytes - peak.reserve_bytes - peak.fragmentation_bytes
        name = f"{precision} ZeRO-{zero} B{micro} S{seq}" + (" ckpt" if ckpt else "")
        results.append({**row("gpu.max_memory_allocated", name, allocated, measured),
                        "reserved": int(torch.cuda.max_memory_reserved()),
                        "reserved_bound": int(peak.total_bytes - peak.reserve_bytes)})
        del engine, step
    out_path.write_text(json.dumps(results, indent=2))


# ---------------------------------------------------------------------------------------------------------------


def row(kind: str, config: str, estimate: int, measured: int) -> dict[str, Any]:
    error = (estimate - measured) / measured if measured else (0.0 if estimate == 0 else float("inf"))
    return {"kind": kind, "config": config, "estimate": int(estimate), "measured": int(measured), "error": error}


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="memory estimator vs measurement (bytes; error = (estimate - measured) / measured)")
    for column in ("kind", "config", "estimate", "measured", "error"):
        table.add_column(column, justify="left" if column in ("kind", "config") else "right")
    for r in rows:
        table.add_row(r["kind"], r["config"], f"{r['estimate']:,}", f"{r['measured']:,}", f"{100 * r['error']:+.2f}%")
    Console(width=180).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["activations", "states"], help="run one part only")
    parser.add_argument("--sets", default=",".join(name for name in CASE_SETS if not name.startswith("test-")),
                        help=f"model-state launches to run, from {', '.join(CASE_SETS)} (default: all but test-*)")
    parser.add_argument("--gpu", action="store_true", help="also compare with torch.cuda.max_memory_allocated")
    parser.add_argument("--measure-states", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cases", default="dp2", help=argparse.SUPPRESS)
    parser.add_argument("--measure-gpu", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)  # --measure-gpu: one GPU_CASES index
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_states:
        measure_states_on_ranks(args.measure_states, CASE_SETS[args.cases][1])
        return 0
    if args.measure_gpu:
        measure_gpu_on_rank(args.measure_gpu, args.case)
        return 0

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.only in (None, "activations"):
        rows += [measure_activation_case(case, precision) for precision in ACTIVATION_DTYPES
                 for case in ACTIVATION_CASES]
    if args.only in (None, "states"):
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        for case_set in args.sets.split(","):
            out = RESULTS.parent / f"states_{case_set}.json"
            rows += state_rows(launch_state_measurement(case_set, out))
            out.unlink()
    if args.gpu:
        if torch.cuda.is_available():
            out = RESULTS.parent / "gpu.json"
            command = deepspeed_command(1, Path(__file__).resolve(), ["--measure-gpu", str(out)])
            subprocess.run(command, check=True, cwd=ROOT, env=rank_env(WANDB_MODE="disabled"))
            rows += json.loads(out.read_text())
        else:
            print("GPU mode skipped: torch.cuda.is_available() is False on this machine", file=sys.stderr)
    print_table(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "wall_s": round(time.perf_counter() - started, 1),
                                   "torch": torch.__version__}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
