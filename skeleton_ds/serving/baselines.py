"""The ways of serving N tasks that Skeleton's shared-weight server (skeleton_ds.serving.multitask) is measured
against, with the same API, so the same HTTP server and load test run them:

- `PromptTuningModel`: what a prompt-tuning user runs: the one full base model and each task's stage-1
  prompt (and head), nothing sliced. A prompt is an input, so one forward pass may hold rows of different
  tasks (`predict_mixed`); it pays the full model per pass, and owns only its prompts.
- `SeparateCompactModels`: each task's compact checkpoint loaded on its own, nothing shared: the memory of
  N separate deployments in one process, each task at its compact cost, one task per pass.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from skeleton_ds import checkpoint
from skeleton_ds.serving import cross_task
from skeleton_ds.errors import UserError
from skeleton_ds.inference import InferenceConfig, Predictor, tensor_bytes
from skeleton_ds.serving.multitask import (CacheStats, base_model_identity, owned_bytes, parse_inputs, prompted,
                                           register, shared_backbone, storage_bytes)
from skeleton_ds.tasks import Example, Task, task_from_record


# ------------------------------------------------------ plain prompt tuning
@dataclass
class PromptEntry:
    """A task served by plain prompt tuning: its stage-1 prompt (and head), trained on the full base."""

    name: str
    directory: Path  # the prompt directory
    record: dict  # its task.json
    task: Task
    prompt: dict[str, torch.Tensor]


def read_prompt_dir(directory: Path, identity: dict, name: str | None = None) -> PromptEntry:
    """DIR/prompt of a pipeline output, or a directory holding prompt.safetensors itself (a prompt directory,
    or a compact checkpoint, which ships the stage-1 prompt). The prompt must be the base model's: a
    re-tuned prompt belongs to its compact model, and is refused by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--task-dir {directory} is not a directory")
    if (directory / "manifest.json").is_file():  # a compact checkpoint: its prompt is checked with the rest
        checkpoint.verify_manifest(directory)
    prompt_dir = directory / "prompt" if (directory / "prompt" / "prompt.safetensors").is_file() else directory
    if not (prompt_dir / "prompt.safetensors").is_file() or not (prompt_dir / "task.json").is_file():
        raise UserError(f"--task-dir {directory} holds no stage-1 prompt "
                        f"(DIR/prompt/prompt.safetensors and task.json): "
                        f"run the pipeline's prompt stage first")
    record = checkpoint.read_json(prompt_dir / "task.json", "task record")
    label = name or record["task"]
    if record["base_model"].get("config_sha256") != identity["config_sha256"]:
        raise UserError(f"task {label!r} ({prompt_dir}): its prompt was trained on "
                        f"{record['base_model'].get('name_or_path')!r}, not on the base {identity['name_or_path']!r} "
                        f"(a re-tuned prompt belongs to its compact model): "
                        f"serve DIR/prompt with the base it was tuned on")
    return PromptEntry(label, prompt_dir, record, task_from_record(record),
                       checkpoint.load_tensors(prompt_dir / "prompt.safetensors"))


class PromptTuningModel:
    """Plain prompt tuning, served: one full base model, each task's stage-1 prompt (and head) on it.

    Same API as MultiTaskModel, plus `predict_mixed`: a prompt is an input, so one forward pass holds
    rows of different tasks, each row with its own task's prompt (decoders get no prompt key/value cache,
    which is per task). Thread-safe: one lock around the forward pass."""

    mixes_tasks = True  # the server keeps one FIFO across tasks for a model that says so

    def __init__(self, base: str, task_dirs: list[Path | str], *, cfg: InferenceConfig = InferenceConfig()):
        if cfg.quant != "none":
            raise UserError("serving plain prompt tuning runs the base model's plain tensors: serve with --quant none")
        identity = base_model_identity(base)
        self.tasks: dict[str, PromptEntry] = register(task_dirs, lambda d, name: read_prompt_dir(d, identity, name))
        self.cfg = replace(cfg, prompt_cache=False, compile=False)
        backbone = shared_backbone(base, [e.record for e in self.tasks.values()], cfg)
        self.backbone, self.pad_id = backbone.model, backbone.tokenizer.pad_token_id
        self.causal = backbone.adapter.causal
        device, dtype = cfg.torch_device(), cfg.torch_dtype()
        self.predictors = {  # one per task, for its encoding and its prompted model; all on the one backbone
            name: Predictor(prompted(self.backbone, backbone.adapter, e.record, e.task, e.prompt, device, dtype),
                            e.task, e.record, backbone.tokenizer, self.cfg, source=f"full {base} + {e.directory}")
            for name, e in self.tasks.items()}
        self.device = device
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ API
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def describe(self) -> list[dict]:
        """One JSON-ready dict per task: name, task, fields, labels, directory, prompt_length, readout,
        resident_bytes (its prompt and head; every task is always resident)."""
        owned = self.memory()["tasks"]
        return [{"name": name, "task": e.task.name, "fields": list(e.task.fields), "labels": list(e.task.label_names),
                 "directory": str(e.directory), "prompt_length": e.record["prompt_length"],
                 "readout": e.record["readout"], "cached": True, "resident_bytes": owned[name]}
                for name, e in self.tasks.items()]

    def parse_inputs(self, name: str, inputs: list) -> list[Example]:
        """As MultiTaskModel.parse_inputs: KeyError for an unknown task, UserError for a bad record."""
        return parse_inputs(self.tasks[name].task, inputs)

    def predict(self, name: str, examples: list[Example]) -> list[dict]:
        return self.predict_mixed([(name, e) for e in examples])

    def predict_mixed(self, tagged: list[tuple[str, Example]]) -> list[dict]:
        """One {"label", "probabilities"} per (task name, example), in order; rows of any tasks share passes."""
        with self._lock:
            logits = self.mixed_logits(tagged)
        return cross_task.answers(tagged, logits, lambda name: self.tasks[name].task.label_names)

    def cache_stats(self) -> dict[str, CacheStats]:
        return {}  # no cache: every prompt is resident from the start

    def memory(self) -> dict:
        """As MultiTaskModel.memory; "cache_bytes" is every task's prompt and head, and there is no budget (null)."""
        tasks = {name: owned_bytes(p.model) for name, p in self.predictors.items()}
        return {"shared_bytes": storage_bytes(self.backbone), "cache_bytes": sum(tasks.values()), "cache_budget": None,
                "tasks": tasks}

    # --------------------------------------------------------- the forward
    @torch.inference_mode()
    def mixed_logits(self, tagged: list[tuple[str, Example]]) -> list[torch.Tensor]:
        """Label logits (fp32, on the CPU) per (task name, example), in order (cross_task.mixed_logits)."""
        return cross_task.mixed_logits(tagged, lambda name, examples: self.predictors[name].encode(examples),
                                       self._forward, batch_size=self.cfg.batch_size, pad_id=self.pad_id,
                                       causal=self.causal, device=self.device)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_index: torch.Tensor,
                 names: list[str]) -> list[torch.Tensor]:
        """The full base model once over rows of many tasks, each row with its own prompt (no prompt cache)."""
        models = {name: self.predictors[name].model for name in dict.fromkeys(names)}
        return cross_task.mixed_forward(self.backbone, models, names, input_ids, attention_mask, answer_index)


# ------------------------------------------------- separate compact models
@dataclass
class CompactEntry:
    """A task served from its own compact checkpoint."""

    name: str
    directory: Path  # the compact checkpoint
    predictor: Predictor


class SeparateCompactModels:
    """Each task's compact checkpoint (DIR/compact, or a compact checkpoint directory) loaded on its own:
    nothing is shared, every task is resident, one task per pass. Same API as MultiTaskModel."""

    mixes_tasks = False

    def __init__(self, task_dirs: list[Path | str], *, cfg: InferenceConfig = InferenceConfig()):
        self.cfg = cfg

        def read(directory: Path, name: str | None) -> CompactEntry:
            compact = directory if (directory / "manifest.json").is_file() else directory / "compact"
            if not (compact / "manifest.json").is_file():
                raise UserError(f"--task-dir {directory} holds no compact checkpoint (DIR/compact/manifest.json): run "
                                f"the pipeline's convert stage first")
            predictor = Predictor.from_checkpoint(compact, cfg)
            return CompactEntry(name or predictor.task.name, compact, predictor)

        self.tasks: dict[str, CompactEntry] = register(task_dirs, read)
        self._lock = threading.Lock()

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def describe(self) -> list[dict]:
        """As MultiTaskModel.describe; every task is resident and owns its whole model."""
        owned = self.memory()["tasks"]
        return [{"name": name, "task": e.predictor.task.name, "fields": list(e.predictor.task.fields),
                 "labels": list(e.predictor.task.label_names), "directory": str(e.directory), "cached": True,
                 "resident_bytes": owned[name], "owned_bytes": owned[name]} for name, e in self.tasks.items()]

    def parse_inputs(self, name: str, inputs: list) -> list[Example]:
        return parse_inputs(self.tasks[name].predictor.task, inputs)

    def predict(self, name: str, examples: list[Example]) -> list[dict]:
        with self._lock:
            return self.tasks[name].predictor.predict(examples)

    def cache_stats(self) -> dict[str, CacheStats]:
        return {}  # no cache: every model is resident from the start

    def memory(self) -> dict:
        """As MultiTaskModel.memory: nothing shared; each task's whole model (and prompt cache) is its own."""
        tasks = {name: storage_bytes(e.predictor.model)
                 + tensor_bytes(getattr(e.predictor.forward, "held_tensors", list)()) for name, e in self.tasks.items()}
        return {"shared_bytes": 0, "cache_bytes": sum(tasks.values()), "cache_budget": None, "tasks": tasks}
