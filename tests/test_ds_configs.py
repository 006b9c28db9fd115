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
