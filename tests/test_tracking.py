"""Tracking: the FLOP count against torch's own counter, metrics.jsonl mirrored in wandb's offline run, the wandb
mode switch, and one 2-rank (2 pipeline stages) training run on a jsonl corpus with a trained tokenizer and
validation loss."""

import json
import struct

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moe_model import MoEConfig, MoEForCausalLM
from moe_model.recipe import recipe_from_dict
from moe_model.train.tracking import Tracker, flops_per_token, read_metrics, throughput_metrics, wandb_scalars
from tests.launch import failure, launch
from tests.test_data import make_docs, write_jsonl


def wandb_records(run_dir):
    """Records of a wandb offline run (its .wandb file: LevelDB log blocks of protobuf records), read here
    independently of wandb's own tooling."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_dir):
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "history"]


@pytest.mark.parametrize("act, tied", [("silu", False), ("gelu", True)])
def test_flops_per_token_matches_torchs_flop_counter(act, tied):
    config = MoEConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                       hidden_act=act, tie_word_embeddings=tied, max_position_embeddings=128)
    model = MoEForCausalLM(config)
    B, S = 2, 96
    ids = torch.randint(512, (B, S))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # MATH: attention as bmm
        model(input_ids=ids, labels=ids).loss.backward()
    counted = counter.get_total_flops() / (B * S)
    predicted = flops_per_token(config, S)
    # torch's math attention computes the masked half of S x S too, which model FLOPs leave out: add it back
    assert predicted["total"] + predicted["attention"] == pytest.approx(counted, rel=0.01)  # rest: norm gains
    assert predicted["attention"] == 6 * 2 * S * 4 * 16


def test_throughput_and_wandb_flattening():
    m = throughput_metrics(tokens_per_s=1e4, per_token_flops=6e9, world_size=4, peak_tflops=400)
    assert m["tflops_per_gpu"] == pytest.approx(15.0) and m["mfu"] == pytest.approx(15.0 / 400)
    flat = wandb_scalars({"step": 3, "loss": 1.5, "per_layer": [1, 2], "matrix": [[1, 2]], "none": None})
    assert flat == {"step": 3, "loss": 1.5, "per_layer/0": 1, "per_layer/1": 2}


def tracker_recipe(tmp_path, mode):
    return recipe_from_dict({"name": "track", "model": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
                                                        "num_hidden_layers": 1, "num_attention_heads": 2,
                                                        "num_local_experts": 2},
                             "train": {"output_dir": str(tmp_path)}, "tracking": {"wandb": {"mode": mode}}})


def test_wandb_mode_env_wins_over_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(tracker_recipe(tmp_path, "offline"), {"recipe": {}}, enabled=True)
    tracker.log({"step": 1, "loss": 2.0})
    tracker.finish()
    assert tracker.run is None and not (tmp_path / "wandb").exists()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    recipe = tracker_recipe(tmp_path, "offline")
    first = Tracker(recipe, {"recipe": {}}, enabled=True)
    first.log({"step": 1, "loss": 2.0})
    first.finish()
    run_id = (tmp_path / Tracker.ID_FILE).read_text().strip()
    assert first.run.id == run_id and run_id in first.where()
    resumed = Tracker(recipe, {"recipe": {}}, enabled=True, resume=True)
    resumed.log({"step": 2, "loss": 1.0})
    resumed.finish()
    assert resumed.run.id == run_id
    parts = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # one folder per start, `offline-run-<time>-<id>` (`wandb sync` joins them into one run); wandb adds `-1` to the
    # second when both started in the same second
    assert len(parts) == 2 and all(p.name.split("-")[3] == run_id for p in parts)
    fresh = Tracker(recipe, {"recipe": {}}, enabled=True)  # a run that starts over (resume: never) starts a new one
    fresh.finish()
    assert fresh.run.id != run_id and (tmp_path / Tracker.ID_FILE).read_text().strip() == fresh.run.id


@pytest.mark.multirank
def test_two_ranks_train_a_jsonl_corpus_with_its_own_tokenizer_and_validation(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_docs(300, seed=5), field="text")
    out = tmp_path / "run"
    # two pipeline stages: the pipeline engine's evaluation path and its carried expert loads
    result = launch(2, f"data.path={corpus}", "data.vocab_size=300", "train.steps=6", "train.warmup_steps=1",
                    "train.log_every=2", "train.eval_every=3", "train.eval_batches=1", "train.seq_len=64",
                    "parallel.pp=2", "parallel.ep=1", "parallel.dp=1", f"train.output_dir={out}",
                    recipe="recipes/tiny_text.yaml")
    assert result.returncode == 0, failure(result)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [2, 3, 4, 6]  # logged every 2 steps and at every evaluation
    assert [("val_loss" in m) for m in metrics] == [False, True, False, True]
    run = json.loads((out / "run.json").read_text())
    assert {"recipe", "deepspeed", "layout", "data", "estimate", "flops_per_token"} <= set(run)
    assert run["layout"]["pp"] == 2 and run["estimate"]["gpus"] == 2
    tokens_per_step = 8 * 64
    for m in metrics:
        # dropless top-2: every layer routes each token of the step exactly twice
        assert [sum(row) for row in m["expert_tokens"]] == [2 * tokens_per_step] * 4
        assert m["expert_tokens_max_per_layer"] == [max(row) for row in m["expert_tokens"]]
        assert m["experts_without_tokens_per_layer"] == [row.count(0) for row in m["expert_tokens"]]
        assert m["tflops_per_gpu"] == pytest.approx(
            run["flops_per_token"]["total"] * m["tokens_per_s"] / 2 / 1e12)
        assert m["mfu"] == pytest.approx(m["tflops_per_gpu"] / 400.0) and m["memory_peak_gb"] > 0.05
        assert "memory_reserved_peak_gb" not in m and "device_memory_used_gb" not in m  # CUDA-only keys
    # the device the ranks ran on: DeepSpeed's accelerator (cpu here), named in run.json and the header
    assert run["device"] == {"kind": "cpu", "name": "CPU ranks (gloo)", "memory_bytes": None,
                             "known_peak_tflops": None} and run["memory_metric"] == "peak RSS (ru_maxrss)"
    assert "moe: tiny-text: 2 CPU ranks (gloo), tp1 pp2" in result.stderr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert 257 < len(tokenizer) <= 300 and run["data"]["vocab_size"] == len(tokenizer)
    history = wandb_history(out)
    assert [h["loss"] for h in history] == [m["loss"] for m in metrics]  # metrics.jsonl mirrors wandb
    assert [h.get("val_loss") for h in history] == [m.get("val_loss") for m in metrics]
    assert history[-1]["expert_tokens_max_per_layer/3"] == metrics[-1]["expert_tokens_max_per_layer"][3]
    (config_record,) = [r.run.config for r in wandb_records(out) if r.WhichOneof("record_type") == "run"]
    assert {"recipe", "deepspeed", "layout", "estimate", "data"} <= {item.key for item in config_record.update}
