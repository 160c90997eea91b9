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
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from skeleton_ds import checkpoint, engine
from skeleton_ds.errors import UserError
from skeleton_ds.inference import InferenceConfig, Predictor, parse_record, tensor_bytes
from skeleton_ds.localization import Skeleton, load_skeleton
from skeleton_ds.prompt import PromptedClassifier
from skeleton_ds.surgery import compact_config, layer_slices, slice_for
from skeleton_ds.tasks import Example, Task, task_from_record


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


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
    record = checkpoint.read_json(prompt_dir / "task.json", "task record")
    label = name or record["task"]
    base_hash = base_identity["config_sha256"]
    if skeleton_record["base_model"].get("config_sha256") != base_hash:
        raise UserError(f"task {label!r} ({directory}) was localized for base model "
                        f"{skeleton_record['base_model'].get('name_or_path')!r}, not {base_identity['name_or_path']!r}: "
                        f"serve it with that --base")
    prompt_base = record["base_model"].get("config_sha256")
    if prompt_base != base_hash and not (compact_dir.is_dir() and prompt_base == engine.directory_config_hash(compact_dir)):
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

    from skeleton_ds.surgery import checkpoint_files

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


class MultiTaskModel:
    """Thread-safe: one lock around materialisation and the forward pass (one pass at a time)."""

    def __init__(self, base: str, task_dirs: list[Path | str], *, cache_bytes: int = 1 << 30,
                 cfg: InferenceConfig = InferenceConfig()):
        if cfg.quant != "none":
            raise UserError("serving shared weights slices the base model's tensors, which bitsandbytes "
                            "layers do not allow: serve with --quant none")
        if not task_dirs:
            raise UserError("give at least one --task-dir")
        if cache_bytes < 0:
            raise UserError(f"--cache-bytes must be >= 0, got {cache_bytes}")
        self.cfg, self.budget = cfg, cache_bytes
        self.device, self.dtype = cfg.torch_device(), cfg.torch_dtype()
        self.tasks: dict[str, TaskEntry] = {}
        specs = [_named(str(d)) for d in task_dirs]
        from transformers import AutoConfig

        path = engine.resolve_model_path(base)
        try:
            base_config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load model config for --base {base!r}: {str(e).splitlines()[0]}") from None
        identity = engine.model_identity(base, path, base_config, None)
        for name, directory in specs:  # every task is checked before the base model is loaded
            entry = read_task_dir(Path(directory), identity, name or None)
            if entry.name in self.tasks:
                raise UserError(f"two task directories answer {entry.name!r} ({self.tasks[entry.name].directory} and "
                                f"{directory}): name them, --task-dir NAME=DIR")
            self.tasks[entry.name] = entry
        readouts = {e.record["readout"] for e in self.tasks.values()}
        self.backbone = engine.load_backbone(base, readout="head" if readouts == {"head"} else "verbalizer",
                                             dtype=self.dtype, device=str(self.device), differentiable=False)
        self.backbone.model.to(self.device)
        self.adapter = self.backbone.adapter
        self.geometry = self.adapter.geometry(self.backbone.model.config)
        self._cache: OrderedDict[str, tuple[Predictor, int]] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------ materialise
    def _task_backbone(self, skeleton: Skeleton, compensated: dict[str, torch.Tensor]) -> tuple[nn.Module, int]:
        """The compact architecture of `skeleton` as a module tree whose unsliced tensors are the base
        model's own; returns it with the bytes of the tensors it owns (the sliced ones, and the FFN
        biases of a compensated task)."""
        base = self.backbone.model
        slices = layer_slices(self.adapter, self.geometry, skeleton)
        flag = self.adapter.ffn_out_bias if compensated and self.adapter.ffn_out_bias != "native" else None
        config = type(base.config).from_dict(compact_config(base.config.to_dict(), self.adapter, self.geometry, skeleton,
                                                            bias_flag=flag))
        config._attn_implementation = base.config._attn_implementation
        with torch.device("meta"):
            model = type(base)(config)
        state, owned = {}, 0
        for name, tensor in base.state_dict().items():
            cut = slice_for(name, self.adapter, slices)
            state[name] = cut.apply(tensor) if cut else tensor
            owned += tensor_bytes([state[name]]) if cut else 0
        paths = [self.adapter.ffn_out, *(self.adapter.ffn_in if flag else ())]
        folded = re.compile(rf"(?:^|\.){re.escape(self.adapter.layers)}\.\d+\.({'|'.join(map(re.escape, paths))})\.bias$")
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
        return model.requires_grad_(False).eval(), owned

    def _materialise(self, entry: TaskEntry) -> tuple[Predictor, int]:
        backbone, owned = self._task_backbone(entry.skeleton, entry.compensated)
        record = entry.record
        model = PromptedClassifier(backbone, self.adapter, record["readout"], record["prompt_length"],
                                   len(entry.task.label_names), record["label_token_ids"])
        model.to(self.device)  # the shared tensors are there already: moving them is a no-op, no copy
        model.load_trained(entry.prompt, self.dtype)
        model.eval()
        predictor = Predictor(model, entry.task, record, self.backbone.tokenizer, self.cfg, source=f"task {entry.name}")
        owned += tensor_bytes([*model.prompt.parameters(), *(model.head.parameters() if model.head is not None else [])])
        cached = getattr(predictor.forward, "prompt_kv", [])
        return predictor, owned + tensor_bytes(t for pair in cached for t in pair)

    def _predictor(self, name: str) -> Predictor:
        entry = self.tasks[name]
        if name in self._cache:
            entry.stats.hits += 1
            self._cache.move_to_end(name)
            return self._cache[name][0]
        entry.stats.misses += 1
        predictor, owned = self._materialise(entry)
        if owned > self.budget:
            return predictor  # larger than the whole cache: answer, never keep (the budget is never exceeded)
        while self._cache and self.cache_bytes() + owned > self.budget:
            evicted, _ = self._cache.popitem(last=False)
            self.tasks[evicted].stats.evictions += 1
        self._cache[name] = (predictor, owned)
        return predictor

    # ------------------------------------------------------------------ API
    def task_names(self) -> list[str]:
        """Registered task names, in registration order."""
        return list(self.tasks)

    def describe(self) -> list[dict]:
        """One JSON-ready dict per task: name, task, fields, labels, directory, cached, resident_bytes.
        Reads a snapshot of the cache, so it never waits for a forward pass."""
        resident = self.memory()["tasks"]
        return [{"name": name, "task": e.task.name, "fields": list(e.task.fields), "labels": list(e.task.label_names),
                 "directory": str(e.directory), "ffn_sizes": e.skeleton.ffn_sizes(),
                 "head_groups": [len(h) for h in e.skeleton.heads], "cached": resident[name] > 0,
                 "resident_bytes": resident[name]} for name, e in self.tasks.items()]

    def parse_inputs(self, name: str, inputs: list) -> list[Example]:
        """Records (dicts with the task's fields, optional label) or plain strings (single-text tasks) ->
        examples. Raises KeyError for an unknown task name and UserError for a bad record."""
        task = self.tasks[name].task
        if not inputs:
            raise UserError("inputs is empty: give at least one record")
        return [parse_record(record, task, f"input {i}") for i, record in enumerate(inputs)]

    def predict(self, name: str, examples: list[Example]) -> list[dict]:
        """One {"label", "probabilities"} per example, from the task's (possibly freshly materialised) model."""
        with self._lock:
            return self._predictor(name).predict(examples)

    def cache_stats(self) -> dict[str, CacheStats]:
        return {name: CacheStats(**vars(e.stats)) for name, e in self.tasks.items()}

    def cache_bytes(self) -> int:
        return sum(owned for _, owned in dict(self._cache).values())

    def memory(self) -> dict:
        """{"shared_bytes", "cache_bytes", "cache_budget", "tasks": {name: resident bytes}}; the base model's
        storage counted once, however many tasks share it."""
        model = self.backbone.model
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [*model.parameters(), *model.buffers()]}
        cache = dict(self._cache)  # a snapshot (one C-level copy): the worker thread may be evicting
        return {"shared_bytes": sum(storages.values()), "cache_bytes": sum(owned for _, owned in cache.values()),
                "cache_budget": self.budget, "tasks": {name: cache[name][1] if name in cache else 0 for name in self.tasks}}
