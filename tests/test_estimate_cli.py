"""`moe estimate` and the launch guard: DESIGN.md's JSON keys, the per-stage table, exit codes, and refusals whose
suggested changes really fit."""

import argparse
import json

import pytest

from moe_model.cli import main
from moe_model.cli.estimate import add_arguments, cmd_estimate
from moe_model.estimate.estimate import estimate
from moe_model.estimate.guard import launch_refusal, suggest_changes
from moe_model.estimate.memory import Assumptions
from moe_model.estimate.params import count_params
from moe_model.recipe import load_recipe
from tests.conftest import ROOT

SEED = str(ROOT / "recipes/seed_4b.yaml")
SEED_PLAN = str(ROOT / "recipes/seed_plan.yaml")
PEAK_KEYS = {"params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "imbalance_headroom_bytes",
             "other_bytes", "total_bytes"}


def run_json(capsys, *argv):
    code = main(["estimate", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_seed_json_has_designs_keys_and_the_true_parameter_count(capsys):
    code, out = run_json(capsys, SEED)
    assert code == 0 and out["fits"] is True
    assert {"params", "gpus", "peak_rank", "budget_bytes", "fits", "step_time_s", "throughput_seq_per_s",
            "mfu"} <= set(out)
    counts = count_params(load_recipe(SEED).moe_config())
    assert out["params"] == {"total": counts.total, "active_per_token": counts.active_per_token}
    assert out["params"]["total"] == 4_428_694_528  # the seed's shape has ~4.4 B parameters, not 30 B
    assert PEAK_KEYS <= set(out["peak_rank"])
    parts = sum(out["peak_rank"][k] for k in PEAK_KEYS - {"total_bytes"})
    assert parts == out["peak_rank"]["total_bytes"] <= out["budget_bytes"] == 64_000_000_000
    assert out["step_time_s"] > 0 and 0 < out["mfu"] <= load_recipe(SEED).hardware.mfu
    # throughput is the global batch over the step time
    assert abs(out["throughput_seq_per_s"] * out["step_time_s"] - 128) < 1e-6 * 128
    assert out["gpus"] == 8 and out["layout"]["dp_assumed"] is True  # dp unset: the smallest legal dp, ep = 8
    assert out["layout"]["moe_backend"] == "legacy"  # gelu experts: AutoEP serves gated ones only


def test_json_says_which_moe_backend_it_assumed(capsys):
    code, out = run_json(capsys, SEED, "--set", "model.hidden_act=silu")
    assert code == 0 and out["layout"]["moe_backend"] == "autoep"  # auto, ep 8, gated, tp 1
    code, out = run_json(capsys, SEED, "--set", "model.hidden_act=silu", "--set", "parallel.moe_backend=legacy")
    assert out["layout"]["moe_backend"] == "legacy"


def test_seed_plan_does_not_fit_and_exits_1(capsys):
    code, out = run_json(capsys, SEED_PLAN)
    assert code == 1 and out["fits"] is False
    assert out["gpus"] == 128  # tp 8 x pp 4 x dp 4
    last = out["stages"][-1]
    assert out["peak_rank"]["stage"] == len(out["stages"]) - 1  # the loss head sits on the last stage
    assert out["peak_rank"]["total_bytes"] == last["total_bytes"] > out["budget_bytes"]


def test_table_shows_every_stage(capsys):
    code = main(["estimate", SEED_PLAN])
    text = capsys.readouterr().out
    assert code == 1
    for ranks in ("0..31", "32..63", "64..95", "96..127"):
        assert ranks in text
    assert "does not fit" in text and "4,428,694,528" in text


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["estimate", SEED, "--set", "parallel.ep=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moe: recipe error: parallel.ep")


def test_flags_set_the_world_size_and_assumptions(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    add_arguments(parser)
    recipe = load_recipe(SEED)
    assert cmd_estimate(recipe, parser.parse_args(["--json", "--gpus", "32", "--imbalance", "1"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 32 and out["layout"]["dp"] == 32 and out["peak_rank"]["imbalance_headroom_bytes"] == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--imbalance", "0.5"])
    capsys.readouterr()


def test_guard_lets_a_fitting_recipe_through():
    assert launch_refusal(load_recipe(SEED), world_size=8) is None


def test_guard_names_the_peak_rank_and_changes_that_really_fit():
    recipe = load_recipe(SEED, ["parallel.activation_checkpointing=false", "parallel.micro_batch_size=4"])
    message = launch_refusal(recipe, world_size=8)
    assert message is not None
    lines = message.splitlines()
    assert "rank 0" in lines[0] and "64.0 GB" in lines[0]
    assert lines[1].count(" GB") == 3  # three largest consumers
    base = estimate(recipe, 8)
    changes = suggest_changes(recipe, base, Assumptions())
    assert 2 <= len(changes) <= 3
    for change in changes:
        assert change.describe(base) in message
        world = change.gpus
        changed = load_recipe(SEED, ["parallel.activation_checkpointing=false", "parallel.micro_batch_size=4",
                                     *change.overrides])
        again = estimate(changed, world)
        assert again.fits and again.peak.total_bytes == change.peak_bytes < base.peak.total_bytes


def test_an_estimate_names_the_block_settings_it_does_not_price_yet(capsys, monkeypatch):
    """Every family block setting is priced now (GLM's dense first layer, shared expert, q/k norm and biases: an empty
    list); a setting listed in `shapes.UNPRICED_SETTINGS` (as MLA's will be until it is priced) is named in the text
    and the JSON rather than hidden."""
    from moe_model.cli import main as moe
    from moe_model.estimate import shapes
    from tests.conftest import ROOT

    glm = str(ROOT / "recipes/tiny_glm4_moe.yaml")
    assert moe(["estimate", glm, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unpriced_block_settings"] == []
    monkeypatch.setattr(shapes, "UNPRICED_SETTINGS", ("dense_layers", "clip_qkv"))  # clip_qkv is off in GLM
    assert moe(["estimate", glm, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unpriced_block_settings"] == ["dense_layers [0]"]
    assert moe(["estimate", glm]) == 0
    assert "not priced yet: dense_layers [0]" in " ".join(capsys.readouterr().out.split())
