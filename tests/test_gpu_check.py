"""scripts/gpu_check.py (`make gpu-check`): exit 0 only where there is no GPU at all; GPUs that torch cannot use are
exit 1 with torch's, CUDA's and the driver's versions; a bad flag is one line; the GPU recipe is legal on both
backends at world size 1; a launch past its limit is stopped with everything it started; a red row is exit 1; and
the whole pipeline on CPU (`--cpu-dry-run`, multirank) is green, its rows checked against the run folders' own
files, then each fault it exists to catch (a broken resume, a disagreeing backend, an export mismatch, a memory
bound exceeded) injected and seen as a red row."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_model.metrics_file import read_metrics
from moe_model.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/gpu_check.py"


def gpu_check():
    """The script as a module (scripts/ is not a package), loaded once."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # before it runs: its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def _no_nvidia(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_any_gpu_it_says_so_in_one_line_and_exits_0(tmp_path, monkeypatch, capsys):
    module = gpu_check()
    monkeypatch.setattr(module, "gpu_evidence", lambda root=Path("/"): [])
    work, out = tmp_path / "work", tmp_path / "out.json"
    assert module.main(["--work", str(work), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [module.NO_GPU]
    assert not work.exists() and not out.exists()


def test_gpu_evidence_reads_nvidia_smi_dev_and_proc(tmp_path, monkeypatch):
    module = gpu_check()
    _no_nvidia(monkeypatch, tmp_path)
    assert module.gpu_evidence(tmp_path) == []
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/nvidia0").touch()
    (tmp_path / "proc/driver/nvidia/gpus/0000:01:00.0").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15\n")
    found = module.gpu_evidence(tmp_path)
    assert found == [str(tmp_path / "dev/nvidia0"), f"1 in {tmp_path / 'proc/driver/nvidia/gpus'}"]
    assert module.driver_version(tmp_path).endswith("550.54.15")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    smi = bin_ / "nvidia-smi"  # answers as the real one does
    smi.write_text("#!/bin/sh\nif [ \"$1\" = -L ]; then echo 'GPU 0: NVIDIA H200 (UUID: GPU-1)'; "
                   "else echo '570.86.15, NVIDIA H200'; fi\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))
    assert module.gpu_evidence(tmp_path)[0] == "nvidia-smi -L: GPU 0: NVIDIA H200 (UUID: GPU-1)"
    assert module.driver_version(tmp_path) == "570.86.15, NVIDIA H200"


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch must not see the GPUs")
def test_gpus_that_torch_cannot_use_are_exit_1_with_the_versions_and_the_fix(tmp_path, monkeypatch, capsys):
    module = gpu_check()
    _no_nvidia(monkeypatch, tmp_path)
    monkeypatch.setattr(module, "gpu_evidence", lambda root=Path("/"): ["/dev/nvidia0"])
    monkeypatch.setattr(module, "driver_version", lambda root=Path("/"): "570.86.15, NVIDIA H200")
    assert module.main(["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o.json")]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "/dev/nvidia0" in out
    assert f"torch {torch.__version__}" in out and f"torch.version.cuda {torch.version.cuda}" in out
    assert "570.86.15" in out and "GPU machines" in out and "--index-url" in out


@pytest.mark.parametrize("value", ["0", "-3", "nan", "lots"])
def test_a_bad_peak_is_one_line_and_exit_2(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        gpu_check().main(["--peak-tflops", value, "--out", str(tmp_path / "o.json")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--peak-tflops" in lines[0] and value in lines[0], lines
    assert not (tmp_path / "o.json").exists()


def test_faults_outside_the_dry_run_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPU_CHECK_FAULTS", "resume")
    with pytest.raises(SystemExit) as exit_:
        gpu_check().main(["--out", str(tmp_path / "o.json")])
    assert exit_.value.code == 2 and "only with the CPU dry run" in capsys.readouterr().err


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


def test_a_red_row_or_a_failing_part_is_exit_1_and_the_other_parts_still_run(tmp_path, monkeypatch, capsys):
    module = gpu_check()
    red = module.row("memory", "", "a bound", "", "FAILED")
    green = module.row("speed", "", "a figure")

    def broken(plan, clock):
        raise KeyError("rows")
    monkeypatch.setattr(module, "PARTS", {"train1": broken, "memory": lambda p, c: ([red], {}),
                                          "speed": lambda p, c: ([green], {})})
    out = tmp_path / "out.json"
    assert module.main(["--cpu-dry-run", "--work", str(tmp_path / "w"), "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert [(r["part"], r["status"][:6]) for r in result["rows"]] == [("train1", "FAILED"), ("memory", "FAILED"),
                                                                      ("speed", "ok")]
    assert result["failed"] == 2 and "FAILED" in capsys.readouterr().out
    monkeypatch.setattr(module, "PARTS", {"speed": lambda p, c: ([green], {})})
    assert module.main(["--cpu-dry-run", "--work", str(tmp_path / "w2"), "--out", str(out)]) == 0


@pytest.mark.multirank
def test_the_cpu_dry_run_is_green_and_each_fault_gives_a_red_row(tmp_path, monkeypatch):
    """One clean dry run (every part, as `make gpu-check` runs them), its figures read again from the run folders;
    then, reusing its legacy run as the reference, one autoep series with every fault injected (GPU_CHECK_FAULTS),
    and one memory case with the memory fault: each targeted row red, the others still green."""
    module = gpu_check()
    work, out = tmp_path / "work", tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_FAULTS"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--work", str(work), "--out", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=ROOT, env={**env, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["failed"] == 0
    rows = report["rows"]
    by = {(r["part"], r["backend"], r["figure"].split(" (")[0].split(",")[0]): r for r in rows}
    plan = module.cpu_dry_run_plan(989.0)
    # independent of the rows: the run folders' own metrics files
    curves = {}
    for backend in module.BACKENDS:
        base = work / f"stage1-{backend}"
        reference = read_metrics(base / "reference/metrics.jsonl")
        resumed = read_metrics(base / "resumed/metrics.jsonl")
        assert [m["step"] for m in reference] == [m["step"] for m in resumed] == list(range(1, plan.steps + 1))
        for a, b in zip(resumed, reference):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                         rel=1e-6)
        assert by[("train1", backend, "killed")]["value"].startswith("exit")
        assert json.loads((base / "resumed.probe.json").read_text())["first_step"] == 2
        assert by[("train1", backend, "AutoEP layers in the live engine")]["autoep_layers"] == \
            (4 if backend == "autoep" else 0)
        assert all(math.isfinite(m["loss"]) for m in reference) and reference[-1]["loss"] < reference[0]["loss"]
        assert by[("train1", backend, "moe export")]["export_error"] < 1e-4
        curves[backend] = reference
    for a, b in zip(curves["autoep"], curves["legacy"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert by[("train1", "autoep vs legacy", "bf16 agreement")]["value"].startswith("skipped")
    memory = [r for r in rows if r["part"] == "memory"]
    assert len(memory) == 2 and all(r["error"] == (r["estimate"] - r["measured"]) / r["measured"] for r in memory)
    speed = {r["figure"].split(",")[0]: r for r in rows if r["part"] == "speed"}
    assert speed["LM loss"]["loss_difference"] < 1e-5 and speed["LM loss"]["status"] == "ok"
    assert report["speed"]["times_s"]["ours"] > 0 and report["speed"]["losses"]["ours"] > 0
    gemm = [r for r in rows if r["part"] == "gemm"]
    assert len(gemm) == 4 and all(r["status"] == "ok" for r in gemm)
    assert report["gemm"]["rms_log_error"] < report["gemm"]["one_efficiency_rms_log_error"]
    assert "hardware.gemm_tile" in " ".join(report["gemm"]["overrides"]) and (work / "gemm.yaml").is_file()

    # the faults, in this process, each in what its row reads (no more launches: CI time): every targeted row red
    monkeypatch.setenv("GPU_CHECK_FAULTS", ",".join(module.FAULTS))
    clean = dataclasses.replace(plan, work=work)
    series = next(s for s in module.stage_series(clean, 1) if s.backend == "autoep")
    base = work / series.name
    log = base / "reference.log"
    launched = {"killed": module.Outcome(False, "exit 247", 0.0, log), "resumed": module.Outcome(True, "ok", 0.0, log)}
    resumed = read_metrics(base / "resumed/metrics.jsonl")
    resumed[-1]["loss"] *= 1 + 1e-4  # resume: one resumed step off by 1e-4 (the tolerance is 1e-6)
    (base / "resumed/metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in resumed))
    resume_row = module.resume_rows(clean, series, launched, curves["autoep"])[-1]
    assert resume_row["status"] == "FAILED" and resume_row["figure"].startswith("resumed from step"), resume_row
    shutil.rmtree(base / "export")  # written again, from the same checkpoint
    vocab = load_recipe(plan.recipe, list(plan.train_sets)).model.vocab_size
    export = module.export_row(clean, series, vocab)  # export: experts 0 and 1 of layer 0 swapped in the loaded folder
    assert export["status"] == "FAILED" and export["export_error"] > 1e-2, export
    off = [{**m, "loss": m["loss"] * 1.001, "grad_norm": m["grad_norm"] * 1.01} for m in curves["autoep"]]
    agreement = module.agreement_rows("train1", {"legacy": curves["legacy"], "autoep": off}, "fp32", "faulty")
    assert [r["status"] for r in agreement] == ["FAILED", "FAILED"]  # backend: curves 1e-3 apart (tolerance 1e-4)
    faulty = dataclasses.replace(plan, work=tmp_path / "faulty")
    memory_rows = module.memory_case(faulty, module.Clock(plan.total_s), plan.memory_cases[0])
    assert [r["status"] for r in memory_rows] == ["FAILED"] and memory_rows[0]["error"] < -0.01  # a tensor saved more
