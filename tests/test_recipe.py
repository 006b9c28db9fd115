"""Recipes: the shipped ones validate, overrides apply, and each bad input gets one line naming field and fix."""

import json
import subprocess

import pytest
import yaml

from moe_model.cli import main as moe
from moe_model.recipe import RecipeError, load_recipe, recipe_from_dict
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.moe_config().num_hidden_layers == recipe.model.num_hidden_layers


def test_seed_plan_inherits_the_seed_model_and_overrides_the_layout():
    seed, plan = load_recipe(ROOT / "recipes/seed_4b.yaml"), load_recipe(ROOT / "recipes/seed_plan.yaml")
    assert plan.model == seed.model
    assert (plan.parallel.tp, plan.parallel.pp, plan.parallel.ep, plan.parallel.dp) == (8, 4, 4, 4)
    assert plan.claims.total_params == 30e9 and seed.claims.total_params is None


def test_overrides_are_parsed_as_yaml_and_validated():
    recipe = load_recipe(ROOT / "recipes/tiny_cpu.yaml",
                         ["train.lr=1e-4", "model.capacity_factor=1.25", "parallel.activation_checkpointing=true",
                          "tracking.wandb.mode=disabled", "model.capacity_factor=null"])
    assert recipe.train.lr == 1e-4 and recipe.model.capacity_factor is None
    assert recipe.parallel.activation_checkpointing is True and recipe.tracking.wandb.mode == "disabled"


def test_default_warmup_never_makes_a_short_run_invalid():
    raw = {k: v for k, v in TINY.items()}
    raw["train"] = {k: v for k, v in TINY["train"].items() if k != "warmup_steps"}
    short = recipe_from_dict(raw, ["train.steps=6"])
    assert short.train.warmup_steps == 6  # the default 10, cut to the run
    assert recipe_from_dict(raw).train.warmup_steps == 10
    from moe_model.train.ds_config import deepspeed_config

    assert deepspeed_config(short)["scheduler"]["params"]["warmup_num_steps"] == 6


def test_a_written_warmup_longer_than_the_run_stays_an_error():
    with pytest.raises(RecipeError, match=r"train.warmup_steps: 8 exceeds train.steps \(6\)"):
        recipe_from_dict(TINY, ["train.steps=6", "train.warmup_steps=8"])


def write(tmp_path, raw, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


TINY = yaml.safe_load((ROOT / "recipes/tiny_cpu.yaml").read_text())

# (overrides on tiny_cpu.yaml, the text the one-line error must contain)
BAD_OVERRIDES = [
    (["model.hidden_sise=64"], "model.hidden_sise: unknown key"),
    (["trian.steps=5"], "trian: unknown key"),
    (["model.num_attention_heads=0"], "model.num_attention_heads: input should be greater than 0"),
    (["train.steps=ten"], "train.steps: input should be a valid integer"),
    (["model.hidden_act=relu"], "model.hidden_act: input should be 'gelu' or 'silu'"),
    (["train.precision=fp8"], "train.precision: input should be 'fp32', 'bf16' or 'fp16'"),
    (["parallel.tp=3"], "parallel.tp: tp=3 must divide num_attention_heads (4) and num_key_value_heads (2); choose tp from 1, 2"),
    (["parallel.ep=3"], "parallel.ep: ep=3 must divide num_local_experts (8); choose ep from 1, 2, 4, 8"),
    (["parallel.ep=4", "parallel.dp=2"], "parallel.ep: ep=4 must divide dp=2"),
    (["parallel.pp=5"], "parallel.pp: pp=5 leaves a pipeline stage without an MoE layer (4 layers); use pp <= 4"),
    (["parallel.pp=2", "parallel.zero_stage=2"], "parallel.zero_stage: DeepSpeed's pipeline engine accepts ZeRO 0 or 1 only"),
    (["parallel.zero_stage=3"], "parallel.zero_stage: DeepSpeed's pipeline engine accepts ZeRO 0 or 1 only (pp=2)"),
    (["parallel.zero_stage=3", "parallel.pp=1", "model.hidden_act=gelu"],
     "parallel.zero_stage: ZeRO-3 with ep=2 needs the AutoEP backend (DeepSpeed's legacy MoE refuses ZeRO-3), and "
     "AutoEP needs gated (silu) experts"),
    (["parallel.zero_stage=3", "parallel.pp=1", "parallel.moe_backend=legacy"],
     "AutoEP is not chosen (moe_backend legacy; use auto or autoep)"),
    (["parallel.moe_backend=autoep", "model.hidden_act=gelu"],
     "parallel.moe_backend: autoep needs gated (silu) experts"),
    (["parallel.moe_backend=autoep", "parallel.tp=2"], "parallel.moe_backend: autoep does not run with tensor parallelism"),
    (["parallel.moe_backend=autoep", "model.capacity_factor=1.25"], "autoep is dropless and has no capacity"),
    (["parallel.moe_backend=autoep", "model.intermediate_size=100"],
     "autoep needs hidden_size and the FFN widths in multiples of 8 (got 64, 100 and 100)"),
    (["parallel.tp=2", "model.qk_norm=projection"],
     "parallel.tp: tp=2 splits the heads, and model.qk_norm projection normalises over all of them"),
    (["parallel.tp=2", "model.attention_out_bias=true"], "model.attention_out_bias would be added on each"),
    (["model.dense_layers=[4]"], "model: dense_layers must name layers 0..3, got [4]"),
    (["model.dense_layers=[0,1,2,3]"], "model: dense_layers leaves no MoE layer"),
    (["model.partial_rotary_factor=0"], "model.partial_rotary_factor: input should be greater than 0"),
    (["parallel.moe_backend=deepep"], "parallel.moe_backend: input should be 'auto', 'autoep' or 'legacy'"),
    (["parallel.zero_stage=4"], "parallel.zero_stage: input should be 0, 1, 2 or 3"),
    (["parallel.ep=1", "parallel.dp=3"], "train.global_batch_size: 8 is not a multiple of micro_batch_size x dp = 4 x 3"),
    (["parallel.ep=4", "parallel.dp=6"], "parallel.ep: ep=4 must divide dp=6"),
    (["train.seq_len=512"], "train.seq_len: 512 exceeds model.max_position_embeddings (256)"),
    (["train.steps=50", "train.warmup_steps=60"], "train.warmup_steps: 60 exceeds train.steps (50)"),
    (["data.source=json", "data.path=/no/such/file.jsonl"], "data.path: '/no/such/file.jsonl' does not exist"),
    (["data.source=text"], "data.path: source 'text' needs a path"),
    (["data.source=hub"], "data.name: source 'hub' needs the dataset name"),
    (["data.vocab_size=1000"], "data.vocab_size: 1000 exceeds model.vocab_size (256)"),
    (["model.num_experts_per_tok=9"], "model: num_experts_per_tok (9) must not exceed num_local_experts (8)"),
    (["model.num_key_value_heads=3"], "model: num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
    (["parallel.tp=16", "model.num_attention_heads=16", "model.num_key_value_heads=16"],
     "parallel.tp: tp=16 must stay inside one node of 8 GPUs"),
    (["hardware.mfu=1.5"], "hardware.mfu: input should be less than or equal to 1"),
    (["tracking.wandb.mode=cloud"], "tracking.wandb.mode: input should be 'online', 'offline' or 'disabled'"),
    (["train.resume=/no/checkpoint"], "train.resume: checkpoint path '/no/checkpoint' does not exist"),
    (["steps"], "--set: 'steps' is not key=value"),
    (["train.steps.max=3"], "--set: train.steps is a value, not a section"),
]


@pytest.mark.parametrize("overrides, expected", BAD_OVERRIDES, ids=[' '.join(o[0]) for o in BAD_OVERRIDES])
def test_bad_recipe_gets_one_clear_line_and_exit_2(tmp_path, capsys, overrides, expected):
    path = write(tmp_path, TINY)
    args = ["config", str(path)] + [x for o in overrides for x in ("--set", o)]
    assert moe(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("moe: recipe error: ")
    assert expected in lines[0], lines[0]


BAD_FILES = [
    ("model: [1, 2", "is not valid YAML at line 1"),
    ("- just\n- a list\n", "must be a mapping with at least a 'model' section"),
    ("name: x\ntrain: {steps: 3}\n", "model: is required"),
    ("base: missing.yaml\nmodel: {}\n", "base: 'missing.yaml'"),
    ("base: bad.yaml\nmodel: {}\n", "inherits from itself"),
]


@pytest.mark.parametrize("text, expected", BAD_FILES, ids=[b[1][:20] for b in BAD_FILES])
def test_bad_recipe_files(tmp_path, capsys, text, expected):
    assert moe(["config", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_missing_recipe_path(capsys):
    assert moe(["params", "recipes/no_such.yaml"]) == 2
    assert "'recipes/no_such.yaml' is not a file" in capsys.readouterr().err


def test_the_console_script_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, TINY)
    result = subprocess.run(["moe", "train", str(path), "--set", "parallel.ep=3"], capture_output=True, text=True,
                            env={"PATH": str(ROOT / ".venv/bin") + ":/usr/bin:/bin"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "moe: recipe error: parallel.ep: ep=3 must divide num_local_experts (8); choose ep from 1, 2, 4, 8"]
    assert not (tmp_path / "runs").exists()


def test_config_output_is_written_whole(tmp_path):
    out = tmp_path / "ds.json"
    assert moe(["config", str(ROOT / "recipes/tiny_cpu.yaml"), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["train_batch_size"] == 8
    assert moe(["config", str(ROOT / "recipes/tiny_cpu.yaml"), "-o", str(tmp_path / "nope/ds.json")]) == 2


def test_train_refuses_a_layout_it_cannot_train_before_any_rank_starts(capsys):
    # the seed's own plan (tp 8, ep 4) is legal for DeepSpeed but tensor-parallel peers would share experts
    assert moe(["train", str(ROOT / "recipes/seed_plan.yaml")]) == 2
    err = capsys.readouterr().err
    assert "parallel.ep: with tp=8, training needs ep to be a multiple of tp (got ep=4)" in err


def test_auto_never_picks_a_backend_the_model_cannot_run():
    """`auto` resolves to AutoEP only where it serves the model; otherwise the legacy layer, and the recipe stays
    valid (a default never makes a valid recipe invalid)."""
    assert load_recipe(ROOT / "recipes/tiny_cpu.yaml").strategy(4)[0].moe_backend == "autoep"
    for change in ("model.intermediate_size=100", "model.hidden_act=gelu", "model.capacity_factor=1.5",
                   "parallel.tp=2"):
        recipe = load_recipe(ROOT / "recipes/tiny_cpu.yaml", [change, "parallel.pp=1"])  # dp 2
        assert recipe.strategy(2 * recipe.parallel.tp)[0].moe_backend == "legacy", change
    for change in ("model.num_shared_experts=1", "model.router_scoring=sigmoid"):  # the families' blocks: AutoEP
        recipe = load_recipe(ROOT / "recipes/tiny_cpu.yaml", [change, "parallel.pp=1"])
        assert recipe.strategy(2)[0].moe_backend == "autoep", change


@pytest.mark.parametrize("name", ["tiny_cpu", "tiny_text", "gpu_check", "seed_4b"])
def test_shipped_recipes_state_no_training_field_its_default_or_base_already_gives(name):
    """A stated default is a trap: tiny_cpu's `warmup_steps: 10` refused `--set train.steps=5`, which the default
    (min(10, steps)) serves. The model shape and hardware sections are the recipe's statement of what it trains and
    on what, and seed_plan.yaml quotes a plan field by field: those stay."""
    import yaml
    from pydantic import BaseModel

    from moe_model.recipe import Recipe

    raw = yaml.safe_load((ROOT / f"recipes/{name}.yaml").read_text())
    base = yaml.safe_load((ROOT / "recipes" / raw["base"]).read_text()) if "base" in raw else {}
    stated_defaults = []
    for section in ("parallel", "train", "data", "tracking"):
        schema = Recipe.model_fields[section].annotation

        def walk(cls: type[BaseModel], values: dict, inherited: dict, where: str) -> None:
            for key, value in values.items():
                field = cls.model_fields[key]
                if isinstance(value, dict) and isinstance(field.annotation, type) and issubclass(field.annotation,
                                                                                                 BaseModel):
                    walk(field.annotation, value, inherited.get(key) or {}, f"{where}{key}.")
                elif value == inherited.get(key, field.default):
                    stated_defaults.append(f"{where}{key}")
        walk(schema, raw.get(section) or {}, base.get(section) or {}, f"{section}.")
    assert stated_defaults == [], stated_defaults
    if "warmup_steps" not in raw.get("train", {}):  # the seed states its plan's 500
        assert load_recipe(ROOT / f"recipes/{name}.yaml", ["train.steps=5"]).train.warmup_steps == 5
