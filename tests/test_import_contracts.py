"""The import contracts (.importlinter) hold, and the checker catches a function-local breach.

Imports follow the data flow in one direction (docs/architecture.md); a GPU worker must not
load catalogue or report code. CI also runs ``lint-imports`` in scripts/check.sh; this test
keeps the same guarantee in the suite a developer runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the test extra (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), str(tree / ".importlinter"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_tree_keeps_every_import_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_function_local_import_against_the_flow_is_caught(tmp_path: Path) -> None:
    """A model module reaching the catalogue inside a function still breaks the contracts."""
    for package in ("node", "pipelines"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    victim = tmp_path / "pipelines" / "model" / "heads.py"
    victim.write_text(
        victim.read_text()
        + "\n\ndef _sneaky() -> None:\n    from node.catalogue.db import Catalogue  # noqa\n"
    )
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "pipelines.model.heads -> node.catalogue.db" in result.stdout
