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
from .shapes import dims, expert_params, layer_dense_params, rank_params


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
    """The counts of the module docstring: the whole model is one rank holding every layer (`shapes.rank_params`)."""
    m = dims(config)
    whole = rank_params(m, layers=m.L, first=True, last=True, tp=1, ep=1)
    per_expert = expert_params(m)
    return ParamCounts(
        total=whole.total,
        active_per_token=whole.total - m.L * (m.E - m.k) * per_expert,
        expert=whole.expert,
        non_expert=whole.dense,
        embedding=m.V * m.D * (1 if m.tied else 2),
        per_layer=layer_dense_params(m) + m.E * per_expert,
        per_expert=per_expert,
    )
