"""Generation through transformers' `generate` against transformers' own Mixtral with the same weights.

transformers' sdist does not ship its GenerationTesterMixin (see tests/transformers_suite.py), so the generation
modes it covers are run here: greedy, sampling, beam search, assisted decoding, the static cache and the dict
outputs. The reference is exact: a silu model is a Mixtral parameter for parameter, so every mode must give the
same tokens, and the scores to float rounding.
"""

import pytest
import torch
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM, StaticCache

from moe_model import MoEConfig, MoEForCausalLM

SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
NEW_TOKENS = 6


def pair(attn_implementation: str = "sdpa", seed: int = 0) -> tuple[MoEForCausalLM, MixtralForCausalLM]:
    torch.manual_seed(seed)
    ours = MoEForCausalLM(MoEConfig(**SHAPE, hidden_act="silu", initializer_range=0.3,
                                    attn_implementation=attn_implementation)).eval()
    theirs = MixtralForCausalLM(MixtralConfig(**SHAPE, sliding_window=None, rope_parameters=ours.config.rope_parameters,
                                              attn_implementation=attn_implementation)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def prompts() -> dict[str, torch.Tensor]:
    """Two prompts, the second left-padded by two (the padding side generation needs)."""
    ids = torch.randint(3, SHAPE["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = SHAPE["pad_token_id"], 0
    return {"input_ids": ids, "attention_mask": mask}


def generate_both(models, seed: int = 0, **kwargs):
    out = []
    for model in models:
        torch.manual_seed(seed)  # sampling draws the same numbers for both
        with torch.no_grad():
            out.append(model.generate(**prompts(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs))
    return out


MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=10, temperature=0.8),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "static_cache": dict(do_sample=False, cache_implementation="static"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_generate_equals_mixtral(mode):
    ours, theirs = generate_both(pair(), **MODES[mode])
    assert ours.shape[1] == prompts()["input_ids"].shape[1] + NEW_TOKENS
    assert torch.equal(ours, theirs)


def test_assisted_decoding_equals_greedy_and_mixtral():
    """Assisted decoding (a second model drafts, the main model verifies) returns greedy's tokens exactly."""
    ours, theirs = pair()
    draft_ours, draft_theirs = pair(seed=1)
    ids = prompts()["input_ids"][:1]  # assisted generation takes one sequence
    with torch.no_grad():
        greedy = ours.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        assisted = ours.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 assistant_model=draft_ours)
        reference = theirs.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                    assistant_model=draft_theirs)
    assert torch.equal(assisted, greedy)
    assert torch.equal(assisted, reference)


def test_dict_outputs_equal_mixtral():
    """`return_dict_in_generate` with scores, logits, hidden states and (eager attention) attention weights."""
    flags = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True,
                 output_hidden_states=True, output_attentions=True)
    ours, theirs = generate_both(pair("eager"), **flags)
    assert torch.equal(ours.sequences, theirs.sequences)
    for name in ("scores", "logits"):
        assert len(getattr(ours, name)) == NEW_TOKENS
        for a, b in zip(getattr(ours, name), getattr(theirs, name)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in ("hidden_states", "attentions"):
        steps_ours, steps_theirs = getattr(ours, name), getattr(theirs, name)
        assert len(steps_ours) == len(steps_theirs) == NEW_TOKENS
        for step_ours, step_theirs in zip(steps_ours, steps_theirs):
            assert len(step_ours) == len(step_theirs) > 0
            for a, b in zip(step_ours, step_theirs):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generation_config_from_the_model_config():
    """A saved model's generation defaults come from its config's special tokens, as for any transformers model."""
    ours, _ = pair()
    assert isinstance(ours.generation_config, GenerationConfig)
    assert (ours.generation_config.bos_token_id, ours.generation_config.eos_token_id,
            ours.generation_config.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize("hidden_act, capacity_factor", [("silu", None), ("gelu", None), ("silu", 1.0)])
def test_forward_compiles_in_one_graph(hidden_act, capacity_factor):
    """`torch.compile(fullgraph=True)` traces a forward without a graph break (routing counts stay on the device;
    dynamo's own backend "eager" runs the captured graph: inductor's code generation adds a minute on 2 cores and
    nothing to what this shows) and gives the uncompiled logits."""
    torch.manual_seed(0)
    config = MoEConfig(**SHAPE, hidden_act=hidden_act, capacity_factor=capacity_factor, min_capacity=1)
    model = MoEForCausalLM(config).eval()
    ids = prompts()["input_ids"]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-6)


def test_static_cache_decode_step_compiles_in_one_graph():
    ours, _ = pair()
    ids = prompts()["input_ids"]
    batch, length = ids.shape
    eager_cache = StaticCache(config=ours.config, max_cache_len=16)
    compiled_cache = StaticCache(config=ours.config, max_cache_len=16)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    prefill = dict(input_ids=ids, use_cache=True, position_ids=torch.arange(length).expand(batch, -1))
    step = dict(input_ids=ids[:, -1:], use_cache=True, position_ids=torch.full((batch, 1), length))
    with torch.no_grad():
        ours(**prefill, cache=eager_cache)
        compiled(**prefill, cache=compiled_cache)
        torch.testing.assert_close(compiled(**step, cache=compiled_cache).logits,
                                   ours(**step, cache=eager_cache).logits, rtol=1e-4, atol=1e-5)
