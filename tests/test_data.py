"""Corpus data: documents through `datasets`, the train/validation split, the token cache, packing and the
(step, micro-batch, data rank) addressing that makes batches independent of dp and of restarts."""

import json
import math
import os
import random

import pytest
import torch

from moe_model.recipe import RecipeError, recipe_from_dict
from moe_model.train.corpus import documents, prepare
from moe_model.train.data import Permutation, StepBatches, describe, prepare_data

EOS = 256  # the byte tokenizer's EOS id


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["expert", "router", "token", "layer", "naïve", "données", "🙂", "pipeline", "stage", "grad"]
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) for i in range(n)]


def write_jsonl(path, docs, field="body"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def make_recipe(tmp_path, path, seq_len=32, **data):
    return recipe_from_dict({
        "name": "data-test",
        "model": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_local_experts": 2, "max_position_embeddings": 10240},
        "parallel": {"micro_batch_size": 2},
        "train": {"global_batch_size": 8, "seq_len": seq_len, "output_dir": str(tmp_path / "run"), "seed": 7},
        "data": {"source": "json", "path": str(path), "text_field": "body", "tokenizer": "byte",
                 "validation_fraction": 0.1, **data}})


def is_validation(i: int, f: float) -> bool:
    return math.floor((i + 1) * f) > math.floor(i * f)


def byte_stream(docs):
    out = []
    for d in docs:
        out += list(d.encode()) + [EOS]
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_permutation_is_a_bijection(n):
    assert sorted(Permutation(n, key=3)(i) for i in range(n)) == list(range(n))


def test_permutation_shuffles_and_depends_on_the_key():
    a, b = [Permutation(1000, key=k) for k in (1, 2)]
    assert [a(i) for i in range(1000)] != list(range(1000))
    assert [a(i) for i in range(1000)] != [b(i) for i in range(1000)]
    with pytest.raises(IndexError):
        a(1000)


def test_cache_holds_each_split_as_documents_followed_by_eos(tmp_path):
    docs = make_docs(60)
    recipe = make_recipe(tmp_path, write_jsonl(tmp_path / "c.jsonl", docs))
    cache = prepare(recipe)
    train = [d for i, d in enumerate(docs) if not is_validation(i, 0.1)]
    validation = [d for i, d in enumerate(docs) if is_validation(i, 0.1)]
    assert len(validation) == 6
    assert cache.tokens("train").tolist() == byte_stream(train)
    assert cache.tokens("validation").tolist() == byte_stream(validation)
    assert cache.meta["documents"] == {"train": 54, "validation": 6}


def test_an_epoch_visits_every_window_once_and_the_next_epoch_reshuffles(tmp_path):
    docs = make_docs(60)
    recipe = make_recipe(tmp_path, write_jsonl(tmp_path / "c.jsonl", docs))
    stream = byte_stream([d for i, d in enumerate(docs) if not is_validation(i, 0.1)])
    S = recipe.train.seq_len
    windows = [tuple(stream[k * S:(k + 1) * S]) for k in range(len(stream) // S)]
    source = StepBatches(recipe, 1, 0).source
    n = len(windows)
    epoch0 = [tuple(source.sample(g).tolist()) for g in range(n)]
    epoch1 = [tuple(source.sample(g).tolist()) for g in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(windows) == sorted(epoch1)
    assert epoch0 != windows and epoch0 != epoch1


def test_every_dp_sees_the_same_samples_per_step_and_a_restart_sees_the_same_batches(tmp_path):
    recipe = make_recipe(tmp_path, write_jsonl(tmp_path / "c.jsonl", make_docs(80)))

    def step_samples(dp, step):
        return sorted(tuple(s.tolist()) for r in range(dp) for mb in StepBatches(recipe, dp, r).micro_batches(step)
                      for s in mb)

    for step in (0, 3, 40):  # 40 lies past the first epoch
        one = step_samples(1, step)
        assert len(one) == recipe.train.global_batch_size and len(set(one)) == len(one)
        assert one == step_samples(2, step) == step_samples(4, step)
    running = StepBatches(recipe, 2, 1)
    seen = [running.micro_batches(s) for s in range(6)]
    restarted = StepBatches(recipe, 2, 1)  # a fresh process resuming at step 5
    assert all(torch.equal(a, b) for a, b in zip(seen[5], restarted.micro_batches(5), strict=True))
    assert [mb.shape for mb in seen[0]] == [torch.Size([2, 32])] * 2  # accumulation = 8 / (2 x 2)


def test_validation_batches_are_held_out_documents(tmp_path):
    docs = make_docs(60)
    recipe = make_recipe(tmp_path, write_jsonl(tmp_path / "c.jsonl", docs))
    val_stream = byte_stream([d for i, d in enumerate(docs) if is_validation(i, 0.1)])
    batch = StepBatches(recipe, 1, 0, split="validation").micro_batches(0)
    S = recipe.train.seq_len
    n = len(val_stream) // S
    count = recipe.train.eval_batches * recipe.train.global_batch_size  # 16 samples an evaluation, spread evenly
    assert n > count
    expected = [val_stream[(k * n // count) * S:(k * n // count + 1) * S] for k in range(8)]
    assert [s.tolist() for mb in batch for s in mb] == expected


def test_long_sequences_pack_across_documents(tmp_path):
    docs = ["x" * 7000, "y" * 7000, "z" * 7000]
    recipe = make_recipe(tmp_path, write_jsonl(tmp_path / "c.jsonl", docs), seq_len=10240,
                         validation_fraction=0.0)
    summary = describe(recipe)
    assert summary["sequences"]["train"] == 2  # 21003 tokens -> two windows of 10240
    window = StepBatches(recipe, 1, 0).source.sample(0)
    assert window.shape == (10240,) and (window == EOS).sum() >= 1  # a window spans a document boundary
    too_long = make_recipe(tmp_path, write_jsonl(tmp_path / "short.jsonl", ["tiny"] * 3), seq_len=10240,
                           validation_fraction=0.0, max_documents=2)
    with pytest.raises(RecipeError) as err:
        describe(too_long)
    assert err.value.field == "train.seq_len" and "fewer than one sequence of 10240" in str(err.value)


def test_cache_is_reused_until_the_corpus_changes(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(30))
    recipe = make_recipe(tmp_path, path)
    first = prepare(recipe)
    stamp = (first.folder / "train.bin").stat().st_mtime_ns
    again = prepare(recipe)
    assert again.folder == first.folder and (again.folder / "train.bin").stat().st_mtime_ns == stamp
    write_jsonl(path, make_docs(31))
    changed = prepare(recipe)
    assert changed.folder != first.folder and changed.meta["documents"]["train"] > first.meta["documents"]["train"]


def test_text_folders_and_parquet_files_are_read_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    (folder / "sub" / "b.md").write_text("third paragraph")
    (folder / "ignored.csv").write_text("not,text")
    recipe = make_recipe(tmp_path, folder, source="text", text_field="text", validation_fraction=0.0)
    assert [t for _, t in documents(recipe)] == ["first paragraph\nstill first", "second paragraph\n",
                                                 "third paragraph"]
    pq.write_table(pa.table({"content": ["alpha", "beta", "gamma"], "n": [1, 2, 3]}), tmp_path / "p.parquet")
    recipe = make_recipe(tmp_path, tmp_path / "p.parquet", source="parquet", text_field="content",
                         validation_fraction=0.5)
    assert list(documents(recipe)) == [("train", "alpha"), ("validation", "beta"), ("train", "gamma")]


def test_bad_corpora_are_one_line_naming_the_field_and_leave_nothing_behind(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(5), field="content")
    with pytest.raises(RecipeError) as err:
        prepare(make_recipe(tmp_path, path, tokenizer="train"))
    assert err.value.field == "data.text_field" and "fields: content, id" in str(err.value)
    (tmp_path / "broken.jsonl").write_text('{"body": "fine"}\n{"body": \n')
    with pytest.raises(RecipeError) as err:
        prepare(make_recipe(tmp_path, tmp_path / "broken.jsonl"))
    assert err.value.field == "data.path" and "\n" not in str(err.value)
    write_jsonl(tmp_path / "numbers.jsonl", [1, 2])
    with pytest.raises(RecipeError) as err:
        prepare(make_recipe(tmp_path, tmp_path / "numbers.jsonl"))
    assert err.value.field == "data.text_field" and "holds int" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RecipeError) as err:
        prepare(make_recipe(tmp_path, empty))
    assert err.value.field == "data.path" and "holds no .json/.jsonl files" in str(err.value)
    run = tmp_path / "run"
    assert not (run / "tokenizer").exists()  # the failed BPE was never saved
    assert not (run / "data_cache").exists() or not list((run / "data_cache").iterdir())
    error, summary = prepare_data(make_recipe(tmp_path, path))  # what every rank gets before training
    assert error.startswith("data.text_field:") and summary == {}


def test_hub_dataset_offline_is_one_clear_line(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    recipe = make_recipe(tmp_path, tmp_path, source="hub", name="wikitext", subset="wikitext-2-raw-v1",
                         text_field="text")
    with pytest.raises(RecipeError) as err:
        prepare(recipe)
    assert err.value.field == "data.name" and "cannot open hub dataset 'wikitext'" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_local_corpus_is_prepared_without_asking_the_hub(tmp_path, monkeypatch):
    import socket

    import datasets.config

    lookups = []

    def unreachable(host, *args, **kwargs):  # a network where the hub never answers
        lookups.append(host)
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    path = write_jsonl(tmp_path / "corpus.jsonl", make_docs(60), field="text")
    prepare(make_recipe(tmp_path, path, text_field="text"))
    assert lookups == []  # datasets' download-count ping to S3 is not sent for local files
    assert datasets.config.HF_HUB_OFFLINE is False  # and a hub source in the same process is left as it was


def test_a_killed_cache_build_leaves_nothing_the_next_build_keeps(tmp_path):
    """A build killed mid-way leaves `.<key>.tmp-<host>-<pid>/`; the next build on the host removes it once its
    process is gone, and leaves a live build's and another host's alone (whether that one lives cannot be told)."""
    import shutil
    import socket
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "c.jsonl", make_docs(30))
    recipe = make_recipe(tmp_path, path)
    folder = prepare(recipe).folder
    shutil.rmtree(folder)  # as if the first build had been killed before moving its folder into place
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    host = socket.gethostname()
    stale, live, elsewhere = (folder.with_name(f".{folder.name}.tmp-{h}-{p}")
                              for h, p in ((host, dead), (host, os.getppid()), ("other-node", dead)))
    for tmp in (stale, live, elsewhere):
        tmp.mkdir()
        (tmp / "train.bin").write_bytes(b"x" * 1000)
    rebuilt = prepare(recipe)
    assert rebuilt.folder == folder and (folder / "meta.json").is_file()
    assert not stale.exists() and live.exists() and elsewhere.exists()
