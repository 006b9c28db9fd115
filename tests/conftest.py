import os
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
        if any(Path(w).name == "deepspeed" for w in words[:1]):
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


@pytest.fixture(scope="session")
def single_rank(tmp_path_factory):
    """The 1-rank run of tests/layouts.py's schedule (`STEPS`; the model's own block, no DeepSpeed MoE) per
    micro-batch size, launched once per session: the aux loss is a mean over micro-batches of a per-micro-batch
    statistic, so a layout is compared with the reference of its micro-batch. Returns its metrics."""
    from moe_model.train.tracking import read_metrics
    from tests.launch import SINGLE_RANK, failure, launch
    from tests.layouts import STEPS

    runs = {}

    def metrics(micro_batch: tuple[str, ...] = ()) -> list[dict]:
        if micro_batch not in runs:
            out = tmp_path_factory.mktemp("single")
            result = launch(1, *SINGLE_RANK, *STEPS, f"train.output_dir={out}", *micro_batch)
            assert result.returncode == 0, failure(result)
            runs[micro_batch] = read_metrics(out)
        return runs[micro_batch]

    return metrics


@pytest.fixture(scope="session")
def layout_run(tmp_path_factory):
    """A parity layout of tests/layouts.py trained once per session on `STEPS`; returns its output folder. The
    parity test reads its losses, and the emulated multi-node runs use it as their uninterrupted run."""
    from tests.launch import failure, launch
    from tests.layouts import LAYOUTS, STEPS

    runs = {}

    def run(name: str):
        if name not in runs:
            ranks, *overrides = LAYOUTS[name]
            out = tmp_path_factory.mktemp(name)
            result = launch(ranks, *overrides, *STEPS, f"train.output_dir={out}")
            assert result.returncode == 0, failure(result)
            runs[name] = out
        return runs[name]

    return run
