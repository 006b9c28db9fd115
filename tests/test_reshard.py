"""Resuming on another layout: one run moved through four layouts (tests/moves.py) ends on the uninterrupted run's
losses and states; pieces that cannot fill the model are refused by name."""

import pytest

from moe_model.train import reshard
from tests.moves import MOVES, STEPS, move_through


@pytest.mark.multirank
def test_a_run_moved_through_four_layouts_continues_as_if_uninterrupted(tmp_path, single_rank_run):
    run = move_through(tmp_path, single_rank_run())  # the session's 1-rank run of the same schedule
    for (_, _, _, _, changes), line in zip(MOVES, run.resume_lines):
        if changes:
            assert f"on another layout ({changes}): weights, both Adam moments" in line, line
    assert [m["step"] for m in run.moved] == list(range(1, STEPS + 1))  # the data position: no step twice or skipped
    for a, b in zip(run.reference, run.moved):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a["step"], a["loss"], b["loss"])
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9), a["step"]  # the scheduler's position
    # every state of every parameter (each expert's Adam moments included) equals the uninterrupted run's
    assert max(run.state_diffs.values()) <= 1e-4, run.state_diffs


def test_pieces_that_miss_an_expert_are_refused_by_name(tmp_path):
    """A writer that kept only its own experts (a bug the field has shipped) cannot pass for a whole checkpoint."""
    from safetensors.torch import save_file

    from moe_model.parallel.state_dict_adapter import piece_key, region, seeded_model
    from tests.test_state_dict_adapter import CONFIG

    state = seeded_model(CONFIG, 1).state_dict()
    pieces = {}
    for name, tensor in state.items():
        index = (slice(0, 2),) if name.endswith("experts.down_proj") else ()  # experts 2 and 3 never written
        spans, _ = region(index, tensor.shape)
        for kind in reshard.STATES:
            pieces[piece_key(kind, name, spans)] = tensor[tuple(slice(a, b) for a, b in spans)].clone()
    save_file(pieces, str(tmp_path / "portable_rank00000_000.safetensors"))
    (tmp_path / reshard.STATE_FILE).write_text("{}")
    assert reshard.problem(tmp_path, CONFIG) == (
        "its fp32 pieces hold 768 of the 1536 values of model.layers.0.mlp.experts.down_proj (a rank's piece is "
        "missing, or the checkpoint holds another model)")
    (tmp_path / reshard.STATE_FILE).unlink()
    assert "has no portable_state.json" in reshard.problem(tmp_path, CONFIG)


def test_only_optimizers_whose_states_can_be_read_write_pieces():
    import torch

    class Engine:
        module = torch.nn.Linear(2, 2)

    engine = Engine()
    engine.optimizer = torch.optim.AdamW(engine.module.parameters())  # fp32 at ZeRO-0: it steps the parameters
    assert reshard.serves(engine)

    class FlatMasters:  # fp16 at ZeRO-0 (DeepSpeed's FP16_Optimizer): fp32 masters in a flat group of their own
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(6))])

    engine.optimizer = FlatMasters()
    assert not reshard.serves(engine)
