"""Artifacts on disk: safetensors + JSON only, each directory published atomically.

A stage's output directory appears only once everything in it is written (build in a sibling
temporary directory, then rename), so a crash never leaves something that looks complete. A
directory that is shipped on (the compact model) carries a manifest.json (sha256 and size of every
file), written last and checked before the directory is loaded.

Every write is flushed to disk (fsync) before its rename, and the directory holding the new name
after it, so a power loss or a node failure never leaves a renamed file with missing contents.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from skeleton_ds.errors import UserError


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, and `root` itself."""
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


@contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise UserError(f"{final} already exists: pass --overwrite to replace it")
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
        fsync_tree(staging)
        if final.exists():
            retired = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
        fsync_path(final.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path that replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    """Atomic single-file JSON write (write, fsync, rename)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_file(path) as tmp:
        save_tensors(tmp, tensors, metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist")
    return load_file(str(path))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """sha256 and size of every file; written last, so its presence means the directory is complete."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json")
    write_json(directory / "manifest.json", {"format": "skeleton_ds.manifest/1", "files": {
        str(p.relative_to(directory)): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files}})


def verify_manifest(directory: Path) -> None:
    """Refuse a directory whose files do not match its manifest (naming the first bad file)."""
    manifest = read_json(directory / "manifest.json", "manifest")
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path} is listed in {directory}/manifest.json but missing: the directory is incomplete")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise UserError(f"{path} does not match its sha256 in {directory}/manifest.json: refusing to load it "
                            f"(re-run the convert stage with --overwrite)")
