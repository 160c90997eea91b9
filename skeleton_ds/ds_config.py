"""DeepSpeed configs: which file `--config` names, and what that file means for this run.

The JSON files ship once, in the checkout's top-level ds_configs/ (users run
`deepspeed launch/train.py --config ds_configs/zero3.json` from a checkout); pyproject.toml maps that
folder into the wheel as skeleton_ds/ds_configs, so an installed package finds them beside its code
(`resolve_config_path`). The files hold no "auto" values: `resolve_ds_config` fills in what depends
on the run (micro batch from the global batch and world size, precision from the device) and turns
what DeepSpeed would reject later with a stack trace into one clear error. Everything that depends on
the ZeRO stage reads it through `zero_stage`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from skeleton_ds.errors import UserError

# Which file: `--config NAME` or `--config PATH`

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT_SPELLING = Path("ds_configs")


def packaged_dir() -> Path:
    """The shipped configs: inside the installed package (a wheel), else the checkout's ds_configs/
    (a checkout or an editable install, where the package directory is skeleton_ds/ itself)."""
    installed = _PACKAGE / "ds_configs"
    return installed if installed.is_dir() else _PACKAGE.parent / "ds_configs"


def packaged_names() -> list[str]:
    """Names `--config` accepts without a path, e.g. zero2 or zero3_offload."""
    return sorted(p.stem for p in packaged_dir().glob("*.json"))


def resolve_config_path(value: str | Path) -> Path:
    """The file `--config VALUE` means. A path that exists wins; otherwise a bare name (zero3 or
    zero3.json) or the checkout spelling ds_configs/zero3.json names a packaged config, so the same
    flag works in a checkout and with the package installed anywhere."""
    path = Path(value)
    if path.is_file():
        return path
    if path.parent in (Path("."), _CHECKOUT_SPELLING) and not path.is_dir():
        packaged = packaged_dir() / (path.name if path.suffix == ".json" else f"{path.name}.json")
        if packaged.is_file():
            return packaged
    what = "is a directory" if path.is_dir() else "does not exist"
    raise UserError(f"DeepSpeed config {value} {what}: give the path of a JSON file, or a packaged config by "
                    f"name: {', '.join(packaged_names())}")


# What it means for this run: the settings deepspeed.initialize is given

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}}
_TORCH_ADAM_TYPES = ("adam", "adamw")
"""Optimizer types DeepSpeed can run as plain torch.optim (its `torch_adam` option). What trains is a prompt
(and perhaps a head): thousands to a million values, for which DeepSpeed's fused or CPU Adam kernels buy
nothing, while building them with ninja delays a fresh machine's first run."""


def _auto_precision() -> str:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_ds_config(path: Path, *, world_size: int, batch_size: int, lr: float, precision: str,
                      weight_decay: float | None = None) -> dict:
    """Read a plain DeepSpeed JSON file and fill in what depends on this run.

    The files in ds_configs/ carry no "auto" values; instead this function derives the micro
    batch from the global batch and the world size, and the precision from the device, sets the
    optimizer's lr (and weight decay, when given) from the flags, and refuses combinations DeepSpeed
    would only reject later with a stack trace.
    """
    try:
        cfg = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON "
                        f"(line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"DeepSpeed config {path} must be a JSON object")
    autos = [k for k, v in cfg.items() if v == "auto"]
    if autos:
        raise UserError(f"DeepSpeed config {path} has 'auto' values ({', '.join(autos)}): give numbers")
    _check_ds_types(cfg, path)

    gas = int(cfg.get("gradient_accumulation_steps", 1))
    if batch_size:
        global_batch = batch_size
        cfg.pop("train_micro_batch_size_per_gpu", None)
    elif "train_batch_size" in cfg:
        global_batch = int(cfg["train_batch_size"])
    elif "train_micro_batch_size_per_gpu" in cfg:
        global_batch = int(cfg["train_micro_batch_size_per_gpu"]) * gas * world_size
    else:
        raise UserError(f"DeepSpeed config {path} sets no batch size: add train_batch_size or pass --batch-size")
    if global_batch % (gas * world_size):
        raise UserError(
            f"global batch {global_batch} is not divisible by gradient_accumulation_steps {gas} x world size "
            f"{world_size}: pass --batch-size as a multiple of {gas * world_size}")
    micro = global_batch // (gas * world_size)
    if "train_micro_batch_size_per_gpu" in cfg and int(cfg["train_micro_batch_size_per_gpu"]) != micro:
        raise UserError(
            f"DeepSpeed config {path} is inconsistent with world size {world_size}: train_batch_size {global_batch} "
            f"!= train_micro_batch_size_per_gpu {cfg['train_micro_batch_size_per_gpu']} x gradient_accumulation_steps "
            f"{gas} x {world_size} ranks; drop one of the two keys or pass --batch-size")
    cfg.update(train_batch_size=global_batch, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas)

    if precision == "auto":
        explicit = any(cfg.get(k, {}).get("enabled") for k in ("bf16", "fp16"))
        precision = None if explicit else _auto_precision()
    if precision is not None:
        cfg["bf16"] = {"enabled": precision == "bf16"}
        cfg["fp16"] = {"enabled": precision == "fp16"}

    optimizer = cfg.setdefault("optimizer", json.loads(json.dumps(_DEFAULT_OPTIMIZER)))
    params = optimizer.setdefault("params", {})
    params["lr"] = lr
    if weight_decay is not None:  # --weight-decay, like --lr, wins over the file
        params["weight_decay"] = weight_decay
    if str(optimizer.get("type", "")).lower() in _TORCH_ADAM_TYPES:
        params.setdefault("torch_adam", True)  # a config may still ask for the built kernels with false
    cfg.setdefault("steps_per_print", 10**9)  # progress goes through our own rich bar
    return cfg


def _check_ds_types(cfg: dict, path: Path) -> None:
    """The keys we read must have the types DeepSpeed expects; it would otherwise fail deep inside
    initialize() with a stack trace, or (a string batch size) after loading the model."""
    for key in _BATCH_KEYS:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"DeepSpeed config {path}: {key} must be an integer, got {value!r}")
        if value is not None and value < 1:
            raise UserError(f"DeepSpeed config {path}: {key} must be a positive integer, got {value}")
    for key in ("zero_optimization", "optimizer", "bf16", "fp16"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise UserError(f"DeepSpeed config {path}: {key} must be a JSON object, got {cfg[key]!r}")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise UserError(f"DeepSpeed config {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def param_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
