"""`moe audit RECIPE`: the findings and consistency checks of estimate/audit.py printed one per line (or as JSON:
`findings` and `consistency`, each entry with `claim, stated, computed, ok, why` and the reading it used, and the
counts `right`, `wrong`, `inconsistent`); exit 1 when any claim is wrong, the layout is refused or the plan
contradicts itself."""

from __future__ import annotations

import argparse
import json

from ..estimate.audit import audit_report
from ..recipe import Recipe


def _number(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.4g}"


def cmd_audit(recipe: Recipe, args: argparse.Namespace) -> int:
    report = audit_report(recipe)
    findings, checks = report["findings"], report["consistency"]
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    else:
        if not findings and not checks:
            print(f"{recipe.name}: no claims to audit (the recipe has no `claims` section)")
            return 0
        for f in findings:
            mark = "right" if f["ok"] else "WRONG"
            print(f"{mark} {f['claim']}: stated {_number(f['stated'])}, computed {_number(f['computed'])}: {f['why']}")
        if checks:
            print("the plan's figures against each other:")
        for f in checks:
            mark = "agree" if f["ok"] else "CLASH"
            print(f"{mark} {f['claim']}: stated {_number(f['stated'])}, implied {_number(f['computed'])}: "
                  f"{f['why']}")
        claims = [f for f in findings if f["claim"] != "layout"]
        print(f"{len(claims)} claims: {sum(f['ok'] for f in claims)} right, {sum(not f['ok'] for f in claims)} wrong"
              + ("; the layout is refused" if report["layout_refused"] else "")
              + (f"; {report['inconsistent']} of {len(checks)} consistency checks fail" if checks else ""))
    return 1 if report["wrong"] or report["inconsistent"] else 0
