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
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

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


def copy_atomically(source: Path, target: Path) -> None:
    """A copy (file or directory) that is complete or absent, so nothing resumes from half a prompt."""
    target = Path(target)
    partial = target.with_name(f".{target.name}.partial")
    if partial.is_dir():  # left by an interrupted copy
        shutil.rmtree(partial)
    partial.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    if Path(source).is_dir():
        shutil.copytree(source, partial)
    else:
        shutil.copy(source, partial)
    partial.rename(target)


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


def write_text(path: Path, text: str) -> None:
    """Atomic single-file text write (write, fsync, rename)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: dict) -> None:
    """Atomic single-file JSON write (write, fsync, rename)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_report(path: Path, record: dict, table: str) -> None:
    """A measurement's record as PATH (JSON) and its rendered table beside it as PATH.md, each atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    write_text(path.with_suffix(".md"), table)


def json_value(value):
    """A config value as JSON of its own type: paths become strings, tuples lists; numbers, booleans
    and None stay what they are."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [json_value(v) for v in value]
    return value


def json_record(config) -> dict:
    """A dataclass config as JSON values of their own types (the config inside metrics.json and bench.json)."""
    from dataclasses import asdict

    return {k: json_value(v) for k, v in asdict(config).items()}


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
    with unreadable_as_user_error(path):
        return load_file(str(path))


@contextmanager
def unreadable_as_user_error(path: Path,
                             fix: str = "re-run the stage that wrote it with --overwrite") -> Iterator[None]:
    """A truncated or corrupt safetensors file becomes one UserError naming it. `path` may be a
    directory of shards: the first unreadable one is named."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        path = Path(path)
        if path.is_dir():
            path = next((f for f in sorted(path.glob("*.safetensors")) if safetensors_problem(f)), path)
        raise UserError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupt; {fix}") from None


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
"""safetensors dtype names -> torch dtypes (conversion writes, the ZeRO-3 loader reads, verify checks sizes)."""
ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in SAFETENSORS_DTYPES.items()}


def map_tensor(file: Path, info: dict) -> torch.Tensor:
    """One tensor of a safetensors file as a copy-on-write memory map (`info`: its header entry, offsets absolute
    in the file): only the pages read become resident, shared with every process mapping the same file, and
    nothing is ever written back to it."""
    import mmap

    start, end = info["data_offsets"]
    with open(file, "rb") as f:
        if os.fstat(f.fileno()).st_size < end:
            raise UserError(f"{file} is truncated (tensor at bytes {start}-{end}): re-download or re-save the model")
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: the file stays as it is
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    tensor = torch.frombuffer(mapping, dtype=dtype, count=(end - start) // ITEMSIZE[info["dtype"]], offset=start)
    return tensor.view(list(info["shape"]))


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's tensor entries (name -> dtype, shape, data_offsets; metadata left out) and the
    byte where its data starts, without reading any tensor. Unchecked: see safetensors_header."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, checked against the file's size (catches truncation and a
    corrupt header without reading the tensors). Raises ValueError saying what is wrong."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{size} bytes: too short for a safetensors header")
        length = int.from_bytes(raw, "little")
        if length > size - 8:
            raise ValueError(f"header length {length} exceeds the file ({size} bytes): truncated or not safetensors")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"header is not valid JSON ({e}): corrupt") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object: corrupt")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            nbytes = ITEMSIZE[info["dtype"]] * math.prod(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name}: malformed header entry") from None
        if nbytes != stop - begin:
            raise ValueError(f"tensor {name}: its shape and dtype do not match its byte range")
        end = max(end, stop)
    if 8 + length + end != size:
        raise ValueError(f"data ends at byte {8 + length + end} but the file has {size} bytes: truncated or padded")
    return header


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's structure, or None."""
    try:
        safetensors_header(path)
    except (OSError, ValueError) as e:
        return str(e)
    return None


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
