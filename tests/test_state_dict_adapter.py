"""The state-dict adapter: every rank's share read by name and slice, from the seed or a Hugging Face folder."""

import pytest
import torch

from moe_model import MoEConfig, MoEForCausalLM
from moe_model.parallel import Layout, build_model
from moe_model.parallel.state_dict_adapter import (PieceSource, SafetensorsSource, SeededInit, Shard, global_name,
                                                   global_shapes, materialize, piece_key, region, seeded_model,
                                                   shard_of)

CONFIG = MoEConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, hidden_act="silu",
                   initializer_range=0.05, pad_token_id=0)


def test_seeded_init_draws_any_part_the_same_whoever_draws_it():
    shapes = global_shapes(CONFIG)
    init = SeededInit(CONFIG, 7, shapes)
    experts = "model.layers.1.mlp.experts.gate_up_proj"
    whole = init.read(experts, ())
    assert whole.shape == shapes[experts]
    for e in range(4):
        assert torch.equal(init.read(experts, (e,)), whole[e])  # one stream per expert
    assert torch.equal(init.read(experts, (slice(2, 4),)), whole[2:4])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(init.read(q, (slice(8, 16),)), init.read(q, ())[8:16])
    assert not torch.equal(init.read(q, ()), SeededInit(CONFIG, 8, shapes).read(q, ()))  # the seed matters
    assert not torch.equal(whole[0], whole[1])  # experts differ
    assert torch.equal(init.read("model.norm.weight", ()), torch.ones(16))
    assert torch.all(init.read("model.embed_tokens.weight", ())[0] == 0)  # the padding row
    std = init.read("model.embed_tokens.weight", ())[1:].std().item()
    assert 0.04 < std < 0.06


def test_one_rank_build_from_the_seed_is_the_seeded_model():
    with torch.device("meta"):
        meta = MoEForCausalLM(CONFIG)
    built = build_model(meta, Layout(1, 1, 1, 1), source=SeededInit(CONFIG, 3, global_shapes(CONFIG))).module
    reference = seeded_model(CONFIG, 3)
    assert not any(p.is_meta for p in built.parameters())
    for (name, a), (_, b) in zip(built.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_shards_name_the_slice_each_rank_holds():
    shapes = global_shapes(CONFIG)
    args = dict(global_shapes=shapes, num_layers=2, ep=2)
    # pipeline keys: 0 embedding, 1..L layers, L+1 head
    assert global_name("2.layer.self_attn.o_proj.weight", True, 2) == "model.layers.1.self_attn.o_proj.weight"
    assert global_name("3.lm_head.weight", True, 2) == "lm_head.weight"
    assert global_name("3.norm.weight", True, 2) == "model.norm.weight"
    # tp: q rows and o columns of tp rank 1 of 2
    q = shard_of("model.layers.0.self_attn.q_proj.weight", torch.Size([8, 16]), pipelined=False, tp_rank=1,
                 ep_rank=0, autoep=False, **args)
    assert q == Shard("model.layers.0.self_attn.q_proj.weight", (slice(8, 16),))
    o = shard_of("model.layers.0.self_attn.o_proj.weight", torch.Size([16, 8]), pipelined=False, tp_rank=1,
                 ep_rank=0, autoep=False, **args)
    assert o == Shard("model.layers.0.self_attn.o_proj.weight", (slice(None), slice(8, 16)))
    # legacy DeepSpeed MoE: local expert 1 of ep rank 1 is global expert 3; its router is the block's gate
    legacy = shard_of("model.layers.1.mlp.moe.deepspeed_moe.experts.deepspeed_experts.1.down_proj",
                      torch.Size([16, 24]), pipelined=False, tp_rank=0, ep_rank=1, autoep=False, **args)
    assert legacy == Shard("model.layers.1.mlp.experts.down_proj", (3,))
    gate = shard_of("1.layer.mlp.moe.deepspeed_moe.gate.wg.weight", torch.Size([4, 16]), pipelined=True,
                    tp_rank=0, ep_rank=1, autoep=False, **args)
    assert gate == Shard("model.layers.0.mlp.gate.weight")
    # the AutoEP block: all E experts allocated, only this rank's read (AutoEP copies no others)
    autoep = shard_of("model.layers.0.mlp.moe.experts.gate_up_proj", torch.Size([4, 48, 16]), pipelined=False,
                      tp_rank=0, ep_rank=1, autoep=True, **args)
    assert autoep == Shard("model.layers.0.mlp.experts.gate_up_proj", (slice(2, 4),), fill=slice(2, 4))
    # AutoEP's layer (after deepspeed.initialize): w1 the gate rows, w3 the up rows of this rank's experts
    w3 = shard_of("model.layers.0.mlp.moe.experts.w3", torch.Size([2, 24, 16]), pipelined=False, tp_rank=0,
                  ep_rank=1, autoep=True, **args)
    assert w3 == Shard("model.layers.0.mlp.experts.gate_up_proj", (slice(2, 4), slice(24, 48)))
    w2 = shard_of("1.layer.mlp.moe.experts.w2", torch.Size([2, 16, 24]), pipelined=True, tp_rank=0, ep_rank=0,
                  autoep=True, **args)
    assert w2 == Shard("model.layers.0.mlp.experts.down_proj", (slice(0, 2),))
    router = shard_of("model.layers.1.mlp.moe.router.gate.weight", torch.Size([4, 16]), pipelined=False, tp_rank=0,
                      ep_rank=1, autoep=True, **args)
    assert router == Shard("model.layers.1.mlp.gate.weight")
    with pytest.raises(ValueError, match="no known part"):
        shard_of("model.norm.weight", torch.Size([8]), pipelined=False, tp_rank=0, ep_rank=0, autoep=False, **args)


@pytest.mark.parametrize("shard_size", [None, "20KB"], ids=["one_file", "sharded"])
def test_a_hugging_face_folder_is_read_slice_by_slice(tmp_path, shard_size):
    model = seeded_model(CONFIG, 5)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard_size)
    source = SafetensorsSource(tmp_path)
    state = model.state_dict()
    experts = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(source.read(experts, (3,)), state[experts][3])
    assert torch.equal(source.read(experts, (slice(2, 4),)), state[experts][2:4])
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(source.read(k, (slice(4, 8),)), state[k][4:8])
    o = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(source.read(o, (slice(None), slice(8, 16))), state[o][:, 8:16])
    with torch.device("meta"):
        meta = MoEForCausalLM(CONFIG)
    loaded = build_model(meta, Layout(1, 1, 1, 1), source=source).module
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_materialize_fills_only_the_rows_a_shard_names():
    block = torch.nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        block.weight.fill_(-1.0)

    class Ones:
        def read(self, name, index):
            return torch.ones(4, 3)[index]

    materialize(block, {"weight": Shard("w", (slice(1, 3),), fill=slice(1, 3))}, Ones())
    assert block.weight[1:3].eq(1).all() and block.weight[[0, 3]].eq(-1).all()


def test_a_hub_format_mixtral_folder_loads_into_the_model(tmp_path):
    """transformers writes Mixtral one tensor per expert under the Hub's names (block_sparse_moe.experts.<e>.w1/w3/w2):
    read expert by expert into the stacked parameters, the model computes Mixtral's logits."""
    from transformers import MixtralForCausalLM

    from moe_model.formats import mixtral_config, model_fields

    torch.manual_seed(0)
    mixtral = MixtralForCausalLM(mixtral_config(CONFIG)).eval()
    mixtral.save_pretrained(tmp_path)
    source = SafetensorsSource(tmp_path)
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in source.names()
    config = MoEConfig(**model_fields(tmp_path))
    assert config.hidden_act == "silu" and config.router_aux_loss_coef == pytest.approx(CONFIG.router_aux_loss_coef)
    experts = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(source.read(experts, (2,)), mixtral.state_dict()[experts][2])
    assert torch.equal(source.read(experts, (slice(1, 3),)), mixtral.state_dict()[experts][1:3])
    with torch.device("meta"):
        meta = MoEForCausalLM(config)
    model = build_model(meta, Layout(1, 1, 1, 1), source=source).module.eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert (model(ids).logits - mixtral(ids).logits).abs().max().item() < 1e-5


def test_allocating_keeps_what_deepspeed_marked_on_a_parameter():
    with torch.device("meta"):
        block = torch.nn.Linear(3, 4, bias=False)
    block.weight.allreduce, block.weight.group_name = False, "ep_size_2"
    materialize(block, {"weight": Shard("w")}, type("Zeros", (), {"read": lambda self, n, i: torch.zeros(4, 3)})())
    assert not block.weight.is_meta and block.weight.allreduce is False and block.weight.group_name == "ep_size_2"


def write_pieces(path, state, name, whole, indices):
    """`whole[index]` for each index, as pieces of one file (what a rank of some layout writes)."""
    from safetensors.torch import save_file

    pieces = {}
    for index in indices:
        spans, _ = region(index, whole.shape)
        pieces[piece_key(state, name, spans)] = whole[tuple(slice(a, b) for a, b in spans)].contiguous()
    save_file(pieces, str(path))


def test_pieces_of_one_layout_give_any_slice_of_another(tmp_path):
    name = "model.layers.0.mlp.experts.gate_up_proj"  # [4 experts, 48, 16]
    shapes = {name: torch.Size([4, 48, 16])}
    whole = torch.randn(shapes[name])
    # written by AutoEP on ep 2: each rank's gate rows (w1) and up rows (w3) of its two experts, in two files
    write_pieces(tmp_path / "a.safetensors", "exp_avg", name, whole, [(slice(0, 2), slice(0, 24)),
                                                                      (slice(0, 2), slice(24, 48))])
    write_pieces(tmp_path / "b.safetensors", "exp_avg", name, whole, [(slice(2, 4), slice(0, 24)),
                                                                      (slice(2, 4), slice(24, 48))])
    source = PieceSource(sorted(tmp_path.glob("*.safetensors")), "exp_avg", shapes)
    # read by the legacy layer on ep 4 (one expert), by a 1-rank layout (all), by an odd slice across pieces
    assert torch.equal(source.read(name, (3,)), whole[3])
    assert torch.equal(source.read(name, ()), whole)
    assert torch.equal(source.read(name, (slice(1, 3), slice(20, 30))), whole[1:3, 20:30])
    with pytest.raises(LookupError, match="fp32 pieces hold 0 of"):  # another state's pieces are not this one's
        PieceSource(sorted(tmp_path.glob("*.safetensors")), "fp32", shapes).read(name, (0,))


def test_a_missing_piece_is_named_never_filled_with_zeros(tmp_path):
    name = "model.layers.0.mlp.experts.down_proj"
    shapes = {name: torch.Size([4, 16, 24])}
    whole = torch.randn(shapes[name])
    write_pieces(tmp_path / "rank0.safetensors", "fp32", name, whole, [(slice(0, 2),)])  # rank 1's experts lost
    source = PieceSource([tmp_path / "rank0.safetensors"], "fp32", shapes)
    assert torch.equal(source.read(name, (1,)), whole[1])
    with pytest.raises(LookupError, match=r"hold 768 of the 1536 values of .*down_proj.*a rank's piece is missing"):
        source.read(name, (slice(0, 4),))
