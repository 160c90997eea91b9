"""The tree passes the linter its pyproject.toml configures (ruff: pyflakes, pycodestyle at 120 columns,
bugbear, pyupgrade), so a slip fails CI where review would miss it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    beside = Path(sys.executable).with_name("ruff")  # the venv's own, pinned by the [test] extra
    found = str(beside) if beside.is_file() else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: `pip install -e .[test]` (launch/setup.sh) installs it")
    return found


def test_tree_passes_ruff():
    run = subprocess.run([_ruff(), "check", "--no-cache", "--output-format", "concise", "."], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"ruff found problems (fix them, or `ruff check --fix .`):\n{run.stdout}{run.stderr}"
