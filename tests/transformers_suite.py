"""transformers' own common model tests, taken at test time from the installed release's source distribution.

The library gap this fills: transformers publishes its `ModelTesterMixin` (tests/test_modeling_common.py) only in
its sdist, not in the wheel, and no installer puts it on the path. `load("test_modeling_common")` downloads the sdist
of exactly the installed version with pip (once: the extracted tests/ folder is cached under
`$MOE_TRANSFORMERS_TESTS`, default ~/.cache/moe-recipes), and imports it as the package `transformers_tests`.
Nothing of it is copied into this repository.

The sdist leaves out two modules that test_modeling_common.py imports. Each gets a stand-in here with no tests:
- `exporters/test_export.py`: `ExportTesterMixin`, the torch.export tests (the base class of ModelTesterMixin).
- `generation/test_utils.py`: `GenerationTesterMixin`, the generation tests; tests/test_hf_generation.py runs
  greedy, sampling, beam, assisted and static-cache generation against transformers' Mixtral instead.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers
from filelock import FileLock

PACKAGE = "transformers_tests"
VERSION = transformers.__version__
CACHE_ROOT = Path(os.environ.get("MOE_TRANSFORMERS_TESTS", Path.home() / ".cache" / "moe-recipes"))
SUITE = CACHE_ROOT / f"transformers-{VERSION}-tests"

STAND_INS = {
    "exporters/test_export.py": '''"""Stand-in: the sdist does not ship tests/exporters."""


class ExportTesterMixin:
    pass
''',
    "generation/test_utils.py": '''"""Stand-in: the sdist does not ship tests/generation (see test_hf_generation.py)."""


class GenerationTesterMixin:
    pass
''',
}


def _download_sdist(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"transformers=={VERSION}", "-d", str(into)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(into.glob("transformers-*.tar.gz"))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"could not download transformers {VERSION}'s sdist from the package index "
                           f"({' '.join(cmd)}): {result.stderr.strip().splitlines()[-1:] or result.returncode}")
    return found[0]


def _extract_tests(sdist: Path, package_dir: Path) -> None:
    prefix = f"transformers-{VERSION}/tests/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        if not any(m.name == prefix + "test_modeling_common.py" for m in members):
            raise RuntimeError(f"{sdist.name} has no tests/test_modeling_common.py")
        for member in members:
            target = package_dir / member.name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    for relative, text in STAND_INS.items():
        target = package_dir / relative
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    for folder in [package_dir, *(p for p in package_dir.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


def ensure_suite() -> Path:
    """The cached tests folder (its parent goes on sys.path), built once per version by one process at a time and
    moved into place whole, so that a crash or a parallel worker never sees half of it."""
    marker = SUITE / PACKAGE / "test_modeling_common.py"
    if marker.exists():
        return SUITE
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with FileLock(str(SUITE) + ".lock"):
        if marker.exists():
            return SUITE
        with tempfile.TemporaryDirectory(dir=CACHE_ROOT) as tmp:
            staging = Path(tmp) / "suite"
            _extract_tests(_download_sdist(Path(tmp)), staging / PACKAGE)
            shutil.rmtree(SUITE, ignore_errors=True)
            staging.rename(SUITE)
    return SUITE


def load(module: str):
    """Import `transformers_tests.<module>` from the cached sdist tests (downloading them the first time)."""
    root = str(ensure_suite())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{PACKAGE}.{module}")
