"""Exact parameter counts of `MoEForCausalLM` from its config, by formula (tests check them against numel).

Per decoder layer, with D hidden, Hq/Hkv query/key-value heads of width d, E experts of FFN width I, top-k:
    attention  D*Hq*d (q) + 2*D*Hkv*d (k, v) + Hq*d*D (o)
    norms      2*D
    router     D*E
    experts    E*I*D*m, with m = 3 for the gated silu FFN (gate, up, down) and 2 for the two-matrix gelu FFN
The model adds the embedding V*D, the final norm D and the LM head V*D (none when tied).
A token runs k of the E experts, so active = total - (E - k)*I*D*m per layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..configuration import MoEConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active_per_token: int
    expert: int  # all experts of all layers
    non_expert: int  # everything else: attention, norms, routers, embedding, head
    embedding: int  # input embedding plus an untied LM head
    per_layer: int
    per_expert: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_params(config: MoEConfig) -> ParamCounts:
    D, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    E, k, I = config.num_local_experts, config.num_experts_per_tok, config.intermediate_size
    q_width, kv_width = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    matrices = 3 if config.hidden_act == "silu" else 2
    per_expert = matrices * I * D
    attention = 2 * D * q_width + 2 * D * kv_width
    per_layer = attention + 2 * D + D * E + E * per_expert
    embedding = V * D * (1 if config.tie_word_embeddings else 2)
    total = L * per_layer + D + embedding
    expert = L * E * per_expert
    return ParamCounts(
        total=total,
        active_per_token=total - L * (E - k) * per_expert,
        expert=expert,
        non_expert=total - expert,
        embedding=embedding,
        per_layer=per_layer,
        per_expert=per_expert,
    )
