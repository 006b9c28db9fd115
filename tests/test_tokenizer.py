"""The run's tokenizer: byte and trained BPE round-trip any text, fit the model, are saved loadable, and bad input is
one line naming the field."""

import json

import pytest
from transformers import AutoTokenizer

from moe_model.recipe import RecipeError, recipe_from_dict
from moe_model.train.tokenizer import EOS, byte_tokenizer, resolve_tokenizer, train_bpe

TRICKY = [
    "plain ascii", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n\n", "héllo wörld, naïve café",
    "日本語のテキスト", "emoji 🙂👍🏽 and zero-width\u200bjoiner", "a literal <|endoftext|> inside text",
    "",
    "\x00\x01 control bytes \x7f",
]
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 20, "def f(x):\n    return x + 1\n" * 30,
          "Mixture of experts routes each token to the top-k experts. " * 15]


def recipe(tmp_path, **data):
    return recipe_from_dict({"name": "tok", "model": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 32,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2,
                                                      "num_local_experts": 2, "max_position_embeddings": 64},
                             "train": {"output_dir": str(tmp_path / "run"), "seq_len": 16},
                             "data": {"source": "json", "path": str(tmp_path), **data}})


def test_byte_tokenizer_ids_are_the_utf8_bytes_and_round_trip():
    tok = byte_tokenizer()
    assert len(tok) == 257 and tok.eos_token == EOS and tok.eos_token_id == 256
    for text in TRICKY:
        if EOS in text:
            continue  # the special token itself is matched by the HF wrapper; the data pipeline encodes it as bytes
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == list(text.encode("utf-8")), text
        assert tok.decode(ids) == text


def test_trained_bpe_round_trips_compresses_and_respects_its_size():
    tok = train_bpe(CORPUS, vocab_size=300)
    assert 257 < len(tok) <= 300
    assert tok.convert_ids_to_tokens(0) == EOS
    for text in TRICKY + CORPUS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    sample = CORPUS[0]
    assert len(tok.encode(sample, add_special_tokens=False)) < 0.6 * len(sample.encode())  # merges learned


def test_train_saves_a_loadable_tokenizer_and_reuses_it(tmp_path):
    r = recipe(tmp_path, tokenizer="train", vocab_size=280)
    calls = []

    def texts():
        calls.append(1)
        return iter(CORPUS)

    tok = resolve_tokenizer(r, texts, "fp1")
    saved = tmp_path / "run" / "tokenizer"
    loaded = AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    text = "jumps over the routes"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert len(loaded) == len(tok) <= 280
    assert json.loads((saved / "moe_tokenizer.json").read_text())["vocab_size"] == 280
    resolve_tokenizer(r, texts, "fp1")
    assert calls == [1]  # a restart reuses the saved tokenizer
    resolve_tokenizer(r, texts, "fp2")
    assert calls == [1, 1]  # changed data: trained again
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_local_path_tokenizer_loads_and_must_fit_the_model(tmp_path):
    folder = tmp_path / "my_tokenizer"
    train_bpe(CORPUS, vocab_size=290).save_pretrained(str(folder))
    r = recipe(tmp_path, tokenizer=str(folder))
    tok = resolve_tokenizer(r, lambda: iter(()), "fp")
    assert len(tok) == len(AutoTokenizer.from_pretrained(str(folder)))
    small = recipe_from_dict({**r.model_dump(), "model": {**r.model.model_dump(), "vocab_size": 270}})
    with pytest.raises(RecipeError) as err:
        resolve_tokenizer(small, lambda: iter(()), "fp")
    assert err.value.field == "data.tokenizer" and "set model.vocab_size >=" in str(err.value)


def test_bad_tokenizer_inputs_are_one_line_naming_the_field(tmp_path):
    with pytest.raises(RecipeError) as err:
        recipe(tmp_path, tokenizer=str(tmp_path / "missing"))
    assert err.value.field == "data.tokenizer" and "fix the path" in str(err.value)
    not_a_tokenizer = tmp_path / "empty"
    not_a_tokenizer.mkdir()
    with pytest.raises(RecipeError) as err:
        resolve_tokenizer(recipe(tmp_path, tokenizer=str(not_a_tokenizer)), lambda: iter(()), "fp")
    assert err.value.field == "data.tokenizer" and "\n" not in str(err.value)
    r = recipe_from_dict({**recipe(tmp_path).model_dump(),
                          "model": {**recipe(tmp_path).model.model_dump(), "vocab_size": 256},
                          "data": {"source": "json", "path": str(tmp_path), "tokenizer": "byte"}})
    with pytest.raises(RecipeError) as err:
        resolve_tokenizer(r, lambda: iter(()), "fp")
    assert "257 ids but model.vocab_size is 256" in str(err.value)
    assert not (tmp_path / "run" / "tokenizer").exists()  # nothing written for a refused tokenizer
