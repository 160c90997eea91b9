"""The package as a user installs it: a wheel, in a fresh virtual environment, run from a directory
that is not the checkout.

The wheel is built from a copy of the sources (so no build/ or egg-info lands in the checkout) without
build isolation or an index, and installed with --no-index --no-deps into a new venv whose only route
to the dependencies is a .pth file naming this venv's site-packages: nothing is downloaded, torch
included. Every command runs through the installed `skeleton-ds` script with cwd outside the checkout
and without PYTHONPATH, and each checks that skeleton_ds came from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import DS_CONFIGS, REPO, generic_flags

from skeleton_ds.cli import run_command, train
from skeleton_ds.config import Config
from skeleton_ds.distributed import RENDEZVOUS_ENV
from skeleton_ds.ds_config import packaged_dir, packaged_names, resolve_config_path
from skeleton_ds.errors import UserError

NEVER_IN_INFERENCE = ("deepspeed", "bitsandbytes")
TINY_RUN = ["--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--lr", "0.1", "--seed", "3",
            "--align", "8", "--ffn-keep", "0.5", "--max-eval-examples", "16", "--attr-examples", "16"]


# --------------------------------------------------------------------------- --config NAME|PATH


def test_config_names_resolve_to_the_packaged_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ds_configs/ here
    assert packaged_names() == sorted(p.stem for p in DS_CONFIGS.glob("*.json"))
    zero3 = packaged_dir() / "zero3.json"
    for spelling in ("zero3", "zero3.json", "ds_configs/zero3.json", "ds_configs/zero3"):
        assert resolve_config_path(spelling) == zero3, spelling
    assert Config().ds_config == packaged_dir() / "zero2.json"  # the default, outside a checkout


def test_a_path_that_exists_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero3.json").write_text("{}")
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero2.json").write_text("{}")
    assert resolve_config_path("zero3.json") == Path("zero3.json")
    assert resolve_config_path("ds_configs/zero2.json") == Path("ds_configs/zero2.json")
    assert resolve_config_path(DS_CONFIGS / "zero0.json") == DS_CONFIGS / "zero0.json"
    monkeypatch.chdir(REPO)
    assert Config().ds_config == Path("ds_configs/zero2.json")  # the default, in a checkout: its own file


@pytest.mark.parametrize("value, says", [("zero4", "does not exist"), ("elsewhere/zero2.json", "does not exist"),
                                         (".", "is a directory")])
def test_an_unknown_config_is_one_error_listing_the_packaged_names(value, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=says) as caught:
        resolve_config_path(value)
    assert all(name in str(caught.value) for name in packaged_names())


def test_unknown_config_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_command(train, ["--config", "zero4", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: DeepSpeed config zero4 does not exist")
    assert "zero0, zero2, zero3, zero3_offload" in err[0]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the installed wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """skeleton_ds built as a wheel from a copy of the sources, offline."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("skeleton_ds", "ds_configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(out), str(src)], cwd=src)
    (built,) = out.glob("skeleton_ds-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; its dependencies are this venv's, through a .pth file."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root)
    python = _bin(root, "python")
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=root).stdout.strip())
    (purelib / "project_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)], cwd=root)
    return root


@pytest.fixture(scope="module")
def installed_run(venv, tiny_models, sentiment_files, tmp_path_factory) -> Path:
    """All five stages through the installed script, from a directory that is not the checkout, with no
    --config: the default must resolve to the packaged zero2."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    _run([str(_bin(venv, "skeleton-ds")), "train", "--model", str(tiny_models["llama"]), "--output", "run",
          "--max-steps", "2", *TINY_RUN, *generic_flags(sentiment_files)], cwd=cwd)
    return cwd / "run"


def test_the_wheel_carries_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "skeleton_ds").rglob("*.py")}
    configs = {f"skeleton_ds/ds_configs/{p.name}" for p in DS_CONFIGS.glob("*.json")}
    assert modules - names == set(), "a package missing from [tool.setuptools] packages in pyproject.toml"
    assert configs and configs <= names


def test_the_installed_requirements_are_satisfied(venv, tmp_path):
    """Every requirement the wheel declares (extras included) is met by what the venv can import, and
    the configs it finds are its own."""
    script = (
        "import json, skeleton_ds\n"
        "from skeleton_ds.ds_config import packaged_dir, packaged_names\n"
        "from importlib.metadata import distribution, version, PackageNotFoundError\n"
        "from packaging.requirements import Requirement\n"
        "dist, unmet = distribution('skeleton-ds'), []\n"
        "for req in map(Requirement, dist.requires):\n"
        "    if req.name == 'skeleton-ds':\n"
        "        continue\n"
        "    try:\n"
        "        found = version(req.name)\n"
        "    except PackageNotFoundError:\n"
        "        found = None\n"
        "    if found is None or not req.specifier.contains(found, prereleases=True):\n"
        "        unmet.append(f'{req} (installed: {found})')\n"
        "print(json.dumps({'unmet': unmet, 'file': skeleton_ds.__file__, 'configs': str(packaged_dir()),\n"
        "                  'names': packaged_names(),\n"
        "                  'metadata': str(dist.locate_file('')), "
        "'extras': dist.metadata.get_all('Provides-Extra')}))\n")
    found = json.loads(_run([str(_bin(venv, "python")), "-c", script], cwd=tmp_path).stdout)
    assert found["unmet"] == []
    _assert_from(venv, found["file"])
    _assert_from(venv, found["metadata"])
    _assert_from(venv, found["configs"])
    assert found["names"] == sorted(p.stem for p in DS_CONFIGS.glob("*.json"))
    assert set(found["extras"]) == {"serve", "bench", "smollm2", "test"}


def test_the_installed_pipeline_runs_with_the_packaged_default_config(venv, installed_run):
    metrics = json.loads((installed_run / "metrics.json").read_text())
    assert set(metrics["stage_seconds"]) == {"prompt", "attribute", "localize", "convert", "teacher", "retune"}
    recorded = json.loads((installed_run / "prompt" / "metrics.json").read_text())["config"]["ds_config"]
    _assert_from(venv, recorded)
    assert Path(recorded).name == "zero2.json" and Path(recorded).parent.name == "ds_configs"
    assert (installed_run / "compact" / "config.json").is_file()


def test_the_installed_script_takes_a_config_by_name(venv, tiny_models, sentiment_files, tmp_path):
    _run([str(_bin(venv, "skeleton-ds")), "train", "--config", "zero2", "--stages", "prompt",
          "--model", str(tiny_models["llama"]), "--output", "run", "--max-steps", "1", *TINY_RUN,
          *generic_flags(sentiment_files)], cwd=tmp_path)
    recorded = json.loads((tmp_path / "run" / "prompt" / "metrics.json").read_text())["config"]["ds_config"]
    _assert_from(venv, recorded)
    assert Path(recorded).name == "zero2.json"


def test_installed_infer_imports_neither_deepspeed_nor_bitsandbytes(venv, installed_run, tmp_path):
    """`skeleton-ds infer` under -X importtime (PYTHONPROFILEIMPORTTIME): every module the process
    imports is listed on stderr."""
    records = tmp_path / "records.jsonl"
    records.write_text('{"text": "the movie was good"}\n{"text": "the plot was awful"}\n')
    result = _run([str(_bin(venv, "skeleton-ds")), "infer", "--checkpoint", str(installed_run / "compact"),
                   "--input", str(records)], cwd=tmp_path, PYTHONPROFILEIMPORTTIME="1")
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "skeleton_ds.inference" in imported and "transformers" in imported  # the profile did record
    assert sorted(m for m in imported if m.split(".")[0] in NEVER_IN_INFERENCE) == []
    predictions = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(predictions) == 2 and all(p["label"] in ("neg", "pos") for p in predictions)


def test_installed_serving_imports_neither_deepspeed_nor_bitsandbytes(venv, installed_run, tiny_models, tmp_path):
    """What `skeleton-ds serve` builds before it listens: the shared-base model and the app."""
    script = (
        "import json, sys, skeleton_ds, skeleton_ds.serving.server as server\n"
        "from skeleton_ds.cli import quiet_libraries\n"
        "from skeleton_ds.inference import InferenceConfig\n"
        "from skeleton_ds.serving.multitask import MultiTaskModel\n"
        "quiet_libraries()\n"
        "model = MultiTaskModel(sys.argv[1], [sys.argv[2]], cfg=InferenceConfig(device='cpu'))\n"
        "app = server.create_app(model, server.ServeSettings())\n"
        "(name,) = model.task_names()\n"
        "answers = model.predict(name, model.parse_inputs(name, ['the movie was good']))\n"
        "print(json.dumps({'file': skeleton_ds.__file__, 'answers': len(answers),\n"
        "                  'modules': "
        f"sorted(m for m in sys.modules if m.split('.')[0] in {NEVER_IN_INFERENCE!r})}}))\n")
    found = json.loads(_run([str(_bin(venv, "python")), "-c", script, str(tiny_models["llama"]), str(installed_run)],
                            cwd=tmp_path).stdout.splitlines()[-1])
    _assert_from(venv, found["file"])
    assert found["answers"] == 1 and found["modules"] == []


# --------------------------------------------------------------------------- helpers


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def _assert_from(venv: Path, path: str) -> None:
    """`path` lies in the test venv (the wheel), not in the checkout."""
    resolved = Path(path).resolve()
    assert resolved.is_relative_to(venv.resolve()), f"{path} is not from the installed wheel"
    assert not resolved.is_relative_to(REPO.resolve())


_NOT_INHERITED = {"PYTHONPATH", *RENDEZVOUS_ENV}
"""In-process tests earlier in the suite join a process group and leave its variables (and port) in
os.environ: a user's fresh shell has none of them."""


def _run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run outside the checkout, as from a fresh shell: no PYTHONPATH or process-group variables, no Hub;
    a failure shows the command's own output."""
    environ = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED} | {"HF_HUB_OFFLINE": "1"} | env
    result = subprocess.run(argv, cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (f"{argv[:3]} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-3000:]}")
    return result
