"""The GPU and cluster path without a GPU or a cluster: SLURM's variables mapped for torch.distributed, the resume
command in each launcher's terms, CUDA_VISIBLE_DEVICES kept, `.deepspeed_env` reaching DeepSpeed's pdsh command, the
device bound before the first collective (the accelerator stood in), a checkpoint saved on a group that refuses CPU
tensors (as NCCL does), the output lock where flock is refused, and the data prepared by one rank of the run.
The launches themselves (two emulated nodes, srun-style tasks) are tests/test_multinode.py."""

from __future__ import annotations

import errno
import json
import os
import shlex
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_model.errors import UsageError
from moe_model.train import cluster, distributed, ownership

SLURM = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "8", "SLURM_NNODES": "2",
         "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}


@pytest.mark.parametrize("nodelist, first", [("gpu[07-09,12],cpu1", "gpu07"), ("node-a,node-b", "node-a"),
                                             ("single", "single"), ("n[3]", "n3"), ("10.0.0.5", "10.0.0.5")])
def test_first_host_of_a_slurm_host_list(nodelist, first):
    assert cluster.first_host(nodelist) == first


def test_tasks_per_node():
    assert [cluster.tasks_per_node("4(x2),3", n) for n in range(3)] == [4, 4, 3]
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        cluster.tasks_per_node("four", 0)


def test_srun_variables_become_what_torch_distributed_reads():
    env = dict(SLURM)
    assert cluster.adopt_slurm(env)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_SIZE", "MASTER_ADDR")} == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_SIZE": "4", "CROSS_SIZE": "2", "MASTER_ADDR": "gpu07"}
    assert env["MASTER_PORT"] == str(cluster.SLURM_PORT_BASE + 123456 % cluster.SLURM_PORT_SPAN)
    # a launcher of its own inside the allocation (deepspeed, torchrun) already said: nothing changes
    launched = {**SLURM, "RANK": "0", "MASTER_PORT": "29500"}
    assert not cluster.adopt_slurm(launched) and launched["MASTER_PORT"] == "29500" and "LOCAL_SIZE" not in launched
    # MASTER_PORT set in the batch script wins
    assert cluster.adopt_slurm(env := {**SLURM, "MASTER_PORT": "31000"}) and env["MASTER_PORT"] == "31000"


def test_the_resume_command_in_each_launchers_terms():
    sets = ["train.steps=9", "train.overwrite=true", "train.resume=/x"]
    assert cluster.continue_command("r.yaml", sets, 4, {}) == "moe train r.yaml --num-gpus 4 --set train.steps=9"
    launched = {cluster.LAUNCH_COMMAND_ENV: cluster.launch_words(
        ["/v/bin/moe", "train", "r.yaml", "--hostfile", "hosts", "--set", "train.steps=9", "--set=a.b=1", "--verbose"])}
    assert cluster.continue_command("r.yaml", sets, 4, launched) == (
        "moe train r.yaml --hostfile hosts --verbose --set train.steps=9")
    srun = cluster.continue_command("r.yaml", sets, 8, SLURM)
    assert shlex.split(srun)[:5] == ["srun", "--nodes", "2", "--ntasks-per-node", "4"] and srun.endswith(
        "--recipe r.yaml --set train.steps=9")
    nodes = cluster.continue_command("r.yaml", sets, 8, {"CROSS_SIZE": "2", "LOCAL_SIZE": "4"})
    assert nodes.startswith("deepspeed --hostfile HOSTFILE --num_nodes 2 --num_gpus 4 --module moe_model.train.main")


def test_cuda_visible_devices_are_the_ones_the_launch_uses():
    env = {"CUDA_VISIBLE_DEVICES": "2,3,6"}
    assert cluster.local_resources(2, "cuda", env) == ["--include", "localhost:2,3"]
    assert cluster.local_resources(2, "cuda", {}) == ["--num_gpus", "2"]
    assert cluster.local_resources(2, "cpu", env) == ["--num_gpus", "2"]
    with pytest.raises(UsageError, match="CUDA_VISIBLE_DEVICES names 3 GPU"):
        cluster.local_resources(4, "cuda", env)


def test_dp_left_to_the_launch_takes_every_visible_gpu(monkeypatch):
    """seed_4b (ep 8, dp unset) on an 8-GPU node starts 8 ranks, not 1 (which ep 8 refuses)."""
    from moe_model.cli.__init__ import build_parser
    from moe_model.cli.train import launch_shape
    from moe_model.recipe import load_recipe

    from deepspeed.accelerator import get_accelerator

    recipe = load_recipe("recipes/seed_4b.yaml")
    assert recipe.parallel.dp is None
    args = build_parser().parse_args(["train", "recipes/seed_4b.yaml"])
    monkeypatch.setattr(type(get_accelerator()), "device_count", lambda self: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert launch_shape(recipe, args, "cuda") == (8, 8, ["--num_gpus", "8"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert launch_shape(recipe, args, "cuda") == (4, 4, ["--include", "localhost:4,5,6,7"])


def test_deepspeed_env_reaches_the_pdsh_command_of_every_node(tmp_path, monkeypatch):
    """DeepSpeed's own runner, as `moe train --hostfile` starts it over pdsh (its subprocess stood in): the
    variables the ranks need are exported on every node, the user's own .deepspeed_env lines kept."""
    import deepspeed.launcher.multinode_runner as multinode
    import deepspeed.launcher.runner as runner

    home, out = tmp_path / "home", tmp_path / "run"
    home.mkdir(), out.mkdir()
    (home / cluster.ENV_FILE).write_text("NCCL_IB_HCA=mlx5\n")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    env = {"WANDB_MODE": "offline", "MOE_VERBOSE": "1", "HF_HOME": "/data/hf", "DS_ACCELERATOR": "cpu",
           cluster.LAUNCH_COMMAND_ENV: "moe train r.yaml --hostfile hosts", "UNRELATED": "x"}
    path = cluster.write_deepspeed_env(out, env, home=str(home), cwd=str(tmp_path))
    started = []

    class Started:
        returncode = 0

        def __init__(self, cmd, env=None):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setenv("DS_ENV_FILE", path)
    monkeypatch.setattr(runner, "DEEPSPEED_ENVIRONMENT_NAME", path)  # read at import: the runner's own rule
    monkeypatch.setattr(multinode.PDSHRunner, "backend_exists", lambda self: True)
    monkeypatch.setattr(runner.subprocess, "Popen", Started)
    runner.main(["--hostfile", str(hostfile), "--master_addr", "10.0.0.1", "--no_ssh_check", "train.py"])
    command = " ".join(started[0])
    for exported in ("NCCL_IB_HCA=mlx5", "WANDB_MODE=offline", "MOE_VERBOSE=1", "HF_HOME=/data/hf",
                     f'{cluster.LAUNCH_COMMAND_ENV}="moe train r.yaml --hostfile hosts"'):
        assert f"export {exported}" in command, (exported, command)
    assert "UNRELATED" not in command


class FakeAccelerator:
    def __init__(self, events):
        self.events = events

    def device_name(self):
        return "cuda"

    def set_device(self, index):
        self.events.append(("set_device", index))


def test_the_device_is_bound_before_the_first_collective(monkeypatch):
    """On CUDA, cuda:LOCAL_RANK is current before the process group (and so every collective before DeepSpeed's
    engine) exists, and the allocator is told to grow segments; the collective timeout is the recipe's."""
    import deepspeed
    import deepspeed.accelerator

    events = []
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeAccelerator(events))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: events.append(("init", kw["timeout"])))
    monkeypatch.setattr(distributed, "share_cpu_cores", lambda: None)
    monkeypatch.setattr(distributed, "skip_cpu_shm_op", lambda: None)
    monkeypatch.setattr(dist, "barrier", lambda: events.append(("barrier",)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert distributed.init_distributed(timeout_min=45) == (3, 8)
    from datetime import timedelta

    assert events == [("set_device", 3), ("init", timedelta(minutes=45)), ("barrier",)]
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == distributed.CUDA_ALLOC_CONF


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_checkpoint_saves_on_a_group_without_a_cpu_backend(tmp_path, one_rank_group, monkeypatch):
    """An NCCL group has no backend for CPU tensors: a tensor collective on one fails (stood in here by refusing any
    CPU tensor), which stopped every run at its first save after DeepSpeed's files and before the manifest."""
    from moe_model.train import checkpoint

    def nccl_like(name):
        real = getattr(dist, name)

        def refuse(*args, **kwargs):
            tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            if any(t.device.type == "cpu" for t in tensors):
                raise RuntimeError(f"{name}: no backend type associated with device type cpu")
            return real(*args, **kwargs)
        return refuse

    for name in ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor"):
        monkeypatch.setattr(dist, name, nccl_like(name))

    class Engine:
        mpu = None
        checkpoint_engine = None  # DeepSpeed's writer, which `checkpoint.save` guards for the time of the save

        def _copy_recovery_script(self, path):
            pass

        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)
            (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")

    layout = {"tp": 1, "pp": 1, "ep": 1, "dp": 1}
    directory = checkpoint.save(Engine(), tmp_path / "checkpoints", 4, layout, keep=2)
    manifest = checkpoint.read_manifest(directory)
    assert manifest["step"] == 4 and manifest["model_parallel_files"] == {"0": {"pipe": 0, "tp": 0}}
    assert checkpoint.damage(directory) is None


def test_the_data_is_prepared_by_one_rank_of_the_run(tmp_path, monkeypatch):
    """Local rank 0 of node 1 (global rank 2) waits for global rank 0's cache instead of building its own copy in
    the shared folder at the same time."""
    from moe_model.recipe import load_recipe
    from moe_model.train import data

    events = []
    monkeypatch.setattr(data, "describe", lambda recipe: events.append("build") or {"source": "text"})
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: events.append("wait"))
    monkeypatch.setattr(data, "collective_device", lambda: torch.device("cpu"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "a document"}\n')
    recipe = load_recipe("recipes/tiny_cpu.yaml", ["data.source=json", f"data.path={corpus}"])
    assert data.prepare_data(recipe) == (None, {"source": "text"})
    assert events == ["wait", "build"]  # read (cached by rank 0) only after rank 0 finished


def test_a_file_system_that_refuses_flock_gets_an_exclusive_lock_file(tmp_path, monkeypatch):
    def no_flock(f, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(ownership.fcntl, "flock", no_flock)
    first = ownership.OutputLock(tmp_path)
    assert first.acquire() is None
    held = tmp_path / "run.lock.held"
    assert json.loads(held.read_text())["pid"] == os.getpid()
    problem = ownership.OutputLock(tmp_path).acquire()
    assert "in use by another run" in problem and f"rm {held}" in problem and "refuses flock" in problem
    first.release()
    assert not held.exists()
    # left by a killed run of this host (its pid is gone): taken over
    held.write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename, "started": "then"}))
    again = ownership.OutputLock(tmp_path)
    assert again.acquire() is None and json.loads(held.read_text())["pid"] == os.getpid()
    again.release()


def test_tp_stays_inside_the_node_the_launch_really_has(monkeypatch):
    """The rule reads the launch's ranks per node (LOCAL_SIZE), not hardware.gpus_per_node: tp 2 on nodes of 1
    rank would put tensor-parallel peers on two nodes."""
    from moe_model.recipe import load_recipe
    from moe_model.train.main import launch_problem

    recipe = load_recipe("recipes/tiny_cpu.yaml", ["parallel.tp=2", "parallel.pp=1", "parallel.ep=2",
                                                   "parallel.dp=2", "parallel.moe_backend=legacy"])
    monkeypatch.setenv("LOCAL_SIZE", "1")
    field, message = launch_problem(recipe, 4)
    assert field == "parallel.tp" and "one node of 1 GPUs" in message
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert launch_problem(recipe, 4) is None


def test_calibrate_probes_run_cpu_ranks_on_any_machine(monkeypatch):
    """moe calibrate's probes time CPU ranks and exchange CPU tensors: their launch pins DS_ACCELERATOR=cpu, or a
    CUDA machine would start them on NCCL, which refuses CPU tensors."""
    from moe_model.calibrate import machine

    seen = {}

    def run(command, capture_output, text, env):
        seen.update(env)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(machine.subprocess, "run", run)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    machine._run(["true"], "probe")
    assert seen["DS_ACCELERATOR"] == "cpu"
