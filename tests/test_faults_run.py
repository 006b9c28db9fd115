"""Faults during and between runs (issue 14, cases 1-6 and 8): nothing lost, one line each.

1 two runs on one output directory        -> the second is refused (exit 2), naming the holder (pid, host, start)
2 `checkpoints/latest` missing             -> the newest intact checkpoint is found by scanning; nothing deleted
3 a checkpoint file corrupt, size intact   -> its SHA-256 does not match: skipped by resume and export, named
4 `resume: never` next to an earlier run   -> refused with the fix (another directory, or train.overwrite=true,
                                              which moves the earlier run into OUTPUT_DIR/archive-<time>/)
5 a resume with another model              -> refused (exit 2), naming the model fields that differ
6 a torn last line in metrics.jsonl        -> the resume trims it; every step once
8 SIGINT                                   -> one line naming the newest complete checkpoint and the resume command,
                                              exit 130, no traceback

The unit tests build checkpoints by hand; the multirank ones run the real launcher on 1 CPU rank, a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_model.cli import main as moe
from moe_model.metrics_file import read_metrics
from moe_model.recipe import RecipeError
from moe_model.train import checkpoint
from moe_model.train.main import interrupted_line, parse_args, resume_command
from moe_model.train.ownership import LOCK_FILE, OutputLock, archive_previous_run, previous_run
from tests.launch import ROOT, SINGLE_RANK, failure, launch

LAYOUT = {"tp": 1, "pp": 1, "ep": 1, "dp": 1}
MODEL = {"hidden_size": 64, "num_hidden_layers": 4}


def signed_checkpoint(root: Path, step: int, body: bytes = b"weights" * 20, model=MODEL) -> Path:
    """A checkpoint as `checkpoint.save` leaves it: files, then the manifest with sizes and SHA-256, then `latest`."""
    directory = root / checkpoint.tag_for(step)
    directory.mkdir(parents=True)
    (directory / "mp_rank_00_model_states.pt").write_bytes(body)
    names = ["mp_rank_00_model_states.pt"]
    import hashlib  # the independent reference: the digest of the bytes written, not checkpoint.file_digest

    manifest = {"step": step, "layout": LAYOUT, "files": {n: len(body) for n in names},
                "model_parallel_files": {"0": {"pipe": 0, "tp": 0}}, "digest": "sha256",
                "digests": {n: hashlib.sha256(body).hexdigest() for n in names}, "model": model}
    (directory / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    (root / checkpoint.POINTER).write_text(directory.name)
    return directory


def zero_out(path: Path) -> None:
    path.write_bytes(b"\0" * path.stat().st_size)  # the right size, the wrong content


# ---------------------------------------------------------------------------------------------- without ranks

def test_case1_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from moe_model.train.ownership import OutputLock; "
        f"lock = OutputLock({str(tmp_path)!r}); assert lock.acquire() is None; print('held', flush=True); time.sleep(600)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = OutputLock(tmp_path).acquire()
        assert line is not None and "\n" not in line
        assert f"in use by another run (pid {holder.pid} on {socket.gethostname()}, started 20" in line
        assert "choose another train.output_dir" in line
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops the lock: a killed run never blocks its own resume
        holder.wait()
    lock = OutputLock(tmp_path)
    assert lock.acquire() is None
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_case1_moe_train_refuses_a_held_directory_before_any_rank_starts(tmp_path, capsys):
    held = OutputLock(tmp_path)
    assert held.acquire() is None  # flock locks belong to the open file: a second open in this process is refused
    try:
        code = moe(["train", str(ROOT / "recipes/tiny_cpu.yaml"), "--set", f"train.output_dir={tmp_path}",
                    *(x for o in SINGLE_RANK for x in ("--set", o))])  # conftest refuses a launch here: none may start
    finally:
        held.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{tmp_path} is in use by another run (pid {os.getpid()}" in err[0]


def test_case2_latest_missing_or_stale_resumes_the_newest_by_scanning(tmp_path):
    signed_checkpoint(tmp_path, 2)
    newest = signed_checkpoint(tmp_path, 4)
    (tmp_path / checkpoint.POINTER).unlink()
    chosen, notes = checkpoint.find_resume(tmp_path, "auto", LAYOUT, MODEL)
    assert chosen == newest and notes == [f"{tmp_path / 'latest'} is missing; the newest intact checkpoint found by "
                                          f"scanning is {newest.name}"]
    (tmp_path / checkpoint.POINTER).write_text(checkpoint.tag_for(2))  # stale: a crash between manifest and pointer
    chosen, notes = checkpoint.find_resume(tmp_path, "auto", LAYOUT, MODEL)
    assert chosen == newest and "names step00000002" in notes[0]
    assert checkpoint.newest(tmp_path) == newest


def test_case3_a_corrupt_file_of_the_right_size_is_caught_by_its_digest(tmp_path):
    older = signed_checkpoint(tmp_path, 2)
    newer = signed_checkpoint(tmp_path, 4)
    zero_out(newer / "mp_rank_00_model_states.pt")
    assert checkpoint.damage(newer, content=False) is None  # the sizes alone see nothing
    assert "does not match its SHA-256 in the manifest" in checkpoint.damage(newer)
    chosen, notes = checkpoint.find_resume(tmp_path, "auto", LAYOUT, MODEL)
    assert chosen == older and notes[0].startswith("skipping damaged checkpoint: ") and newer.name in notes[0]
    with pytest.raises(RecipeError, match="content is corrupt; pick another checkpoint"):
        checkpoint.find_resume(tmp_path, str(newer), LAYOUT, MODEL)
    zero_out(older / "mp_rank_00_model_states.pt")
    with pytest.raises(RecipeError, match="no intact checkpoint .* train.overwrite=true"):
        checkpoint.find_resume(tmp_path, "auto", LAYOUT, MODEL)
    assert sorted(p.name for p in tmp_path.glob("step*")) == [older.name, newer.name]  # nothing deleted


def test_case4_an_earlier_run_is_found_and_archived_whole(tmp_path):
    assert previous_run(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    signed_checkpoint(tmp_path / "checkpoints", 2)
    (tmp_path / "tokenizer").mkdir()  # reused by the next run: stays
    assert previous_run(tmp_path) == ["metrics.jsonl", "checkpoints/"]
    archive = archive_previous_run(tmp_path)
    assert archive.parent == tmp_path and archive.name.startswith("archive-")
    assert (archive / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (archive / "checkpoints" / "step00000002" / "manifest.json").is_file()
    assert previous_run(tmp_path) == [] and (tmp_path / "tokenizer").is_dir()
    assert archive_previous_run(tmp_path) is None


def test_case5_another_model_is_refused_naming_the_fields(tmp_path):
    signed_checkpoint(tmp_path, 2)
    with pytest.raises(RecipeError, match=r"^model: .* holds another model \(model.hidden_size 64 -> 32\); resume "
                                          r"with the saved model, or start a new run"):
        checkpoint.find_resume(tmp_path, "auto", LAYOUT, {**MODEL, "hidden_size": 32})


def test_case8_the_interrupt_line_names_the_checkpoint_and_the_command(tmp_path):
    args = parse_args(["--recipe", "r.yaml", "--set", "train.steps=9", "--set", "train.overwrite=true",
                       "--set", "train.resume=never"])
    assert resume_command(args, 2) == "moe train r.yaml --num-gpus 2 --set train.steps=9"

    class Recipe:
        output_dir = tmp_path

    class Trainer:
        current_step = 5

    signed_checkpoint(tmp_path / "checkpoints", 4)
    line = interrupted_line("SIGINT", args, Recipe, Trainer, 2)
    assert line == (f"moe: interrupted (SIGINT) at step 6; newest complete checkpoint: "
                    f"{tmp_path / 'checkpoints' / 'step00000004'} (step 4); resume with: moe train r.yaml --num-gpus 2 "
                    "--set train.steps=9")


# ------------------------------------------------------------------------------------ through the real launcher

RUN = (*SINGLE_RANK, "parallel.zero_stage=0", "train.warmup_steps=1", "train.log_every=1", "train.save_every=2",
       "tracking.wandb.mode=disabled")


def moe_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("moe")]


@pytest.mark.multirank
def test_cases_1_to_6_on_one_run_directory(tmp_path):
    run = tmp_path / "run"
    result = launch(1, *RUN, "train.steps=4", f"train.output_dir={run}")
    assert result.returncode == 0, failure(result)
    first = read_metrics(run / "metrics.jsonl")
    metrics_text = (run / "metrics.jsonl").read_text()

    # 1: a run holds the directory (this test process, as a run's rank 0 would): a second run is refused
    holder = OutputLock(run)
    assert holder.acquire() is None
    result = launch(1, *RUN, "train.steps=6", f"train.output_dir={run}")
    holder.release()
    assert result.returncode == 2, failure(result)
    lines = moe_lines(result)
    assert len(lines) == 1 and f"is in use by another run (pid {os.getpid()} on {socket.gethostname()}" in lines[0]
    assert "Traceback" not in result.stderr
    # 4: resume: never next to that run
    result = launch(1, *RUN, "train.steps=6", "train.resume=never", f"train.output_dir={run}")
    assert result.returncode == 2, failure(result)
    assert len(moe_lines(result)) == 1 and "train.overwrite=true" in moe_lines(result)[0]
    # 5: another model
    result = launch(1, *RUN, "train.steps=6", "model.hidden_size=32", f"train.output_dir={run}")
    assert result.returncode == 2, failure(result)
    assert len(moe_lines(result)) == 1 and "model.hidden_size 64 -> 32" in moe_lines(result)[0]
    assert "Traceback" not in result.stderr
    assert (run / "metrics.jsonl").read_text() == metrics_text  # nothing written by the refused runs

    # 2 + 3 + 6: `latest` gone, the newest checkpoint's weights zeroed (size intact), a torn last metrics line
    checkpoints = run / "checkpoints"
    (checkpoints / checkpoint.POINTER).unlink()
    zero_out(checkpoints / "step00000004" / "mp_rank_00_model_states.pt")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')
    assert moe(["export", str(run), str(tmp_path / "hf")]) == 0  # 3: export takes step 2, naming step 4
    result = launch(1, *RUN, "train.steps=6", f"train.output_dir={run}")
    assert result.returncode == 0, failure(result)
    assert "skipping damaged checkpoint" in result.stderr and "step00000004" in result.stderr
    assert f"resuming from {checkpoints / 'step00000002'} (step 2)" in result.stderr
    resumed = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]  # 6: every step once, the torn line gone
    for a, b in zip(first, resumed[:4]):  # steps 3 and 4 ran again from step 2's checkpoint: the same losses
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (a["step"], a["loss"], b["loss"])
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000002", "step00000004", "step00000006"]
    assert checkpoint.damage(checkpoints / "step00000004") is None  # saved again, signed again

    # 4's fix: train.overwrite starts over after moving the earlier run aside, whole
    result = launch(1, *RUN, "train.steps=2", "train.resume=never", "train.overwrite=true", f"train.output_dir={run}")
    assert result.returncode == 0, failure(result)
    [archive] = run.glob("archive-*")
    assert f"moved the earlier run's files into {archive}" in result.stderr
    assert read_metrics(archive / "metrics.jsonl") == resumed
    assert sorted(p.name for p in (archive / "checkpoints").glob("step*")) == [
        "step00000002", "step00000004", "step00000006"]
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2]


@pytest.mark.multirank
def test_case8_sigint_prints_one_line_and_exits_130(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "moe_model.cli", "train", "recipes/tiny_cpu.yaml"]
    for override in (*RUN, "train.steps=500", f"train.output_dir={run}"):
        args += ["--set", override]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group: a terminal's Ctrl-C reaches all
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"step": 5,' in metrics.read_text()):
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1, err[-3000:]
    newest = checkpoint.newest(run / "checkpoints")
    assert f"newest complete checkpoint: {newest} (step " in lines[0] and "resume with: moe train" in lines[0]
    assert checkpoint.damage(newest) is None


def test_sigterm_and_sigusr1_request_a_stop_after_the_step():
    from moe_model.train import preemption

    previous = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    try:
        preemption.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second request changes nothing
        assert preemption.requested() == "SIGUSR1"
    finally:
        preemption._requested = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.mark.multirank
@pytest.mark.parametrize("target", ["process group", "moe train alone"])
def test_preemption_saves_after_the_step_and_the_resume_gives_the_uninterrupted_losses(tmp_path, single_rank_run,
                                                                                     target):
    """Issue 24, cases 1 and 2: SIGTERM to `moe train`'s process group (a job manager, a scheduler's preemption),
    or to `moe train` alone (`kill PID`), which passes it on. It comes once the rank has started (its run.json), so
    the rank stops after its first step: the checkpoint of step 1, one line naming it and the resume command, exit
    75, no process left. After the group's signal, the resumed run ends on the losses of the session's uninterrupted
    1-rank run of the same schedule."""
    import psutil

    from tests.layouts import REFERENCE_SAVE, STEPS

    run = tmp_path / "run"
    args = [sys.executable, "-m", "moe_model.cli", "train", "recipes/tiny_cpu.yaml"]
    for override in (*SINGLE_RANK, *STEPS, *REFERENCE_SAVE, f"train.output_dir={run}"):
        args += ["--set", override]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "WANDB_MODE": "disabled"})
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "run.json").exists() and process.poll() is None:
        time.sleep(0.05)
    if target == "process group":
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 75, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("moe: stopped on request")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    # the group's signal reaches the rank itself, before its first step ends; `moe train` passes its own on within
    # a fraction of a second, by when a tiny step or a few may have run
    step = int(lines[0].split(" after step ")[1].split()[0])
    assert step == 1 if target == "process group" else 1 <= step < 7, lines[0]
    saved = run / "checkpoints" / checkpoint.tag_for(step)
    assert f"(SIGTERM) after step {step} of {STEPS[0].split('=')[1]}; checkpoint {saved} (written in " in lines[0]
    assert "resume with: moe train" in lines[0]
    assert checkpoint.damage(saved) is None
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == list(range(1, step + 1))
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(run) in " ".join(p.info["cmdline"] or [])]
    if target != "process group":
        return

    resumed = launch(1, *SINGLE_RANK, *STEPS, *REFERENCE_SAVE, f"train.output_dir={run}")
    assert resumed.returncode == 0, failure(resumed)
    reference = read_metrics(single_rank_run() / "metrics.jsonl")
    losses = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in losses] == [m["step"] for m in reference]
    for a, b in zip(reference, losses):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (a["step"], a["loss"], b["loss"])
