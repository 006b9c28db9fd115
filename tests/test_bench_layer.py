"""benchmarks/ds_moe_layer.py: the routing skew it designs is the one the project's router takes, and on 2 ranks
AutoEP and the legacy layer (the project's gate) give the same outputs while every form routes at the target skew."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks.ds_moe_layer import skewed_loads, skewed_routes, steering_tokens
from moe_model.routing import expert_counts, route
from tests.conftest import ROOT

BENCH = str(ROOT / "benchmarks/ds_moe_layer.py")
TINY = ["--tokens", "64", "--experts", "8", "--hidden", "64", "--ffn", "128", "--steps", "1"]


@pytest.mark.parametrize("tokens,experts,skew,busiest", [(512, 64, 1, 16), (512, 64, 2, 32), (512, 64, 4, 64),
                                                          (64, 8, 4, 64), (100, 64, 1, 4)])
def test_designed_routes_have_the_loads_and_distinct_experts(tokens, experts, skew, busiest):
    loads = skewed_loads(tokens, experts, 2, skew)
    assert sum(loads) == 2 * tokens and max(loads) == loads[0] == busiest
    assert max(loads[1:]) - min(loads[1:]) <= 1  # the rest as even as integers allow
    experts_TK = skewed_routes(tokens, experts, 2, skew, torch.Generator().manual_seed(0))
    assert (experts_TK[:, 0] != experts_TK[:, 1]).all()
    assert expert_counts(experts_TK, experts).tolist() == loads


@pytest.mark.parametrize("skew", [1, 4])
def test_steered_tokens_take_the_designed_routes_through_the_projects_router(skew):
    generator = torch.Generator().manual_seed(3)
    gate_ED = torch.randn(64, 1024, generator=generator) * 0.02  # the seed's router shape and init
    experts_TK = skewed_routes(2048, 64, 2, skew, generator)
    x_TD = steering_tokens(gate_ED, experts_TK, generator)
    _, _, routed_TK = route(x_TD @ gate_ED.t(), 2)
    assert torch.equal(routed_TK.sort(dim=1).values, experts_TK.sort(dim=1).values)


def test_bad_flags_get_one_line_and_exit_2():
    done = subprocess.run([sys.executable, BENCH, "--ranks", "4", "--experts", "6"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "ds_moe_layer: --experts 6 is not a multiple of 4 ranks (ep = ranks)"


@pytest.mark.multirank
def test_two_ranks_autoep_matches_legacy_at_each_skew(tmp_path):
    out = tmp_path / "layer.json"
    done = subprocess.run([sys.executable, BENCH, "--ranks", "2", "--skews", "1", "4", *TINY, "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["ranks"] == 2 and [row["skew_target"] for row in run["rows"]] == [1, 4]
    for row in run["rows"]:
        # 64 tokens x top-2 over 8 experts: the designed loads hit the target exactly, for every form's own router
        assert row["skew_measured"] == {"project": row["skew_target"], "autoep": row["skew_target"],
                                        "stock": row["skew_target"]}
        assert row["max_abs_output_legacy_project"] > 0.1
        assert row["max_abs_diff_vs_legacy_project"]["autoep"] <= 1e-5 * row["max_abs_output_legacy_project"]
    assert "AutoEP / legacy project" in done.stdout  # the table
