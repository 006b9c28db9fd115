"""Checkpoints: complete or invisible, exact resume after SIGKILL, export to Hugging Face folders."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from moe_model.cli import main as moe
from moe_model.launch import deepspeed_command
from moe_model.recipe import RecipeError
from moe_model.train import checkpoint
from moe_model.train.tracking import read_metrics
from tests.launch import ROOT, failure, launch
from tests.layouts import LAST_STEP, LAYOUTS, STEPS

LAYOUT = {"tp": 1, "pp": 2, "ep": 2, "dp": 2}


def fake_checkpoint(root, step, layout=LAYOUT, body=b"x" * 100):
    directory = root / checkpoint.tag_for(step)
    directory.mkdir(parents=True)
    (directory / "mp_rank_00_model_states.pt").write_bytes(body)
    manifest = {"step": step, "layout": layout, "files": {"mp_rank_00_model_states.pt": len(body)},
                "model_parallel_files": {"0": {"pipe": 0, "tp": 0}}}
    (directory / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    (root / checkpoint.POINTER).write_text(directory.name)
    return directory


def test_truncated_checkpoint_is_detected_and_auto_falls_back(tmp_path):
    older = fake_checkpoint(tmp_path, 2)
    newer = fake_checkpoint(tmp_path, 4)
    with open(newer / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(37)
    assert "is 37 bytes, the manifest says 100" in checkpoint.damage(newer)
    chosen, notes = checkpoint.find_resume(tmp_path, "auto", LAYOUT)
    assert chosen == older and "skipping damaged checkpoint" in notes[0]
    with pytest.raises(RecipeError, match="truncated or overwritten"):
        checkpoint.find_resume(tmp_path, str(newer), LAYOUT)


def test_a_checkpoint_without_manifest_never_counts(tmp_path):
    fake_checkpoint(tmp_path, 2)
    half = tmp_path / checkpoint.tag_for(4)
    half.mkdir()  # a save that died before rank 0 wrote the manifest and moved the pointer
    (half / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    chosen, _ = checkpoint.find_resume(tmp_path, "auto", LAYOUT)
    assert chosen.name == checkpoint.tag_for(2)


def test_pruning_keeps_the_checkpoint_just_saved_and_never_touches_newer_folders(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    # a run resumed from step 4 (6 and 8 left by an earlier attempt, e.g. corrupt) has just saved step 4 again
    checkpoint._prune(tmp_path, 1, checkpoint.tag_for(4))
    assert sorted(p.name for p in tmp_path.glob("step*")) == [checkpoint.tag_for(s) for s in (4, 6, 8)]


def test_another_layout_resumes_only_from_portable_states(tmp_path):
    written = fake_checkpoint(tmp_path, 2)
    other = {"tp": 1, "pp": 1, "ep": 2, "dp": 4, "moe_backend": "autoep"}
    with pytest.raises(RecipeError, match=r"another layout \(pp 2 -> 1, dp 2 -> 4, moe_backend legacy -> autoep\) "
                                          r"and without portable states"):
        checkpoint.find_resume(tmp_path, "auto", other)
    manifest = checkpoint.read_manifest(written)
    (written / checkpoint.MANIFEST).write_text(json.dumps({**manifest, "portable": True, "zero_stage": 1}))
    chosen, _ = checkpoint.find_resume(tmp_path, "auto", other, zero_stage=3)
    assert chosen == written
    assert checkpoint.layout_changes(checkpoint.read_manifest(written), other, 3) == [
        "pp 2 -> 1", "dp 2 -> 4", "moe_backend legacy -> autoep", "ZeRO stage 1 -> 3"]
    assert checkpoint.layout_changes(checkpoint.read_manifest(written), {**LAYOUT, "moe_backend": "legacy"}, 1) == []


def test_metrics_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)))
    checkpoint.trim_metrics(path, 4)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.multirank
def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path, layout_run, monkeypatch, capsys):
    """AutoEP's experts inside ZeRO-3's partitions (tiny_cpu's own pp2 x dp2 x ep2 (ZeRO-1, AutoEP) is killed and
    resumed across two emulated nodes, and ZeRO-0 legacy under srun, by tests/test_multinode.py). The uninterrupted
    run is the session's parity run of the layout (tests/layouts.py)."""
    name = "dp2_ep2_zero3_autoep"
    ranks, *layout = LAYOUTS[name]
    killed = tmp_path / "killed"
    run = (*layout, *STEPS, "train.save_every=2", "train.keep_checkpoints=2")  # saves at 2, 4, 6; keeps 2
    command = deepspeed_command(ranks, ROOT / "scripts/train.py", ["--recipe", str(ROOT / "recipes/tiny_cpu.yaml")],
                                overrides=(*run, f"train.output_dir={killed}"))
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "WANDB_MODE": "disabled"})
    deadline = time.time() + 300
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and '"step": 3' in metrics.read_text()):
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # every rank, in step 4 (or, on a fast layout, just after its checkpoint)
    process.wait()
    assert [m["step"] for m in read_metrics(killed)][-1] < LAST_STEP, "the run ended before the kill"
    newest = {checkpoint.tag_for(s): s for s in (2, 4)}[(killed / "checkpoints" / checkpoint.POINTER).read_text()]
    result = launch(ranks, *run, f"train.output_dir={killed}")
    assert result.returncode == 0, failure(result)
    assert f"(step {newest})" in result.stderr and "resuming from" in result.stderr
    uninterrupted, resumed = read_metrics(layout_run(name)), read_metrics(killed)
    assert [m["step"] for m in resumed] == list(range(1, LAST_STEP + 1))
    for a, b in zip(uninterrupted, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (a["step"], a["loss"], b["loss"])
    assert sorted(p.name for p in (killed / "checkpoints").glob("step*")) == [
        checkpoint.tag_for(s) for s in (4, 6)]  # keep_checkpoints: 2 of the 3 saved
    export_during_rotation(killed, tmp_path / "exported", monkeypatch, capsys)


def export_during_rotation(run, out, monkeypatch, capsys):
    """`moe export` of a live run whose rotation deletes the checkpoint it chose (step 6) before it is read: it
    exports the next intact one (step 4), says so, and names the step it wrote."""
    from moe_model.train import export as export_module

    original, calls = export_module.merged_state_dict, []

    def rotated_away(directory, config, scratch=None):
        if not calls:
            shutil.rmtree(directory)  # what train.keep_checkpoints' pruning does while export runs
        calls.append(directory.name)
        return original(directory, config, scratch)

    monkeypatch.setattr(export_module, "merged_state_dict", rotated_away)
    capsys.readouterr()
    assert moe(["export", str(run), str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert calls == [checkpoint.tag_for(6), checkpoint.tag_for(4)]
    assert json.loads(captured.out)["step"] == 4
    assert f"skipping {checkpoint.tag_for(6)}: removed while it was read" in captured.err
    assert (out / "config.json").exists() and not out.with_name(out.name + ".partial").exists()


@pytest.mark.multirank
@pytest.mark.parametrize("ranks, overrides", [
    (2, ("parallel.tp=1", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2", "parallel.zero_stage=3")),  # AutoEP
], ids=["dp2_ep2_zero3_autoep"])
def test_export_round_trip_gives_the_engine_logits(tmp_path, ranks, overrides):
    """ZeRO-3's export, read through DeepSpeed's universal conversion. The direct reader's layouts are checked bit
    for bit by tests/test_init_from.py: PP2xDP2xEP2 AutoEP (pipeline keys, AutoEP's w1/w3/w2 files) and
    TP2xDP2xEP2 legacy (tensor-parallel slices, the legacy layer's expert files) export the source's tensors."""
    run, logits_dir = tmp_path / "run", tmp_path / "logits"
    logits_dir.mkdir()
    result = launch(ranks, *overrides, script="tests/distributed/model_logits.py",
                    extra_args=("--out", str(logits_dir), "--train-steps", "3", "--run-dir", str(run)))
    assert result.returncode == 0, failure(result)
    saved = [torch.load(p) for p in sorted(logits_dir.glob("engine_logits_rank*.pt"))]
    assert saved
    assert moe(["export", str(run), str(tmp_path / "native")]) == 0
    assert moe(["export", str(run), str(tmp_path / "mixtral"), "--format", "mixtral"]) == 0
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
    mixtral = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    for expected in saved:
        with torch.no_grad():
            for model in (native, mixtral):
                diff = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
                assert diff < 1e-5, (type(model).__name__, diff)


def test_export_refuses_bad_input(tmp_path, capsys):
    assert moe(["export", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "has no run.json" in capsys.readouterr().err
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "a-file").write_text("")
    assert moe(["export", str(tmp_path), str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err
    assert "OUT_DIR" in err and "is a file, not a folder" in err and "Traceback" not in err


class FakeEngine:
    def __init__(self, fp16: bool, applied: bool):
        self.fp16, self.applied = fp16, applied

    def fp16_enabled(self):
        return self.fp16

    def was_step_applied(self):
        return self.applied


@pytest.mark.parametrize("loss, fp16, applied, fault", [
    (float("nan"), False, True, True),  # fp32/bf16: any non-finite loss stops the run
    (float("inf"), True, True, True),  # fp16 applied a step on an infinite loss: beyond what scaling handles
    (float("nan"), True, False, False),  # fp16 overflow, the step was skipped and the loss scale lowered
    (2.5, False, True, False),
])
def test_non_finite_loss_stops_the_run_beyond_fp16_skips(loss, fp16, applied, fault):
    from moe_model.train.trainer import is_fault

    assert is_fault(loss, FakeEngine(fp16, applied)) is fault


@pytest.mark.parametrize("overrides, message", [
    (["train.output_dir=/etc/passwd/run"], "train.output_dir: cannot create '/etc/passwd/run'"),
    (["train.save_every=10", "train.keep_checkpoints=100000000"], "checkpoints need about"),
])
def test_output_problems_fail_before_any_rank_starts(tmp_path, capsys, overrides, message):
    args = ["train", str(ROOT / "recipes/tiny_cpu.yaml"), "--set", f"train.output_dir={tmp_path / 'run'}"]
    for o in overrides:
        args += ["--set", o]
    assert moe(args) == 2
    err = capsys.readouterr().err
    assert message in err and "+ " not in err  # no launcher command was printed: nothing started
