"""The parallel layouts whose losses must equal one rank's: one catalog for the parity tests
(tests/test_parallel_layouts.py) and the parity table (benchmarks/layout_parity.py).

Each entry: name -> (ranks, recipe overrides on recipes/tiny_cpu.yaml). tiny_cpu's experts are gated (silu), so
`moe_backend: auto` runs DeepSpeed's AutoEP wherever ep > 1 and tp = 1, and the legacy layer with tp > 1; a name says
which backend runs ("autoep" exactly when the DeepSpeed config carries an `expert_parallel` section).
"""

SINGLE_RANK = ("parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.dp=null")
# the schedule of every parity run; DeepSpeed's WarmupCosineLR runs its first two steps at lr 0: 7 steps give 5 real
# updates
LAST_STEP = 7
# (no last-step checkpoint, `train.save_last`: the parity runs compare losses only, and a 4-rank save with its
# portable pieces costs about as much as the 7 steps; a test that resumes or compares states states its saves)
STEPS = (f"train.steps={LAST_STEP}", "train.warmup_steps=2", "train.log_every=1", "tracking.wandb.mode=disabled",
         "train.save_last=false")
# the 1-rank reference keeps its last step's checkpoint: the run moved through layouts (tests/moves.py) is held to
# every state in it
REFERENCE_SAVE = ("train.save_last=true",)

LAYOUTS = {
    "ep1_autoep": (1, *SINGLE_RANK, "parallel.moe_backend=autoep"),  # AutoEP's grouped experts, no exchange
    "dp2_ep2_zero1_autoep": (2, "parallel.tp=1", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2"),
    "dp2_ep2_zero3_autoep": (2, "parallel.tp=1", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2",
                             "parallel.zero_stage=3"),
    # dp 4 needs micro-batches of 2 for tiny_cpu's global batch of 8: compared with the 1-rank run at micro-batch 2
    "dp4_ep2_zero3_autoep_mb2": (4, "parallel.tp=1", "parallel.pp=1", "parallel.ep=2", "parallel.dp=4",
                                 "parallel.zero_stage=3", "parallel.micro_batch_size=2"),
    "pp2_dp2_ep2_zero1_ckpt_autoep": (4, "parallel.tp=1", "parallel.pp=2", "parallel.ep=2", "parallel.dp=2",
                                      "parallel.activation_checkpointing=true"),
    # ZeRO-0 fp32: the engine's own clip (`clip_keeping_norm`) must count every stage and expert once
    "pp2_dp2_ep2_zero0_legacy": (4, "parallel.tp=1", "parallel.pp=2", "parallel.ep=2", "parallel.dp=2",
                                 "parallel.zero_stage=0", "parallel.moe_backend=legacy"),
    "tp2_dp2_ep2_zero2_legacy": (4, "parallel.tp=2", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2",
                                 "parallel.zero_stage=2"),
    "tp2_pp2_dp2_ep2_zero1_legacy": (8, "parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.dp=2"),
}


def micro_batch_overrides(overrides) -> tuple[str, ...]:
    """The overrides a layout's 1-rank reference shares with it: its micro-batch size (the aux loss is a mean over
    micro-batches of a per-micro-batch statistic)."""
    return tuple(o for o in overrides if o.startswith("parallel.micro_batch_size="))
