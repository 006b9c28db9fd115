"""The trainer's edges that need no ranks: the console's quiet defaults, what a CPU launch gets in its environment,
the stale extension build lock, and the one abort path of `moe_model.train.main`."""

import logging
import os
import subprocess
import time

import pytest

from moe_model.train import console, distributed
from moe_model.train.main import main as train_main
from tests.launch import ROOT


def record(level, message):
    return logging.LogRecord("DeepSpeed", level, __file__, 1, message, None, None)


def test_deepspeed_chatter_is_dropped_and_real_warnings_stay(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    keep = console._DropChatter()
    assert not keep.filter(record(logging.INFO, "Using topology: ..."))
    assert not keep.filter(record(logging.WARNING, "Setting accelerator to CPU. If you have GPU or other ..."))
    assert keep.filter(record(logging.WARNING, "the loss scale fell to 1"))
    assert keep.filter(record(logging.ERROR, "Setting accelerator to CPU"))  # errors always show
    assert console.launcher_log_args(False) == ["--log_level", "critical"]
    assert console.launcher_log_args(True) == []
    monkeypatch.setenv(console.VERBOSE_ENV, "1")  # set by `moe train --verbose`, or by hand on the launcher path
    assert console.launcher_log_args(False) == []


def test_library_prints_are_captured_unless_verbose_and_shown_on_failure(monkeypatch, capsys):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    with console.library_output():
        print("Using topology: {...}")
    assert capsys.readouterr().out == ""
    with pytest.raises(RuntimeError), console.library_output():
        print("SEED_LAYERS=False")
        raise RuntimeError("the build failed")
    assert "SEED_LAYERS=False" in capsys.readouterr().err
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    with console.library_output():
        print("stage=0 layers=3")
    assert "stage=0 layers=3" in capsys.readouterr().out


def test_a_cpu_launch_gets_the_heap_allocator_and_the_detected_accelerator(monkeypatch):
    for key in ("DS_ACCELERATOR", *distributed.HEAP_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(distributed, "accelerator_name", lambda: "cpu")
    assert distributed.launch_env() == {"DS_ACCELERATOR": "cpu", **distributed.HEAP_ENV}
    monkeypatch.setattr(distributed, "accelerator_name", lambda: "cuda")
    assert distributed.launch_env() == {"DS_ACCELERATOR": "cuda"}  # GPUs: the caching allocator does this already
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")  # the user's own setting wins
    monkeypatch.setattr(distributed, "accelerator_name", lambda: "cpu")
    assert distributed.launch_env()["MALLOC_MMAP_MAX_"] == "65536"


def make_lock(root, age_s):
    folder = root / "py311_cpu" / "deepspeed_shm_comm"
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_lock_left_by_a_killed_build_is_found_a_live_or_fresh_one_is_not(tmp_path):
    stale = make_lock(tmp_path / "a", age_s=3600)
    assert distributed.stale_build_lock([tmp_path / "a"]) == stale
    make_lock(tmp_path / "b", age_s=1)  # a build that started a second ago
    assert distributed.stale_build_lock([tmp_path / "b"]) is None
    live = make_lock(tmp_path / "c", age_s=3600)
    build = subprocess.Popen(["sleep", "30"], cwd=live.parent)  # ninja works in the build folder while it builds
    try:
        time.sleep(0.2)
        assert distributed.stale_build_lock([tmp_path / "c"]) is None
    finally:
        build.kill()
        build.wait()


def test_a_stale_lock_stops_the_run_with_its_fix_instead_of_waiting(tmp_path, monkeypatch, capsys):
    lock = make_lock(tmp_path / "ext", age_s=3600)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("RANK", "0")
    code = train_main(["--recipe", str(ROOT / "recipes/tiny_cpu.yaml"), "--set", f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(lock) in err and err.endswith(f"rm {lock}")


def test_a_recipe_error_on_the_rank_path_is_one_line_on_rank_0_only(tmp_path, monkeypatch, capsys):
    args = ["--recipe", str(ROOT / "recipes/tiny_cpu.yaml"), "--set", "parallel.ep=3"]
    monkeypatch.setenv("RANK", "0")
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe: recipe error: parallel.ep") and len(err.splitlines()) == 1
    monkeypatch.setenv("RANK", "1")
    assert train_main(args) == 2
    assert capsys.readouterr().err == ""


def test_checkpoints_fall_every_save_every_steps_at_stop_at_and_at_the_last_step_unless_turned_off():
    from moe_model.recipe import TrainSection
    from moe_model.train.trainer import checkpoint_due

    def due(**fields):
        train = TrainSection(steps=10, **fields)
        return [step for step in range(1, 11) if checkpoint_due(train, step)]

    assert due() == [10]  # the default: a finished run always has one
    assert due(save_last=False) == []
    assert due(save_every=4) == [4, 8, 10]
    assert due(save_every=4, save_last=False) == [4, 8]
    assert due(save_every=4, stop_at=6, save_last=False) == [4, 6, 8]
