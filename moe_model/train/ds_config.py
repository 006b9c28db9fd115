"""Recipe -> DeepSpeed JSON config. Pure data: no deepspeed import, so `moe config` runs anywhere.

The batch is given as `train_batch_size` (the recipe's global batch) and `train_micro_batch_size_per_gpu`;
DeepSpeed derives the gradient-accumulation steps from the data-parallel size it finds at launch, so one file serves
any world size.
"""

from __future__ import annotations

from typing import Any

from ..estimate.memory import grad_accum_dtype
from ..recipe import Recipe
from ..strategy import Strategy


def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    t, p = recipe.train, recipe.parallel
    # DeepSpeed's WarmupCosineLR refuses 0 warmup steps: no warmup is one warmup step that starts at the full lr
    warmup_steps, warmup_min_ratio = (t.warmup_steps, 0.0) if t.warmup_steps > 0 else (1, 1.0)
    config: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            # torch's AdamW runs on every accelerator, CPU ranks included; its fused kernel (CPU and CUDA) updates
            # in one pass, where the default allocates sqrt/div temporaries as large as the flat ZeRO partition
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": t.weight_decay,
                       "torch_adam": True, "fused": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": t.steps, "warmup_num_steps": warmup_steps,
                       "warmup_min_ratio": warmup_min_ratio, "cos_min_ratio": t.min_lr_ratio, "warmup_type": "linear"},
        },
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,  # the project logs its own metrics
        "wall_clock_breakdown": False,
    }
    accumulate = grad_accum_dtype(t.precision, p.zero_stage)
    if accumulate != t.precision:  # bf16 at ZeRO 1-3: DeepSpeed's default sums micro-batches in bf16
        config["data_types"] = {"grad_accum_dtype": accumulate}
    strategy = Strategy.of(p).with_backend(recipe.model)
    if strategy.moe_backend == "autoep":
        from ..parallel.autoep import autoep_section

        config["expert_parallel"] = autoep_section(recipe.moe_config(), p.ep)
    if p.pp > 1:
        # with tp > 1 the pipeline must not split activations/grads over the model-parallel group itself
        config["pipeline"] = {"pipe_partitioned": p.tp == 1, "grad_partitioned": p.tp == 1}
    return config
