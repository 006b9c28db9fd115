"""Training through the real deepspeed launcher on CPU ranks."""

import json

import pytest

from moe_model.train import checkpoint
from moe_model.train.tracking import read_metrics
from tests.launch import SINGLE_RANK, failure, launch
from tests.layouts import STEPS

pytestmark = pytest.mark.multirank  # every test here starts deepspeed ranks

METRIC_KEYS = {"step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
               "expert_load_max_over_mean", "expert_load_max_over_mean_per_layer", "experts_without_tokens"}


def test_one_rank_deepspeed_training_loss_falls(tmp_path):
    result = launch(1, *SINGLE_RANK, "train.steps=60", "train.log_every=1", f"train.output_dir={tmp_path}")
    assert result.returncode == 0, failure(result)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 61))
    assert METRIC_KEYS <= set(metrics[0])
    assert metrics[-1]["loss"] < 0.7 * metrics[0]["loss"], (metrics[0]["loss"], metrics[-1]["loss"])
    assert all(m["loss"] > m["lm_loss"] for m in metrics)  # the aux term is really added
    assert metrics[0]["lr"] < metrics[5]["lr"] < metrics[10]["lr"]  # linear warmup
    assert (tmp_path / "run.json").exists()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "the wandb offline run is missing"
    # save_every unset: the last step still leaves the checkpoint moe export reads (train.save_last)
    assert checkpoint.newest(tmp_path / "checkpoints").name == checkpoint.tag_for(60)


def test_layout_that_breaks_a_rule_at_launch_fails_before_training(tmp_path):
    # dp is known only at launch: 2 ranks with micro-batch 4 cannot make a global batch of 4
    result = launch(2, *SINGLE_RANK, "train.global_batch_size=4", f"train.output_dir={tmp_path}")
    assert result.returncode != 0
    assert "train.global_batch_size: 4 is not a multiple of micro_batch_size x dp = 4 x 2" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_two_data_parallel_ranks_and_zero0_give_the_one_rank_losses(tmp_path, single_rank):
    """Same samples per step (data.py), so DP2 must reproduce the single-process losses step for step; so must one
    rank without ZeRO, whose gradient norm comes from DeepSpeed's fp32 clipping rather than ZeRO's optimizer. The
    1-rank run is the session's (tests/layouts.py's schedule)."""
    runs = {}
    for name, ranks, extra in (("dp2", 2, ()), ("dp1-zero0", 1, ("parallel.zero_stage=0",))):
        out = tmp_path / name
        result = launch(ranks, *SINGLE_RANK, *STEPS, f"train.output_dir={out}", *extra)
        assert result.returncode == 0, failure(result)
        runs[name] = read_metrics(out)
    for name in ("dp2", "dp1-zero0"):
        for one, other in zip(single_rank(), runs[name], strict=True):
            for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
                assert other[key] is not None, (name, one["step"], key)
                assert abs(one[key] - other[key]) <= 1e-5 * abs(one[key]), (name, one["step"], key, one[key], other[key])


def test_one_rank_engine_skips_the_all_reduce_without_changing_a_step(tmp_path):
    """build_engine skips DeepSpeed's gradient all-reduce at dp = 1 (ZeRO-0): DeepSpeed's own all-reduce path is the
    reference; 3 steps of 2 accumulated micro-batches each must give the same losses and weights."""
    out = tmp_path / "skip.json"
    result = launch(1, *SINGLE_RANK, "parallel.zero_stage=0", "train.global_batch_size=8",
                    script="tests/distributed/allreduce_skip.py", extra_args=("--out", str(out)))
    assert result.returncode == 0, failure(result)
    found = json.loads(out.read_text())
    assert found["losses_skipped"] == found["losses_allreduce"]
    assert found["max_weight_diff"] == 0.0
