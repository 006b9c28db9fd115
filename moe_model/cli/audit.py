"""`moe audit RECIPE`: the findings of estimate/audit.py printed one per line (or as JSON); exit 1 when any claim
is wrong."""

from __future__ import annotations

import argparse
import json

from ..estimate.audit import audit
from ..recipe import Recipe


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.4g}"


def cmd_audit(recipe: Recipe, args: argparse.Namespace) -> int:
    findings = audit(recipe)
    wrong = [f for f in findings if not f["ok"]]
    if getattr(args, "json", False):
        print(json.dumps({"recipe": recipe.name, "findings": findings, "wrong": len(wrong)}, indent=2))
    else:
        if not findings:
            print(f"{recipe.name}: no claims to audit (the recipe has no `claims` section)")
        for f in findings:
            mark = "ok   " if f["ok"] else "WRONG"
            print(f"{mark} {f['claim']}: stated {_number(f['stated'])}, computed {_number(f['computed'])}: {f['why']}")
        print(f"{len(wrong)} of {len(findings)} claims wrong")
    return 1 if wrong else 0
