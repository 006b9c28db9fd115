"""One run moved through four layouts, against the same run uninterrupted on one rank: the run both the test
(tests/test_reshard.py) and the table (benchmarks/layout_moves.py) read.

Each launch resumes the previous one's checkpoint (`resume: auto`) and `train.stop_at` ends it. The chain crosses
every change the issue names: PP2xDP2xEP2 -> DP2xEP2, ZeRO-1 -> ZeRO-3, AutoEP -> legacy and back, TP2xDP2xEP2 ->
PP2xDP2xEP2, and ZeRO-0 (whose torch optimizer holds the states itself) both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moe_model.recipe import ModelSection
from moe_model.train import checkpoint, reshard
from moe_model.train.tracking import read_metrics
from tests import layouts
from tests.launch import SINGLE_RANK, failure, launch

# tests/layouts.py's schedule: every launch but the last ended by train.stop_at, which saves; the last step's
# checkpoint (train.save_last) is what the states are compared on
RUN = (*layouts.STEPS, *layouts.REFERENCE_SAVE, "train.keep_checkpoints=0")
STEPS = layouts.LAST_STEP
PP2_DP2_EP2 = ("parallel.tp=1", "parallel.pp=2", "parallel.ep=2", "parallel.dp=2")  # tiny_cpu's own: AutoEP, ZeRO-1
MOVES = [  # (name, ranks, layout, stop after step, the changes its resume names)
    ("PP2xDP2xEP2 AutoEP ZeRO-1", 4, PP2_DP2_EP2, 2, None),
    ("DP2xEP2 AutoEP ZeRO-3", 2, ("parallel.tp=1", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2",
                                  "parallel.zero_stage=3"), 4, "pp 2 -> 1, ZeRO stage 1 -> 3"),
    ("TP2xDP2xEP2 legacy ZeRO-0", 4, ("parallel.tp=2", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2",
                                      "parallel.zero_stage=0"), 6,
     "tp 1 -> 2, moe_backend autoep -> legacy, ZeRO stage 3 -> 0"),  # tp: the legacy layer (auto)
    ("PP2xDP2xEP2 AutoEP ZeRO-1", 4, PP2_DP2_EP2, None,
     "tp 2 -> 1, pp 1 -> 2, moe_backend legacy -> autoep, ZeRO stage 0 -> 1"),
]


@dataclass
class Moved:
    """What the moved run gave, against the uninterrupted one."""

    reference: list[dict]  # the uninterrupted run's metrics lines
    moved: list[dict]  # the moved run's, every launch's steps in order
    resume_lines: list[str] = field(default_factory=list)  # each resumed launch's "resuming from" line
    state_diffs: dict[str, float] = field(default_factory=dict)  # state -> largest |diff| / max |reference|


def move_through(tmp: Path, reference: Path | None = None) -> Moved:
    """Run the moved run under `tmp`, and the reference too unless given (the folder of a 1-rank run of `RUN`: the
    tests' session-wide one); raises AssertionError with the launch's output if one fails."""
    moved = tmp / "moved"
    if reference is None:
        reference = tmp / "reference"
        result = launch(1, *RUN, *SINGLE_RANK, f"train.output_dir={reference}")
        assert result.returncode == 0, failure(result)
    lines = []
    for _, ranks, layout, stop_at, _ in MOVES:
        stop = (f"train.stop_at={stop_at}",) if stop_at else ()
        result = launch(ranks, *RUN, *layout, *stop, f"train.output_dir={moved}")
        assert result.returncode == 0, failure(result)
        lines.append(next((line for line in result.stderr.splitlines() if "resuming from" in line), ""))
    final = checkpoint.tag_for(STEPS)
    config = ModelSection(**checkpoint.read_manifest(reference / "checkpoints" / final)["model"]).to_config()
    want = reshard.sources(reference / "checkpoints" / final, config)
    have = reshard.sources(moved / "checkpoints" / final, config)
    diffs = {}
    for state in reshard.STATES:
        worst = 0.0
        for name in want[state].shapes:
            a, b = want[state].read(name, ()), have[state].read(name, ())
            worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
        diffs[state] = worst
    return Moved(read_metrics(reference), read_metrics(moved), lines, diffs)
