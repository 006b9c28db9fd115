"""`moe audit`: the seed plan's claims against computed figures (its 30 B parameters and 512 GPUs are wrong), a
recipe whose claims hold exits 0, and the JSON keys."""

import json

import pytest

from moe_model.cli import main
from moe_model.estimate.audit import audit, consistency
from moe_model.recipe import load_recipe
from tests.conftest import ROOT

SEED = str(ROOT / "recipes/seed_4b.yaml")
SEED_PLAN = str(ROOT / "recipes/seed_plan.yaml")


def by_claim(findings):
    return {f["claim"]: f for f in findings}


def test_seed_plan_findings():
    f = by_claim(audit(load_recipe(SEED_PLAN)))
    assert {"total_params", "gpus", "experts_per_gpu", "step_latency_s", "throughput_seq_per_s"} <= set(f)
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
    assert out["findings"] and all({"claim", "stated", "computed", "ok", "why"} <= set(f) for f in out["findings"])
    assert out["wrong"] == 14  # issue 15: all 18 of the seed's claims (13 wrong) and its refused layout


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


# ---- issue 15: every claim kind (a right claim passes, a wrong one is flagged) and the plan's own arithmetic ----

P_SEED = 4_428_694_528  # the seed's shape, counted by hand in test_seed_plan_findings
LAYOUT = ["parallel.tp=2", "parallel.pp=4", "parallel.ep=8", "parallel.dp=8", "parallel.micro_batch_size=2"]


def seed_findings(*overrides, recipe=SEED):
    return by_claim(audit(load_recipe(recipe, list(overrides))))


def model_flops_by_hand(batch=128, S=10240, D=1024, E=64, k=2, I=2048, g=2, V=32000, L=16):
    """Megatron's count, written out: 2 FLOPs per multiply-add, causal attention halved, backward 2x forward."""
    per_token_layer = 2 * (4 * D * D + D * E + k * g * I * D) + 2 * S * D  # projections, router, experts; QK^T+PV/2
    return 3 * batch * S * (L * per_token_layer + 2 * D * V)


@pytest.mark.parametrize("claim,right,wrong", [
    ("gpus", 64, 128),                       # tp2 x pp4 x dp8
    ("experts_per_gpu", 8, 16),              # 64 / ep8
    ("layers_per_stage", 4, 2),              # 16 / pp4
    ("hidden_per_tp_rank", 512, 256),        # 16 heads x 64 / tp2
    ("heads_per_tp_rank", 8, 16),            # 16 / tp2
    ("effective_batch_size", 128, 64),       # the recipe's global batch
    ("gradient_accumulation_steps", 8, 1),   # 128 / (micro-batch 2 x dp8)
])
def test_layout_claims(claim, right, wrong):
    assert seed_findings(*LAYOUT, f"claims.{claim}={right}")[claim]["ok"]
    bad = seed_findings(*LAYOUT, f"claims.{claim}={wrong}")[claim]
    assert not bad["ok"] and bad["why"].startswith("wrong: ") and bad["computed"] == right


def test_ambiguous_layout_claims_give_the_other_reading():
    f = seed_findings(*LAYOUT, "claims.gpus=512", "claims.hidden_per_tp_rank=1024", "claims.effective_batch_size=1024",
                      "claims.gradient_accumulation_steps=64")
    # ep as a fourth axis (2 x 4 x 8 x 8), the residual stream split over tp, 128 per replica (x dp8 = 1024)
    for claim, other in (("gpus", 512), ("hidden_per_tp_rank", 1024), ("effective_batch_size", 1024),
                         ("gradient_accumulation_steps", 64)):
        assert not f[claim]["ok"] and f[claim]["computed_other_interpretation"] == other
        assert f[claim]["interpretation"] and f[claim]["verdict_other_interpretation"] == "right"
    assert f["hidden_per_tp_rank"]["verdict_other_interpretation"] == "right"  # wrong here: tp keeps 1024 per rank
    assert "bubble" in seed_findings("claims.gradient_accumulation_steps=1", recipe=SEED_PLAN)[
        "gradient_accumulation_steps"]["why"]


def test_uneven_stages_make_any_layers_per_stage_claim_wrong():
    f = seed_findings("parallel.pp=3", "parallel.dp=8", "claims.layers_per_stage=5")["layers_per_stage"]
    assert not f["ok"] and f["computed"] == 6  # 16 layers on 3 stages: 5, 5, 6 in some order


@pytest.mark.parametrize("claim,right_gb,wrong_gb", [
    ("param_memory_gb", P_SEED * 2 / 1e9, 60),        # bf16 weights
    ("gradient_memory_gb", P_SEED * 6 / 1e9, 60),     # bf16 .grad + the fp32 accumulation buffer (ZeRO-1)
    ("optimizer_memory_gb", P_SEED * 12 / 1e9, P_SEED * 4 / 1e9),  # fp32 master + m + v, not "2x the parameters"
])
def test_model_state_memory_claims(claim, right_gb, wrong_gb):
    f = seed_findings("parallel.dp=8", f"claims.{claim}={right_gb}")[claim]
    assert f["ok"] and f["computed"] == pytest.approx(right_gb, rel=1e-9)
    assert not seed_findings("parallel.dp=8", f"claims.{claim}={wrong_gb}")[claim]["ok"]


def test_activation_and_total_memory_claims():
    f = seed_findings("parallel.dp=8", "claims.activation_memory_gb=8.4", "claims.total_memory_gb=257")
    acts, total = f["activation_memory_gb"], f["total_memory_gb"]
    assert not acts["ok"] and not total["ok"]
    # the whole batch's bf16 logits and their fp32 log-softmax alone (128 x 10240 x 32000 x (2 + 4) bytes)
    assert acts["computed"] > 128 * 10240 * 32000 * 6 / 1e9
    assert total["computed"] == pytest.approx(acts["computed"] + P_SEED * (2 + 6 + 12) / 1e9)
    # read per replica the batch is 8x larger: activations grow nearly 8x (the RoPE tables do not)
    assert 7.9 < acts["computed_other_interpretation"] / acts["computed"] <= 8
    right = seed_findings("parallel.dp=8", f"claims.activation_memory_gb={acts['computed'] * 1.05}",
                          f"claims.total_memory_gb={total['computed'] * 0.95}")
    assert right["activation_memory_gb"]["ok"] and right["total_memory_gb"]["ok"]


def test_fits_and_memory_efficiency_claims():
    # the seed plan's last stage holds a micro-batch of 32 x 10240 tokens' logits (bf16), their fp32 log-softmax and
    # two fp32 gradients: 32 x 10240 x 32000 x 14 bytes > 64 GB on its own
    assert 32 * 10240 * 32000 * 14 > 64e9
    assert not seed_findings("claims.fits_gpu_memory=true", recipe=SEED_PLAN)["fits_gpu_memory"]["ok"]
    assert seed_findings("claims.fits_gpu_memory=false", recipe=SEED_PLAN)["fits_gpu_memory"]["ok"]
    from moe_model.estimate.estimate import estimate

    peak = estimate(load_recipe(SEED, ["parallel.dp=8"])).peak.total_bytes
    assert seed_findings("parallel.dp=8", f"claims.memory_efficiency={peak / 64e9}")["memory_efficiency"]["ok"]
    bad = seed_findings("parallel.dp=8", "claims.memory_efficiency=1.0")["memory_efficiency"]
    assert not bad["ok"] and bad["verdict_other_interpretation"] == "right"  # one stage: every rank alike
    assert not seed_findings("claims.memory_efficiency=1.0", recipe=SEED_PLAN)["memory_efficiency"]["ok"]


def test_time_claims():
    f = seed_findings("parallel.dp=8", "claims.step_latency_s=1", "claims.throughput_seq_per_s=1", "claims.mfu=0.6")
    step, seq_s, mfu = (f[c]["computed"] for c in ("step_latency_s", "throughput_seq_per_s", "mfu"))
    assert seq_s * step == pytest.approx(128)
    assert mfu * step * 8 * 400e12 == pytest.approx(model_flops_by_hand())
    assert not f["mfu"]["ok"] and f["mfu"]["verdict_other_interpretation"] == "right"  # hardware.mfu is 0.6
    for claim, value in (("step_latency_s", step), ("throughput_seq_per_s", seq_s), ("mfu", mfu)):
        assert seed_findings("parallel.dp=8", f"claims.{claim}={value * 1.1}")[claim]["ok"]
        assert not seed_findings("parallel.dp=8", f"claims.{claim}={value * 2}")[claim]["ok"]


def test_a_refused_layout_is_a_finding_with_the_rule_and_the_reason():
    f = seed_findings(recipe=SEED_PLAN)["layout"]
    assert not f["ok"] and f["stated"] == "tp8 pp4 ep4 dp4" and "parallel.ep" in f["computed"]
    assert "multiple of tp" in f["why"] and "same experts" in f["why"]
    assert "layout" in seed_findings("parallel.tp=4", "parallel.ep=2", "parallel.dp=8")  # ep 2 under tp 4
    assert "layout" not in seed_findings(*LAYOUT)  # ep 8 over tp 2: peers hold different experts


HAND_MADE = ["parallel.dp=8", "claims.total_params=1e9", "claims.param_memory_gb=2", "claims.gradient_memory_gb=6",
             "claims.optimizer_memory_gb=12", "claims.activation_memory_gb=1", "claims.total_memory_gb=21",
             "claims.step_latency_s=1.28", "claims.throughput_seq_per_s=100", "claims.effective_batch_size=128",
             "claims.gpus=8", f"claims.mfu={model_flops_by_hand() / (1.28 * 8 * 400e12)}"]


def checks(*overrides):
    return {f["claim"].split(" = ")[0]: f for f in consistency(load_recipe(SEED, [*HAND_MADE, *overrides]))}


def test_a_consistent_hand_made_plan_passes_every_check():
    c = checks()
    assert set(c) == {"param_memory_gb", "gradient_memory_gb", "optimizer_memory_gb", "total_memory_gb",
                      "throughput_seq_per_s", "effective_batch_size", "mfu"}
    assert all(f["ok"] and f["why"].startswith("right: ") for f in c.values())


@pytest.mark.parametrize("override,check,implied", [
    ("claims.param_memory_gb=3", "param_memory_gb", 2),             # 1e9 params x 2 bytes
    ("claims.gradient_memory_gb=4", "gradient_memory_gb", 6),       # 3x: bf16 .grad + fp32 accumulation
    ("claims.optimizer_memory_gb=4", "optimizer_memory_gb", 12),    # 6x: 12 bytes per 2-byte parameter
    ("claims.total_memory_gb=20", "total_memory_gb", 21),           # 2 + 1 + 6 + 12
    ("claims.throughput_seq_per_s=400", "throughput_seq_per_s", 100),  # 128 / 1.28
    ("claims.effective_batch_size=512", "effective_batch_size", 128),  # 100 x 1.28
    ("claims.mfu=0.3", "mfu", model_flops_by_hand() / (1.28 * 8 * 400e12)),  # 0.77
])
def test_each_inconsistency_is_flagged(override, check, implied):
    f = checks(override)[check]
    assert not f["ok"] and f["computed"] == pytest.approx(implied)


def test_the_batch_reading_decides_throughput_and_is_reported():
    f = checks("claims.throughput_seq_per_s=800")["throughput_seq_per_s"]  # 1024 / 1.28: 128 per replica x dp8
    assert not f["ok"] and "global batch" in f["interpretation"]
    assert f["computed_other_interpretation"] == pytest.approx(800) and f["verdict_other_interpretation"] == "right"
    assert checks("claims.optimizer_memory_gb=4")["optimizer_memory_gb"]["verdict_other_interpretation"] == "right"


def test_seed_plan_contradicts_itself_where_the_issue_says(capsys):
    assert main(["audit", SEED_PLAN, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    c = {f["claim"].split(" = ")[0]: f for f in out["consistency"]}
    assert c["total_memory_gb"]["computed"] == pytest.approx(60 + 8.4 + 60 + 120) and not c["total_memory_gb"]["ok"]
    assert c["throughput_seq_per_s"]["ok"] and c["throughput_seq_per_s"]["verdict_other_interpretation"] == "wrong"
    assert c["effective_batch_size"]["computed"] == pytest.approx(128) and not c["effective_batch_size"]["ok"]
    assert c["param_memory_gb"]["ok"] and out["layout_refused"]
    assert out["right"] + out["wrong"] == len(out["findings"]) == 19
    for f in out["findings"] + out["consistency"]:  # a right claim is said to be right, in one sentence
        assert f["why"].startswith("right: " if f["ok"] else "wrong: ") and ". " not in f["why"][:-1]


def test_consistent_claims_that_contradict_each_other_exit_1(capsys):
    overrides = sum((["--set", o] for o in [*HAND_MADE, "claims.total_memory_gb=20"]), [])
    assert main(["audit", SEED, *overrides]) == 1
    text = capsys.readouterr().out
    assert "CLASH total_memory_gb" in text and "1 of 7 consistency checks fail" in text


def test_the_committed_review_opens_with_every_claim_then_the_recommended_strategy():
    text = (ROOT / "docs/seed_plan_review.md").read_text()
    claims_part, _, rest = text.partition("## The recommended strategy")
    assert rest, "docs/seed_plan_review.md has no recommended strategy: run make plan"
    stated = load_recipe(SEED_PLAN).claims.model_dump(exclude_none=True)
    rows = {line.split("|")[1].strip() for line in claims_part.splitlines() if line.startswith("| ")}
    assert len(stated) == 18 and set(stated) | {"layout"} <= rows, "stale review: run make plan"
