"""4D layouts through the real launcher on CPU ranks: same losses as one rank, same logits as the HF model."""

import json
import os

import pytest

from moe_model.train.distributed import cpu_threads_per_rank
from moe_model.train.tracking import read_metrics
from tests.launch import failure, launch
from tests.layouts import LAYOUTS, micro_batch_overrides


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_losses_equal_one_rank(single_rank, layout_run, name):
    ranks, *overrides = LAYOUTS[name]
    single_rank = single_rank(micro_batch_overrides(overrides))
    out = layout_run(name)
    run = json.loads((out / "run.json").read_text())
    assert ("expert_parallel" in run["deepspeed"]) == ("autoep" in name), name  # the backend each name says
    parallel = read_metrics(out)
    assert len(parallel) == len(single_rank) == 7
    for one, many in zip(single_rank, parallel):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert abs(one[key] - many[key]) <= 1e-4 * abs(one[key]), (name, one["step"], key, one[key], many[key])
        assert one["expert_load_max_over_mean_per_layer"] == many["expert_load_max_over_mean_per_layer"]
    assert parallel[-1]["loss"] < parallel[0]["loss"]


@pytest.mark.multirank
@pytest.mark.parametrize("ranks, overrides", [
    (4, ("parallel.tp=2", "parallel.pp=2", "parallel.ep=1", "parallel.dp=1")),
    (4, ("parallel.tp=2", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2")),
], ids=["tp2_pp2", "tp2_dp2_ep2"])
def test_parallel_logits_equal_the_hf_model(tmp_path, ranks, overrides):
    result = launch(ranks, *overrides, script="tests/distributed/model_logits.py", extra_args=("--out", str(tmp_path)))
    assert result.returncode == 0, failure(result)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    holders = [r for r in reports if r["holds_logits"]]
    assert holders, "no rank returned logits"
    for report in holders:
        assert report["max_abs_diff"] < 1e-5 and report["max_abs_logit"] > 0.1, report
    if "OMP_NUM_THREADS" not in os.environ:  # the ranks share the cores rather than each starting one per core
        assert {r["threads"] for r in reports} == {cpu_threads_per_rank(ranks)}, [r["threads"] for r in reports]
    for report in reports:
        if "gather_shim_max_abs_diff" in report:
            assert report["gather_shim_max_abs_diff"] == 0.0


@pytest.mark.multirank
def test_autoep_block_keeps_the_model_contract(tmp_path):
    """AutoEP computes no aux loss or z-loss and counts tokens cumulatively; the adapter must give the block's own
    figures of every forward (z-loss switched on here), with no tensor left on a module."""
    result = launch(2, "parallel.pp=1", "parallel.dp=2", "model.router_z_loss_coef=0.001",
                    script="tests/distributed/autoep_contract.py", extra_args=("--out", str(tmp_path)))
    assert result.returncode == 0, failure(result)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["backend"] == "autoep"
        for forward in report["forwards"]:
            assert forward["logits"] < 1e-5 and forward["aux_loss"] < 1e-6 and forward["z_loss"] < 1e-6, forward
            assert forward["counts_equal"] and forward["routes"] == 4 * 4 * 64 * 2, forward  # L x B x S x k
        assert report["new_tensor_attributes"] == []
