"""The one deepspeed command builder and its environment; `moe train --verbose` hands MOE_VERBOSE=1 to the ranks;
every user error derives from one base that the CLI turns into one line and exit 2."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from moe_model.cli import main as moe
from moe_model.errors import LaunchError, MetricsError, UsageError, UserError
from moe_model.launch import deepspeed_command, free_port, rank_env
from moe_model.recipe import RecipeError
from moe_model.report.run import ReportError
from moe_model.train.export import ExportError

ROOT = Path(__file__).resolve().parents[1]


def test_the_command_line_of_a_script_and_of_a_module():
    command = deepspeed_command(4, "scripts/train.py", ["--recipe", "r.yaml"], overrides=("a=1", "b=2"),
                                master_port=29999)
    assert Path(command[0]).name == "deepspeed"
    assert command[1:] == ["--num_gpus", "4", "--master_port", "29999", "scripts/train.py", "--recipe", "r.yaml",
                           "--set", "a=1", "--set", "b=2"]
    command = deepspeed_command(2, "moe_model.train.main", module=True)
    assert command[1:3] == ["--num_gpus", "2"] and command[5:] == ["--module", "moe_model.train.main"]
    assert int(command[4]) > 0


def test_free_port_is_free():
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_rank_env():
    base = {"PATH": "/bin"}
    assert rank_env(base=base) == base
    assert rank_env(verbose=True, threads=3, base=base, WANDB_MODE="disabled") == {
        "PATH": "/bin", "MOE_VERBOSE": "1", "OMP_NUM_THREADS": "3", "WANDB_MODE": "disabled"}


@pytest.mark.parametrize("verbose", [False, True])
def test_moe_train_passes_verbose_to_the_ranks(tmp_path, monkeypatch, capsys, verbose):
    started = {}

    def call(command, env):
        started.update(command=command, env=env)
        return 0

    monkeypatch.delenv("MOE_VERBOSE", raising=False)
    monkeypatch.setattr("moe_model.cli.train.subprocess.call", call)
    args = ["train", str(ROOT / "recipes/tiny_cpu.yaml"), "--set", f"train.output_dir={tmp_path / 'run'}"]
    assert moe(args + (["--verbose"] if verbose else [])) == 0
    assert started["command"][started["command"].index("--module") + 1] == "moe_model.train.main"
    assert ("MOE_VERBOSE" in started["env"]) is verbose
    assert "+ " in capsys.readouterr().err  # the command it started is shown


def test_every_user_error_derives_from_one_base():
    for kind in (RecipeError, ExportError, ReportError, UsageError, LaunchError, MetricsError):
        assert issubclass(kind, UserError), kind
    assert issubclass(RecipeError, ValueError)  # as before: callers that catch ValueError still do
