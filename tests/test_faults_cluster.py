"""Faults a cluster brings (issue 24, cases 3, 4 and 9; cases 1-2 are test_faults_run.py's preemption tests, 5-8
test_init_from.py's and the export tests'): each through the real launcher, one line, its exit code, what is on disk.

3 a write fails during a checkpoint save  -> exit 74, one line: the cause, the rank and file, the newest good
                                             checkpoint, the fix, the resume command; the partial folder removed;
                                             the resume ends on the uninterrupted losses
4 one rank of two is killed (kill -9)      -> exit 69 (or 137, the launcher's code for the killed rank, when it
                                             sees that first), one line from the survivor naming the rank and the
                                             resume command; the resume ends on the uninterrupted losses
9 a refusal on the ranks after the launch  -> exit 2, one line, no launcher echo, no folder left behind
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_model.metrics_file import read_metrics
from moe_model.train import checkpoint, peers
from moe_model.train.ownership import LOCK_FILE, remove_if_unused
from tests.launch import ROOT, SINGLE_RANK, failure, launch
from tests.layouts import LAYOUTS, REFERENCE_SAVE, STEPS

ECHO = "exits with return code"  # DeepSpeed launch.py's error line, the whole rank command line before it


def moe_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("moe:") and not line.startswith("moe: note")]


def assert_same_losses(reference: list[dict], resumed: list[dict]) -> None:
    assert [m["step"] for m in resumed] == [m["step"] for m in reference]
    for a, b in zip(reference, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (a["step"], a["loss"], b["loss"])


def moe_train(*overrides: str) -> list[str]:
    """`moe train` on tiny_cpu as a user types it (the deepspeed runner, launch.py, the ranks)."""
    args = [sys.executable, "-m", "moe_model.cli", "train", "recipes/tiny_cpu.yaml"]
    for override in overrides:
        args += ["--set", override]
    return args


# ---------------------------------------------------------------------------------------------- without ranks

def test_the_causes_of_a_failed_write_are_named_with_their_fix(tmp_path):
    full = checkpoint.write_failure_cause(OSError(errno.ENOSPC, "No space left on device"), None, tmp_path / "step2")
    assert full[0] == "No space left on device" and "free space under" in full[1] and "keep_checkpoints" in full[1]
    large = checkpoint.write_failure_cause(OSError(errno.EFBIG, "File too large"), None, tmp_path / "step2")
    assert large[0] == "File too large" and "ulimit -f" in large[1]
    quota = checkpoint.write_failure_cause(OSError(errno.EDQUOT, "quota"), None, tmp_path / "step2")
    assert quota[0] == os.strerror(errno.EDQUOT) and "quota" in quota[1]
    other = checkpoint.write_failure_cause(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos"),
                                           None, tmp_path / "step2")  # free space here, no file-size limit
    assert "unexpected pos" in other[0] and other[1] == f"check {tmp_path}"


def test_a_lost_connection_is_found_in_the_exception_chain():
    try:
        try:
            raise RuntimeError("[pair.cc:534] Read error [127.0.0.1]:29500: Connection reset by peer")
        except RuntimeError as err:
            raise ValueError("all_gather_object failed") from err
    except ValueError as chained:
        assert peers.lost_connection(chained) == "Connection reset by peer"
    assert peers.lost_connection(KeyError("step")) is None


def test_a_refused_folder_goes_only_when_it_holds_nothing_of_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("{}")
    (run / "run.json").write_text("{}")
    assert not remove_if_unused(run) and (run / LOCK_FILE).exists()  # something of a run: kept whole
    (run / "run.json").unlink()
    assert remove_if_unused(run) and not run.exists()


# ------------------------------------------------------------------------------------ through the real launcher

SAVES = ("train.save_every=2", "parallel.zero_stage=1")


@pytest.mark.multirank
def test_case3_a_file_size_limit_during_a_save_stops_with_one_line_and_the_resume_is_exact(tmp_path, single_rank_run):
    """The run stops at step 2 (`train.stop_at`); its resume runs under a file-size limit (`ulimit -f`, what a
    scheduler's limit on file size gives) below the size of the weights' file, so the save of step 4 fails; the
    resume without the limit ends on the uninterrupted run's losses."""
    run = tmp_path / "run"
    schedule = (*SINGLE_RANK, *STEPS, *REFERENCE_SAVE, *SAVES, f"train.output_dir={run}")
    result = launch(1, *schedule, "train.stop_at=2")
    assert result.returncode == 0, failure(result)
    good = run / "checkpoints" / checkpoint.tag_for(2)
    limit = (good / "mp_rank_00_model_states.pt").stat().st_size // 4  # metrics and run.json stay far below it

    result = launch(1, *schedule, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == checkpoint.SAVE_FAILED == 74, failure(result)
    [line] = moe_lines(result.stderr)[-1:]
    assert line.startswith(f"moe: checkpoint step00000004 (step 4) could not be written: File too large (the "
                           f"file-size limit, ulimit -f, is {limit} bytes) (rank 0, "), line
    assert (f"the partial folder is removed; newest good checkpoint: {good} (step 2); raise the file-size limit"
            in line and "; resume with: moe train " in line), line
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000002"]
    assert checkpoint.damage(good) is None

    resumed = launch(1, *schedule)
    assert resumed.returncode == 0, failure(resumed)
    assert_same_losses(read_metrics(single_rank_run() / "metrics.jsonl"), read_metrics(run / "metrics.jsonl"))


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.multirank
def test_case3_a_full_disk_stops_both_ranks_together_with_one_line(tmp_path):
    """Two ranks write into a tmpfs (in a mount namespace of its own: nothing outside sees it) sized for the
    checkpoints `moe train`'s disk check asks for (train.keep_checkpoints 0: two) and a little more: the third
    save runs out of space on some rank mid-save. Both ranks stop after that save's collectives, together."""
    from moe_model.estimate.params import count_params
    from moe_model.recipe import load_recipe

    run = tmp_path / "run"
    run.mkdir()
    if not _can_mount_tmpfs(run):
        pytest.skip("this machine refuses a tmpfs mount in a mount namespace (unshare -m: needs CAP_SYS_ADMIN)")
    overrides = ("parallel.tp=1", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2", *STEPS, *SAVES,
                 "train.keep_checkpoints=0", "train.steps=12", f"train.output_dir={run}")
    params = count_params(load_recipe(ROOT / "recipes/tiny_cpu.yaml", list(overrides)).moe_config()).total
    size = int(2 * 30 * params * 1.1)  # main.check_disk_space: 18 + 12 (portable) bytes a parameter, two of them
    state = ("import json, sys; from moe_model.train import checkpoint; root = sys.argv[1]; "
             "print('STATE ' + json.dumps({p.name: checkpoint.damage(p) for p in checkpoint.tags(__import__("
             "'pathlib').Path(root))}))")
    script = (f"mount -t tmpfs -o size={size} tmpfs {run} && {shlex.join(moe_train(*overrides))}; code=$?; "
              f"{shlex.quote(sys.executable)} -c {shlex.quote(state)} {run / 'checkpoints'}; exit $code")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT,
                            timeout=400, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 74, failure(result)
    lines = moe_lines(result.stderr)
    failed = [line for line in lines if "could not be written" in line]
    assert len(failed) == 1 and "No space left on device (rank " in failed[0], failure(result)
    assert "; resume with: moe train " in failed[0] and "free space under" in failed[0]
    assert "Traceback" not in result.stderr and ECHO not in result.stdout + result.stderr
    on_disk = json.loads(result.stdout.split("STATE ", 1)[1])
    saved = [name for name, problem in on_disk.items() if problem is None]
    assert saved and len(saved) == len(on_disk), on_disk  # every folder left is a complete checkpoint
    newest = max(saved)
    assert f"newest good checkpoint: {run / 'checkpoints' / newest} (step {int(newest[4:])})" in failed[0]


@pytest.mark.multirank
def test_case4_a_killed_rank_is_named_by_its_survivor_and_the_resume_is_exact(tmp_path, layout_run):
    """`kill -9` of rank 1 of a 2-rank `moe train` once the checkpoint of step 2 is signed: rank 0's next collective
    fails; it names rank 1 and the resume command in one line. The resume ends on the session's uninterrupted run
    of the same layout and schedule."""
    import psutil

    name = "dp2_ep2_zero1_autoep"
    ranks, *layout = LAYOUTS[name]
    run = tmp_path / "run"
    schedule = (*layout, *STEPS, "train.save_every=2", f"train.output_dir={run}")
    process = subprocess.Popen(moe_train(*schedule), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, env={**os.environ, "WANDB_MODE": "disabled"})
    victim, deadline = None, time.time() + 300
    while victim is None and time.time() < deadline and process.poll() is None:
        for candidate in psutil.Process(process.pid).children(recursive=True):
            with_rank = None
            try:
                if "moe_model.train.main" in candidate.cmdline() and "deepspeed.launcher" not in candidate.cmdline():
                    with_rank = candidate.environ().get("RANK")
            except psutil.Error:
                continue
            if with_rank == "1":
                victim = candidate
        time.sleep(0.05)
    assert victim is not None, "rank 1 never started"
    signed = run / "checkpoints" / checkpoint.tag_for(2) / checkpoint.MANIFEST
    while not signed.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    assert process.returncode in (peers.PEER_LOST, 128 + signal.SIGKILL), err[-3000:]
    lines = moe_lines(err)
    assert len(lines) == 3, err[-3000:]  # the header's two lines, then the one of the stop
    newest = checkpoint.newest(run / "checkpoints")
    step = checkpoint.read_manifest(newest)["step"]
    assert lines[2].startswith(f"moe: rank 1 (pid {victim.pid}) on ") and "exited during the run" in lines[2]
    assert f"newest complete checkpoint: {newest} (step {step}); resume with: moe train " in lines[2]
    assert "Traceback" not in err and "Connection reset" not in err and ECHO not in out + err
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(run) in " ".join(p.info["cmdline"] or [])]

    resumed = launch(ranks, *schedule)
    assert resumed.returncode == 0, failure(resumed)
    assert f"resuming from {newest} (step {step})" in resumed.stderr
    assert_same_losses(read_metrics(layout_run(name) / "metrics.jsonl"), read_metrics(run / "metrics.jsonl"))


@pytest.mark.multirank
def test_case9_a_refusal_on_the_ranks_leaves_no_folder_and_no_launcher_echo(tmp_path):
    """Refusals that only a rank can make: fp16 on CPU ranks (DeepSpeed's accelerator says), through `moe train`;
    a resume point that is not a checkpoint, on a direct launch (the rank created the folder itself)."""
    run = tmp_path / "run"
    result = subprocess.run(moe_train(*SINGLE_RANK, "train.precision=fp16", f"train.output_dir={run}"), cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 2, failure(result)
    assert moe_lines(result.stderr) == [("moe: recipe error: train.precision: fp16 is not supported by DeepSpeed's "
                                         "cpu accelerator here; use fp32 (or bf16) (world size 1)")]
    assert ECHO not in result.stdout + result.stderr and not run.exists()

    not_a_checkpoint = tmp_path / "step00000002"
    not_a_checkpoint.mkdir()  # a folder (the recipe's own check passes), never completed
    result = launch(1, *SINGLE_RANK, f"train.resume={not_a_checkpoint}", f"train.output_dir={run}")
    assert result.returncode == 2, failure(result)
    [line] = moe_lines(result.stderr)
    assert line.startswith("moe: recipe error: train.resume: ") and "has no manifest.json" in line
    assert not run.exists()
