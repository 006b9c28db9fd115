"""A DeepSeek-V3 checkpoint's multi-token-prediction (MTP) layers on import and export.

Real DeepSeek-V3 folders state `num_nextn_predict_layers: 1` and store that layer's tensors after the decoder layers
(`model.layers.61.*` for 61 layers: `enorm`, `hnorm`, `eh_proj`, `shared_head.{norm,head}` and a whole attention +
MoE block). This model trains the main layers only: `train.init_from` leaves them out with one line that says so
(`formats.mtp_layers`), refuses as before any other tensor it would not read, and an export's config states 0 MTP
layers. Nothing here starts a rank: the launcher is replaced where `moe train` would start it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_model import formats
from moe_model.cli import main as moe
from moe_model.modeling import MoEForCausalLM
from moe_model.parallel import Layout, build_model
from moe_model.recipe import load_recipe
from tests.layouts import SINGLE_RANK
from tests.test_family_training import family_folder, recipe_from

LAYERS = 4  # recipes/tiny_deepseek_v3.yaml (tiny_cpu's depth): the MTP layer is model.layers.4


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """transformers' own tiny DeepSeek-V3, saved: the folder without MTP layers."""
    path = tmp_path_factory.mktemp("dsv3") / "plain"
    family_folder("deepseek_v3", path)
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == LAYERS
    return path


def mtp_tensors(weights: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """An MTP layer's tensors as DeepSeek-V3 stores them: the last decoder layer's block (attention, routed and
    shared experts one tensor each, router and its score bias) under layer number `layer`, and the MTP parts."""
    last = f"model.layers.{LAYERS - 1}."
    hidden, vocab = weights["model.norm.weight"].shape[0], weights["lm_head.weight"].shape[0]
    generator = torch.Generator().manual_seed(layer)
    out = {f"model.layers.{layer}." + name.removeprefix(last): torch.randn(t.shape, generator=generator)
           for name, t in weights.items() if name.startswith(last)}
    out.update({f"model.layers.{layer}.{name}": torch.randn(shape, generator=generator) for name, shape in (
        ("enorm.weight", (hidden,)), ("hnorm.weight", (hidden,)), ("eh_proj.weight", (hidden, 2 * hidden)),
        ("shared_head.norm.weight", (hidden,)), ("shared_head.head.weight", (vocab, hidden)))})
    assert f"model.layers.{layer}.self_attn.kv_a_proj_with_mqa.weight" in out
    assert f"model.layers.{layer}.mlp.experts.0.gate_proj.weight" in out
    return out


def variant(plain, path, mtp_count: int | None, extra: dict[str, torch.Tensor] | None = None, key: str =
            "num_nextn_predict_layers"):
    """`plain` copied to `path` with one MTP layer's tensors (and `extra`) added, its config stating `mtp_count`
    MTP layers under `key` (None: the key left as transformers wrote it, 0)."""
    shutil.copytree(plain, path)
    weights = load_file(path / "model.safetensors")
    added = {**mtp_tensors(weights, LAYERS), **(extra or {})}
    save_file({**weights, **added}, path / "model.safetensors", metadata={"format": "pt"})
    if mtp_count is not None:
        config = json.loads((path / "config.json").read_text())
        config.pop("num_nextn_predict_layers", None)
        config[key] = mtp_count
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path, added


def test_the_rule_names_the_layers_after_the_main_ones():
    v3 = {"num_hidden_layers": 61, "num_nextn_predict_layers": 1}
    assert formats.mtp_layers(v3) == range(61, 62)
    assert formats.mtp_layers({"num_hidden_layers": 4, "num_mtp_layers": 2}) == range(4, 6)
    assert not formats.mtp_layers({"num_hidden_layers": 61}) and not formats.mtp_layers(
        {"num_hidden_layers": 61, "num_nextn_predict_layers": 0})
    layers = formats.mtp_layers(v3)
    assert formats.in_mtp_layer("model.layers.61.enorm.weight", layers)
    assert formats.in_mtp_layer("model.layers.61.mlp.experts.255.down_proj.weight", layers)
    for name in ("model.layers.60.enorm.weight", "model.layers.6.self_attn.o_proj.weight",
                 "model.layers.610.enorm.weight", "lm_head.weight", "model.norm.weight", "mtp.model.layers.61.x"):
        assert not formats.in_mtp_layer(name, layers), name


def launches(monkeypatch) -> list:
    """Where `moe train` would start the ranks: recorded, not started (exit 0)."""
    import moe_model.cli.train as cli_train

    started: list = []
    monkeypatch.setattr(cli_train, "launch", lambda recipe, *rest: started.append(recipe) or 0)
    return started


@pytest.mark.parametrize("key", ["num_nextn_predict_layers", "num_mtp_layers"])
def test_the_mtp_layer_is_left_out_in_one_line_and_the_model_is_the_main_layers(plain, tmp_path, capsys,
                                                                                 monkeypatch, key):
    from moe_model.train.engine import init_from_source

    folder, added = variant(plain, tmp_path / "mtp", 1, key=key)
    count = sum(t.numel() for t in added.values())
    started = launches(monkeypatch)
    recipe_path = recipe_from(tmp_path, folder)
    capsys.readouterr()
    assert moe(["train", str(recipe_path), "--set", f"train.output_dir={tmp_path / 'run'}",
                *(f"--set={o}" for o in SINGLE_RANK)]) == 0
    assert len(started) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "multi-token" in line]
    assert lines == [f"moe: init_from: leaving out the checkpoint's 1 multi-token-prediction layer "
                     f"(model.layers.{LAYERS}.*, {count:,} parameters): this model trains the main layers only"]

    recipe = load_recipe(recipe_path, list(SINGLE_RANK))
    source = init_from_source(recipe)
    assert source.left_out() == sorted(added) and source.unexpected(
        {n: p.shape for n, p in MoEForCausalLM(recipe.moe_config()).state_dict().items()}) == []
    with torch.device("meta"):
        meta = MoEForCausalLM(recipe.moe_config())
    loaded = build_model(meta, Layout(1, 1, 1, 1), source=source).module.state_dict()
    expected = formats.load_family(plain).state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("case", ["config_states_none", "unrelated_tensor", "second_layer_not_stated"])
def test_any_other_tensor_is_still_refused_in_one_line(plain, tmp_path, capsys, monkeypatch, case):
    """MTP tensors the config does not state, or a tensor outside the stated MTP layers, are refused as before
    (exit 2, one line naming the first, no output folder, no launch), `ignore` or not aside."""
    extra, mtp_count, named = {}, 1, f"model.layers.{LAYERS}.eh_proj.weight"
    if case == "config_states_none":
        mtp_count = None
    elif case == "unrelated_tensor":
        named = "model.layers.0.mlp.shared_expert.weight"
        extra = {named: torch.zeros(2, 2)}
    else:
        named = f"model.layers.{LAYERS + 1}.enorm.weight"
        extra = {named: torch.zeros(64)}
    folder, _ = variant(plain, tmp_path / "bad", mtp_count, extra)
    started = launches(monkeypatch)
    out = tmp_path / "run"
    capsys.readouterr()
    assert moe(["train", str(recipe_from(tmp_path, folder)), "--set", f"train.output_dir={out}",
                *(f"--set={o}" for o in SINGLE_RANK)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "tensor(s) the model does not have (" in err and named in err and "multi-token" not in err, err
    assert not started and not out.exists()


def test_the_exported_config_states_no_mtp_layers(plain, tmp_path):
    """`moe export --format deepseek_v3` (and `hub` from such a folder) writes through `save_family`: its config
    states 0 MTP layers, whatever the source folder stated, and holds no MTP tensor."""
    folder, _ = variant(plain, tmp_path / "mtp", 1)
    source = json.loads((folder / "config.json").read_text())
    assert formats.mtp_layers(source) == range(LAYERS, LAYERS + 1)
    model = formats.load_family(plain)
    formats.save_family(model, tmp_path / "export", "deepseek_v3")
    written = json.loads((tmp_path / "export/config.json").read_text())
    assert written.get("num_nextn_predict_layers", written.get("num_mtp_layers")) == 0
    assert not formats.mtp_layers(written)
    names = load_file(tmp_path / "export/model.safetensors").keys()
    assert not any(formats.in_mtp_layer(n, range(LAYERS, LAYERS + 8)) for n in names)
    assert formats.model_fields(tmp_path / "export") == formats.model_fields(plain)
