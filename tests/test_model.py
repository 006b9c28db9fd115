"""The model on its own: dispatch against a per-token reference, capacity, generate, save/load, remote code."""

import math
import subprocess
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_model import MoEConfig, MoEForCausalLM, MoEModel
from moe_model.losses import StepStats, training_loss
from moe_model.modeling import MoESparseBlock, RouterOutput


def reference_moe(block: MoESparseBlock, x_TD: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """Token by token, route by route, with GShard's priority (first choices first) counted by hand."""
    cfg = block.config
    probs = torch.softmax(x_TD @ block.gate.weight.t(), dim=-1)
    top, idx = probs.topk(cfg.num_experts_per_tok, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    taken = [0] * cfg.num_local_experts
    keep = torch.ones_like(idx, dtype=torch.bool)
    for k in range(idx.shape[1]):
        for t in range(idx.shape[0]):
            e = int(idx[t, k])
            keep[t, k] = capacity is None or taken[e] < capacity
            taken[e] += 1
    out = torch.zeros_like(x_TD)
    ex = block.experts
    for t in range(x_TD.shape[0]):
        for k in range(idx.shape[1]):
            if not keep[t, k]:
                continue
            e = int(idx[t, k])
            if ex.gated:
                g, u = (ex.gate_up_proj[e] @ x_TD[t]).chunk(2)
                h = torch.nn.functional.silu(g) * u
            else:
                h = torch.nn.functional.gelu(ex.up_proj[e] @ x_TD[t])
            out[t] += top[t, k] * (ex.down_proj[e] @ h)
    return out


@pytest.mark.parametrize("act", ["gelu", "silu"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_moe_block_equals_per_token_reference(tiny_config_kwargs, act, capacity_factor):
    torch.manual_seed(0)
    cfg = MoEConfig(**tiny_config_kwargs, hidden_act=act, capacity_factor=capacity_factor, min_capacity=1,
                    initializer_range=0.3)
    block = MoEForCausalLM(cfg).model.layers[0].mlp
    x_BSD = torch.randn(2, 13, cfg.hidden_size)
    T = 26
    capacity = None
    if capacity_factor is not None:
        capacity = max(math.ceil(cfg.num_experts_per_tok * capacity_factor * T / cfg.num_local_experts), 1)
    with torch.no_grad():
        y, router = block(x_BSD)
        ref = reference_moe(block, x_BSD.reshape(T, -1), capacity)
    assert (y.reshape(T, -1) - ref).abs().max().item() < 1e-5
    if capacity_factor is not None:  # the case must really drop something, or it proves nothing
        assert int(router.expert_counts_E.max()) > capacity


def test_forward_returns_router_statistics_and_keeps_no_state(tiny_config_kwargs):
    """Expert counts come back in the output (every token's k routes, per layer); no module gains an attribute."""
    torch.manual_seed(7)
    cfg = MoEConfig(**tiny_config_kwargs, router_z_loss_coef=0.01)
    model = MoEForCausalLM(cfg)
    ids = torch.randint(0, 97, (2, 9))
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    out = model(ids, labels=ids, use_cache=False)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes
    held = [f"{name}.{key}" for name, m in model.named_modules() for key, value in vars(m).items()
            if isinstance(value, (torch.Tensor, RouterOutput))]  # parameters and buffers live in their own dicts
    assert held == []
    L, E, K = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
    assert out.expert_counts_LE.shape == (L, E)
    assert out.expert_counts_LE.sum(dim=1).tolist() == [ids.numel() * K] * L
    assert torch.equal(out.loss, training_loss(out.lm_loss, out.aux_loss, out.z_loss, cfg))


def test_step_stats_sum_pack_and_average():
    L, E = 2, 3
    one = StepStats.of(torch.tensor(4.0), torch.tensor(3.0), torch.tensor(1.0), torch.tensor(0.5),
                       torch.arange(L * E).reshape(L, E))
    two = StepStats.total([one, one], L, E)
    assert two.flat().tolist() == [8.0, 6.0, 2.0, 1.0] + [2.0 * v for v in range(L * E)]
    assert StepStats.from_flat(two.flat(), L, E).flat().tolist() == two.flat().tolist()
    mean = two.mean(micro_batches=2, dp=1, tp=2)  # tp ranks hold the same figures: counted once
    assert [mean.loss.item(), mean.lm_loss.item()] == [2.0, 1.5]
    assert mean.expert_counts_LE.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert one.without_expert_counts().flat().tolist() == [4.0, 3.0, 1.0, 0.5]


def test_gelu_parameter_set_is_two_matrices(tiny_config_kwargs):
    model = MoEForCausalLM(MoEConfig(**tiny_config_kwargs, hidden_act="gelu"))
    experts = dict(model.model.layers[0].mlp.experts.named_parameters())
    E, D, I = 4, 32, 48
    assert {k: tuple(v.shape) for k, v in experts.items()} == {"up_proj": (E, I, D), "down_proj": (E, D, I)}


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_generate_with_kv_cache_equals_full_recompute(tiny_config_kwargs):
    torch.manual_seed(3)
    model = MoEForCausalLM(MoEConfig(**tiny_config_kwargs, initializer_range=0.3)).eval()
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13)
    assert torch.equal(out, greedy_without_cache(model, prompt, 8))


def test_generate_left_padded_batch_equals_unpadded(tiny_config_kwargs):
    torch.manual_seed(4)
    model = MoEForCausalLM(MoEConfig(**tiny_config_kwargs, initializer_range=0.3)).eval()
    short = torch.randint(1, 97, (1, 4))
    long = torch.randint(1, 97, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = model.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(together[0, 3:], alone[0])


def test_save_load_round_trip_through_auto_classes(tmp_path, tiny_config_kwargs):
    torch.manual_seed(5)
    model = MoEForCausalLM(MoEConfig(**tiny_config_kwargs, tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "moe_model"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MoEForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_automodel_loads_the_base_model_of_a_saved_causal_lm(tmp_path, tiny_config_kwargs):
    from transformers import AutoModel

    torch.manual_seed(8)
    model = MoEForCausalLM(MoEConfig(**tiny_config_kwargs)).eval()
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is MoEModel
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(model.model(ids).last_hidden_state, base(ids).last_hidden_state)


def test_saved_directory_loads_with_remote_code_without_the_package(tmp_path, tiny_config_kwargs, python):
    torch.manual_seed(6)
    model = MoEForCausalLM(MoEConfig(**tiny_config_kwargs, hidden_act="silu")).eval()
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["moe_model"] = None  # this package is absent: any import of it fails
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("moe_model"), type(model).__module__
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            diff = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
        print("maxdiff", diff)
        assert diff == 0.0
    """)
    env = {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([python, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "maxdiff 0.0" in result.stdout


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config_kwargs):
    torch.manual_seed(7)
    cfg = MoEConfig(**tiny_config_kwargs, initializer_range=0.2)
    plain = MoEForCausalLM(cfg).train()
    ckpt = MoEForCausalLM(cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 97, (2, 12))
    saved = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        count = [0]

        def pack(t, count=count):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss
        saved[name] = count[0]
        loss.backward()
    assert saved["ckpt"] < saved["plain"] / 2, saved  # checkpointing really holds less for backward
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize("bad, message", [
    (dict(hidden_act="relu"), "hidden_act must be one of gelu, silu"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok (9) must not exceed num_local_experts (4)"),
    (dict(num_key_value_heads=3), "must be a multiple of num_key_value_heads (3)"),
    (dict(capacity_factor=0), "capacity_factor must be null"),
])
def test_config_refuses_impossible_shapes(tiny_config_kwargs, bad, message):
    with pytest.raises(ValueError) as err:
        MoEConfig(**{**tiny_config_kwargs, **bad})
    assert message in str(err.value)
