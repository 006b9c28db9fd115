"""scripts/gpu_check.py (`make gpu-check`): one line and exit 0 without a GPU, a bad flag as one line, the speed rows
against the bench's committed CPU result, its recipe legal on both backends at world size 1, a part past its limit
stopped with everything it started, failed parts as rows and exit 1, and the whole pipeline on CPU (`--cpu-dry-run`,
multirank: it starts deepspeed ranks) with the autoep run's losses against the legacy run's."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from moe_model.metrics_file import read_metrics
from moe_model.recipe import load_recipe
from tests.conftest import ROOT

SCRIPT = ROOT / "scripts/gpu_check.py"


def gpu_check():
    """The script as a module (scripts/ is not a package), loaded once."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # before it runs: its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--work", str(work), "--out", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [gpu_check().NO_GPU]
    assert "torch.cuda.is_available() is False" in result.stdout
    assert not work.exists() and not out.exists()


@pytest.mark.parametrize("value", ["0", "-3", "nan", "lots"])
def test_a_bad_peak_is_one_line_and_exit_2(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        gpu_check().main(["--peak-tflops", value, "--out", str(tmp_path / "o.json")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--peak-tflops" in lines[0] and value in lines[0], lines
    assert not (tmp_path / "o.json").exists()


def test_speed_rows_are_the_bench_figures_of_its_committed_cpu_result():
    """tokens/s, MFU and the engine ratios from the bench's JSON, recomputed here from its raw times and FLOPs."""
    bench = json.loads((ROOT / "benchmarks/results/moe_speed_cpu_default.json").read_text())
    peak = 0.5  # TFLOPS: a CPU-sized peak, so that the MFU is a percentage worth comparing
    rows = {r["figure"]: r for r in gpu_check().speed_rows(bench, peak)}
    t_ours = bench["model_vs_mixtral"]["times_s"]["ours"]
    assert rows["ours: tokens/s (fp32)"]["value"] == f"{bench['tokens'] / t_ours:,.0f}"
    mfu = bench["model_vs_mixtral"]["useful_flops"] / t_ours / (peak * 1e12)
    assert 0 < mfu < 1
    assert rows["ours: MFU (vs --peak-tflops) (fp32)"]["value"] == f"{mfu:.1%}"
    assert rows["GEMM rate (fp32)"]["gemm_flops_s"] == bench["gemm_flops_s"]
    for run in bench["deepspeed_vs_bare"]:
        ratio = rows[f"DeepSpeed 1-rank engine / bare model + AdamW, ZeRO-{run['zero_stage']}"]["value"]
        assert float(ratio) == pytest.approx(run["times_s"]["deepspeed"] / run["times_s"]["bare"], abs=5e-4)
    assert all(r["status"] == "ok" for r in rows.values())


@pytest.mark.parametrize("backend", ["legacy", "autoep"])
def test_the_gpu_recipe_trains_on_each_backend_at_world_size_1_and_fits_16_gb(backend):
    from moe_model.estimate.estimate import estimate
    from moe_model.train.main import check_trainable

    recipe = load_recipe(ROOT / "recipes/gpu_check.yaml", [f"parallel.moe_backend={backend}"])
    assert recipe.model.hidden_act == "silu" and recipe.train.precision == "bf16"
    strategy, _ = recipe.strategy(1)
    assert strategy.moe_backend == backend and (strategy.tp, strategy.pp, strategy.ep, strategy.dp) == (1, 1, 1, 1)
    assert strategy.backend_problem(recipe.model) is None
    check_trainable(recipe)
    result = estimate(recipe, 1)
    assert result.fits and result.budget_bytes == 16e9


def test_a_part_past_its_limit_is_stopped_with_every_process_it_started(tmp_path):
    module = gpu_check()
    log = tmp_path / "part.log"
    # a child that starts a grandchild (as the deepspeed launcher starts ranks), prints its pid and waits
    program = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
               "time.sleep(120)']); print(p.pid, flush=True); time.sleep(120)")
    started = time.monotonic()
    outcome = module.run_part([sys.executable, "-c", program], log, limit_s=3)
    assert time.monotonic() - started < 30
    assert not outcome.ok and outcome.status == "timed out after 3 s"
    grandchild = int(log.read_text().splitlines()[-1])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.1)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited (its parent, killed too, no longer reaps it)


def test_failed_parts_are_rows_naming_their_logs_and_the_exit_is_1(tmp_path, monkeypatch, capsys):
    """A recipe that does not exist (`moe train` refuses it before any rank starts) and a bench given a bad flag:
    both training runs and the speed part fail, the memory part still runs, the table and the JSON still come out."""
    module = gpu_check()
    broken = module.cpu_dry_run_plan(1.0)
    monkeypatch.setattr(module, "cpu_dry_run_plan", lambda peak: module.dataclasses.replace(
        broken, recipe=tmp_path / "missing.yaml", speed_args=("--device", "tpu")))
    out = tmp_path / "out.json"
    code = module.main(["--cpu-dry-run", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert code == 1
    result = json.loads(out.read_text())
    failed = [(r["part"], r["backend"]) for r in result["rows"] if r["status"] != "ok"]
    assert failed == [("train", "legacy"), ("train", "autoep"), ("speed", "legacy")]
    assert result["failed"] == 3
    train_legacy = result["rows"][0]
    assert train_legacy["status"] == "FAILED (exit 2)" and "missing.yaml" in train_legacy["value"]
    assert str(tmp_path / "work" / "train-legacy.log") in train_legacy["value"]
    assert any(r["part"] == "memory" and r["status"] == "ok" for r in result["rows"])
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.multirank
def test_the_cpu_dry_run_trains_both_backends_to_the_same_losses(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out.json"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--work", str(work), "--out", str(out)],
                            capture_output=True, text=True, timeout=1000, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gpu-check: CPU dry run" in result.stdout
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["failed"] == 0
    rows = report["rows"]
    for backend in ("legacy", "autoep"):
        mine = {r["figure"].split(" (")[0]: r for r in rows if r["part"] == "train" and r["backend"] == backend}
        assert mine["backend built"]["value"].startswith(f"moe_backend {backend}, expert_parallel "
                                                         f"{'on' if backend == 'autoep' else 'off'}")
        assert mine["tokens/s"]["tokens_per_s"] > 0
    # the reference: the legacy run's own metrics file; AutoEP at autoep_size 1 must follow it step by step (fp32)
    legacy, autoep = (read_metrics(work / f"train-{b}/metrics.jsonl") for b in ("legacy", "autoep"))
    assert [m["step"] for m in legacy] == [m["step"] for m in autoep] == list(range(1, 7))
    assert all(math.isfinite(m["loss"]) for m in legacy) and legacy[-1]["loss"] < legacy[0]["loss"]
    for a, b in zip(autoep, legacy):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    memory = [r for r in rows if r["part"] == "memory"]
    assert memory and all(r["error"] == (r["estimate"] - r["measured"]) / r["measured"] for r in memory)
    assert [r["figure"] for r in rows if r["part"] == "speed"] == ["GEMM rate (fp32)"]
    assert report["speed"]["gemm_flops_s"] > 0  # the bench's own JSON, kept whole
