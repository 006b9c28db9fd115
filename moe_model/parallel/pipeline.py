"""The model as a DeepSpeed `PipelineModule`, built from the same blocks as `MoEForCausalLM`.

Stages pass `(hidden_BSD, carry)` to each other. `carry` is one fp32 vector that accumulates, MoE layer by MoE
layer (`MoEConfig.moe_layers`: a dense FFN layer routes nothing and passes it on),
`[sum of aux losses, sum of z losses, routes per expert of the first MoE layer, ..., of the last]`: the router losses travel
as a tensor and are added in the loss function on the last stage (an autograd-injected aux gradient would be
mis-scaled by the pipeline engine), and the expert-load counts (no gradient) reach the last stage with them, so
recomputation under activation checkpointing cannot count a forward twice.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.utils.checkpoint
from torch import nn

from ..configuration import MoEConfig
from ..losses import StepStats, training_loss
from ..modeling import MoEDecoderLayer, MoEForCausalLM, MoERotaryEmbedding, causal_lm_loss
from .groups import RankGroups
from .layer import parallelize_layer
from .state_dict_adapter import allocate


def carry_size(config: MoEConfig) -> int:
    return 2 + len(config.moe_layers) * config.num_local_experts


class EmbeddingPipe(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding, config: MoEConfig):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.carry_size = carry_size(config)
        allocate(self)  # built on meta: the PipelineModule moves its stage next, and `build_model` fills it

    def forward(self, ids_BS: torch.Tensor):
        x_BSD = self.embed_tokens(ids_BS)
        return x_BSD, x_BSD.new_zeros(self.carry_size, dtype=torch.float32)


class DecoderLayerPipe(nn.Module):
    """One decoder block (already parallelized for tp/ep) that also adds its router losses and load to the carry."""

    def __init__(self, layer: MoEDecoderLayer, layer_idx: int, config: MoEConfig, groups: RankGroups):
        super().__init__()
        self.layer = parallelize_layer(layer, groups)
        self.layer_idx = layer_idx
        self.config = config
        self.rotary_emb = MoERotaryEmbedding(config)
        allocate(self)  # built on meta: the PipelineModule moves its stage next, and `build_model` fills it

    def forward(self, inputs):
        x_BSD, carry = inputs
        cfg = self.config
        position_ids = torch.arange(x_BSD.shape[1], device=x_BSD.device).unsqueeze(0)
        cos_sin = self.rotary_emb(x_BSD, position_ids)
        x_BSD, router = self.layer(x_BSD, cos_sin)
        if router is None:  # a dense FFN layer
            return x_BSD, carry
        E, L, slot = cfg.num_local_experts, len(cfg.moe_layers), cfg.moe_layers.index(self.layer_idx)
        load_E = router.expert_counts_E.detach().float()
        update = torch.cat([router.aux_loss.float().reshape(1), router.z_loss.float().reshape(1),
                            carry.new_zeros(slot * E), load_E, carry.new_zeros((L - 1 - slot) * E)])
        return x_BSD, carry + update


class HeadPipe(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head
        allocate(self)  # built on meta: the PipelineModule moves its stage next, and `build_model` fills it

    def forward(self, inputs):
        x_BSD, carry = inputs
        return self.lm_head(self.norm(x_BSD)), carry


class PipelineLoss:
    """The training loss of `MoEForCausalLM` (`losses.training_loss`) from the last stage's `(logits, carry)`; keeps
    each micro-batch's `StepStats` until `take`."""

    def __init__(self, config: MoEConfig):
        self.config = config
        self.stats: list[StepStats] = []

    def __call__(self, outputs, labels_BS):
        logits_BSV, carry = outputs
        L, E = len(self.config.moe_layers), self.config.num_local_experts
        lm_loss, _ = causal_lm_loss(logits_BSV, labels_BS)
        aux_loss, z_loss = carry[0] / L, carry[1] / L
        loss = training_loss(lm_loss, aux_loss, z_loss, self.config)
        self.stats.append(StepStats.of(loss, lm_loss, aux_loss, z_loss, carry[2:].reshape(L, E)))
        return loss

    def take(self) -> StepStats:
        """The sum of the micro-batches kept since the last call, on the CPU (zeros on a stage without the loss)."""
        stats, self.stats = self.stats, []
        return StepStats.total(stats, len(self.config.moe_layers), self.config.num_local_experts)


def build_pipeline_module(model: MoEForCausalLM, groups: RankGroups, activation_checkpointing: bool
                          ) -> tuple[nn.Module, PipelineLoss]:
    """The `PipelineModule` of this rank's stage and its loss function (which keeps the step's `StepStats`)."""
    from deepspeed.pipe import LayerSpec, PipelineModule

    config = model.config
    if config.tie_word_embeddings:
        raise ValueError("tie_word_embeddings with pp > 1 is not supported yet; untie the embeddings or set pp 1")
    specs = [LayerSpec(EmbeddingPipe, model.model.embed_tokens, config)]
    specs += [LayerSpec(DecoderLayerPipe, layer, i, config, groups) for i, layer in enumerate(model.model.layers)]
    specs.append(LayerSpec(HeadPipe, model.model.norm, model.lm_head))
    loss = PipelineLoss(config)
    module = PipelineModule(
        layers=specs, topology=groups.layout.topology(), loss_fn=loss,
        partition_method="type:DecoderLayerPipe",  # decoder layers balanced over stages, dense or MoE
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        # non-reentrant: the pipeline engine runs backward once per output tensor (hidden, then carry), and
        # DeepSpeed's reentrant checkpoint frees its saved inputs after the first
        activation_checkpoint_func=partial(torch.utils.checkpoint.checkpoint, use_reentrant=False),
        checkpointable_layers=["DecoderLayerPipe"],
    )
    return module, loss
