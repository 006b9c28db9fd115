"""Aux-loss-free balancing under transformers' Trainer: `ScoreBiasCallback` moves the score bias after every
optimizer step by DeepSeek-V3's rule (section 2.1.2), from the step's routes summed over its micro-batches.

The reference runs the same micro-batches through the model by hand, sums `expert_counts_LE` over each step's two,
and applies the sign rule written out here (not `routing.bias_update`). Learning rate 0: only the bias moves.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from moe_model import MoEConfig, MoEForCausalLM, ScoreBiasCallback

RATE, STEPS, ACCUMULATE, BATCH, SEQ = 0.01, 3, 2, 2, 12


def glm_like(rate: float = RATE) -> MoEForCausalLM:
    """Sigmoid scoring, score bias, two expert groups (one kept), a shared expert, a dense first layer, no aux loss."""
    config = MoEConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                       num_hidden_layers=3, num_attention_heads=4, num_local_experts=8, num_experts_per_tok=2,
                       dense_layers=[0], num_shared_experts=1, router_scoring="sigmoid", router_score_bias=True,
                       n_group=2, topk_group=1, routed_scaling_factor=2.5, router_aux_loss_coef=0.0,
                       router_bias_update_rate=rate)
    torch.manual_seed(0)
    return MoEForCausalLM(config)


def rows(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (count, SEQ), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def biases(model: torch.nn.Module) -> torch.Tensor:
    return torch.stack([b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")])


def train(model: torch.nn.Module, data: list[dict], tmp_path, callbacks=(), evaluate: bool = False,
          gradient_checkpointing: bool = False) -> list[torch.Tensor]:
    """The biases after each of the STEPS optimizer steps (micro-batches in the data's order)."""
    after: list[torch.Tensor] = []

    class Record(TrainerCallback):  # runs after the callbacks under test
        def on_step_end(self, args, state, control, **kwargs):
            after.append(biases(model).clone())

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=4, gradient_accumulation_steps=ACCUMULATE, max_steps=STEPS,
                             learning_rate=0.0, lr_scheduler_type="constant", train_sampling_strategy="sequential",
                             eval_strategy="steps" if evaluate else "no", eval_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", activation_checkpointing=gradient_checkpointing,
                             seed=0)
    Trainer(model=model, args=args, train_dataset=data, eval_dataset=rows(8, seed=2) if evaluate else None,
            callbacks=[*callbacks, Record()]).train()
    return after


def reference(data: list[dict]) -> list[torch.Tensor]:
    """The biases after each step, by hand: counts summed over the step's micro-batches, then the sign rule."""
    model = glm_like().train()
    bias_LE = torch.zeros_like(biases(model))
    after = []
    for step in range(STEPS):
        for layer, b in enumerate(n for n, _ in model.named_buffers() if n.endswith("e_score_correction_bias")):
            model.get_buffer(b).copy_(bias_LE[layer])
        counts_LE = torch.zeros(bias_LE.shape, dtype=torch.int64)
        for micro in range(ACCUMULATE):
            first = (step * ACCUMULATE + micro) * BATCH
            ids_BS = torch.stack([row["input_ids"] for row in data[first:first + BATCH]])
            with torch.no_grad():
                counts_LE += model(ids_BS).expert_counts_LE
        assert counts_LE.sum() == ACCUMULATE * BATCH * SEQ * 2 * counts_LE.shape[0]  # every route, each step
        mean_L1 = counts_LE.double().sum(dim=1, keepdim=True) / counts_LE.shape[1]
        below, above = counts_LE < mean_L1, counts_LE > mean_L1  # an idle expert moves up, a busy one down
        bias_LE = bias_LE + torch.where(below, RATE, torch.where(above, -RATE, 0.0)).float()
        after.append(bias_LE.clone())
    return after


@pytest.mark.parametrize("variant", ["plain", "with eval every step", "gradient checkpointing", "peft lora"])
def test_the_callback_moves_the_bias_as_the_rule_on_each_steps_summed_routes(tmp_path, variant):
    data = rows(STEPS * ACCUMULATE * BATCH, seed=1)
    model = glm_like()
    if variant == "peft lora":  # the router wrapped by LoRA (zero-initialised: the same routes), the model by PEFT
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["gate", "q_proj"]))
    got = train(model, data, tmp_path, [ScoreBiasCallback()], evaluate=variant.startswith("with eval"),
                gradient_checkpointing=variant == "gradient checkpointing")
    want = reference(data)
    assert len(got) == STEPS
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32
        assert torch.equal(g, w), (step, g, w)
    assert want[-1].abs().sum() > 0 and not torch.equal(want[0], want[-1])  # it moved, and not only once


def test_without_the_callback_trainer_leaves_the_bias_at_zero(tmp_path):
    """The gap the callback fills: Trainer itself never applies router_bias_update_rate."""
    model = glm_like()
    got = train(model, rows(STEPS * ACCUMULATE * BATCH, seed=1), tmp_path)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in got)


def test_at_rate_0_it_warns_once_and_leaves_the_bias_as_it_is(tmp_path):
    model = glm_like(rate=0.0)
    start = torch.randn(biases(model).shape)
    for layer, name in enumerate(n for n, _ in model.named_buffers() if n.endswith("e_score_correction_bias")):
        model.get_buffer(name).copy_(start[layer])
    with pytest.warns(UserWarning, match="ScoreBiasCallback: the score bias stays as it is") as caught:
        got = train(model, rows(STEPS * ACCUMULATE * BATCH, seed=1), tmp_path, [ScoreBiasCallback()])
    assert sum("ScoreBiasCallback" in str(w.message) for w in caught) == 1
    assert all(torch.equal(g, start) for g in got)


def test_a_model_without_moe_layers_is_refused_at_train_begin():
    with pytest.raises(ValueError, match="no moe_model MoEModel"):
        ScoreBiasCallback().on_train_begin(None, None, None, model=torch.nn.Linear(2, 2))


def test_under_torch_distributed_the_update_follows_the_counts_summed_over_ranks(monkeypatch):
    """The step's counts are all-reduced before the rule: here a stand-in for a second rank whose routes all went to
    expert 0 makes expert 0 the busiest of every layer, whatever this rank routed."""
    model = glm_like().train()
    reduced = []

    def all_reduce(counts_LE):  # the sum over this rank and one whose 10**6 routes all chose expert 0
        reduced.append(counts_LE.dtype)
        counts_LE[:, 0] += 10**6

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    callback = ScoreBiasCallback()
    callback.on_train_begin(None, None, None, model=model)
    model(torch.randint(0, 64, (BATCH, SEQ)))
    callback.on_step_end(None, None, None, model=model)
    assert reduced == [torch.int64]
    assert (biases(model)[:, 0] == -RATE).all() and (biases(model)[:, 1:] == RATE).all()
