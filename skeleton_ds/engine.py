"""DeepSpeed plumbing: process group, config resolution, ZeRO-aware model loading and gathering.

Everything that depends on the ZeRO stage or the world size is decided here, so the recipe code
reads the same for one CPU process and for many GPUs across nodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from skeleton_ds import checkpoint, packaged_models, widths
from skeleton_ds.architectures import ArchAdapter, adapter_for
from skeleton_ds.errors import UserError

log = logging.getLogger("skeleton_ds")

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}}


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS_ENV = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"})
"""The variables that place a process in a process group (a launcher's, or the world of one set below). A
child that must form its own world is started without them, or it tries to rejoin this (bound) address."""


def without_rendezvous(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in RENDEZVOUS_ENV}


def init_distributed() -> Dist:
    """Join the process group; a plain `python launch/train.py` becomes a world of one."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist = Dist(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                # DeepSpeed's launcher sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE: ranks on this node
                local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE",
                                                                                    os.environ["WORLD_SIZE"]))))
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        # CPU ranks on one host share its cores; oversubscribing threads makes every rank slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world_size))
    else:
        accel.set_device(dist.local_rank)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False)
    return dist


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _auto_precision() -> str:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_ds_config(path: Path, *, world_size: int, batch_size: int, lr: float, precision: str) -> dict:
    """Read a plain DeepSpeed JSON file and fill in what depends on this run.

    The files in ds_configs/ carry no "auto" values; instead this function derives the micro
    batch from the global batch and the world size, and the precision from the device, and
    refuses combinations DeepSpeed would only reject later with a stack trace.
    """
    try:
        cfg = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
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
    optimizer.setdefault("params", {})["lr"] = lr
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


def gathered(params: Iterable[torch.nn.Parameter]):
    """Full values of ZeRO-3 partitioned parameters inside the block (read only); a no-op otherwise.

    A collective under ZeRO-3: every rank must enter it.
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def local_fraction(params: Iterable[torch.nn.Parameter]) -> float:
    """Share of these parameters' elements this rank stores: 1.0 unless ZeRO-3 partitioned them."""
    params = list(params)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    return local / max(total, 1)


def resolve_model_path(name: str) -> str:
    """Local directory, Hub id, or a model packaged on PyPI (aliases 'minilm', 'smollm2-135m')."""
    return packaged_models.resolve_model_path(name)


_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype",
                         "_commit_hash", "use_cache"}


def model_identity(name: str, path: str, config, revision: str | None) -> dict:
    """What ties an artifact to its base model: the name given, and a hash of the architecture config
    (shapes and hyper-parameters; not the library version or dtype it was saved with)."""
    shape = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()
    identity = {"name_or_path": name, "resolved_path": path, "config_sha256": digest,
                "revision": revision or getattr(config, "_commit_hash", None)}
    source = packaged_models.source_record(path)
    if source is not None:  # a converted packaged model: its weights are the GGUF it was made from
        identity["weights_sha256"] = source["gguf_sha256"]
    return identity


def directory_config_hash(directory) -> str:
    """The config hash of the model saved in `directory` (a compact checkpoint's own identity)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    return model_identity(str(directory), str(directory), config, None)["config_sha256"]


def check_identity(recorded: dict, actual: dict, what: str) -> None:
    if recorded.get("config_sha256") != actual["config_sha256"]:
        raise UserError(f"{what} was made for base model {recorded.get('name_or_path')!r}, not {actual['name_or_path']!r} "
                        f"(config hashes differ): pass the same --model, or redo the stage with --overwrite")


@dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: object
    adapter: ArchAdapter
    has_mlm_head: bool
    path: str
    identity: dict
    label_head: torch.Tensor | None = None
    """A compact decoder converted with --slice-lm-head: the verbalizer rows of its LM head."""


QUANT_MODES = ("none", "8bit", "4bit")


def quantization_config(quant: str, compute_dtype: torch.dtype):
    """bitsandbytes settings for a frozen model: LLM.int8() or NF4 weights (with double quantization)."""
    if quant not in QUANT_MODES:
        raise UserError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _safetensors_index(path: str, revision: str | None) -> dict[str, tuple[Path, dict]] | None:
    """Checkpoint tensor name -> (file, header entry) from the safetensors headers alone; None when the
    checkpoint is not safetensors (or a Hub id that cannot be fetched): the caller falls back."""
    directory = Path(path)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(path, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
        except Exception:  # offline, unknown id: from_pretrained gives the user its own error
            return None
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        return None
    entries = {}
    for file in files:
        header, data_start = checkpoint.read_header(file)
        for name, info in header.items():
            info["data_offsets"] = [data_start + o for o in info["data_offsets"]]  # absolute file offsets
            entries[name] = (file, info)
    return entries


def _read_tensor_into(target: torch.Tensor, file: Path, info: dict) -> None:
    """Copy one checkpoint tensor into `target` with plain reads: no memory map, so the checkpoint's
    pages never count in this process's RSS, and no copy of the tensor when dtype and device match."""
    dtype, shape = checkpoint.SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"])
    start, end = info["data_offsets"]
    direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
    buffer = target if direct else torch.empty(shape, dtype=dtype)
    view = memoryview(buffer.view(-1).view(torch.uint8).numpy()) if buffer.numel() else memoryview(b"")
    with open(file, "rb") as f:
        f.seek(start)
        if f.readinto(view) != end - start:
            raise UserError(f"{file} is truncated (tensor at bytes {start}-{end}): re-download or re-save the model")
    if not direct:
        target.copy_(buffer.view(target.shape))


def _load_partitioned(cls, config, path: str, revision: str | None, dtype: torch.dtype):
    """A ZeRO-3 model loaded with at most one module's parameters whole on any rank, or None (fall back).

    transformers' from_pretrained under ZeRO-3 (integrations/deepspeed.py, modeling_utils
    _load_pretrained_model) builds the model partitioned (zero.Init), but then has rank 0 read every
    shard into one merged state dict before copying it in, so rank 0 holds the whole model. Here the
    partitioned model is built from its config, then filled module by module: its parameters are
    gathered, rank 0 reads exactly those tensors from the safetensors files, and they are
    re-partitioned. Only when every parameter is found in the checkpoint by name (as is, or with the
    base-model prefix added or removed) with its shape; anything else (pickles, renamed legacy keys,
    weights the checkpoint lacks) takes transformers' own path.
    """
    import copy

    import deepspeed

    index = _safetensors_index(path, revision)
    if index is None:
        return None
    model = cls.from_config(copy.deepcopy(config), dtype=dtype)  # zero.Init: created partitioned
    prefix = getattr(model, "base_model_prefix", "") or ""

    def source(key: str, shape) -> tuple[Path, dict] | None:
        names = [key]
        if prefix:
            names.append(key[len(prefix) + 1:] if key.startswith(prefix + ".") else f"{prefix}.{key}")
        for name in names:
            if name in index and list(index[name][1]["shape"]) == list(shape):
                return index[name]
        return None

    plan, seen = [], set()
    for module_name, module in model.named_modules():
        params = []
        for name, p in module._parameters.items():
            if p is None or id(p) in seen:  # tied parameters are loaded once
                continue
            seen.add(id(p))
            found = source(f"{module_name}.{name}" if module_name else name, getattr(p, "ds_shape", p.shape))
            if found is None:
                log.info("ZeRO-3 streaming load: %s.%s not found in the checkpoint as is; using from_pretrained",
                         module_name, name)
                return None
            params.append((p, found))
        buffers = []
        for name, b in module._buffers.items():
            key = f"{module_name}.{name}" if module_name else name
            if b is not None and name not in module._non_persistent_buffers_set:
                found = source(key, b.shape)
                if found is not None:
                    buffers.append((b, found))
        if params or buffers:
            plan.append((params, buffers))
    rank = torch.distributed.get_rank()
    with torch.no_grad():
        for params, buffers in plan:
            if params:
                with deepspeed.zero.GatheredParameters([p for p, _ in params], modifier_rank=0):
                    if rank == 0:
                        for p, (file, info) in params:
                            _read_tensor_into(p.data, file, info)
            for b, (file, info) in buffers:  # not partitioned, and small: every rank reads its own
                _read_tensor_into(b, file, info)
    return model


def _fit_compact_widths(model: torch.nn.Module, adapter: ArchAdapter, path: Path) -> None:
    """Cut a padded compact model's layers to the widths its skeleton.json records."""
    record_file = path / "skeleton.json"
    if not (record_file.is_file() and (path / "manifest.json").is_file()):
        return  # not a compact checkpoint
    record = checkpoint.read_json(record_file, "compact model's skeleton")
    ffn_sizes, head_counts = record.get("ffn_sizes"), record.get("head_counts")
    if ffn_sizes and head_counts:
        widths.fit_layer_widths(model, adapter, ffn_sizes, head_counts)


def load_backbone(name: str, ds_config: dict | None = None, *, readout: str, revision: str | None = None,
                  dtype: torch.dtype | None = None, quant: str = "none", device: str | None = None,
                  differentiable: bool = True, layer_widths: bool = True) -> Backbone:
    """Load the frozen model; under ZeRO-3 it is created partitioned and filled one module at a time
    (_load_partitioned), so no rank holds all of it.

    `dtype` overrides the DeepSpeed config's precision (inference passes no config). `quant` loads
    the linear layers as bitsandbytes 8-bit or NF4 onto `device`; ZeRO-3 cannot partition those
    layers (their weights are packed integer buffers with quantization state, not plain tensors),
    so quantized models run on one device. `differentiable=False` (inference only) lets bitsandbytes
    repack NF4 weights into its faster CPU inference layout, which has no backward.

    A compact model whose skeleton keeps different widths per layer is stored padded to the widest;
    with `layer_widths` (and neither ZeRO-3 nor quantization, whose layers cannot be cut) each layer
    is cut back to its own width after loading (skeleton_ds.widths), so compute follows the kept units.
    """
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model config for --model {name!r}: {str(e).splitlines()[0]}") from None
    adapter = adapter_for(config.model_type)
    archs = " ".join(config.architectures or [])
    has_mlm_head = not adapter.causal and ("MaskedLM" in archs or "ForPreTraining" in archs)
    if readout == "verbalizer" and not (adapter.causal or has_mlm_head):
        raise UserError(f"--readout verbalizer needs an LM or MLM head, and {name} has none ({archs}): use --readout head")
    label_head_file = Path(path) / "label_head.safetensors"
    label_head = None
    if label_head_file.is_file():
        from safetensors.torch import load_file

        label_head = load_file(str(label_head_file))["weight"]
    if adapter.causal and label_head is None:
        cls = AutoModelForCausalLM
    elif has_mlm_head and readout != "head":
        cls = AutoModelForMaskedLM
    else:
        cls = AutoModel
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ds_config = ds_config or {}
    dtype = dtype or param_dtype(ds_config)
    if quant != "none" and zero_stage(ds_config) == 3:
        raise UserError(f"--quant {quant} cannot be combined with ZeRO-3: DeepSpeed cannot partition bitsandbytes "
                        f"layers; use ds_configs/zero0.json or zero2.json on one device")
    quantized = quantization_config(quant, dtype)
    placement = {"quantization_config": quantized, "device_map": {"": device or "cpu"}} if quantized else {}
    # transformers reads ZeRO-3 from a process-wide setting; hold it only while loading, so models
    # loaded later in this process (by us or by the caller) are not silently partitioned.
    zero3 = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    try:
        # Measured on a 1.1B LLaMA, 2 ranks (docs/scale_run.md): transformers' own ZeRO-3 path peaks at the
        # whole checkpoint plus a partition on rank 0 (7.6 GB); this one at a partition plus one module (3.0 GB).
        model = _load_partitioned(cls, config, path, revision, dtype) if zero3 is not None else None
        if model is None:
            model = cls.from_pretrained(path, revision=revision, dtype=dtype, **placement)
    finally:
        del zero3
        unset_hf_deepspeed_config()
    if layer_widths and not quantized and zero_stage(ds_config) < 3:
        _fit_compact_widths(model, adapter, Path(path))
    model.requires_grad_(False)
    model.eval()  # frozen backbone: no dropout, so runs and resumes are deterministic
    if quantized and differentiable:
        # bitsandbytes repacks an NF4 layer for a CPU inference kernel without autograd at its first
        # eval-mode forward with no input gradient (a dev evaluation): later backward passes through
        # it would then be silently wrong. Gradients must reach the prompt, so keep the plain layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    tokenizer.padding_side = adapter.padding_side
    if tokenizer.pad_token_id is None:
        # Pads are masked out of attention, so any existing token serves; adding one would resize the embeddings.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UserError(f"tokenizer of {name} has no pad, eos or unk token to pad with: add a pad_token to it")
        tokenizer.pad_token = fallback
    return Backbone(model=model, tokenizer=tokenizer, adapter=adapter, has_mlm_head=has_mlm_head, path=path,
                    identity=model_identity(name, path, config, revision), label_head=label_head)
