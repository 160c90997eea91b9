"""Documentation that is generated stays in step with the code it describes."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_cli_reference_is_up_to_date():
    """docs/cli.md is read off the argument parsers; a new or changed flag without a regenerated file fails."""
    from skeleton_ds.cli import COMMANDS, reference

    text = reference()
    assert (REPO / "docs" / "cli.md").read_text() == text, "docs/cli.md is stale: run python launch/cli_reference.py"
    for name in COMMANDS:
        assert f"## `skeleton-ds {name}`" in text


def test_cli_reference_script_checks_from_a_process():
    result = subprocess.run([sys.executable, "launch/cli_reference.py", "--check"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "up to date" in result.stdout, result.stdout + result.stderr
