"""Exact parameter counts of `MoEForCausalLM` from its config, by formula (tests check them against numel).

Per decoder layer, with D hidden, Hq/Hkv query/key-value heads of width d, E experts of FFN width I, top-k:
    attention  D*Hq*d (q) + 2*D*Hkv*d (k, v) + Hq*d*D (o)
    norms      2*D
    router     D*E
    experts    E*I*D*m, with m = 3 for the gated silu FFN (gate, up, down) and 2 for the two-matrix gelu FFN
The model adds the embedding V*D, the final norm D and the LM head V*D (none when tied).
A token runs k of the E experts, so active = total - (E - k)*I*D*m per MoE layer. The other families' blocks
(dense layers, shared experts, biases, q/k norms) add what `shapes.layer_table` lists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..configuration import MoEConfig
from .shapes import dims, layer_table


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
    """The counts of the module docstring, summed over `shapes.layer_table` (every layer's parts: the families'
    dense layers, shared experts, biases and q/k norms included). `per_layer` and `per_expert` are an MoE layer's."""
    m = dims(config)
    table = layer_table(config)
    embedding = m.V * m.D * (1 if m.tied else 2)
    expert = sum(row.experts * row.per_expert for row in table)
    total = embedding + m.D + sum(row.total for row in table)
    moe = next(row for row in table if row.moe)
    return ParamCounts(
        total=total,
        active_per_token=total - sum((row.experts - m.k) * row.per_expert for row in table if row.moe),
        expert=expert,
        non_expert=total - expert,
        embedding=embedding,
        per_layer=moe.total,
        per_expert=moe.per_expert,
    )
