"""The training entry the deepspeed launcher runs on every rank (`scripts/train.py` and `moe train` both land here).

    deepspeed --num_gpus N scripts/train.py --recipe R [--set k=v ...]

The same command runs on GPUs (NCCL) and on CPU ranks (gloo): DeepSpeed picks its accelerator by itself. The run
itself is `trainer.Trainer`; what the console shows (and `MOE_VERBOSE=1`, which keeps DeepSpeed's logs) is `console`.

Before anything is written, global rank 0 takes the output directory's lock and decides what happens to an earlier
run's files there (`claim_output_dir`, `ownership`). SIGINT (Ctrl-C) stops the run at once on every rank: rank 0
prints one line naming the newest complete checkpoint and the command that resumes it, and the ranks exit 130
(`interrupted_line`); a checkpoint being written when the signal came has no manifest and never counts. SIGTERM and
SIGUSR1 (a scheduler's preemption) stop it after the current step with a checkpoint, exit 75 (`preemption`). A rank
that dies (a kill -9, the out-of-memory killer) is named by a survivor in one line with the resume command, exit 69
(`peers`). With MOE_VERBOSE=1 the traceback of where each rank stopped is shown too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import traceback

from ..launch import rank_program_parser
from ..recipe import Recipe, RecipeError, load_recipe
from ..strategy import Strategy
from . import peers, preemption
from .console import library_output, quiet_libraries
from .distributed import close_distributed, init_distributed, stale_build_lock


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = rank_program_parser("Train a recipe under DeepSpeed (run through the deepspeed launcher)", recipe=True)
    return parser.parse_args(argv)


def check_trainable(recipe: Recipe) -> None:
    """Refuse what DeepSpeed accepts but this project cannot yet train correctly, before any process group exists."""
    problem = Strategy.of(recipe.parallel).training_problem(recipe.model)
    if problem:
        raise RecipeError(*problem)


def check_output_dir(recipe: Recipe) -> bool:
    """The output folder must be creatable, writable and roomy enough for the checkpoints, before any step. Returns
    whether this call created it (a refused launch removes what it created: `ownership.remove_if_unused`)."""
    created = not recipe.output_dir.exists()
    try:
        recipe.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RecipeError("train.output_dir", f"cannot create {str(recipe.output_dir)!r} ({err.strerror}); "
                                              "choose another") from None
    if not os.access(recipe.output_dir, os.W_OK):
        raise RecipeError("train.output_dir", f"{str(recipe.output_dir)!r} is not writable; choose another")
    try:
        check_disk_space(recipe)
    except RecipeError:
        if created:
            recipe.output_dir.rmdir()
        raise
    return created


def check_disk_space(recipe: Recipe) -> None:
    """Checkpoints must fit before the first step: about 18 bytes a parameter each (16-bit or fp32 weights, fp32
    master and Adam moments), 12 more with portable states (fp32 master and both moments again, `reshard`), for the
    kept ones plus the one being written."""
    if not recipe.train.save_every and not recipe.train.stop_at and not recipe.train.save_last:
        return
    from ..estimate.params import count_params

    per_param = 18 + (12 if recipe.train.portable_checkpoints else 0)
    per_checkpoint = per_param * count_params(recipe.moe_config()).total
    needed = per_checkpoint * (recipe.train.keep_checkpoints + 1 if recipe.train.keep_checkpoints else 2)
    free = shutil.disk_usage(recipe.output_dir).free
    if free < needed:
        raise RecipeError("train.output_dir", (f"{free / 1e9:.1f} GB free under {recipe.output_dir}, checkpoints need "
                                               f"about {needed / 1e9:.1f} GB; free space, lower "
                                               "train.keep_checkpoints or choose another output_dir"))


INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT
_stopped_by: str | None = None  # the signal that stopped this rank (`_interrupt`)


def _interrupt(signum: int, frame) -> None:
    """SIGINT/SIGTERM on a rank: stop where the rank is (KeyboardInterrupt), once; a second signal (the launcher
    sends SIGTERM right after forwarding Ctrl-C) must not interrupt the line being printed."""
    global _stopped_by
    _stopped_by = signal.Signals(signum).name
    # wandb's service process got the same Ctrl-C and is gone: its client's asyncio transport would log
    # "socket.send() raised exception." for every message still queued
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    for name in (signal.SIGINT, *preemption.SIGNALS):  # a no-op, not SIG_IGN: Python raises OSError ("Signal 15
        signal.signal(name, lambda *_: None)  # ignored due to race condition") for a pending signal now set to SIG_IGN
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Check the recipe and the build cache, start the process group, check the layout against the world size,
    create and claim the output directory, then train. The one place a stopped run becomes its line (on global
    rank 0) and its exit code, and an interrupted one its line and 130."""
    args = parse_args(argv)
    quiet_libraries()
    from .trainer import RunStopped, Trainer, recipe_error  # here: `moe train` imports this module's checks only

    signal.signal(signal.SIGINT, _interrupt)  # explicitly: a launcher may have started this rank with SIGINT ignored
    preemption.install()  # SIGTERM, SIGUSR1: stop after this step, with a checkpoint
    recipe, trainer, world, lock, created = None, None, None, None, False
    try:
        try:
            recipe = load_recipe(args.recipe, args.set)
            check_trainable(recipe)
        except RecipeError as err:
            raise recipe_error(err) from None
        check_build_lock()
        with library_output():
            rank, world = init_distributed(recipe.train.collective_timeout_min)
        peers.record()  # every rank's host and pid: a rank that dies is named by its peers
        problem = launch_problem(recipe, world)
        if problem:
            raise recipe_error(RecipeError(*problem), f" (world size {world})")
        try:  # created once the layout passed: a refused launch leaves no folder
            created = check_output_dir(recipe) and rank == 0  # rank 0 removes it after a refusal if it created it
        except RecipeError as err:
            raise recipe_error(err) from None
        lock = claim_output_dir(recipe, rank)  # held until the run ends
        trainer = Trainer(recipe, rank, world)
        code = trainer.run()
        end_run(lock)
        return code
    except RunStopped as stop:
        if global_rank() == 0:
            from .checkpoint import SAVE_FAILED

            resumable = stop.code in (preemption.PREEMPTED, SAVE_FAILED)
            resume = f"; resume with: {resume_command(args, world)}" if resumable else ""
            print(stop.line + resume, file=sys.stderr)
        if created and stop.code == 2:  # a refusal: the folder this rank created goes, if nothing else was written
            from .ownership import remove_if_unused

            remove_if_unused(recipe.output_dir)
        end_run(lock)  # every rank reaches the same verdict at the same point
        return stop.code
    except (KeyboardInterrupt, Exception) as err:
        if _stopped_by is None:  # not Ctrl-C, whose peers exit at once by design: a peer gone is named (`peers`)
            peer_lost(err, args, recipe, trainer, world, lock)
        # after a signal, whatever this rank raises is its side of the stop (a collective whose peer has already
        # exited fails here before the signal's KeyboardInterrupt is raised); anything else is a real error
        stopped_by = _stopped_by or preemption.requested()
        if not isinstance(err, KeyboardInterrupt) and stopped_by is None:
            raise
        from .console import verbose

        if verbose():
            traceback.print_exc()
        if global_rank() == 0:
            print(interrupted_line(stopped_by or "SIGINT", args, recipe, trainer, world), file=sys.stderr)
        # no atexit hooks: wandb's service process got the same Ctrl-C and is gone, and its teardown would print
        # a traceback and a line per unsent message; the metrics and checkpoints are already on disk
        if lock is not None:
            lock.release()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)


def peer_lost(err: BaseException, args, recipe, trainer, world, lock) -> None:
    """Where `err` comes from a rank that is gone (one of this host exited, or the transport says a peer went away;
    DeepSpeed's launch.py also sends the survivors SIGTERM once it sees the dead rank): the lowest living rank of this
    host prints `peer_lost_line`, and this rank exits `peers.PEER_LOST` at once (the group is broken: no teardown).
    Returns for any other error."""
    if not peers.known():
        return
    lost = peers.lost_connection(err)
    dead = peers.gone(wait_s=3.0 if lost or preemption.requested() else 0.0)
    if not dead and not lost:
        return
    from .console import verbose

    if verbose():
        traceback.print_exc()
    if peers.reports(dead):
        print(peer_lost_line(dead, err, args, recipe, trainer, world), file=sys.stderr)
    if lock is not None:
        lock.release()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(peers.PEER_LOST)


def end_run(lock) -> None:
    """A run that ended (finished, or stopped with its line on every rank): the process group torn down, the
    output lock (rank 0's) released."""
    close_distributed()
    if lock is not None:
        lock.release()


def claim_output_dir(recipe: Recipe, rank: int):
    """Global rank 0 takes the output directory's lock (`ownership.OutputLock`) before the run writes anything, then
    settles an earlier run's files: `train.overwrite` archives them; `resume: never` next to them is refused (the run
    would append to their metrics.jsonl). Every rank gets rank 0's verdict (a collective), so all stop together.
    Returns the held lock on rank 0 (keep it referenced), None elsewhere."""
    import torch.distributed as dist

    from .ownership import NODE_TOKEN, OutputLock, archive_previous_run, not_shared_verdict, previous_run, write_node_token
    from .trainer import RunStopped

    lock, verdict, output_dir = None, None, recipe.output_dir
    if rank == 0:
        lock = OutputLock(output_dir)
        problem = lock.acquire()
        fix = (f"choose another train.output_dir, or --set train.overwrite=true to move the earlier run into "
               f"{output_dir}/archive-<time>/ and start over")
        if problem:
            verdict = f"moe: error: {problem}"
        elif recipe.train.overwrite and recipe.train.resume not in ("auto", "never"):
            verdict = ("moe: recipe error: train.overwrite: it starts over and train.resume names a checkpoint to "
                       "continue from; drop one of the two")
        elif recipe.train.overwrite:
            archived = archive_previous_run(output_dir)
            if archived is not None:
                print(f"moe: train.overwrite: moved the earlier run's files into {archived}", file=sys.stderr)
        elif recipe.train.resume == "never" and previous_run(output_dir):
            verdict = (f"moe: recipe error: train.resume: never, but {output_dir} holds an earlier run "
                       f"({', '.join(previous_run(output_dir))}) that this run would mix with; {fix}")
    token = None
    if rank == 0 and verdict is None:
        token = write_node_token(output_dir)
    shared = [verdict, token]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is None:
        shared[0] = not_shared_verdict(output_dir, shared[1])
    if rank == 0 and token is not None:
        (output_dir / NODE_TOKEN).unlink(missing_ok=True)
    if shared[0]:
        raise RunStopped(2, shared[0])
    return lock


def resume_command(args: argparse.Namespace, world: int | None) -> str:
    """The command line that continues this run, in its launcher's terms (`cluster.continue_command`)."""
    from .cluster import continue_command

    return continue_command(args.recipe, args.set, world)


def interrupted_line(signal_name: str, args: argparse.Namespace, recipe: Recipe | None, trainer, world) -> str:
    """The one line an interrupted run prints: where it stopped, the newest complete checkpoint, how to resume."""
    return stopped_line(f"interrupted ({signal_name})", args, recipe, trainer, world)


def peer_lost_line(dead: list[tuple[int, int]], err: BaseException, args: argparse.Namespace, recipe: Recipe | None,
                   trainer, world) -> str:
    """The one line of a run whose rank is gone (`peers`): which rank (or, of another node, the transport's words),
    where the run stopped, the newest complete checkpoint, how to resume."""
    import socket

    if dead:
        ranks = ", ".join(f"rank {rank} (pid {pid})" for rank, pid in dead)
        cause = (f"{ranks} on {socket.gethostname()} exited during the run (killed: a kill -9 or the out-of-memory "
                 "killer, see dmesg; or crashed: its own output above)")
    else:
        words = peers.lost_connection(err) or "the connection was lost"
        cause = f"a rank of another node is gone (the collective failed: {words}; that node's output says why)"
    return stopped_line(cause, args, recipe, trainer, world)


def stopped_line(cause: str, args: argparse.Namespace, recipe: Recipe | None, trainer, world) -> str:
    """`moe: CAUSE at step N; newest complete checkpoint: ... (step K); resume with: CMD`, the tail every run that
    stops without finishing prints."""
    from . import checkpoint

    if recipe is None or trainer is None:
        return f"moe: {cause} before training started; nothing to resume"
    at = f" at step {trainer.current_step + 1}" if trainer.current_step is not None else ""
    newest = checkpoint.newest(recipe.output_dir / "checkpoints")
    if newest is None:
        saved = "no checkpoint saved yet (train.save_every sets how often); rerunning starts over"
        return f"moe: {cause}{at}; {saved}: {resume_command(args, world)} --set train.overwrite=true"
    step = checkpoint.read_manifest(newest)["step"]
    return (f"moe: {cause}{at}; newest complete checkpoint: {newest} (step {step}); resume "
            f"with: {resume_command(args, world)}")


def run_launcher(command: list[str], env: dict[str, str], call=None, saved_since=None) -> int:
    """`moe train`'s side: run the deepspeed launcher (`call(command, env=env)`, default `subprocess.call`) and wait
    for it; returns its exit code, or 130 after Ctrl-C.

    DeepSpeed's runner (the `deepspeed` command) has no signal handler: SIGINT would print a KeyboardInterrupt
    traceback, SIGTERM or SIGUSR1 kill it and orphan the ranks. So it is started with SIGINT, SIGTERM and SIGUSR1
    ignored (inherited through fork and exec; its per-node launch.py installs its own SIGINT/SIGTERM handler, which
    stops the ranks with SIGTERM one after the other, 30 s each before SIGKILL, then exits 1; the ranks install
    theirs). The launcher stays in this process's group, so a signal to the group (a terminal's Ctrl-C, a job
    manager, `kill -9 -PGID`) reaches every process. One sent to this process alone (`kill PID`) is passed on to
    every rank (the children of launch.py), and the launcher is waited for: SIGINT stops the ranks at once (one line,
    130), SIGTERM and SIGUSR1 after their step with a checkpoint (`preemption`, 75; where launch.py took the signal
    too and exited 1, 75 all the same when `saved_since(time of the signal)` finds the checkpoint the ranks wrote
    after it). `subprocess.call` has no hook
    between fork and wait, so it runs on a thread while this (main) thread ignores the signals until the runner
    exists, then records them."""
    import subprocess
    import threading
    import time

    import psutil

    outcome: dict[str, object] = {}

    def launch() -> None:
        try:
            outcome["code"] = (call or subprocess.call)(command, env=env)
        except BaseException as err:  # re-raised on the main thread
            outcome["error"] = err

    pending: list[int] = []
    seen: set[int] = set()
    preempted_at: list[float] = []
    me = psutil.Process()
    signals = (signal.SIGINT, *preemption.SIGNALS)
    handlers = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signals}
    try:
        thread = threading.Thread(target=launch, name="deepspeed-launcher", daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while thread.is_alive() and not me.children() and time.monotonic() < deadline:
            time.sleep(0.01)  # the runner is forked (with the signals ignored) within milliseconds
        def received(signum: int, frame) -> None:
            pending.append(signum)
            seen.add(signum)
            if signum in preemption.SIGNALS and not preempted_at:
                preempted_at.append(time.time())

        for signum in signals:
            signal.signal(signum, received)
        while thread.is_alive():
            thread.join(timeout=0.2)
            ranks = launched_ranks(me) if pending else []
            while pending and ranks:  # a signal before any rank started waits for the first one
                signum = pending.pop(0)
                for rank in ranks:  # a rank that got the same signal from its group takes it once
                    with contextlib.suppress(psutil.Error):
                        rank.send_signal(signum)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    code = int(outcome["code"])  # type: ignore[call-overload]
    if signal.SIGINT in seen:
        return INTERRUPTED
    if 256 - 64 < code < 256:  # launch.py's sys.exit(-N) for a rank killed by signal N: the shell's 128 + N
        code = 128 + 256 - code
    if preempted_at and code not in (0, preemption.PREEMPTED) and saved_since and saved_since(preempted_at[0]):
        return preemption.PREEMPTED
    return code


def checkpoint_saved_since(output_dir, since: float) -> bool:
    """Whether the run's newest complete checkpoint was signed (its manifest written) at or after `since`."""
    from . import checkpoint

    newest = checkpoint.newest(output_dir / "checkpoints")
    return newest is not None and (newest / checkpoint.MANIFEST).stat().st_mtime >= since


def launched_ranks(me):
    """The rank processes under this process: the children of DeepSpeed's per-node launch.py."""
    return [child for process in me.children(recursive=True) if _is_node_launcher(process)
            for child in process.children()]


def _is_node_launcher(process) -> bool:
    import psutil

    try:
        return "deepspeed.launcher.launch" in process.cmdline()
    except psutil.Error:
        return False


def global_rank() -> int:
    """This process's rank: the process group's once it exists, before that the launcher's RANK."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def check_build_lock() -> None:
    """Stop (exit 2) instead of waiting forever on a build lock a killed run left (`distributed.stale_build_lock`)."""
    from .trainer import RunStopped

    lock = stale_build_lock()
    if lock is not None:
        raise RunStopped(2, f"moe: error: {lock} is a build lock left by a killed run (no build is running); every "
                            f"run would wait on it forever: rm {lock}")


def launch_problem(recipe: Recipe, world: int) -> tuple[str, str] | None:
    """`Strategy`'s rules again, now that the world size (and so dp) is known, and whether this accelerator runs the
    recipe's precision."""
    stated = Strategy.of(recipe.parallel)
    problem = stated.world_problem(world)
    if problem is None:
        from .cluster import local_size

        # tp stays inside a node: the node this launch really has (its ranks per node), else the recipe's figure
        per_node = local_size() or recipe.hardware.gpus_per_node
        problem = stated.resolved(world)[0].problem(recipe.model, per_node, recipe.train.global_batch_size,
                                                    trainable=True)
    if problem is None and recipe.train.precision != "fp32":
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        supported = accelerator.is_fp16_supported() if recipe.train.precision == "fp16" else accelerator.is_bf16_supported()
        if not supported:
            problem = ("train.precision", f"{recipe.train.precision} is not supported by DeepSpeed's "
                       f"{accelerator.device_name()} accelerator here; use fp32 (or bf16)")
    return problem


if __name__ == "__main__":
    sys.exit(main())
