"""`moe calibrate`: the shrunken layout run, one rank's arithmetic, the efficiency fit and the link probe."""

import dataclasses
import json

import pytest

from moe_model.cli import main
from moe_model.calibrate.machine import fit_mfu, measure_link_gbps, measure_work, shrunken
from moe_model.calibrate.work_probe import rank_model_recipe, shrunken_widths, stage_layers_timed
from moe_model.estimate.params import count_params
from moe_model.estimate.perf import layer_forward_flops, performance, shape_of, stage_compute_time
from moe_model.recipe import load_recipe, recipe_from_dict
from tests.conftest import ROOT

TINY_CPU = str(ROOT / "recipes/tiny_cpu.yaml")
ONE_RANK = ["parallel.pp=1", "parallel.ep=1", "parallel.dp=null", "parallel.zero_stage=0"]


def test_shrunken_recipe_keeps_the_layout_and_depth_and_drops_the_widths():
    recipe = load_recipe(TINY_CPU)
    small = shrunken(recipe, 7, None)
    assert small.parallel == recipe.parallel
    for key in ("num_hidden_layers", "num_local_experts", "num_experts_per_tok", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "vocab_size", "tie_word_embeddings"):
        assert getattr(small.model, key) == getattr(recipe.model, key), key
    assert (small.train.seq_len, small.train.global_batch_size) == (recipe.train.seq_len,
                                                                    recipe.train.global_batch_size)
    assert small.train.steps == 7 and small.tracking.wandb.mode == "disabled" and small.data == recipe.data
    assert small.model.hidden_size == 2 * recipe.model.num_attention_heads
    assert count_params(small.moe_config()).expert < 0.01 * count_params(recipe.moe_config()).expert


def test_rank_model_does_the_arithmetic_of_one_rank_of_the_layout():
    recipe = load_recipe(TINY_CPU)  # pp 2, ep 2: a rank holds 2 layers and 4 of the 8 experts
    work = rank_model_recipe(recipe)
    assert (work.parallel.tp, work.parallel.pp, work.parallel.ep) == (1, 1, 1)
    assert work.model.num_hidden_layers == stage_layers_timed(recipe) == 2
    assert work.model.num_local_experts == 4
    B = recipe.parallel.micro_batch_size
    one_device = layer_forward_flops(shape_of(work), B, 1, 1)
    on_the_rank = layer_forward_flops(shape_of(recipe), B, 1, 2)
    for op in ("qkv", "o_proj", "sdpa", "experts"):  # the router scores the rank's 4 experts, not all 8
        assert one_device[op] == on_the_rank[op], op


def test_rank_model_runs_the_backend_the_recipe_resolves_to():
    """tiny_cpu's gated dropless experts at ep 2 resolve to AutoEP: the expert-parallel work recipe keeps it (and a
    stated legacy backend), the one-device work (ep 1) runs the model's own block."""
    recipe = load_recipe(TINY_CPU, ["parallel.pp=1", "parallel.ep=2", "parallel.dp=2"])
    assert rank_model_recipe(recipe, expert_parallel=True).parallel.moe_backend == "autoep"
    legacy = load_recipe(TINY_CPU, ["parallel.pp=1", "parallel.ep=2", "parallel.dp=2", "parallel.moe_backend=legacy"])
    assert rank_model_recipe(legacy, expert_parallel=True).parallel.moe_backend == "legacy"
    assert rank_model_recipe(recipe).parallel.moe_backend == "legacy"


def test_fit_mfu_prices_the_recipes_backend():
    """The fit inverts the time of the backend the recipe runs: AutoEP's routed rows, not the legacy buffers."""
    recipe = load_recipe(TINY_CPU, ["parallel.pp=1", "parallel.ep=2", "parallel.dp=2"])
    p = recipe.parallel
    full, small = (dataclasses.replace(shape_of(r, 3.0), compute_flops=1e11 * 0.3, hbm_bytes_s=2e10)
                   for r in (recipe, shrunken_widths(recipe)))
    grown = {backend: float(stage_compute_time(full, p.micro_batch_size, p.tp, p.ep, stage_layers_timed(recipe),
                                               False, backend))
             - float(stage_compute_time(small, p.micro_batch_size, p.tp, p.ep, stage_layers_timed(recipe), False,
                                        backend)) for backend in (True, False)}
    assert grown[True] < grown[False]  # AutoEP's routed rows, the legacy layer's capacity-deep buffers
    assert fit_mfu(recipe, 1e11, 2e10, grown[True], imbalance=3.0) == pytest.approx(0.3, rel=1e-6)


@pytest.mark.multirank
@pytest.mark.parametrize("backend,layer", [("auto", "DeepSpeed's AutoEP layer"), ("legacy", "DeepSpeed's MoE layer")])
def test_rank_work_through_deepspeeds_moe_layer_on_two_ranks(backend, layer):
    recipe = load_recipe(TINY_CPU, ["parallel.pp=1", "parallel.ep=2", "parallel.dp=2", f"parallel.moe_backend={backend}"])
    work = measure_work(recipe, threads=1)
    assert work["where"] == f"{layer} on 2 ranks"
    assert work["full_s"] > 0 and work["shrunken_s"] > 0
    assert work["routing_imbalance"] >= 1.0  # the busiest expert's load over the mean


def test_fit_mfu_inverts_the_stage_time_and_stops_at_the_peak():
    recipe = load_recipe(TINY_CPU)
    p = recipe.parallel
    full, small = (dataclasses.replace(shape_of(r), compute_flops=1e11 * 0.3, hbm_bytes_s=2e10)
                   for r in (recipe, shrunken_widths(recipe)))
    measured = (float(stage_compute_time(full, p.micro_batch_size, p.tp, p.ep, stage_layers_timed(recipe)))
                - float(stage_compute_time(small, p.micro_batch_size, p.tp, p.ep, stage_layers_timed(recipe))))
    assert fit_mfu(recipe, 1e11, 2e10, measured) == pytest.approx(0.3, rel=1e-6)
    assert fit_mfu(recipe, 1e11, 2e10, measured / 1e3) == 1.0


def test_step_overhead_adds_to_the_step_and_shows_in_the_breakdown():
    raw = load_recipe(TINY_CPU, ONE_RANK).model_dump()
    base = performance(recipe_from_dict(raw), dp=1)
    more = performance(recipe_from_dict(raw, ["hardware.step_overhead_ms=5"]), dp=1)
    assert more.step_time_s - base.step_time_s == pytest.approx(5e-3, rel=1e-9)
    assert more.breakdown["fixed_overhead"] == 5e-3 and base.breakdown["fixed_overhead"] == 0.0


@pytest.mark.multirank
def test_calibrate_one_rank_measures_the_fixed_cost_and_predicts_with_it(capsys):
    sets = [x for o in ONE_RANK for x in ("--set", o)]
    assert main(["calibrate", TINY_CPU, *sets, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ranks"] == 1 and "links" not in out
    assert out["shrunken_step_time_s"] > out["shrunken_arithmetic_s"] > 0
    assert out["step_overhead_s"] == pytest.approx(out["shrunken_step_time_s"] - out["shrunken_arithmetic_s"])
    assert 0 < out["mfu"] <= 1 and out["rank_forward_backward_s"] > 0
    calibrated = load_recipe(TINY_CPU, ONE_RANK + out["overrides"])
    perf = performance(calibrated, dp=1)
    assert perf.step_time_s == pytest.approx(out["predicted_step_time_s"], rel=1e-9)
    assert perf.breakdown["fixed_overhead"] == pytest.approx(out["step_overhead_s"], rel=1e-3)


@pytest.mark.multirank
def test_link_probe_times_the_recipes_messages_between_two_ranks():
    recipe = load_recipe(TINY_CPU, ["parallel.pp=1", "parallel.ep=2", "parallel.dp=2"])
    figures = measure_link_gbps(recipe)
    assert figures["ranks"] == 2
    assert figures["a2a_bytes"] == 2 * 4 * 64 * 64 * 4  # k * tokens * hidden * fp32 bytes
    assert figures["intra_node_gbps"] > 0
    assert all(figures[k] > 0 for k in ("round_trip_small_s", "round_trip_p2p_s", "all_to_all_small_s",
                                        "all_to_all_a2a_s"))


def test_calibrate_refuses_a_missing_run(capsys, tmp_path):
    assert main(["calibrate", TINY_CPU, "--from", str(tmp_path)]) == 2
    assert "run.json" in capsys.readouterr().err


def test_calibrate_refuses_a_layout_with_more_ranks_than_this_machine_starts(capsys):
    seed_plan = str(ROOT / "recipes/seed_plan.yaml")
    assert main(["calibrate", seed_plan]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than 8" in err[0] and "--from RUN_DIR" in err[0]
