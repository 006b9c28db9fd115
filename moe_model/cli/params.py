"""`moe params RECIPE`: exact parameter counts of the recipe's model (estimate/params.py)."""

from __future__ import annotations

import argparse
import json

from ..recipe import Recipe


def cmd_params(recipe: Recipe, args: argparse.Namespace) -> int:
    from ..estimate import count_params

    counts = count_params(recipe.moe_config())
    if args.json:
        print(json.dumps({"recipe": recipe.name, "params": counts.as_dict()}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    m = recipe.moe_config()
    extra = (f", dense FFN {m.intermediate_size} in layers {m.dense_layers}" if m.dense_layers else "") + \
        (f", shared FFN {m.shared_width}" if m.shared_width else "")
    table = Table(title=f"{recipe.name}: parameters", caption=(
        f"{m.num_hidden_layers} layers, {len(m.moe_layers)} of them MoE x {m.num_local_experts} experts "
        f"({m.hidden_act}), hidden {m.hidden_size}, expert FFN {m.expert_width}{extra}, top-{m.num_experts_per_tok}, "
        f"vocab {m.vocab_size}"))
    table.add_column("count")
    table.add_column("parameters", justify="right")
    table.add_column("", justify="right")
    for name, value in counts.as_dict().items():
        table.add_row(name, f"{value:,}", f"{value / 1e9:.3f} B")
    Console().print(table)
    return 0
