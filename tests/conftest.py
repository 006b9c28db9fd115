import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")


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
