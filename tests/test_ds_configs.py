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
