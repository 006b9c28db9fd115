"""Top-k routing and the router losses: the one definition both training paths use.

Shapes: T tokens, E experts, K = top-k.

Routing (`route`): `probs_TE = softmax(logits_TE in fp32)`, take the top-k, renormalise the k weights to sum to 1
(exactly transformers' Mixtral router; Qwen's and OLMoE's with `norm_topk_prob` on or off). Sigmoid scoring
(DeepSeek-V3 section 2.1.2, transformers' Glm4Moe router): `scores_TE = sigmoid(logits in fp32)`; the experts are
chosen on `scores + bias_E` (the bias chooses, it never weights), among the `topk_group` of `n_group` expert groups
whose two best biased scores sum highest; the weights are the chosen unbiased scores, renormalised (+1e-20) with
`norm_topk_prob`, times `routed_scaling_factor`. Its `probs_TE` (what the balance loss reads) are the scores
normalised per token (DeepSeek-V3 eq. 18).

Load-balancing loss (Switch Transformer, eq. 4-6, normalised per route):

    aux = E * sum_e f_e * P_e
    f_e = (routes that chose expert e) / (T * K)      fraction of the T*K routes, no gradient
    P_e = mean_t probs_TE[t, e]                        mean router probability, carries the gradient

It is 1.0 under perfectly uniform routing for any K, and equals transformers' `load_balancing_loss_func` for one
layer divided by K (padded tokens left out the same way where an attention mask is given). A model's `aux_loss`
is the mean of this over its MoE layers; the training loss adds `router_aux_loss_coef * aux_loss`.
Sequence-level (`router_aux_loss_per_sequence`, DeepSeek-V3 eq. 17-20): the same formula over each sequence's
tokens alone, averaged over the sequences; it asks every sequence to be balanced, not only the batch.

Aux-loss-free balancing (`router_bias_update_rate` u, DeepSeek-V3 section 2.1.2): after each optimizer step the
score bias of expert e moves by `u * sign(mean_e' load_e' - load_e)`, the loads being the routes each expert
received in the step, summed over its micro-batches and data-parallel ranks (`bias_update`): an overloaded expert
is chosen less, an idle one more, and no gradient is involved.

Router z-loss (ST-MoE): `mean_t logsumexp(logits_TE[t])^2`, averaged over layers the same way.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch


class Routing(NamedTuple):
    probs_TE: torch.Tensor  # fp32 softmax over all experts
    weights_TK: torch.Tensor  # renormalised top-k weights, fp32
    experts_TK: torch.Tensor  # chosen expert ids, int64


def route(logits_TE: torch.Tensor, top_k: int, scoring: str = "softmax", norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0, n_group: int | None = None, topk_group: int | None = None,
          bias_E: torch.Tensor | None = None) -> Routing:
    """The module docstring's routing; the defaults are Mixtral's (no groups: `n_group` None or 1)."""
    if scoring == "softmax":
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        weights_TK, experts_TK = torch.topk(probs_TE, top_k, dim=-1)
        if norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    else:
        scores_TE = torch.sigmoid(logits_TE.float())
        choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
        if n_group is not None and n_group > 1:
            T, E = choice_TE.shape
            best_TG = choice_TE.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(dim=-1)
            kept_TG = torch.zeros_like(best_TG).scatter_(1, torch.topk(best_TG, topk_group, dim=-1).indices, 1.0)
            kept_TE = kept_TG.repeat_interleave(E // n_group, dim=1).bool()
            choice_TE = choice_TE.masked_fill(~kept_TE, float("-inf"))
        experts_TK = torch.topk(choice_TE, top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
        if norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        probs_TE = normalised_scores(scores_TE)
    if routed_scaling_factor != 1.0:
        weights_TK = weights_TK * routed_scaling_factor
    return Routing(probs_TE, weights_TK, experts_TK)


def normalised_scores(scores_TE: torch.Tensor) -> torch.Tensor:
    """Sigmoid scores as a distribution over the experts, each token's over their sum: the aux loss's P under sigmoid
    scoring (the module docstring)."""
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True)


def probabilities(logits_TE: torch.Tensor, scoring: str = "softmax") -> torch.Tensor:
    """The router's probabilities the aux loss reads, fp32 [T, E]: `route`'s `probs_TE` without the choice (for a
    router whose routes are chosen elsewhere: DeepSpeed's AutoEP layer)."""
    if scoring == "softmax":
        return torch.softmax(logits_TE.float(), dim=-1)
    return normalised_scores(torch.sigmoid(logits_TE.float()))


def expert_counts(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routes per expert, shape [E] (int64); every id must be below E.

    A scatter-add into E bins rather than `torch.bincount`, whose output length is the largest id + 1: on CUDA it
    reads that maximum back to the host (a sync per call) and under torch.compile it is a data-dependent shape."""
    ids = experts_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor,
                        mask_T: torch.Tensor | None = None, sequences: int = 1) -> torch.Tensor:
    """The module docstring's `aux`, over the tokens where `mask_T` (1 = a real token, 0 = padding; default: all)
    is set: f_e and P_e count and average those tokens only, as transformers' Mixtral does with an attention mask.
    `sequences` > 1: the T tokens are that many sequences of equal length, one after another; the loss is the mean
    over them of each one's own (the sequence-level loss; a sequence of padding alone contributes 0)."""
    num_tokens, num_experts = probs_TE.shape
    K = experts_TK.shape[1]
    if sequences > 1:
        B = sequences
        m_BS = probs_TE.new_ones(num_tokens) if mask_T is None else mask_T.reshape(-1).to(probs_TE.dtype)
        m_BS = m_BS.view(B, -1)
        routes_BE = probs_TE.new_zeros(B, num_experts).scatter_add_(
            1, experts_TK.reshape(B, -1), m_BS.repeat_interleave(K, dim=1))
        kept_B1 = m_BS.sum(dim=1, keepdim=True).clamp(min=1)
        f_BE = routes_BE / (kept_B1 * K)
        P_BE = (probs_TE.view(B, -1, num_experts) * m_BS[..., None]).sum(dim=1) / kept_B1
        return num_experts * torch.sum(f_BE * P_BE, dim=1).mean()
    if mask_T is None:
        routes_E = expert_counts(experts_TK, num_experts).to(probs_TE.dtype)
        f_E = routes_E / (num_tokens * K)
        P_E = probs_TE.mean(dim=0)
    else:
        m_T = mask_T.reshape(-1).to(probs_TE.dtype)
        kept = m_T.sum()
        routes_E = torch.zeros(num_experts, dtype=probs_TE.dtype, device=probs_TE.device).scatter_add_(
            0, experts_TK.reshape(-1), m_T.repeat_interleave(K))
        f_E = routes_E / (kept * K)
        P_E = (probs_TE * m_T[:, None]).sum(dim=0) / kept
    return num_experts * torch.sum(f_E * P_E)


def bias_update(counts_LE: torch.Tensor, rate: float) -> torch.Tensor:
    """The change of every MoE layer's score bias after one optimizer step (module docstring), fp32 [L, E]:
    `rate * sign(mean_e counts_LE[l] - counts_LE[l, e])`; `counts_LE` are the step's routes per expert."""
    counts_LE = counts_LE.float()
    return rate * torch.sign(counts_LE.mean(dim=1, keepdim=True) - counts_LE)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def expert_capacity(num_tokens, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int):
    """Routed tokens one expert may take: `max(ceil(k * cf * T / E), min_capacity)` (DeepSpeed's rule).

    The one home of this rule: the model drops by it, the estimator sizes buffers by it. A number of tokens gives an
    int; a numpy array of them (the planner's grid) an array."""
    share = top_k * capacity_factor * num_tokens / num_experts
    if not isinstance(share, np.ndarray):  # (not np.ndim: torch.compile cannot trace numpy on a Python number)
        return max(math.ceil(share), min_capacity)
    return np.maximum(np.ceil(share), min_capacity)


def expert_positions(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each route's slot in its expert's queue, int64 [T, K].

    The order is GShard's priority: every token's first choice before any second choice, and within one choice
    earlier tokens first.
    """
    experts_KT = experts_TK.t()
    onehot_KTE = torch.nn.functional.one_hot(experts_KT, num_experts)
    position_KTE = torch.cumsum(onehot_KTE.reshape(-1, num_experts), dim=0).reshape(onehot_KTE.shape) - 1
    return (position_KTE * onehot_KTE).sum(dim=-1).t()


def capacity_keep_mask(experts_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which routes survive a per-expert capacity, bool [T, K], by `expert_positions`' priority.

    A dropped route contributes nothing; the token still passes through the residual connection.
    """
    return expert_positions(experts_TK, num_experts) < capacity
