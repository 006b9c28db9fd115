import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
# the suite runs CPU ranks (gloo, fp32) on any machine, also one with GPUs, where DeepSpeed would pick NCCL for the
# ranks the tests start (they inherit this); make gpu-check is the GPU's check
os.environ["DS_ACCELERATOR"] = "cpu"


class _UnmarkedLaunch(subprocess.Popen):
    """A Popen that refuses to start the deepspeed launcher: installed for tests without the `multirank` mark, so
    `make test-fast` (`-m "not multirank"`) can never start ranks by accident."""

    def __init__(self, args, *rest, **kwargs):
        words = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
        if any(Path(w).name == "deepspeed" for w in words[:1]) or "deepspeed.launcher.launch" in words[:4]:
            raise AssertionError("this test starts deepspeed ranks: mark it @pytest.mark.multirank")
        super().__init__(args, *rest, **kwargs)


@pytest.fixture(autouse=True)
def _ranks_only_in_multirank_tests(request, monkeypatch):
    if request.node.get_closest_marker("multirank") is None:
        monkeypatch.setattr(subprocess, "Popen", _UnmarkedLaunch)


@pytest.fixture
def tiny_config_kwargs():
    """A model small enough for CPU tests that still has GQA, several experts and top-2."""
    return dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


@pytest.fixture
def python():
    return sys.executable


# the files whose tests chain several launches (one to three minutes each on 2 cores): started first
CHAINED_LAUNCHES = ("test_reshard.py", "test_gpu_check.py", "test_faults_run.py", "test_faults_cluster.py",
                    "test_multinode.py", "test_checkpoints.py")


def pytest_collection_modifyitems(items):
    """Tests that start ranks first, those of `CHAINED_LAUNCHES` before the rest (in collection order otherwise):
    with `make test`'s workers (pytest-xdist) the quick tests then fill the last minutes instead of one long chain
    ending alone. Only the order changes."""
    def order(item) -> int:
        if item.get_closest_marker("multirank") is None:
            return 2
        return 0 if item.path.name in CHAINED_LAUNCHES else 1
    items.sort(key=order)  # a stable sort


def _shared_root(tmp_path_factory) -> Path:
    """One folder for every worker of this session: pytest-xdist gives each worker a base temp folder inside the
    session's (popen-gwN), plain pytest its own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _launched_once(tmp_path_factory, key: str, ranks: int, overrides: tuple[str, ...],
                   recipe: str = "recipes/tiny_cpu.yaml") -> Path:
    """Train `recipe` with `overrides` on `ranks` ranks once per session, whichever worker asks first (the others
    wait on its lock and reuse the folder); returns the run's output folder."""
    from filelock import FileLock

    from tests.launch import failure, launch

    out = _shared_root(tmp_path_factory) / "shared-runs" / key
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        done = out.parent / f"{key}.done"
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a failed attempt's folder
            result = launch(ranks, *overrides, f"train.output_dir={out}", recipe=recipe)
            assert result.returncode == 0, failure(result)
            done.touch()
    return out


@pytest.fixture(scope="session")
def single_rank_run(tmp_path_factory):
    """The 1-rank run of tests/layouts.py's schedule (`STEPS`; the model's own block, no DeepSpeed MoE) per
    micro-batch size, launched once per session, with its last step's checkpoint (`REFERENCE_SAVE`: the run moved
    through layouts, tests/test_reshard.py, is held to its states). Returns its output folder."""
    from tests.layouts import REFERENCE_SAVE, SINGLE_RANK, STEPS

    def run(micro_batch: tuple[str, ...] = ()) -> Path:
        key = "single" + "".join("-" + o.rsplit(".", 1)[-1] for o in micro_batch)
        return _launched_once(tmp_path_factory, key, 1, (*SINGLE_RANK, *STEPS, *REFERENCE_SAVE, *micro_batch))

    return run


@pytest.fixture(scope="session")
def single_rank(single_rank_run):
    """The metrics of `single_rank_run`: the aux loss is a mean over micro-batches of a per-micro-batch statistic,
    so a layout is compared with the reference of its micro-batch."""
    from moe_model.train.tracking import read_metrics

    return lambda micro_batch=(): read_metrics(single_rank_run(micro_batch))


@pytest.fixture(scope="session")
def layout_run(tmp_path_factory):
    """A parity layout of tests/layouts.py trained once per session on `STEPS`; returns its output folder. The
    parity test reads its losses, and the emulated multi-node runs and the ZeRO-3 kill-and-resume use it as their
    uninterrupted run."""
    from tests.layouts import LAYOUTS, STEPS

    def run(name: str) -> Path:
        ranks, *overrides = LAYOUTS[name]
        return _launched_once(tmp_path_factory, name, ranks, (*overrides, *STEPS))

    return run


@pytest.fixture(scope="session")
def family_single_rank_run(tmp_path_factory):
    """The 1-rank run of recipes/tiny_<family>.yaml on tests/layouts.py's schedule (`STEPS`), launched once per
    session per family: the reference of that family's parity rows. Returns its output folder."""
    from tests.layouts import SINGLE_RANK, STEPS

    return lambda kind: _launched_once(tmp_path_factory, f"family-{kind}", 1, (*SINGLE_RANK, *STEPS),
                                       recipe=f"recipes/tiny_{kind}.yaml")
