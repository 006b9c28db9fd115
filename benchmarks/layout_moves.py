"""One run moved through four layouts (`tests/moves.py`) against the same run uninterrupted on one rank, through
the real launcher on CPU ranks (fp32): the continued losses per launch and every state at the end.

    .venv/bin/python benchmarks/layout_moves.py

Prints one row per launch (the layout change its resume named, its steps, the largest relative loss difference)
and the final states' differences, and writes benchmarks/results/layout_moves.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.moves import MOVES, move_through  # noqa: E402


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        run = move_through(Path(tmp))
    reference = {m["step"]: m for m in run.reference}
    rows, first = [], 1
    for (name, ranks, _, stop_at, changes), _line in zip(MOVES, run.resume_lines):
        last = stop_at or run.moved[-1]["step"]
        steps = [m for m in run.moved if first <= m["step"] <= last]
        worst = max(abs(m["loss"] - reference[m["step"]]["loss"]) / reference[m["step"]]["loss"] for m in steps)
        rows.append({"layout": name, "ranks": ranks, "resumed_with": changes or "(fresh start)",
                     "steps": [first, last], "max_rel_loss_diff": worst})
        first = last + 1
    table = Table(title="one run moved through four layouts vs the same run on 1 rank, uninterrupted (fp32, CPU)")
    for column in ("launch", "layout", "ranks", "changes at resume", "steps", "largest loss diff (rel)"):
        table.add_column(column, justify="right")
    for i, row in enumerate(rows, 1):
        table.add_row(str(i), row["layout"], str(row["ranks"]), row["resumed_with"],
                      f"{row['steps'][0]}-{row['steps'][1]}", f"{row['max_rel_loss_diff']:.1e}")
    Console(width=160).print(table)
    print("final states, largest |moved - uninterrupted| / max |uninterrupted| over every parameter: "
          + ", ".join(f"{k} {v:.1e}" for k, v in run.state_diffs.items()))
    out = ROOT / "benchmarks/results/layout_moves.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"launches": rows, "final_state_max_rel_diff": run.state_diffs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
