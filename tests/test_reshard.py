"""Resuming on another layout: one run moved through four layouts ends on the uninterrupted run's losses and states.

The chain (each launch resumes the previous one's checkpoint, `train.stop_at` ends it) crosses every change the
issue names: PP2xDP2xEP2 -> DP2xEP2, ZeRO-1 -> ZeRO-3, AutoEP -> legacy and back, TP2xDP2xEP2 -> PP2xDP2xEP2, and
ZeRO-0 (whose torch optimizer holds the states itself) both ways. The reference is one rank, uninterrupted.
"""

import pytest

from moe_model.recipe import ModelSection
from moe_model.train import checkpoint, reshard
from moe_model.train.tracking import read_metrics
from tests.launch import SINGLE_RANK, failure, launch

RUN = ("train.steps=8", "train.warmup_steps=2", "train.log_every=1", "train.save_every=8",
       "train.keep_checkpoints=0", "tracking.wandb.mode=disabled")
PP2_DP2_EP2 = ("parallel.tp=1", "parallel.pp=2", "parallel.ep=2", "parallel.dp=2")  # tiny_cpu's own: AutoEP, ZeRO-1
CHAIN = [  # (ranks, layout, stop after step, the changes the resume must name)
    (4, PP2_DP2_EP2, 2, None),
    (2, ("parallel.tp=1", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2", "parallel.zero_stage=3"), 4,
     "pp 2 -> 1, ZeRO stage 1 -> 3"),
    (4, ("parallel.tp=2", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2", "parallel.zero_stage=0"), 6,
     "tp 1 -> 2, moe_backend autoep -> legacy, ZeRO stage 3 -> 0"),  # tp: the legacy layer (auto)
    (4, PP2_DP2_EP2, None, "tp 2 -> 1, pp 1 -> 2, moe_backend legacy -> autoep, ZeRO stage 0 -> 1"),
]


@pytest.mark.multirank
def test_a_run_moved_through_four_layouts_continues_as_if_uninterrupted(tmp_path):
    reference, moved = tmp_path / "reference", tmp_path / "moved"
    result = launch(1, *RUN, *SINGLE_RANK, f"train.output_dir={reference}")
    assert result.returncode == 0, failure(result)
    for ranks, layout, stop_at, changes in CHAIN:
        stop = (f"train.stop_at={stop_at}",) if stop_at else ()
        result = launch(ranks, *RUN, *layout, *stop, f"train.output_dir={moved}")
        assert result.returncode == 0, failure(result)
        if changes:
            assert f"on another layout ({changes}): weights, both Adam moments" in result.stderr, result.stderr[-2000:]

    expected, got = read_metrics(reference), read_metrics(moved)
    assert [m["step"] for m in got] == list(range(1, 9))  # the data position carried: no step run twice or skipped
    for a, b in zip(expected, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a["step"], a["loss"], b["loss"])
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9), a["step"]  # the scheduler's position carried

    # every state of every parameter (each expert's Adam moments included) equals the uninterrupted run's
    final = checkpoint.tag_for(8)
    config = ModelSection(**checkpoint.read_manifest(reference / "checkpoints" / final)["model"]).to_config()
    want = reshard.sources(reference / "checkpoints" / final, config)
    have = reshard.sources(moved / "checkpoints" / final, config)
    for state in reshard.STATES:
        for name in want[state].shapes:
            a, b = want[state].read(name, ()), have[state].read(name, ())
            assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (state, name, (a - b).abs().max().item())
