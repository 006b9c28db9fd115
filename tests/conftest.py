import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def tiny_config_kwargs():
    """A model small enough for CPU tests that still has GQA, several experts and top-2."""
    return dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


@pytest.fixture
def python():
    return sys.executable
