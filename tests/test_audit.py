"""`moe audit`: the seed plan's claims against computed figures (its 30 B parameters and 512 GPUs are wrong), a
recipe whose claims hold exits 0, and the JSON keys."""

import json


from moe_model.cli import main
from moe_model.estimate.audit import audit
from moe_model.recipe import load_recipe
from tests.conftest import ROOT

SEED = str(ROOT / "recipes/seed_4b.yaml")
SEED_PLAN = str(ROOT / "recipes/seed_plan.yaml")


def by_claim(findings):
    return {f["claim"]: f for f in findings}


def test_seed_plan_findings():
    f = by_claim(audit(load_recipe(SEED_PLAN)))
    assert set(f) == {"total_params", "gpus", "experts_per_gpu", "step_latency_s", "throughput_seq_per_s"}
    # 16 x (attention 4*1024^2 + norms 2*1024 + router 1024*64 + 64 experts x 2 x 2048*1024) + 2 x 32000*1024 + 1024
    shape_total = 16 * (4 * 1024**2 + 2 * 1024 + 1024 * 64 + 64 * 2 * 2048 * 1024) + 2 * 32000 * 1024 + 1024
    assert f["total_params"]["computed"] == shape_total == 4_428_694_528
    assert f["total_params"]["stated"] == 30e9 and not f["total_params"]["ok"]
    # DeepSpeed carves ep out of dp: 8 x 4 x 4 = 128, not 8 x 4 x 4 x 4
    assert f["gpus"]["computed"] == 128 and f["gpus"]["stated"] == 512 and not f["gpus"]["ok"]
    assert "data-parallel" in f["gpus"]["why"]
    assert f["experts_per_gpu"]["ok"] and f["experts_per_gpu"]["computed"] == 16
    # the plan does not fit 64 GB, so no latency or throughput claim for it can hold
    for claim in ("step_latency_s", "throughput_seq_per_s"):
        assert not f[claim]["ok"] and "does not fit" in f[claim]["why"]
    assert f["step_latency_s"]["computed"] > 0.064 * 1.25
    for finding in f.values():  # one sentence each
        assert finding["why"].endswith(".") and ". " not in finding["why"][:-1]


def test_cli_exit_1_with_wrong_claims_and_json_keys(capsys):
    assert main(["audit", SEED_PLAN, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["findings"] and all(set(f) == {"claim", "stated", "computed", "ok", "why"} for f in out["findings"])
    assert out["wrong"] == 4


def test_true_claims_pass_and_exit_0(capsys):
    recipe = load_recipe(SEED, ["parallel.dp=8"])
    from moe_model.estimate.estimate import estimate

    est = estimate(recipe)
    claims = [f"claims.total_params={4_428_694_528}", "claims.gpus=8", "claims.experts_per_gpu=8",
              f"claims.memory_per_gpu_gb={est.peak.total_bytes / 1e9 * 1.05}",
              f"claims.step_latency_s={est.performance.step_time_s * 0.9}",
              f"claims.throughput_seq_per_s={est.performance.throughput_seq_per_s}"]
    assert main(["audit", SEED, "--set", "parallel.dp=8", *sum((["--set", c] for c in claims), []), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(f["ok"] for f in out["findings"]) and len(out["findings"]) == 6


def test_a_wrong_memory_claim_is_caught():
    f = by_claim(audit(load_recipe(SEED, ["claims.memory_per_gpu_gb=5"])))
    assert not f["memory_per_gpu_gb"]["ok"] and f["memory_per_gpu_gb"]["computed"] > 10


def test_bad_recipe_is_one_line_exit_2(capsys, tmp_path):
    assert main(["audit", str(tmp_path / "missing.yaml")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
