"""Committed DeepSpeed configs: one per recipe, up to date, and accepted by DeepSpeed's own config class."""

import json

import pytest

from moe_model.recipe import load_recipe
from moe_model.train.ds_config import deepspeed_config
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_committed_config_is_current(recipe_path):
    committed = ROOT / "ds_configs" / f"{recipe_path.stem}.json"
    assert committed.exists(), f"{committed} is missing: run `make configs`"
    assert json.loads(committed.read_text()) == deepspeed_config(load_recipe(recipe_path)), \
        f"{committed} is stale: run `make configs` and commit the result"


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_deepspeed_parses_the_config(recipe_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    recipe = load_recipe(recipe_path)
    parsed = DeepSpeedConfig(json.loads((ROOT / "ds_configs" / f"{recipe_path.stem}.json").read_text()))
    assert parsed.train_batch_size == recipe.train.global_batch_size
    assert parsed.train_micro_batch_size_per_gpu == recipe.parallel.micro_batch_size
    assert parsed.zero_optimization_stage == recipe.parallel.zero_stage
    assert parsed.bfloat16_config.enabled == (recipe.train.precision == "bf16")
    assert parsed.float16_config.enabled == (recipe.train.precision == "fp16")
    assert parsed.optimizer_name == "adamw" and parsed.scheduler_name == "WarmupCosineLR"


@pytest.mark.parametrize("warmup", [0, 3])
def test_deepspeed_scheduler_runs_the_recipe_warmup(warmup):
    """DeepSpeed's own WarmupCosineLR refuses 0 warmup steps; the config must still give the full lr from step 1."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    recipe = load_recipe(ROOT / "recipes" / "tiny_cpu.yaml", [f"train.warmup_steps={warmup}"])
    params = deepspeed_config(recipe)["scheduler"]["params"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.train.lr)
    scheduler = WarmupCosineLR(optimizer, **params)
    lrs = []
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    if warmup == 0:
        assert lrs[0] == pytest.approx(recipe.train.lr, rel=0.02)  # cosine decay only, no ramp
    else:
        assert lrs[0] < lrs[1] < lrs[2] <= recipe.train.lr * 1.0001  # the ramp


@pytest.mark.parametrize("precision,zero_stage,pp", [  # the pipeline engine takes ZeRO 0 or 1
    (precision, zero_stage, pp) for precision in ("fp32", "bf16", "fp16") for zero_stage in range(4)
    for pp in (1, 2) if pp == 1 or zero_stage < 2])
def test_deepspeed_takes_the_accumulation_dtype(monkeypatch, precision, zero_stage, pp):
    """DeepSpeed's own choice (`DeepSpeedEngine.get_data_types` and `_do_optimizer_sanity_check`, run on the parsed
    config without building an engine) accepts the config's gradient accumulation dtype for every precision, ZeRO
    stage and pp, accumulates bf16 in fp32 wherever the estimator says so, and builds the optimizer wrapper the
    estimator prices (`estimate.memory.optimizer_kind`)."""
    import types

    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    from moe_model.estimate.memory import grad_accum_dtype, optimizer_kind

    monkeypatch.setattr("deepspeed.comm.get_rank", lambda *args, **kwargs: 0)  # no process group here: rank 0 logs

    recipe = load_recipe(ROOT / "recipes" / "tiny_cpu.yaml", [f"train.precision={precision}",
                                                              f"parallel.zero_stage={zero_stage}", f"parallel.pp={pp}"])
    config = DeepSpeedConfig(deepspeed_config(recipe))
    engine = types.SimpleNamespace(
        _config=config, fp16_enabled=lambda: config.float16_config.enabled,
        bfloat16_enabled=lambda: config.bfloat16_config.enabled, zero_optimization=lambda: zero_stage > 0,
        zero_optimization_stage=lambda: zero_stage, zero_cpu_offload=lambda: False, zero_compute_grad_norm=lambda: True,
        zero_allow_untested_optimizer=lambda: False, pipeline_parallelism=pp > 1, global_rank=0)
    engine.get_data_types = types.MethodType(DeepSpeedEngine.get_data_types, engine)
    model_dtype, accumulate = engine.get_data_types()
    assert accumulate == getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[
        grad_accum_dtype(precision, zero_stage)])
    assert (accumulate == torch.float32) == (precision == "fp32" or (precision == "bf16" and zero_stage >= 1))
    wrapper = DeepSpeedEngine._do_optimizer_sanity_check(engine, torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]))
    built = {"zero_optimization": "DeepSpeedZeroOptimizer_Stage3" if zero_stage == 3 else "DeepSpeedZeroOptimizer",
             "bf16": "BF16_Optimizer", "fp16": "FP16_UnfusedOptimizer", "ddp_bf16": "FP16_UnfusedOptimizer",
             None: "torch AdamW (no wrapper)"}[wrapper]  # torch AdamW is not FusedAdam: the unfused fp16 wrapper
    assert built == optimizer_kind(precision, zero_stage, pp)
    if precision == "bf16" and zero_stage == 0:  # why the rule stops at ZeRO-0: DeepSpeed refuses the mix there
        config.grad_accum_dtype = "fp32"
        with pytest.raises(NotImplementedError, match="unsupported mix"):
            DeepSpeedEngine._do_optimizer_sanity_check(engine, torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]))
