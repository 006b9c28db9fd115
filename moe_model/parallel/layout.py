"""Where a rank sits: tensor (tp), pipeline (pp), data (dp) and expert (ep) coordinates.

Ranks are laid out as DeepSpeed's `PipeModelDataParallelTopology(num_pp, num_mp=tp, num_dp)` does: pipe outermost,
model (tp) innermost, so `rank = (pipe * dp + data) * tp + model`. DeepSpeed's MoE builds its expert-parallel groups
from consecutive global ranks (`groups._create_expert_and_data_parallel`, legacy ordering): `ep_rank = rank % ep`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..strategy import Strategy


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    ep: int
    dp: int
    moe_backend: str = "legacy"  # resolved: autoep or legacy (`Strategy.with_backend`)

    @classmethod
    def of(cls, strategy: Strategy) -> Layout:
        """The rank layout of a resolved strategy (dp known: `Strategy.resolved`; the backend: `with_backend`)."""
        if strategy.moe_backend not in ("autoep", "legacy"):
            raise ValueError(f"moe_backend {strategy.moe_backend!r} is not resolved (Strategy.with_backend)")
        return cls(tp=strategy.tp, pp=strategy.pp, ep=strategy.ep, dp=strategy.dp, moe_backend=strategy.moe_backend)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> dict[str, int]:
        return {"pipe": rank // (self.dp * self.tp), "data": (rank // self.tp) % self.dp, "model": rank % self.tp,
                "expert": rank % self.ep}

    def topology(self):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)

    def describe(self) -> str:
        backend = " autoep" if self.moe_backend == "autoep" else ""
        return f"tp{self.tp} pp{self.pp} dp{self.dp} ep{self.ep}{backend}"
