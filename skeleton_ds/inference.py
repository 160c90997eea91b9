"""Answer a task from a compact checkpoint (or from the full model with its stage-1 prompt), fast.

    skeleton-ds infer --checkpoint DIR/compact --data-dir ../shared/data --split validation
    skeleton-ds infer --checkpoint DIR/compact --input records.jsonl > predictions.jsonl
    skeleton-ds infer --base M --prompt DIR/prompt --input -        # the full model, same code

Both sources go through one `Predictor`, so full and compact compare fairly. What makes it fast:
- decoders: the soft prompt comes first and attention is causal, so its keys and values never depend
  on the input; they are computed once when the model loads and every batch starts from them
  (`PromptCachedDecoder`), so the prompt's positions are never run again;
- only the label logits at the answer position are computed (the verbalizer's rows of the LM head,
  or the sliced head a `--slice-lm-head` conversion ships), never the whole vocabulary;
- inputs are sorted by length and batched, so padding is small; `torch.inference_mode`; the
  backbone's SDPA attention; optional `torch.compile`;
- optional bitsandbytes 8-bit / NF4 weights (`quant`).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from skeleton_ds import checkpoint, data
from skeleton_ds.errors import UserError
from skeleton_ds.loading import load_backbone
from skeleton_ds.model_identity import check_identity
from skeleton_ds.prompt import PromptedClassifier, read_task_record
from skeleton_ds.quantization import QUANT_MODES
from skeleton_ds.static_shapes import Buckets, StaticPromptDecoder, prompt_key_values
from skeleton_ds.tasks import Example, Task, compute_metrics, task_from_record

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class InferenceConfig:
    device: str = "auto"  # auto (cuda when available) | cuda | cpu | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | bf16 | fp16 | fp32
    quant: str = "none"  # none | 8bit | 4bit (bitsandbytes)
    batch_size: int = 32
    prompt_cache: bool = True
    compile: bool = False
    static: str = "auto"  # decoders with a prompt cache: on | off | auto (on for CUDA); see static_shapes
    warmup_buckets: bool = False  # static: build (capture, compile) every bucket at load, not on first use

    def static_shapes(self) -> bool:
        """Whether decoders run at bucketed static shapes: it removes per-batch host work and lets CUDA graphs
        capture the pass; eager CPU gains nothing from it (the padding to a bucket costs compute there)."""
        return self.static == "on" or (self.static == "auto" and self.torch_device().type == "cuda")

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise UserError(f"--dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        if self.quant not in QUANT_MODES:
            raise UserError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {self.quant!r}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if self.static not in ("auto", "on", "off"):
            raise UserError(f"--static must be auto, on or off, got {self.static!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {self.device}: no CUDA device is available here; use --device cpu")
        if self.device != "auto" and not self.device.startswith(("cuda", "cpu")):
            raise UserError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        gpu = self.torch_device().type == "cuda"
        return torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float32


class PromptCachedDecoder(nn.Module):
    """A decoder PromptedClassifier whose prompt keys and values are computed once and reused.

    Same inputs and outputs as `PromptedClassifier.forward`; positions are counted over real tokens
    exactly as there (left padding never shifts them), so predictions are the same.
    """

    def __init__(self, model: PromptedClassifier):
        super().__init__()
        if not model.adapter.causal:
            raise ValueError("only decoders (causal attention) can reuse the prompt's keys and values")
        self.model = model
        self.prompt_length = model.prompt.embedding.shape[0]
        self.prompt_kv = prompt_key_values(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_index: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        batch, n = input_ids.shape[0], self.prompt_length
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self.prompt_kv):
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
        mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        positions = n + attention_mask.long().cumsum(-1) - 1  # as the plain path: pads sit at n - 1
        states = self.model.backbone.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                                cache=cache, use_cache=True).last_hidden_state
        return self.model.read_labels(states, attention_mask, answer_index)

    def held_tensors(self) -> list[torch.Tensor]:
        """What this path holds beyond the model (a server counts it against its cache budget)."""
        return [t for pair in self.prompt_kv for t in pair]


class Predictor:
    """A prompted model ready to answer its task: records in, label probabilities out."""

    def __init__(self, model: PromptedClassifier, task: Task, record: dict, tokenizer, cfg: InferenceConfig,
                 source: str):
        self.model, self.task, self.record, self.tokenizer, self.cfg = model, task, record, tokenizer, cfg
        self.source = source
        self.device = next(model.backbone.parameters()).device
        self.causal = model.adapter.causal
        cached = self.causal and cfg.prompt_cache and model.prompt.embedding.shape[0] > 0  # (zero-shot: no prompt)
        if cached and cfg.static_shapes():
            self.forward = StaticPromptDecoder(model, Buckets.up_to(cfg.batch_size, record["max_length"]),
                                               tokenizer.pad_token_id, compile=cfg.compile)
            if cfg.warmup_buckets:
                with torch.inference_mode():
                    self.forward.warm_up()
        else:
            self.forward = PromptCachedDecoder(model) if cached else model
            if cfg.compile:
                self.forward = torch.compile(self.forward, dynamic=True)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(cls, directory: Path, cfg: InferenceConfig = InferenceConfig()) -> Predictor:
        """A compact checkpoint (DIR/compact): its manifest is verified before anything is loaded."""
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"{directory} is not a directory: pass the compact checkpoint DIR/compact")
        if not (directory / "manifest.json").is_file():
            raise UserError(f"{directory} is not a compact checkpoint (no manifest.json): pass the DIR/compact "
                            f"directory the convert stage wrote, or --base M --prompt DIR/prompt for a full model")
        checkpoint.verify_manifest(directory)
        if not (directory / "prompt.safetensors").is_file():
            raise UserError(f"{directory} holds no prompt: convert it with --prompt DIR/prompt (or run the pipeline's "
                            f"convert stage, which ships one)")
        return cls._build(str(directory), directory, cfg, source=f"compact {directory}", compact=True)

    @classmethod
    def from_prompt(cls, base: str, prompt_dir: Path, cfg: InferenceConfig = InferenceConfig(),
                    revision: str | None = None, zero_shot: bool = False) -> Predictor:
        """The full base model with a stage-1 (or re-tuned) prompt, through the same code as a compact one.
        `zero_shot`: the same template and verbalizer without the soft prompt (the floor prompt tuning lifts)."""
        prompt_dir = Path(prompt_dir)
        if not (prompt_dir / "prompt.safetensors").is_file():
            raise UserError(f"{prompt_dir} has no prompt.safetensors: pass a stage-1 prompt directory (DIR/prompt)")
        source = f"zero-shot {base}" if zero_shot else f"full {base} + {prompt_dir}"
        return cls._build(base, prompt_dir, cfg, source=source, compact=False, revision=revision, zero_shot=zero_shot)

    @classmethod
    def _build(cls, model_name: str, prompt_dir: Path, cfg: InferenceConfig, *, source: str, compact: bool,
               revision: str | None = None, zero_shot: bool = False) -> Predictor:
        record = read_task_record(prompt_dir)
        tensors = checkpoint.load_tensors(prompt_dir / "prompt.safetensors")
        if zero_shot:
            if record["readout"] == "head":
                raise UserError(f"{prompt_dir} reads labels with a trained head: without it there is no zero-shot "
                                f"model (only a verbalizer readout has one)")
            record, tensors = record | {"prompt_length": 0}, {}
        device, dtype = cfg.torch_device(), cfg.torch_dtype()
        if cfg.quant == "8bit":  # said once per layer and call on CPU; it is how LLM.int8() works there
            warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        backbone = load_backbone(model_name, readout="head" if record["readout"] == "head" else "verbalizer",
                                 revision=revision, dtype=dtype, quant=cfg.quant, device=str(device),
                                 differentiable=False)
        # A compact model has its own config hash: its prompt was trained either on the base it was sliced
        # from (the stage-1 prompt convert ships) or on the compact model itself (re-tuned).
        origin = (getattr(backbone.model.config, "skeleton_ds", None) or {}).get("base_model", {})
        if not (compact and record["base_model"].get("config_sha256") == origin.get("config_sha256")):
            check_identity(record["base_model"], backbone.identity, f"the prompt in {prompt_dir}")
        task = task_from_record(record)
        model = PromptedClassifier(backbone.model, backbone.adapter, record["readout"], record["prompt_length"],
                                   len(task.label_names), record["label_token_ids"], backbone.label_head)
        model.to(device)  # (a quantized backbone is there already: bitsandbytes placed it)
        model.load_trained(tensors, dtype)
        model.eval()
        return cls(model, task, record, backbone.tokenizer, cfg, source)

    # -------------------------------------------------------------- answering
    def encode(self, examples: Sequence[Example], max_length: int | None = None) -> list[data.Encoded]:
        return data.encode(self.task, examples, self.tokenizer, max_length=max_length or self.record["max_length"],
                           readout=self.model.readout)

    @torch.inference_mode()
    def logits(self, items: Sequence[data.Encoded]) -> torch.Tensor:
        """Label logits [len(items), labels] in input order; batches are cut from length-sorted items."""
        order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
        pad_id, cuda = self.tokenizer.pad_token_id, self.device.type == "cuda"
        results = []
        for start in range(0, len(order), self.cfg.batch_size):
            batch = data.collate([items[i] for i in order[start:start + self.cfg.batch_size]], pad_id,
                                 left_pad=self.causal)
            # CUDA: pinned host memory, copies that do not wait, and no read-back until every batch is queued
            ids, mask, answer = (batch[k].pin_memory().to(self.device, non_blocking=True) if cuda
                                 else batch[k].to(self.device) for k in ("input_ids", "attention_mask", "answer_index"))
            results.append(self.forward(ids, mask, answer).float())
        out = torch.empty(len(items), len(self.task.label_names))
        if results:
            out[order] = torch.cat(results).cpu()
        return out

    def predict(self, examples: Sequence[Example]) -> list[dict]:
        """One {"label", "probabilities"} per example, in order."""
        probs = self.logits(self.encode(examples)).softmax(-1)
        names = self.task.label_names
        return [{"label": names[int(p.argmax())], "probabilities": {n: float(v) for n, v in zip(names, p)}}
                for p in probs]

    def evaluate(self, examples: Sequence[Example]) -> dict:
        """Task metrics over labelled examples, and throughput of the model calls (encoding excluded)."""
        items = self.encode(examples)
        sync(self.device)
        start = time.perf_counter()
        predictions = self.logits(items).argmax(-1).tolist()
        sync(self.device)
        seconds = time.perf_counter() - start
        return {"task": self.task.name, "examples": len(items), "source": self.source,
                "metrics": compute_metrics(self.task, predictions, [e.label for e in items]),
                "seconds": round(seconds, 4), "examples_per_s": round(len(items) / seconds, 2)}

    def weight_bytes(self) -> int:
        return tensor_bytes([*self.model.parameters(), *self.model.buffers()])


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes the tensors' elements take (a packed NF4 tensor: its packed bytes)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ raw input
def parse_record(record, task: Task, where: str) -> Example:
    """One input: a dict with the task's fields (and optionally a label), or a plain string for a
    single-text task. Without a label the example gets label -1."""
    if isinstance(record, str):
        if len(task.fields) != 1:
            raise UserError(f"{where} is plain text, but task {task.name} reads several fields "
                            f"({', '.join(task.fields)}): give records with those fields")
        return Example((record.strip(),), -1)
    if not isinstance(record, dict):
        raise UserError(f"{where} is neither a record nor a string: give {{{', '.join(repr(f) for f in task.fields)}}}")
    missing = [f for f in task.fields if f not in record]
    if missing:
        raise UserError(f"{where} has no field {missing[0]!r}: task {task.name} reads {', '.join(task.fields)} "
                        f"(found {', '.join(sorted(record)) or 'no fields'})")
    label = -1
    if record.get("label") is not None:
        lookup = {name.lower(): i for i, name in enumerate(task.label_names)}
        label = lookup.get(str(record["label"]).strip().lower(), -2)
        if label == -2:
            raise UserError(f"{where} has label {record['label']!r}, which is not one of task {task.name}'s labels "
                            f"({', '.join(task.label_names)})")
    return Example(tuple(str(record[f]).strip() for f in task.fields), label)


def read_records(lines: Iterable[str], task: Task, source: str) -> list[Example]:
    """JSON Lines records, or plain text lines for a single-text task (see parse_record)."""
    examples = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        record = line
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(f"{source} line {number} is not valid JSON ({e})") from None
        examples.append(parse_record(record, task, f"{source} line {number}"))
    if not examples:
        raise UserError(f"{source} holds no input records: give one JSON record (or text line) per line")
    return examples


def evaluation_examples(task: Task, data_dir: Path | None, split: str, limit: int = 0,
                        seed: int | None = None) -> tuple[list[Example], str]:
    """A labelled split of a built-in task (from --data-dir, else the Hub), capped as train caps it (the same
    seeded subset for the same cap and seed), and which examples those are, in words."""
    from skeleton_ds.tasks import describe_subset, load_split, subset

    split = {"validation": "dev"}.get(split, split)
    if task.hub is None:
        raise UserError(f"task {task.name!r} has no built-in data: evaluate it with --input FILE (JSON Lines records "
                        f"with a label field)")
    if limit and seed is None:
        raise ValueError("a capped split needs the seed that selects it (train's --seed)")
    examples = load_split(task, split, data_dir)
    return subset(examples, limit, seed), describe_subset(limit, len(examples), seed)


def label_accuracy(predictions: Sequence[dict], examples: Sequence[Example], task: Task) -> dict | None:
    """Metrics when every input record carried a label, else None."""
    if any(e.label < 0 for e in examples):
        return None
    ids = {n: i for i, n in enumerate(task.label_names)}
    return compute_metrics(task, [ids[p["label"]] for p in predictions], [e.label for e in examples])

