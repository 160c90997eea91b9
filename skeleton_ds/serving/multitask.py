"""One base model, many task skeletons: each task answers at compact-model speed while sharing every
tensor it does not slice.

    registry = MultiTaskModel("minilm", [Path("runs/minilm-sst2"), Path("runs/minilm-rte")], cache_bytes=256 << 20)
    registry.predict("sst2", registry.parse_inputs("sst2", ["a gripping, funny film"]))

A task is a pipeline output directory (its skeleton.json and re-tuned prompt, else the stage-1 prompt)
or a compact checkpoint directory (its manifest is verified). Its model is materialised on first use:
a standard module tree of the compact architecture whose sliced tensors (its FFN rows and columns, its
kept heads) are new, and whose other tensors (embeddings, norms, attention when all heads are kept, the
MLM head) are the base model's own tensors, by reference. Materialised tasks live in a cache bounded
by a byte budget (only the bytes a task owns count), least recently used evicted first.

The contenders served the same way (plain prompt tuning, separate compact models) are in
skeleton_ds/serving/baselines.py.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar
from collections.abc import Callable

import torch
from torch import nn

from skeleton_ds import checkpoint, data, widths
from skeleton_ds.serving import cross_task
from skeleton_ds.conversion import compact_config, layer_slices, slice_for
from skeleton_ds.errors import UserError
from skeleton_ds.inference import InferenceConfig, Predictor, parse_record, tensor_bytes
from skeleton_ds.loading import Backbone, load_backbone, resolve_model_path
from skeleton_ds.localization import Skeleton, load_skeleton
from skeleton_ds.model_identity import directory_config_hash, model_identity
from skeleton_ds.prompt import PromptedClassifier, read_task_record
from skeleton_ds.tasks import Example, Task, task_from_record


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


@dataclass
class Resident:
    """A materialised task in the cache: its predictor, the bytes it owns, its routed projections' weights."""

    predictor: Predictor
    owned: int
    projections: dict[str, cross_task.Weights] = field(default_factory=dict)  # cross-task passes only


@dataclass
class TaskEntry:
    """A registered task: where it came from, its skeleton, its trained prompt (and head)."""

    name: str
    directory: Path
    record: dict  # its task.json
    task: Task
    skeleton: Skeleton
    prompt: dict[str, torch.Tensor]
    compensated: dict[str, torch.Tensor] = field(default_factory=dict)
    """Bias compensation's FFN biases, read from its compact checkpoint (empty when not compensated)."""
    stats: CacheStats = field(default_factory=CacheStats)


def read_task_dir(directory: Path, base_identity: dict, name: str | None = None) -> TaskEntry:
    """A pipeline output directory (skeleton.json + retune/ or prompt/) or a compact checkpoint (manifest
    verified). Its skeleton and prompt must belong to `base_identity`, else the task is refused by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--task-dir {directory} is not a directory")
    if (directory / "manifest.json").is_file():  # a compact checkpoint carries its skeleton and prompt
        checkpoint.verify_manifest(directory)
        skeleton_file, prompt_dir, compact_dir = directory / "skeleton.json", directory, directory
    else:
        skeleton_file = directory / "skeleton.json"
        retuned = directory / "retune" / "prompt.safetensors"
        prompt_dir = retuned.parent if retuned.is_file() else directory / "prompt"
        compact_dir = directory / "compact"
    if not skeleton_file.is_file() or not (prompt_dir / "prompt.safetensors").is_file():
        raise UserError(f"--task-dir {directory} is neither a pipeline output (skeleton.json and a prompt) nor a "
                        f"compact checkpoint with a prompt: run the pipeline through --stages localize first")
    skeleton, skeleton_record = load_skeleton(skeleton_file)
    record = read_task_record(prompt_dir)
    label = name or record["task"]
    base_hash = base_identity["config_sha256"]
    if skeleton_record["base_model"].get("config_sha256") != base_hash:
        raise UserError(f"task {label!r} ({directory}) was localized for base model "
                        f"{skeleton_record['base_model'].get('name_or_path')!r}, "
                        f"not {base_identity['name_or_path']!r}: "
                        f"serve it with that --base")
    prompt_base = record["base_model"].get("config_sha256")
    if prompt_base != base_hash and not (compact_dir.is_dir() and prompt_base == directory_config_hash(compact_dir)):
        raise UserError(f"task {label!r} ({directory}): its prompt belongs to neither the base model nor its "
                        f"compact model")
    return TaskEntry(label, directory, record, task_from_record(record), skeleton,
                     checkpoint.load_tensors(prompt_dir / "prompt.safetensors"), _compensation(compact_dir, label))


def _compensation(compact_dir: Path, label: str) -> dict[str, torch.Tensor]:
    """The FFN bias tensors of a compensated compact checkpoint (they are not in the base model)."""
    config = compact_dir / "config.json"
    if not config.is_file() or checkpoint.read_json(config, "model config").get("skeleton_ds", {}).get(
            "compensate", "none") == "none":
        return {}
    from safetensors import safe_open

    from skeleton_ds.conversion import checkpoint_files

    tensors = {}
    for file in checkpoint_files(compact_dir):
        with checkpoint.unreadable_as_user_error(file), safe_open(str(file), "pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys() if name.endswith(".bias")}
    if not tensors:
        raise UserError(f"task {label!r}: {compact_dir} says it is bias-compensated but holds no biases")
    return tensors


def _same_tensor(name: str, tensors: dict[str, torch.Tensor]) -> str | None:
    """The key of `tensors` naming the same layer tensor as `name` (checkpoints may carry a prefix such
    as 'bert.' or 'model.' that the loaded module tree does not)."""
    return next((k for k in tensors if k == name or k.endswith("." + name) or name.endswith("." + k)), None)


def _named(spec: str) -> tuple[str, str]:
    """'NAME=DIR' -> (NAME, DIR); a plain DIR -> ("", DIR) (the task is then named by its task.json)."""
    name, sep, directory = spec.partition("=")
    return (name, directory) if sep and name and "/" not in name else ("", spec)


Entry = TypeVar("Entry")  # TaskEntry or PromptEntry


def register(task_dirs: list[Path | str], read: Callable[[Path, str | None], Entry]) -> dict[str, Entry]:
    """Each [NAME=]DIR read by `read(DIR, NAME or None)`, by task name; two directories answering one name
    are refused (name them). Every directory is read before the base model's weights load."""
    if not task_dirs:
        raise UserError("give at least one --task-dir")
    entries: dict[str, Entry] = {}
    for name, directory in (_named(str(d)) for d in task_dirs):
        entry = read(Path(directory), name or None)
        if entry.name in entries:
            raise UserError(f"two task directories answer {entry.name!r} ({entries[entry.name].directory} and "
                            f"{directory}): name them, --task-dir NAME=DIR")
        entries[entry.name] = entry
    return entries


def base_model_identity(base: str) -> dict:
    """The base model's identity (name, config hash) from its config alone, before its weights load."""
    from transformers import AutoConfig

    path = resolve_model_path(base)
    try:
        base_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model config for --base {base!r}: {str(e).splitlines()[0]}") from None
    return model_identity(base, path, base_config, None)


def shared_backbone(base: str, records: list[dict], cfg: InferenceConfig) -> Backbone:
    """The one base model every task runs on: with an LM/MLM head unless every task reads a trained head."""
    readouts = {r["readout"] for r in records}
    backbone = load_backbone(base, readout="head" if readouts == {"head"} else "verbalizer",
                             dtype=cfg.torch_dtype(), device=str(cfg.torch_device()), differentiable=False)
    backbone.model.to(cfg.torch_device())
    return backbone


def prompted(backbone: nn.Module, adapter, record: dict, task: Task, prompt: dict[str, torch.Tensor],
             device: torch.device, dtype: torch.dtype) -> PromptedClassifier:
    """A task's trained prompt (and head) around `backbone`, which it holds by reference (moving it to the
    device where the backbone already is copies nothing)."""
    model = PromptedClassifier(backbone, adapter, record["readout"], record["prompt_length"], len(task.label_names),
                               record["label_token_ids"])
    model.to(device)
    model.load_trained(prompt, dtype)
    return model.eval()


def owned_bytes(model: PromptedClassifier) -> int:
    """Bytes of what a task adds to its backbone: its prompt and head."""
    return tensor_bytes([*model.prompt.parameters(), *(model.head.parameters() if model.head is not None else [])])


def storage_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once however many tensors view it."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()]}
    return sum(storages.values())


def default_cache_bytes(device: torch.device) -> int:
    """Half the memory free on `device` now (CUDA: free device memory; CPU: the kernel's MemAvailable), so
    the cache leaves as much again for activations and everything else."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 1 << 30  # no way to ask: 1 GiB
    return available // 2


def parse_inputs(task: Task, inputs: list) -> list[Example]:
    """Records (dicts with the task's fields, optional label) or plain strings (single-text tasks) -> examples."""
    if not inputs:
        raise UserError("inputs is empty: give at least one record")
    return [parse_record(record, task, f"input {i}") for i, record in enumerate(inputs)]


class MultiTaskModel:
    """Thread-safe: one lock around materialisation and the forward pass (one pass at a time).

    The cache's byte budget (`cache_bytes`) defaults to half the device memory free once the base is loaded
    (`default_cache_bytes`). Every task is materialised once at start to measure what it owns, and a task
    larger than the whole budget is refused then, with the numbers, rather than re-materialised on every
    request later.

    `mix_tasks` (default): passes may mix tasks (`predict_mixed`, skeleton_ds.serving.cross_task): the shared modules
    run once over the whole batch and each task's sliced projections on its own rows. A pass holds the weights
    of every task in it until it ends, so a pass with more tasks than the cache holds briefly exceeds the
    budget. Mixed passes run at eager shapes; `mix_tasks=False` serves one task per pass, at static shapes
    where `cfg.static` says so (CUDA)."""

    def __init__(self, base: str, task_dirs: list[Path | str], *, cache_bytes: int | None = None,
                 cfg: InferenceConfig = InferenceConfig(), mix_tasks: bool = True):
        if cfg.quant != "none":
            raise UserError("serving shared weights slices the base model's tensors, which bitsandbytes "
                            "layers do not allow: serve with --quant none")
        if cache_bytes is not None and cache_bytes < 0:
            raise UserError(f"--cache-bytes must be >= 0, got {cache_bytes}")
        self.mixes_tasks = mix_tasks  # the server mixes tasks in a pass for a model that says so
        self.cfg = replace(cfg, static="off") if mix_tasks else cfg
        self.device, self.dtype = cfg.torch_device(), cfg.torch_dtype()
        identity = base_model_identity(base)
        self.tasks: dict[str, TaskEntry] = register(task_dirs, lambda d, name: read_task_dir(d, identity, name))
        self.backbone = shared_backbone(base, [e.record for e in self.tasks.values()], cfg)
        self.adapter = self.backbone.adapter
        self.geometry = self.adapter.geometry(self.backbone.model.config)
        self.budget = default_cache_bytes(self.device) if cache_bytes is None else cache_bytes
        self._cache: OrderedDict[str, Resident] = OrderedDict()
        self._routed = cross_task.RoutedBackbone(self.backbone.model, self.adapter) if mix_tasks else None
        self._lock = threading.Lock()
        self.task_bytes = {name: self._materialise(entry).owned for name, entry in self.tasks.items()}
        too_large = [f"{name} owns {size / 2**20:.1f} MiB" for name, size in self.task_bytes.items()
                     if size > self.budget]
        if too_large:
            raise UserError(f"{len(too_large)} task(s) larger than the whole cache budget of {self.budget / 2**20:.1f} "
                            f"MiB ({'; '.join(too_large)}), which would be re-built on every request: raise "
                            f"--cache-bytes, or serve them on a device with more memory")

    # ------------------------------------------------------------ materialise
    def _task_backbone(self, skeleton: Skeleton, compensated: dict[str, torch.Tensor]) -> tuple[nn.Module, int]:
        """The compact architecture of `skeleton` as a module tree whose unsliced tensors are the base
        model's own; returns it with the bytes of the tensors it owns (the sliced ones, and the FFN
        biases of a compensated task)."""
        base = self.backbone.model
        slices = layer_slices(self.adapter, self.geometry, skeleton)
        flag = self.adapter.ffn_out_bias if compensated and self.adapter.ffn_out_bias != "native" else None
        config = type(base.config).from_dict(compact_config(base.config.to_dict(), self.adapter, self.geometry,
                                                            skeleton, bias_flag=flag))
        config._attn_implementation = base.config._attn_implementation
        with torch.device("meta"):
            model = type(base)(config)
        state, owned = {}, 0
        for name, tensor in base.state_dict().items():
            cut = slice_for(name, self.adapter, slices)
            state[name] = cut.apply(tensor) if cut else tensor
            owned += tensor_bytes([state[name]]) if cut else 0
        paths = [self.adapter.ffn_out, *(self.adapter.ffn_in if flag else ())]
        folded = re.compile(rf"(?:^|\.){re.escape(self.adapter.layers)}\.\d+\."
                            rf"({'|'.join(map(re.escape, paths))})\.bias$")
        for name in model.state_dict():  # compensation's biases, from the task's compact checkpoint
            if compensated and folded.search(name) and (source := _same_tensor(name, compensated)) is not None:
                state[name] = compensated[source].to(self.device, self.dtype)
                owned += tensor_bytes([state[name]])
        model.load_state_dict(state, assign=True, strict=True)
        base_buffers = dict(base.named_buffers())
        for name, buffer in list(model.named_buffers()):  # non-persistent buffers (rotary frequencies, ids)
            if buffer.is_meta:
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._buffers[leaf] = base_buffers[name]
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"materialising a task left tensors without data: {left[:3]}")
        if widths.fit_layer_widths(model, self.adapter, skeleton.ffn_sizes(), [len(h) for h in skeleton.heads]):
            shared = {t.data_ptr() for t in base.state_dict().values()}  # a cut layer owns smaller copies
            owned = tensor_bytes(t for t in model.state_dict().values() if t.data_ptr() not in shared)
        return model.requires_grad_(False).eval(), owned

    def _materialise(self, entry: TaskEntry) -> Resident:
        backbone, owned = self._task_backbone(entry.skeleton, entry.compensated)
        model = prompted(backbone, self.adapter, entry.record, entry.task, entry.prompt, self.device, self.dtype)
        predictor = Predictor(model, entry.task, entry.record, self.backbone.tokenizer, self.cfg,
                              source=f"task {entry.name}")
        owned += owned_bytes(model)
        held = getattr(predictor.forward, "held_tensors", list)()  # a decoder's prompt cache
        routes = cross_task.projections(backbone, self.adapter) if self._routed is not None else {}
        return Resident(predictor, owned + tensor_bytes(held), routes)

    def _resident(self, name: str) -> Resident:
        entry = self.tasks[name]
        if name in self._cache:
            entry.stats.hits += 1
            self._cache.move_to_end(name)
            return self._cache[name]
        entry.stats.misses += 1
        resident = self._materialise(entry)  # no larger than the budget: checked at start
        while self._cache and self.cache_bytes() + resident.owned > self.budget:
            evicted, _ = self._cache.popitem(last=False)
            self.tasks[evicted].stats.evictions += 1
        self._cache[name] = resident
        return resident

    # ------------------------------------------------------------------ API
    def task_names(self) -> list[str]:
        """Registered task names, in registration order."""
        return list(self.tasks)

    def describe(self) -> list[dict]:
        """One JSON-ready dict per task: name, task, fields, labels, directory, cached, resident_bytes (now),
        owned_bytes (when materialised). Reads a snapshot of the cache, so it never waits for a forward pass."""
        resident = self.memory()["tasks"]
        return [{"name": name, "task": e.task.name, "fields": list(e.task.fields), "labels": list(e.task.label_names),
                 "directory": str(e.directory), "ffn_sizes": e.skeleton.ffn_sizes(),
                 "head_groups": [len(h) for h in e.skeleton.heads], "cached": resident[name] > 0,
                 "resident_bytes": resident[name], "owned_bytes": self.task_bytes[name]}
                for name, e in self.tasks.items()]

    def parse_inputs(self, name: str, inputs: list) -> list[Example]:
        """Records (dicts with the task's fields, optional label) or plain strings (single-text tasks) ->
        examples. Raises KeyError for an unknown task name and UserError for a bad record."""
        return parse_inputs(self.tasks[name].task, inputs)

    def predict(self, name: str, examples: list[Example]) -> list[dict]:
        """One {"label", "probabilities"} per example, from the task's (possibly freshly materialised) model."""
        with self._lock:
            return self._resident(name).predictor.predict(examples)

    def predict_mixed(self, tagged: list[tuple[str, Example]]) -> list[dict]:
        """One {"label", "probabilities"} per (task name, example), in order; rows of any tasks share passes
        (needs mix_tasks=True)."""
        if self._routed is None:
            raise RuntimeError("mixed passes need MultiTaskModel(..., mix_tasks=True)")
        with self._lock:
            logits = self.mixed_logits(tagged)
        return cross_task.answers(tagged, logits, lambda name: self.tasks[name].task.label_names)

    @torch.inference_mode()
    def mixed_logits(self, tagged: list[tuple[str, Example]]) -> list[torch.Tensor]:
        """Label logits (fp32, on the CPU) per (task name, example), in order (cross_task.mixed_logits)."""
        def encode(name: str, examples: list[Example]) -> list:
            entry = self.tasks[name]
            return data.encode(entry.task, examples, self.backbone.tokenizer, max_length=entry.record["max_length"],
                               readout=entry.record["readout"])

        return cross_task.mixed_logits(tagged, encode, self._mixed_pass, batch_size=self.cfg.batch_size,
                                       pad_id=self.backbone.tokenizer.pad_token_id, causal=self.adapter.causal,
                                       device=self.device)

    def _mixed_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_index: torch.Tensor,
                    names: list[str]) -> list[torch.Tensor]:
        residents = {name: self._resident(name) for name in dict.fromkeys(names)}
        groups = cross_task.row_groups(names, input_ids.device)
        self._routed.route([(groups[name], r.projections) for name, r in residents.items()])
        models = {name: r.predictor.model for name, r in residents.items()}
        caches = {name: r.predictor.forward.prompt_kv for name, r in residents.items()
                  if hasattr(r.predictor.forward, "prompt_kv")}
        try:
            return cross_task.mixed_forward(self._routed.model, models, names, input_ids, attention_mask, answer_index,
                                            caches if len(caches) == len(models) else None)
        finally:
            self._routed.clear()

    def cache_stats(self) -> dict[str, CacheStats]:
        return {name: CacheStats(**vars(e.stats)) for name, e in self.tasks.items()}

    def cache_bytes(self) -> int:
        return sum(r.owned for r in dict(self._cache).values())

    def memory(self) -> dict:
        """{"shared_bytes", "cache_bytes", "cache_budget", "tasks": {name: resident bytes}}; the base model's
        storage counted once, however many tasks share it."""
        cache = dict(self._cache)  # a snapshot (one C-level copy): the worker thread may be evicting
        return {"shared_bytes": storage_bytes(self.backbone.model),
                "cache_bytes": sum(r.owned for r in cache.values()), "cache_budget": self.budget,
                "tasks": {name: cache[name].owned if name in cache else 0 for name in self.tasks}}
