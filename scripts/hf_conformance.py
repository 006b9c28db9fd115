"""transformers' own common model tests: the model (both expert activations) against transformers' Mixtral.

    .venv/bin/python scripts/hf_conformance.py

Runs tests/test_hf_common.py with MIXTRAL_RESULTS=1 (Mixtral in the same harness), reads pytest's JUnit report and
prints the counts per class and every test whose outcome (passed, skipped, failed) is not the same for all three,
with its skip reason. Exit 1
where a test that passes for Mixtral fails for the model.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("TestMixtral", "TestModelGelu", "TestModelSilu")


def outcomes(report: Path) -> dict[str, dict[str, str]]:
    """test name -> class -> "passed" | "failed" | "skipped: <reason>" (a test with skipped subtests passed)."""
    table: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped: " + child.get("message", "")
        table[case.get("name")][case.get("classname").rsplit(".", 1)[-1]] = outcome
    return table


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        env = dict(os.environ, MIXTRAL_RESULTS="1")
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_hf_common.py",
                        f"--junitxml={report}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=False)
        table = outcomes(report)
    counts = collections.Counter((cls, result.split(":")[0]) for row in table.values() for cls, result in row.items())
    print("| class | tests | passed | skipped | failed |\n|---|---|---|---|---|")
    for cls in CLASSES:
        total = sum(n for (c, _), n in counts.items() if c == cls)
        print(f"| {cls} | {total} | {counts[cls, 'passed']} | {counts[cls, 'skipped']} | {counts[cls, 'failed']} |")
    print("\n| test | Mixtral | model, gelu | model, silu |\n|---|---|---|---|")
    worse = 0
    for name, row in sorted(table.items()):
        cells = [row.get(cls, "-") for cls in CLASSES]
        if len({cell.split(":")[0] for cell in cells}) > 1:  # the outcomes differ (reasons name their class)
            print(f"| {name} | " + " | ".join(cells) + " |")
        worse += row.get("TestMixtral") == "passed" and "failed" in cells[1:]
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
