"""How a parallel strategy reads in tables and documents (`moe plan`'s tables, docs/seed_plan_review.md)."""

from __future__ import annotations


def describe(parallel: dict) -> str:
    """`tp2 pp1 ep4 dp8 ZeRO-1 mb2 ckpt on autoep` for a `parallel` dict of `moe plan --json`'s candidates (the MoE
    backend last, where the mapping has one)."""
    p = parallel
    backend = f" {p['moe_backend']}" if p.get("moe_backend") else ""
    return (f"tp{p['tp']} pp{p['pp']} ep{p['ep']} dp{p['dp']} ZeRO-{p['zero_stage']} mb{p['micro_batch_size']} "
            f"ckpt {'on' if p['activation_checkpointing'] else 'off'}{backend}")
