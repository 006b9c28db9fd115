"""`train.init_from`: a run starts from a Hugging Face folder (native or Mixtral, read slice by slice per rank)."""

import copy

import pytest
import torch
import yaml
from safetensors import safe_open

from moe_model.cli import main as moe
from moe_model.formats import mixtral_config
from moe_model.recipe import RecipeError, load_recipe
from moe_model.train.data import StepBatches
from moe_model.train.tracking import read_metrics
from tests.conftest import ROOT
from tests.launch import failure, launch

TINY = yaml.safe_load((ROOT / "recipes/tiny_cpu.yaml").read_text())


def mixtral_folder(path):
    """transformers' own Mixtral with tiny_cpu's shape and random weights, saved as transformers saves it."""
    from transformers import MixtralForCausalLM

    config = load_recipe(ROOT / "recipes/tiny_cpu.yaml").moe_config()
    torch.manual_seed(11)
    model = MixtralForCausalLM(mixtral_config(config)).eval()
    model.save_pretrained(path)
    return model


def largest_difference(source, exported) -> float:
    """The largest absolute difference between two folders' `model.safetensors`, which must hold the same names."""
    with safe_open(source / "model.safetensors", "pt") as before, safe_open(exported / "model.safetensors", "pt") as after:
        assert set(before.keys()) == set(after.keys())
        return max((before.get_tensor(k) - after.get_tensor(k)).abs().max().item() for k in before.keys())


def recipe_from(tmp_path, folder, **train):
    raw = copy.deepcopy(TINY)
    raw.pop("model")  # the folder's config.json is the model
    raw["train"].update(init_from=str(folder), **train)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_model_section_comes_from_the_folder_or_must_agree(tmp_path):
    mixtral_folder(tmp_path / "hf")
    recipe = load_recipe(recipe_from(tmp_path, tmp_path / "hf"))
    assert recipe.model.hidden_act == "silu" and recipe.model.num_local_experts == 8
    # exported (divided by k) and read back (times k): tiny_cpu's own coefficient (tests/test_hf_losses.py holds
    # each direction to Mixtral's loss)
    assert recipe.model.router_aux_loss_coef == pytest.approx(0.01)
    stated = load_recipe(recipe_from(tmp_path, tmp_path / "hf"), ["model.router_z_loss_coef=0.001"])
    assert stated.model.router_z_loss_coef == 0.001 and stated.model.hidden_size == 64  # a training field may differ
    with pytest.raises(RecipeError, match=r"model: differs from train.init_from's model \(hidden_size 128 -> 64, "
                                          r"num_local_experts 4 -> 8\)"):
        load_recipe(recipe_from(tmp_path, tmp_path / "hf"), ["model.hidden_size=128", "model.num_local_experts=4"])
    with pytest.raises(RecipeError, match="train.init_from: '/nowhere' is not a folder"):
        load_recipe(recipe_from(tmp_path, "/nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="has no config.json"):
        load_recipe(recipe_from(tmp_path, tmp_path / "empty"))


def test_a_folder_that_cannot_fill_the_model_is_refused_before_any_rank_starts(tmp_path, capsys):
    """A missing shard, or a tensor the model does not have, is one line from `moe train` (exit 2) before the
    launcher starts (a launch here would fail the test: tests/conftest.py) and leaves no output folder."""
    from safetensors.torch import load_file, save_file

    from moe_model.parallel.state_dict_adapter import global_shapes
    from moe_model.train.engine import init_from_source

    mixtral_folder(tmp_path / "whole").save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    out = tmp_path / "run"
    capsys.readouterr()
    assert moe(["train", str(recipe_from(tmp_path, tmp_path / "sharded")), "--set", f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"names 1 shard(s) the folder lacks ({shards[-1].name})" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()

    mixtral_folder(tmp_path / "extra")
    weights = load_file(tmp_path / "extra/model.safetensors")
    save_file({**weights, "model.layers.0.mlp.shared_expert.weight": torch.zeros(2, 2)},
              tmp_path / "extra/model.safetensors", metadata={"format": "pt"})
    recipe = recipe_from(tmp_path, tmp_path / "extra")
    capsys.readouterr()
    assert moe(["train", str(recipe), "--set", f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert ("holds 1 tensor(s) the model does not have (model.layers.0.mlp.shared_expert.weight); set "
            "train.init_from_unexpected=ignore") in err and not out.exists()
    ignoring = load_recipe(recipe, ["train.init_from_unexpected=ignore"])
    shapes = global_shapes(ignoring.moe_config())
    assert init_from_source(ignoring).unexpected(shapes) == ["model.layers.0.mlp.shared_expert.weight"]


@pytest.mark.multirank
@pytest.mark.parametrize("ranks, layout", [
    (4, ()),  # tiny_cpu: pp2 x dp2 x ep2 on AutoEP
    (4, ("parallel.tp=2", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2")),  # legacy MoE with tensor parallelism
], ids=["pp2_dp2_ep2_autoep", "tp2_dp2_ep2_legacy"])
def test_first_loss_is_the_source_models_and_export_returns_its_weights(tmp_path, ranks, layout):
    source = mixtral_folder(tmp_path / "hf")
    run = tmp_path / "run"
    # 2 steps inside the warmup: DeepSpeed's WarmupCosineLR runs them at lr 0, so no weight may change
    recipe_path = recipe_from(tmp_path, tmp_path / "hf", steps=2, warmup_steps=2, save_every=2, log_every=1,
                              output_dir=str(run))
    result = launch(ranks, *layout, "tracking.wandb.mode=disabled", recipe=str(recipe_path))
    assert result.returncode == 0, failure(result)
    recipe = load_recipe(recipe_path, list(layout))
    dp = ranks // (recipe.parallel.tp * recipe.parallel.pp)
    batches = [ids for rank in range(dp) for ids in StepBatches(recipe, dp, rank).micro_batches(0)]
    with torch.no_grad():
        expected = sum(source(ids, labels=ids).loss.item() for ids in batches) / len(batches)
    first = read_metrics(run)[0]
    print(f"first step's lm loss {first['lm_loss']:.8f}, the Mixtral's {expected:.8f} (relative difference "
          f"{abs(first['lm_loss'] - expected) / expected:.1e})")  # the figures of the README: pytest -s
    assert abs(first["lm_loss"] - expected) <= 1e-5 * expected, (first["lm_loss"], expected)

    assert moe(["export", str(run), str(tmp_path / "out"), "--format", "mixtral"]) == 0
    worst = largest_difference(tmp_path / "hf", tmp_path / "out")
    print(f"init_from -> 2 steps at lr 0 -> moe export: largest difference from the source's tensors {worst}")
    assert worst == 0.0, worst
