"""PEFT's LoRA on the model: attention and the router as targets, trained, merged, saved and reloaded."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from moe_model import MoEConfig, MoEForCausalLM

SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
TARGETS = ["q_proj", "v_proj", "gate"]


def lora_model(seed: int = 0):
    torch.manual_seed(seed)
    base = MoEForCausalLM(MoEConfig(**SHAPE, hidden_act="silu"))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))


def test_lora_reaches_the_router_and_trains_only_its_adapters():
    model = lora_model()
    adapted = {name.rsplit(".", 1)[0] for name, _ in model.named_modules() if name.endswith(".lora_A")}
    assert sum(name.endswith("mlp.gate") for name in adapted) == SHAPE["num_hidden_layers"]
    assert sum(name.endswith("self_attn.q_proj") for name in adapted) == SHAPE["num_hidden_layers"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in frozen.items())
    router_adapters = [n for n in trainable if "mlp.gate.lora_" in n]
    assert router_adapters and all(not torch.equal(params[n], trainable[n]) for n in router_adapters)


def test_merged_and_reloaded_adapters_give_the_adapted_logits(tmp_path):
    model = lora_model().eval()
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        base = model.get_base_model()
        with model.disable_adapter():
            plain = base(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-3  # the adapters (random, not zero-initialised) change the output
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(MoEForCausalLM(MoEConfig(**SHAPE, hidden_act="silu")), tmp_path / "adapter")
    merged = reloaded.merge_and_unload().eval()
    assert type(merged) is MoEForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
