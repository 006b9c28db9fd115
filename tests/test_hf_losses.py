"""The training loss as Hugging Face clients see it, against transformers' own references: the exported Mixtral's
loss (router term included), transformers' Trainer under gradient accumulation, and the aux loss of a padded batch."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM, Trainer, TrainingArguments
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moe_model import MoEConfig, MoEForCausalLM
from moe_model.formats import mixtral_config


def tiny(tiny_config_kwargs, **changes) -> MoEForCausalLM:
    torch.manual_seed(0)
    config = MoEConfig(**{**tiny_config_kwargs, "hidden_act": "silu", "initializer_range": 0.2,
                          "router_aux_loss_coef": 0.5, **changes})
    return MoEForCausalLM(config)


def exported_mixtral(ours: MoEForCausalLM) -> MixtralForCausalLM:
    """What `moe export --format mixtral` writes: formats.mixtral_config and the same tensors."""
    theirs = MixtralForCausalLM(mixtral_config(ours.config))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs


def test_the_exported_mixtrals_training_loss_is_the_models(tiny_config_kwargs):
    """One MoE layer: Mixtral's loss with its router term (output_router_logits) equals the model's. Before the fix
    the export multiplied the coefficient by k where Mixtral's aux is already k times this model's: a router term
    k^2 = 4 times too large."""
    ours = tiny(tiny_config_kwargs, num_hidden_layers=1).eval()
    theirs = exported_mixtral(ours).eval()
    ids = torch.randint(0, ours.config.vocab_size, (3, 13))
    with torch.no_grad():
        a = ours(ids, labels=ids)
        b = theirs(ids, labels=ids, output_router_logits=True)
    ours_router, theirs_router = (a.loss - a.lm_loss).item(), (b.loss - _lm(b, ids)).item()
    assert ours_router > 0.1  # large enough to see a wrong coefficient
    assert theirs_router == pytest.approx(ours_router, rel=1e-5)
    assert abs(a.loss.item() - b.loss.item()) < 1e-5, (a.loss.item(), b.loss.item())


def _lm(out, ids) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))


def test_with_several_layers_the_one_difference_is_mixtrals_pooling(tiny_config_kwargs):
    """Mixtral pools every layer's routes into one load-balancing loss; the model averages one per layer. The
    exported loss differs by exactly that (formats.py states it), nothing else."""
    ours = tiny(tiny_config_kwargs).eval()
    theirs = exported_mixtral(ours).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 11))
    with torch.no_grad():
        a = ours(ids, labels=ids, output_router_logits=True)
        b = theirs(ids, labels=ids, output_router_logits=True)
    E, k = ours.config.num_local_experts, ours.config.num_experts_per_tok
    pooled = load_balancing_loss_func(a.router_logits, E, k)  # transformers' own function, all layers at once
    assert abs(b.loss.item() - (a.lm_loss + theirs.config.router_aux_loss_coef * pooled).item()) < 1e-5
    assert theirs.config.router_aux_loss_coef == pytest.approx(ours.config.router_aux_loss_coef / k)


def test_a_hub_mixtral_imported_trains_with_its_own_router_term(tmp_path, tiny_config_kwargs):
    """transformers' own Mixtral (coefficient 0.3, one MoE layer) read by `formats.model_fields`: the model built
    from those fields, on the same tensors, has Mixtral's training loss. Before the fix the coefficient was divided
    by k where it must be multiplied: a balance weight k^2 too small."""
    from transformers import MixtralConfig

    from moe_model.formats import model_fields

    shape = {k: v for k, v in tiny_config_kwargs.items() if k != "max_position_embeddings"}
    torch.manual_seed(3)
    theirs = MixtralForCausalLM(MixtralConfig(**{**shape, "num_hidden_layers": 1}, router_aux_loss_coef=0.3,
                                              initializer_range=0.2, sliding_window=None)).eval()
    theirs.save_pretrained(tmp_path)
    ours = MoEForCausalLM(MoEConfig(**model_fields(tmp_path))).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ids = torch.randint(0, ours.config.vocab_size, (3, 13))
    with torch.no_grad():
        a = ours(ids, labels=ids)
        b = theirs(ids, labels=ids, output_router_logits=True)
    assert ours.config.router_aux_loss_coef == pytest.approx(0.3 * ours.config.num_experts_per_tok)
    assert abs(a.loss.item() - b.loss.item()) < 1e-5, (a.loss.item(), b.loss.item())


def trainer_update(model: MoEForCausalLM, rows: list[dict], batch: int, accumulate: int, tmp_path) -> dict:
    """The weights' change after one Trainer step of `batch` x `accumulate` rows (SGD, constant lr: the update is
    the gradient, nothing normalises a wrong scale away)."""
    model = MoEForCausalLM(model.config)
    model.load_state_dict(torch.load(tmp_path / "start.pt"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / f"t{batch}x{accumulate}"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulate, max_steps=1, learning_rate=0.1, optim="sgd",
                             lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             dataloader_drop_last=True, seed=0)
    Trainer(model=model, args=args, train_dataset=rows).train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", ["rows of different lengths, no router term", "equal rows, router term"])
def test_trainer_at_4x2_moves_the_weights_as_1x8(tmp_path, tiny_config_kwargs, case):
    """Trainer passes num_items_in_batch and leaves the loss undivided (the model accepts loss kwargs). Rows of
    different label counts check the per-token weighting; equal rows (every micro-batch the same, so its router
    statistic is the whole batch's) check the router term's share. Before the fix: 4.000x at 4 steps."""
    different = case.startswith("rows")
    model = tiny(tiny_config_kwargs, router_aux_loss_coef=0.0 if different else 0.5)
    torch.save(model.state_dict(), tmp_path / "start.pt")
    torch.manual_seed(1)
    rows = []
    for i in range(8):
        ids = torch.randint(0, model.config.vocab_size, (12,)) if different or i == 0 else rows[0]["input_ids"]
        labels = ids.clone()
        if different:
            labels[12 - i:] = -100  # 12 .. 5 target tokens
        rows.append({"input_ids": ids, "labels": labels})
    one = trainer_update(model, rows, 8, 1, tmp_path)
    four = trainer_update(model, rows, 2, 4, tmp_path)
    ratio = (sum(d.norm() ** 2 for d in four.values()) / sum(d.norm() ** 2 for d in one.values())).sqrt().item()
    assert ratio == pytest.approx(1.0, abs=1e-4), ratio
    for name in one:
        assert torch.allclose(one[name], four[name], rtol=1e-4, atol=1e-7), name


def test_the_aux_loss_of_a_padded_batch_with_its_mask_is_the_unpadded_ones(tiny_config_kwargs):
    """Right padding leaves the real tokens' routes as they are (causal attention), so with the mask the aux loss is
    the unpadded batch's; and each layer's equals transformers' Mixtral's masked figure divided by k."""
    model = tiny(tiny_config_kwargs).eval()
    ids = torch.randint(1, model.config.vocab_size, (2, 9))
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones(2, 9), torch.zeros(2, 4)], dim=1).long()
    with torch.no_grad():
        plain = model(ids)
        masked = model(padded, attention_mask=mask, output_router_logits=True)
        unmasked = model(padded)
    assert abs(masked.aux_loss.item() - plain.aux_loss.item()) < 1e-6
    assert abs(unmasked.aux_loss.item() - plain.aux_loss.item()) > 1e-4  # the padding changes it when counted
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    per_layer = [load_balancing_loss_func((logits,), E, k, mask) / k for logits in masked.router_logits]
    assert abs(masked.aux_loss.item() - (sum(per_layer) / len(per_layer)).item()) < 1e-6
