"""The parallel strategy of a run, and every rule that says whether it is legal.

`Strategy` is what travels between the recipe, the estimator, the performance model, the planner and the launcher
instead of loose integers. It owns every layout rule (DeepSpeed's and this project's) and the resolution of dp:
    dp     the world size / (tp * pp) at launch, else the recipe's `parallel.dp`, else the smallest legal value, ep
           (the estimate then says dp was assumed)
    moe_backend  which engine runs the experts (`with_backend` resolves `auto`, `backend_problem` says what AutoEP
           cannot serve): `autoep`, DeepSpeed's AutoEP (variable-split all-to-all, grouped GEMMs, no capacity
           padding; `parallel.autoep`); `legacy`, DeepSpeed's `deepspeed.moe.layer.MoE` (fixed-capacity all-to-all)
           where ep > 1 and the model's own block where ep = 1. `auto` is AutoEP where experts are split (ep > 1)
           and AutoEP serves the model (gated experts, tp 1, dropless); at ep 1 there is nothing to exchange and the
           model's own grouped block runs the same arithmetic without DeepSpeed.
    rules  `layout_problem`: what DeepSpeed 0.19 accepts (tp | heads and inside a node, a stage per MoE layer,
           untied embeddings with pp, ep | experts and ep | dp, ZeRO-3 only without DeepSpeed's legacy MoE and
           without pp, ZeRO <= 1 with pp, what AutoEP serves);
           `training_problem`: what DeepSpeed accepts but this project cannot train correctly;
           `batch_problem`: micro_batch_size * dp divides the global batch.
A rule answers `(field, message with the fix)` or None; `moe_model.recipe` turns an answer into the `RecipeError`
the user sees (`Recipe.strategy`, `Recipe.check_strategy`), so this module needs nothing of the recipe.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

from .units import divisors

Problem = tuple[str, str]  # (recipe field, one-line message naming the fix)
FIELDS = ("tp", "pp", "ep", "dp", "zero_stage", "micro_batch_size", "activation_checkpointing",
          "moe_backend")  # `moe plan` JSON
MOE_BACKENDS = ("auto", "autoep", "legacy")


class ModelShape(Protocol):
    """What the rules read of the model: the recipe's `ModelSection` or a `MoEConfig`."""

    num_attention_heads: int
    num_key_value_heads: int | None
    num_local_experts: int
    num_hidden_layers: int
    tie_word_embeddings: bool
    hidden_act: str
    capacity_factor: float | None
    hidden_size: int
    intermediate_size: int


@dataclass(frozen=True)
class Strategy:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int | None = None  # None: not known before launch (world size / (tp * pp)); see `resolved`
    zero_stage: int = 1
    micro_batch_size: int = 1
    activation_checkpointing: bool = False
    moe_backend: str = "auto"  # one of MOE_BACKENDS; `with_backend` resolves auto

    @classmethod
    def of(cls, parallel: Any) -> Strategy:
        """From a recipe's `parallel` section, or a mapping with `FIELDS` (a plan candidate's `parallel`)."""
        given = parallel if isinstance(parallel, dict) else vars(parallel)
        values = {f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}
        return cls(**values).replace(activation_checkpointing=bool(values.get("activation_checkpointing")))

    @classmethod
    def from_recipe(cls, recipe: Any, world_size: int | None = None) -> tuple[Strategy, bool]:
        """(the recipe's strategy with dp and the MoE backend resolved, whether dp was assumed). Check
        `world_problem` first."""
        strategy, dp_assumed = cls.of(recipe.parallel).resolved(world_size)
        return strategy.with_backend(recipe.model), dp_assumed

    def replace(self, **changes: Any) -> Strategy:
        return dataclasses.replace(self, **changes)

    def autoep_problem(self, model: ModelShape) -> str | None:
        """Why DeepSpeed's AutoEP cannot run this model on this layout (the reason, for a message), or None."""
        if model.hidden_act != "silu":
            return (f"needs gated (silu) experts: DeepSpeed registers no two-matrix activation (model.hidden_act is "
                    f"{model.hidden_act})")
        if self.tp > 1:
            return f"does not run with tensor parallelism (tp={self.tp}): DeepSpeed refuses tp from mpu"
        if model.capacity_factor is not None:
            return (f"is dropless and has no capacity (model.capacity_factor is {model.capacity_factor}); set it "
                    "null")
        if model.hidden_size % 8 or model.intermediate_size % 8 or expert_width(model) % 8:
            return (f"needs hidden_size and the FFN widths in multiples of 8 (got {model.hidden_size}, "
                    f"{model.intermediate_size} and {expert_width(model)}): torch's grouped GEMM takes rows of "
                    "16-byte multiples in bf16")
        return None

    def with_backend(self, model: ModelShape) -> Strategy:
        """This strategy with `moe_backend` resolved: `auto` becomes autoep where ep > 1 and AutoEP serves the
        model and layout, else legacy (module docstring). A stated backend is kept (`backend_problem` checks it)."""
        if self.moe_backend != "auto":
            return self
        return self.replace(moe_backend="autoep" if self.ep > 1 and self.autoep_problem(model) is None else "legacy")

    def backend_problem(self, model: ModelShape) -> Problem | None:
        """A stated backend the model or layout cannot run on (auto always resolves to one that can)."""
        if self.moe_backend not in MOE_BACKENDS:
            return "parallel.moe_backend", f"{self.moe_backend!r} is not one of {', '.join(MOE_BACKENDS)}"
        reason = self.autoep_problem(model) if self.moe_backend == "autoep" else None
        if reason:
            return "parallel.moe_backend", f"autoep {reason}; or use moe_backend legacy (or auto)"
        return None

    def world_problem(self, world_size: int | None) -> Problem | None:
        """Whether `world_size` ranks can run this strategy: a multiple of tp * pp that agrees with a stated dp."""
        if world_size is None:
            return None
        if world_size <= 0 or world_size % (self.tp * self.pp):
            return "parallel", (f"world size {world_size} is not a multiple of tp x pp = {self.tp} x {self.pp}; "
                                f"start a multiple of {self.tp * self.pp} ranks")
        dp = world_size // (self.tp * self.pp)
        if self.dp is not None and self.dp != dp:
            return "parallel.dp", (f"the recipe says dp={self.dp} but {world_size} ranks give dp={dp}; start "
                                   f"{self.tp * self.pp * self.dp} ranks")
        return None

    def resolved(self, world_size: int | None = None) -> tuple[Strategy, bool]:
        """(this strategy with dp set, whether dp was assumed): dp from `world_size` (which must pass
        `world_problem`), else the stated dp, else ep, the smallest dp the layout rules allow."""
        if world_size is not None:
            return self.replace(dp=world_size // (self.tp * self.pp)), False
        if self.dp is not None:
            return self, False
        return self.replace(dp=self.ep), True

    @property
    def gpus(self) -> int:
        """tp * pp * dp: the world size (dp must be resolved)."""
        return self.tp * self.pp * self.dp

    def micro_batches(self, global_batch: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (`batch_problem` must pass)."""
        return global_batch // (self.micro_batch_size * self.dp)

    def as_parallel(self) -> dict[str, Any]:
        """The `parallel` mapping of `moe plan`'s JSON (`FIELDS`)."""
        return {name: getattr(self, name) for name in FIELDS}

    def layout_problem(self, model: ModelShape, gpus_per_node: int) -> Problem | None:
        """The first rule of DeepSpeed's (and this project's) parallel layout this strategy breaks; the dp rule only
        once dp is known."""
        tp, pp, ep, dp = self.tp, self.pp, self.ep, self.dp
        heads = model.num_attention_heads
        kv_heads = model.num_key_value_heads or heads
        experts = model.num_local_experts
        listed = lambda n: ", ".join(str(d) for d in divisors(n))  # noqa: E731
        if heads % tp or kv_heads % tp:
            return "parallel.tp", (f"tp={tp} must divide num_attention_heads ({heads}) and num_key_value_heads "
                                   f"({kv_heads}); choose tp from {listed(kv_heads)}")
        if tp > gpus_per_node or gpus_per_node % tp:
            return "parallel.tp", (f"tp={tp} must stay inside one node of {gpus_per_node} GPUs; choose tp from "
                                   f"{listed(gpus_per_node)} (or raise hardware.gpus_per_node)")
        if pp > model.num_hidden_layers:
            return "parallel.pp", (f"pp={pp} leaves a pipeline stage without an MoE layer "
                                   f"({model.num_hidden_layers} layers); use pp <= {model.num_hidden_layers}")
        if pp > 1 and model.tie_word_embeddings:
            return "parallel.pp", ("tie_word_embeddings with pp > 1 is not supported yet (embedding and head sit on "
                                   "different stages); set model.tie_word_embeddings false or pp 1")
        if experts % ep:
            return "parallel.ep", f"ep={ep} must divide num_local_experts ({experts}); choose ep from {listed(experts)}"
        if dp is not None and dp % ep:
            return "parallel.ep", (f"ep={ep} must divide dp={dp}: expert-parallel groups are carved out of the "
                                   f"data-parallel ranks; choose ep from {listed(math.gcd(dp, experts))} or raise dp")
        backend = self.backend_problem(model)
        if backend:
            return backend
        if tp > 1 and getattr(model, "qk_norm", None) == "projection":
            return "parallel.tp", (f"tp={tp} splits the heads, and model.qk_norm projection normalises over all of "
                                   "them (OLMoE's); use tp 1 (or qk_norm head)")
        mla_bias = getattr(model, "kv_lora_rank", None) is not None and getattr(model, "attention_bias", False)
        if tp > 1 and (getattr(model, "attention_out_bias", False) or mla_bias):  # (MLA's attention_bias has one)
            field = "attention_bias (with MLA, on o_proj too)" if mla_bias else "attention_out_bias"
            return "parallel.tp", (f"tp={tp} sums o_proj's partial outputs over the tp ranks, and "
                                   f"model.{field} would be added on each; use tp 1")
        if self.zero_stage == 3 and ep > 1 and self.with_backend(model).moe_backend != "autoep":
            why = self.autoep_problem(model) or "is not chosen (moe_backend legacy; use auto or autoep)"
            return "parallel.zero_stage", (f"ZeRO-3 with ep={ep} needs the AutoEP backend (DeepSpeed's legacy MoE "
                                           f"refuses ZeRO-3), and AutoEP {why}; or use zero_stage 0, 1 or 2")
        if pp > 1 and self.zero_stage > 1:
            return "parallel.zero_stage", (f"DeepSpeed's pipeline engine accepts ZeRO 0 or 1 only (pp={pp}); "
                                           "use zero_stage 1 or set pp 1")
        return None

    def training_problem(self, model: ModelShape | None = None) -> Problem | None:
        """What DeepSpeed accepts but this project cannot train correctly (checked before launch and by the planner).

        DeepSpeed's expert groups are consecutive ranks: with tp > 1 and ep not a multiple of tp, two tensor-parallel
        peers hold the same experts, and DeepSpeed's global grad norm (which counts a parameter once per tp rank or on
        tp rank 0 only) cannot count them exactly once, so gradient clipping would use a wrong norm.
        """
        tp, ep = self.tp, self.ep
        if tp > 1 and ep > 1 and ep % tp:
            return "parallel.ep", (f"with tp={tp}, training needs ep to be a multiple of tp (got ep={ep}) so that "
                                   "tensor-parallel peers hold different experts; raise ep or lower tp")
        return None

    def batch_problem(self, global_batch: int, dp_assumed: bool = False) -> Problem | None:
        """micro_batch_size * dp must divide the global batch (nothing to check while dp is unknown)."""
        if self.dp is None or batch_divides(global_batch, self.micro_batch_size, self.dp):
            return None
        per_step = self.micro_batch_size * self.dp
        return "train.global_batch_size", (
            f"{global_batch} is not a multiple of micro_batch_size x dp = {self.micro_batch_size} x {self.dp}"
            + (" (dp assumed = ep; set parallel.dp)" if dp_assumed else "") + f"; use a multiple of {per_step}")

    def problem(self, model: ModelShape, gpus_per_node: int, global_batch: int, *, dp_assumed: bool = False,
                trainable: bool = False) -> Problem | None:
        """The first rule this strategy breaks: the training rule (only with `trainable`), the layout rules, then the
        global batch; None when every rule holds."""
        return ((self.training_problem(model) if trainable else None) or self.layout_problem(model, gpus_per_node)
                or self.batch_problem(global_batch, dp_assumed))


def expert_width(model: ModelShape) -> int:
    """One routed expert's FFN width (`MoEConfig.expert_width`, for a recipe's model section too)."""
    return getattr(model, "moe_intermediate_size", None) or model.intermediate_size


def batch_divides(global_batch, micro_batch_size, dp):
    """Whether micro_batch_size * dp divides the global batch (numbers or numpy arrays: the planner's grid)."""
    return global_batch % (micro_batch_size * dp) == 0


def layout_problem(model: ModelShape, tp: int, pp: int, ep: int, dp: int | None, zero_stage: int,
                   gpus_per_node: int, moe_backend: str = "auto") -> Problem | None:
    """`Strategy.layout_problem` for callers holding loose integers (scripts written before `Strategy`)."""
    return Strategy(tp=tp, pp=pp, ep=ep, dp=dp, zero_stage=zero_stage,
                    moe_backend=moe_backend).layout_problem(model, gpus_per_node)


def training_problem(tp: int, ep: int) -> Problem | None:
    """`Strategy.training_problem` for callers holding loose integers."""
    return Strategy(tp=tp, ep=ep).training_problem()
