"""Where a rank runs in the cluster: what its launcher told it, mapped to what torch.distributed reads, and the command
that starts the same run again.

Launchers and the variables each leaves a rank:

| launcher | rank, local rank, world | ranks per node, nodes | master |
|---|---|---|---|
| `deepspeed` (`--hostfile`: pdsh or `--no_ssh`) | RANK, LOCAL_RANK, WORLD_SIZE | LOCAL_SIZE, CROSS_SIZE | MASTER_ADDR/PORT |
| `srun` | SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS | SLURM_TASKS_PER_NODE, SLURM_NNODES | first host of SLURM_JOB_NODELIST |

`adopt_slurm` fills the first row from the second when a rank was started by `srun` alone. The gap it fills:
DeepSpeed's `init_distributed` discovers ranks from its own launcher, from MPI (through mpi4py, which the project does
not install), AzureML and SageMaker, not from SLURM; its `--launcher slurm` runs `srun` itself and so still needs
the `deepspeed` runner on the submitting node. torch's `torchrun` reads no SLURM variable either.

The master port under `srun` is `SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN` unless MASTER_PORT is set: every
task of a job computes the same one with no exchange, and two jobs sharing a node differ unless their ids are
`SLURM_PORT_SPAN` apart (then set MASTER_PORT in the batch script).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, MutableMapping, Sequence

SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: `gpu[07-09,12],cpu1` -> `gpu07`, `node-a,node-b` -> `node-a`.
    (`scontrol show hostnames` expands the whole list, but scontrol is often missing inside a job's container.)"""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a SLURM host list")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def tasks_per_node(spec: str, node: int) -> int:
    """Tasks on node `node` from SLURM_TASKS_PER_NODE (`4(x2),3`: nodes 0 and 1 run 4, node 2 runs 3)."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r} is not a SLURM task count")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[min(node, len(counts) - 1)]


def adopt_slurm(environ: MutableMapping[str, str] | None = None) -> bool:
    """Under `srun` with no launcher of its own (no RANK), set RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, CROSS_SIZE,
    MASTER_ADDR and MASTER_PORT from SLURM's variables (values already set win). Returns whether it did."""
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env or "RANK" in env:
        return False
    mapped = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
        "LOCAL_SIZE": str(tasks_per_node(env.get("SLURM_TASKS_PER_NODE", "1"), int(env.get("SLURM_NODEID", "0")))),
        "CROSS_SIZE": env.get("SLURM_NNODES", "1"),
        "MASTER_ADDR": first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))),
        "MASTER_PORT": str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN),
    }
    for key, value in mapped.items():
        env.setdefault(key, value)
    return True


def local_size(environ: Mapping[str, str] | None = None) -> int | None:
    """Ranks on this rank's node as the launcher started them (LOCAL_SIZE; SLURM's once adopted), or None."""
    env = os.environ if environ is None else environ
    return int(env["LOCAL_SIZE"]) if env.get("LOCAL_SIZE", "").isdigit() else None


def nodes(environ: Mapping[str, str] | None = None) -> int:
    """Nodes of the launch (CROSS_SIZE, which DeepSpeed's launch.py and `adopt_slurm` set), 1 when not said."""
    env = os.environ if environ is None else environ
    return int(env.get("CROSS_SIZE", "1") or 1)


# `moe train` hands its ranks the command line that started it (less its --set overrides, which the ranks have),
# so that the resume line can repeat it
LAUNCH_COMMAND_ENV = "MOE_LAUNCH_COMMAND"


def launch_words(argv: Sequence[str]) -> str:
    """`moe train`'s command line (`argv`, as sys.argv holds it) without its `--set K=V` pairs, for
    `LAUNCH_COMMAND_ENV`."""
    words, skip = ["moe"], False
    for word in argv[1:]:
        if skip:
            skip = False
        elif word == "--set":
            skip = True
        elif not word.startswith("--set="):
            words.append(word)
    return shlex.join(words)


def continue_command(recipe: str, overrides: Sequence[str], world: int | None,
                     environ: Mapping[str, str] | None = None) -> str:
    """The command that continues this run (resume: auto; `train.overwrite`/`train.resume` overrides dropped, they
    would start over), in the launcher's own terms:
    - started by `moe train` (it sets `LAUNCH_COMMAND_ENV`): that command line again, with the kept overrides;
    - under `srun`: the same `srun` over the job's nodes and tasks;
    - by `deepspeed` over several nodes: the same `deepspeed --hostfile` launch (the hostfile is the launcher's, which
      no rank sees);
    - else (one node): `moe train RECIPE --num-gpus WORLD`.
    """
    env = os.environ if environ is None else environ
    kept = [o for o in overrides if not o.replace(" ", "").startswith(("train.overwrite=", "train.resume="))]
    sets = [word for o in kept for word in ("--set", o)]
    if env.get(LAUNCH_COMMAND_ENV):  # `moe train`'s own words less its overrides (`launch_words`)
        words = shlex.split(env[LAUNCH_COMMAND_ENV])
        again = shlex.join([*words, *sets])
        return again + ("  (on every node, each with its own --node-rank)" if "--node-rank" in words else "")
    if "SLURM_PROCID" in env and "SLURM_NNODES" in env:
        per_node = tasks_per_node(env.get("SLURM_TASKS_PER_NODE", "1"), 0)
        return shlex.join(["srun", "--nodes", env["SLURM_NNODES"], "--ntasks-per-node", str(per_node),
                           "python", "-m", "moe_model.train.main", "--recipe", recipe, *sets])
    if nodes(env) > 1:
        per_node = local_size(env) or 1
        return (shlex.join(["deepspeed", "--hostfile"]) + " HOSTFILE " + shlex.join(
            ["--num_nodes", str(nodes(env)), "--num_gpus", str(per_node), "--module", "moe_model.train.main",
             "--recipe", recipe, *sets]) + "  (HOSTFILE: the one this run was started with)")
    command = ["moe", "train", recipe]
    if world:
        command += ["--num-gpus", str(world)]
    return shlex.join([*command, *sets])


# ---------------------------------------------------------------------------------------------------------------
# the launch side (`moe train`)


def visible_devices(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The GPUs CUDA_VISIBLE_DEVICES names (ids or UUIDs, in order), or None when it is unset."""
    env = os.environ if environ is None else environ
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [d.strip() for d in value.split(",") if d.strip()]


def local_resources(ranks: int, accelerator: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The deepspeed launcher's words for `ranks` ranks on this node. On CUDA with CUDA_VISIBLE_DEVICES set,
    `--include localhost:<the first `ranks` of them>`: DeepSpeed's runner drops CUDA_VISIBLE_DEVICES whenever
    `--num_gpus` is passed and then uses GPUs 0..N-1 of the node, someone else's in a shared node. Else
    `--num_gpus N`."""
    devices = visible_devices(environ) if accelerator == "cuda" else None
    if devices:
        if ranks > len(devices):
            from ..errors import UsageError

            raise UsageError(f"--num-gpus {ranks}: CUDA_VISIBLE_DEVICES names {len(devices)} GPU(s) "
                             f"({','.join(devices)}); ask for at most {len(devices)} or widen CUDA_VISIBLE_DEVICES")
        return ["--include", "localhost:" + ",".join(devices[:ranks])]
    return ["--num_gpus", str(ranks)]


def hostfile_slots(path: str) -> dict[str, int]:
    """host -> slots of a DeepSpeed hostfile, read by DeepSpeed's own parser (`runner.fetch_hostfile`); a missing or
    malformed file is one line."""
    from ..errors import UsageError

    if not os.path.isfile(path):
        raise UsageError(f"--hostfile {path}: no such file; write one line per node, 'HOST slots=GPUS'")
    from deepspeed.launcher.runner import fetch_hostfile

    try:
        slots = fetch_hostfile(path)
    except ValueError as err:
        raise UsageError(f"--hostfile {path}: {err}; write one line per node, 'HOST slots=GPUS'") from None
    if not slots:
        raise UsageError(f"--hostfile {path} names no host; write one line per node, 'HOST slots=GPUS'")
    return dict(slots)


# what the ranks of another node must get from `moe train`'s environment: DeepSpeed's pdsh runner forwards only
# NCCL_*, PYTHON*, UCX*, MV2*, MLFLOW* and what `.deepspeed_env` lists
RANK_ENV_PREFIXES = ("MOE_", "WANDB_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "DS_ACCELERATOR", "DEEPSPEED_",
                     "MALLOC_", "OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF", "TORCH_EXTENSIONS_DIR", "CUDA_",
                     "TORCH_NCCL_", "TORCH_DISTRIBUTED_")
ENV_FILE = ".deepspeed_env"


def write_deepspeed_env(folder, env: Mapping[str, str], home: str | None = None, cwd: str = ".") -> str:
    """Write `folder/.deepspeed_env`: the user's own `~/.deepspeed_env` and `./.deepspeed_env` lines (DeepSpeed's
    runner reads those two; they stay first), then every variable of `env` the ranks need (`RANK_ENV_PREFIXES`),
    as KEY=VALUE (the runner quotes a value with spaces itself when it writes pdsh's `export KEY=VALUE;`).
    Returns the file's absolute path, for `DS_ENV_FILE` (the runner joins that name with its two folders, and an
    absolute name wins both joins). Atomic."""
    from pathlib import Path

    lines: list[str] = []
    for base in (home if home is not None else os.path.expanduser("~"), cwd):
        user_file = Path(base) / ENV_FILE
        if user_file.is_file():
            lines += [line.rstrip("\n") for line in user_file.read_text().splitlines() if "=" in line]
    lines += [f"{key}={value}" for key, value in sorted(env.items())
              if key.startswith(RANK_ENV_PREFIXES) and "\n" not in value]
    path = Path(folder).resolve() / ENV_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    return str(path)
