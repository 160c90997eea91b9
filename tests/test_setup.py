"""launch/setup.sh's torch pin, against a torch like the public index's CUDA wheel: its `__version__` carries a
local label (2.13.0+cu130) that its distribution's version (2.13.0) lacks. A fake torch in a fresh venv stands
in for it; nothing is downloaded (pip runs with --no-index and no configuration)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

PIN = REPO / "launch" / "torch_pin.py"


def _fake_torch(site: Path, version: str, runtime_version: str, cuda: str | None) -> None:
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text(
        f"__version__ = {runtime_version!r}\nclass version:\n    cuda = {cuda!r}\n")
    info = site / f"torch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text(f"torch/__init__.py,,\ntorch-{version}.dist-info/METADATA,,\n")


def _wheel_needing_torch(folder: Path) -> Path:
    """A one-module wheel that requires torch>=2.6, as skeleton-ds does."""
    path = folder / "needs_torch-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("needs_torch/__init__.py", "")
        whl.writestr("needs_torch-0.1.dist-info/METADATA",
                     "Metadata-Version: 2.1\nName: needs-torch\nVersion: 0.1\nRequires-Dist: torch>=2.6\n")
        whl.writestr("needs_torch-0.1.dist-info/WHEEL",
                     "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr("needs_torch-0.1.dist-info/RECORD", "")
    return path


@pytest.fixture(scope="module")
def cuda_torch_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("setup")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    _fake_torch(site, version="2.13.0", runtime_version="2.13.0+cu130", cuda="13.0")
    return venv


def _pip_install_with(venv: Path, constraint: str, wheel: Path) -> subprocess.CompletedProcess:
    constraints = wheel.parent / "constraints.txt"
    constraints.write_text(constraint + "\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(wheel.parent), "PIP_CONFIG_FILE": os.devnull}
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--isolated",
                           "--disable-pip-version-check", "-c", str(constraints), str(wheel)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_constraint_pins_the_distribution_version_and_pip_accepts_it(cuda_torch_venv, tmp_path):
    python = str(cuda_torch_venv / "bin" / "python")
    runtime = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], check=True,
                             capture_output=True, text=True).stdout.strip()
    assert runtime == "2.13.0+cu130"  # the fake is what the public index serves
    constraint = subprocess.run([python, str(PIN), "constraint"], check=True, capture_output=True,
                                text=True).stdout.strip()
    assert constraint == "torch==2.13.0"
    wheel = _wheel_needing_torch(tmp_path)
    accepted = _pip_install_with(cuda_torch_venv, constraint, wheel)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    # The pin setup.sh used to write, from __version__, is one pip cannot satisfy:
    refused = _pip_install_with(cuda_torch_venv, f"torch=={runtime}", wheel)
    assert refused.returncode != 0 and "ResolutionImpossible" in refused.stdout + refused.stderr


def test_describe_names_the_build(cuda_torch_venv):
    line = subprocess.run([str(cuda_torch_venv / "bin" / "python"), str(PIN), "describe"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert line.startswith("torch 2.13.0 (CUDA 13.0 build), ") and line.endswith(" GB on disk")


def test_setup_script_writes_the_constraint_with_torch_pin():
    script = (REPO / "launch" / "setup.sh").read_text()
    assert 'launch/torch_pin.py constraint > "$constraints"' in script
    assert "torch.__version__" not in script
