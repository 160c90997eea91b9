"""The provenance record every result JSON carries: which code, command, libraries, device and date."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO
from skeleton_ds.provenance import FIELDS, missing_fields, provenance


def test_record_names_code_command_libraries_device_and_date():
    record = provenance("skeleton-ds bench --shape tiny")
    assert missing_fields({"provenance": record}) == []
    assert set(FIELDS) <= set(record)
    assert record["command"] == "skeleton-ds bench --shape tiny"
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    assert record["code_version"] == git.stdout.strip()  # this checkout's commit (and -dirty if edited)
    assert record["libraries"]["torch"] is not None and "deepspeed" in record["libraries"]
    assert record["device"]["cpu_cores"] >= 1


def test_outside_a_checkout_the_package_version_names_the_code(tmp_path):
    """A copy of the package without .git beside it (as in an installed wheel) reports its version."""
    import shutil

    shutil.copytree(REPO / "skeleton_ds", tmp_path / "skeleton_ds")
    out = subprocess.run([sys.executable, "-c",
                          "from skeleton_ds.provenance import code_version; print(code_version())"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("skeleton-ds ")


def test_missing_fields_names_what_a_record_lacks():
    assert missing_fields({}) == list(FIELDS)
    record = provenance("x")
    del record["libraries"]
    assert missing_fields({"provenance": record}) == ["libraries"]
