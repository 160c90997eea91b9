"""Conversion (stage 4's algorithm): slice a skeleton out of the base checkpoint into a compact, standard model.

    skeleton-ds convert --base M --skeleton DIR/skeleton.json --prompt DIR/prompt --output DIR/compact
    (inside the pipeline: skeleton_ds/stages/convert.py, `--stages convert` of launch/train.py)

Streaming: the plan (every output tensor's name, dtype and shape) is computed from the base
checkpoint's headers alone, so each output shard's safetensors header can be written first and the
tensors then read, sliced and written one at a time: peak memory is about one tensor, whatever the
model size.

LLaMA family: rows of gate/up and columns of down for kept FFN neurons; rows of q and columns of o
for the kept groups' query heads; rows of k/v for kept KV groups; biases alike. BERT/RoBERTa: rows
and bias of intermediate.dense, columns of output.dense. The config gets the new intermediate_size,
num_attention_heads, num_key_value_heads and an explicit head_dim. A non-uniform skeleton
(global keep mode) is padded, per layer, to the largest kept size with zero neurons / zero heads
(zero input rows and zero output columns), which changes no output: the result stays a standard
architecture and exactly equals the masked model.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open

from skeleton_ds import checkpoint, model_card
from skeleton_ds.architectures import ArchAdapter, Geometry, adapter_for
from skeleton_ds.errors import UserError
from skeleton_ds.loading import resolve_model_path
from skeleton_ds.localization import Skeleton, load_skeleton
from skeleton_ds.model_identity import check_identity, model_identity
from skeleton_ds.prompt import read_task_record

_DTYPES = checkpoint.SAFETENSORS_DTYPES
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = checkpoint.ITEMSIZE


def checkpoint_files(base: Path, *, allow_pickle: bool = False) -> list[Path]:
    """The base model's safetensors shards, in index order; pickles only on explicit request."""
    index = base / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base / f for f in files]
    if (base / "model.safetensors").is_file():
        return [base / "model.safetensors"]
    pickles = sorted(base.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise UserError(f"{base} holds only pickle weights ({pickles[0].name}); loading a pickle can run code: "
                            f"convert only with --allow-pickle if you trust it")
        return pickles
    raise UserError(f"{base} has no model.safetensors or model.safetensors.index.json")


@dataclass(frozen=True)
class Slice:
    """How one base tensor becomes one output tensor: index `rows` along dim 0 and/or `cols` along dim 1.
    Negative indices are zero-filled padding (a neuron or head that has no effect)."""

    rows: tuple[int, ...] | None = None
    cols: tuple[int, ...] | None = None

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        for dim, index in ((0, self.rows), (1, self.cols)):
            if index is None:
                continue
            idx = torch.tensor(index, device=tensor.device)
            picked = tensor.index_select(dim, idx.clamp(min=0))
            pad = (idx < 0).view([-1 if d == dim else 1 for d in range(tensor.dim())])
            tensor = picked.masked_fill(pad, 0) if bool((idx < 0).any()) else picked
        return tensor

    def padding(self, shape: list[int]) -> int:
        """Zero-filled elements in an output of `shape` (padding that per-layer widths cut off again)."""
        rows = self.rows.count(-1) if self.rows is not None else 0
        cols = self.cols.count(-1) if self.cols is not None else 0
        inner = _numel(shape[2:])
        return (rows * (shape[1] if len(shape) > 1 else 1) + cols * shape[0] - rows * cols) * inner

    def shape(self, shape: list[int]) -> list[int]:
        out = list(shape)
        if self.rows is not None:
            out[0] = len(self.rows)
        if self.cols is not None:
            out[1] = len(self.cols)
        return out


def _padded(kept: list[int], size: int) -> tuple[int, ...]:
    return tuple(kept) + (-1,) * (size - len(kept))


def _expand(units: tuple[int, ...], width: int) -> tuple[int, ...]:
    """Unit indices -> the rows/columns they own (a padded unit owns padded rows)."""
    return tuple(u * width + j if u >= 0 else -1 for u in units for j in range(width))


def layer_slices(adapter: ArchAdapter, geometry: Geometry, skeleton: Skeleton) -> list[dict[str, Slice]]:
    """Per layer: module path -> how its weight (and bias) is cut."""
    ffn_size = max(skeleton.ffn_sizes())
    groups = geometry.padded_groups(max(len(h) for h in skeleton.heads))
    q_width = geometry.heads_per_group * geometry.head_dim
    prune_heads = any(len(h) < geometry.kv_heads for h in skeleton.heads)
    plans = []
    for ffn, heads in zip(skeleton.ffn, skeleton.heads):
        neurons = _padded(ffn, ffn_size)
        kept_groups = _padded(heads, groups)
        q_rows = _expand(kept_groups, q_width)
        kv_rows = _expand(kept_groups, geometry.head_dim)
        plan = {path: Slice(rows=neurons) for path in adapter.ffn_in}
        plan[adapter.ffn_out] = Slice(cols=neurons)
        if prune_heads:
            plan[adapter.q_proj] = Slice(rows=q_rows)
            plan |= {path: Slice(rows=kv_rows) for path in adapter.kv_proj}
            plan[adapter.attn_out] = Slice(cols=q_rows)
        plans.append(plan)
    return plans


def compact_config(config: dict, adapter: ArchAdapter, geometry: Geometry, skeleton: Skeleton,
                   bias_flag: str | None = None) -> dict:
    groups = geometry.padded_groups(max(len(h) for h in skeleton.heads))
    if any(len(h) < geometry.kv_heads for h in skeleton.heads) and not adapter.causal:
        raise UserError("removing attention heads from a BERT/RoBERTa model cannot be written as a standard "
                        "checkpoint (transformers derives the head size from hidden_size / num_attention_heads): "
                        "localize encoders with --head-keep 1.0")
    out = dict(config)
    out["intermediate_size"] = max(skeleton.ffn_sizes())
    if bias_flag:
        out[bias_flag] = True
    if adapter.causal:
        out["num_key_value_heads"] = groups
        out["num_attention_heads"] = groups * geometry.heads_per_group
        out["head_dim"] = geometry.head_dim
    return out


def slice_for(name: str, adapter: ArchAdapter, slices: list[dict[str, Slice]]) -> Slice | None:
    """How the tensor called `name` (a checkpoint or state-dict key) is cut; None: kept whole."""
    match = re.search(rf"(?:^|\.){re.escape(adapter.layers)}\.(\d+)\.(.+)\.(weight|bias)$", name)
    if not match:
        return None
    cut = slices[int(match.group(1))].get(match.group(2))
    if cut is not None and match.group(3) == "bias":
        # an output projection's bias is per output feature: untouched
        return Slice(rows=cut.rows) if cut.rows is not None else None
    return cut


def _layer_tensor(names, adapter: ArchAdapter, layer: int, path: str, kind: str) -> str | None:
    pattern = re.compile(rf"(?:^|\.){re.escape(adapter.layers)}\.{layer}\.{re.escape(path)}\.{kind}$")
    return next((n for n in names if pattern.search(n)), None)


def compensation_tensors(files: list[Path], adapter: ArchAdapter, skeleton: Skeleton, means: list[torch.Tensor]
                         ) -> tuple[dict[str, tuple[str, list[int], Callable[[], torch.Tensor]]], str | None]:
    """Bias compensation: each removed FFN neuron's mean activation times its output column, added to
    the FFN output bias, so that the compact model's output equals, to first order (exactly, for the
    mean input), the full model's. Returns name -> (dtype, shape, producer) of the bias tensors to
    write (replacing the base's where it has them), and the config flag that makes the architecture
    carry them (None when it has them natively)."""
    where = {name: (f, info) for f in files for name, info in _header(f).items()}
    size = max(skeleton.ffn_sizes())
    flag = None
    tensors = {}
    for i, kept in enumerate(skeleton.ffn):
        weight = _layer_tensor(where, adapter, i, adapter.ffn_out, "weight")
        bias = weight[:-len("weight")] + "bias"
        file, info = where[weight]
        if bias not in where:
            if adapter.ffn_out_bias in (None, "native"):
                raise UserError(f"{adapter.family} models have no FFN output bias and no standard config option that "
                                f"adds one, so a compensated model would not load with plain from_pretrained: "
                                f"convert with --compensate none")
            flag = adapter.ffn_out_bias
            for path in adapter.ffn_in:  # the flag adds these too: zeros change nothing
                name = _layer_tensor(where, adapter, i, path, "weight")[:-len("weight")] + "bias"
                tensors[name] = (info["dtype"], [size],
                                 lambda dtype=info["dtype"]: torch.zeros(size, dtype=_DTYPES[dtype]))

        def fold(file=file, weight=weight, bias=bias, kept=kept, mean=means[i]) -> torch.Tensor:
            w = _read(file, weight)
            removed = torch.ones(w.shape[1], dtype=torch.bool)
            removed[kept] = False
            value = w.double()[:, removed] @ mean.double()[removed]
            if bias in where:
                value += _read(where[bias][0], bias).double()
            return value.to(w.dtype)

        tensors[bias] = (info["dtype"], [info["shape"][0]], fold)
    return tensors, flag


def plan_tensors(files: list[Path], adapter: ArchAdapter, slices: list[dict[str, Slice]]
                 ) -> list[tuple[str, Path, Slice | None, str, list[int]]]:
    """(name, source file, slice, dtype, output shape) for every tensor, from headers only."""
    plan = []
    for file in files:
        for name, info in _header(file).items():
            cut = slice_for(name, adapter, slices)
            plan.append((name, file, cut, info["dtype"], cut.shape(info["shape"]) if cut else info["shape"]))
    return plan


def _padding(files: list[Path], adapter: ArchAdapter, slices: list[dict[str, Slice]], drop: frozenset[str],
             produced: dict) -> int:
    """Zero-filled elements the compact checkpoint will hold (produced tensors replace the base's)."""
    cuts = {name: (cut, shape) for name, _, cut, _, shape in plan_tensors(files, adapter, slices)}
    cuts |= {name: (slice_for(name, adapter, slices), shape) for name, (_, shape, _) in produced.items()}
    return sum(cut.padding(shape) for name, (cut, shape) in cuts.items() if cut is not None and name not in drop)


def _header(file: Path) -> dict:
    """name -> {"dtype", "shape"} without reading tensor data."""
    if file.suffix == ".bin":
        return {name: {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)} for name, t in _pickle(file).items()}
    return checkpoint.read_header(file)[0]


@functools.lru_cache(maxsize=1)
def _pickle(file: Path) -> dict[str, torch.Tensor]:
    """Only reached with --allow-pickle. weights_only refuses arbitrary objects; mmap keeps the
    tensors on disk until each is sliced."""
    return torch.load(file, map_location="cpu", mmap=True, weights_only=True)


def _read(file: Path, name: str) -> torch.Tensor:
    if file.suffix == ".bin":
        return _pickle(file)[name]
    with safe_open(str(file), "pt") as f:
        return f.get_tensor(name)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n




def write_streaming(path: Path, entries: list[tuple[str, str, list[int]]], tensors: Iterator[torch.Tensor],
                    metadata: dict[str, str]) -> None:
    """Write a safetensors file whose header is known up front, consuming `tensors` one at a time."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = _numel(shape) * _ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, dtype, shape), tensor in zip(entries, tensors, strict=True):
            if list(tensor.shape) != shape or _DTYPE_NAMES[tensor.dtype] != dtype:
                raise RuntimeError(f"planned {name} as {dtype}{shape}, got {tensor.dtype}{list(tensor.shape)}")
            if tensor.numel():
                f.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))  # no extra copy


def convert_weights(base: Path, out: Path, adapter: ArchAdapter, geometry: Geometry, skeleton: Skeleton, *,
                    shard_bytes: int = 2 << 30, allow_pickle: bool = False, drop: frozenset[str] = frozenset(),
                    produced: dict[str, tuple[str, list[int], Callable[[], torch.Tensor]]] | None = None) -> dict:
    """Write the sliced weights of `base` (less `drop`) into `out` as sharded safetensors; returns the weight map.
    `produced` (name -> dtype, shape, producer) replaces or adds tensors (bias compensation)."""
    files = checkpoint_files(base, allow_pickle=allow_pickle)
    produced = produced or {}
    plan = [item for item in plan_tensors(files, adapter, layer_slices(adapter, geometry, skeleton))
            if item[0] not in drop and item[0] not in produced]
    plan += [(name, None, make, dtype, shape) for name, (dtype, shape, make) in produced.items()]
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = _numel(item[4]) * _ITEMSIZE[item[3]]
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for shard_name, shard in zip(names, shards):
        def tensors(items=shard) -> Iterator[torch.Tensor]:
            for name, file, cut, _, _ in items:
                if file is None:  # a produced tensor; `cut` holds its producer
                    yield cut()
                    continue
                tensor = _read(file, name)
                yield cut.apply(tensor) if cut else tensor

        write_streaming(out / shard_name, [(n, d, s) for n, _, _, d, s in shard], tensors(), {"format": "pt"})
        weight_map |= {item[0]: shard_name for item in shard}
    if len(shards) > 1:
        total = sum(_numel(item[4]) * _ITEMSIZE[item[3]] for item in plan)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return weight_map


def summary_line(counts: dict, out: Path) -> str:
    """One line for the user: parameters kept (each layer at its width) and, when it differs, stored."""
    kept, stored = counts.get("parameters_kept", counts["parameters_compact"]), counts["parameters_compact"]
    padded = "" if kept == stored else f"; stored padded to the widest layer: {stored:,}"
    return f"skeleton_ds: compact model ({kept:,} of {counts['parameters_full']:,} parameters{padded}) -> {out}"


def compensation_means(scores: Path, geometry: Geometry, base_model: dict) -> list[torch.Tensor]:
    """Per layer, each FFN neuron's mean activation, from the attribution pass's scores file."""
    from skeleton_ds.attribution import read_attribution

    tensors, meta = read_attribution(scores)
    check_identity(meta["base_model"], base_model, str(scores))
    means = [tensors.get(f"ffn_mean.{i}") for i in range(geometry.layers)]
    if any(m is None or m.shape != (geometry.ffn_size,) for m in means):
        raise UserError(f"{scores} holds no mean FFN activations for this model (written by an older version, or "
                        f"for another model): redo --stages attribute with --overwrite, "
                        f"or convert with --compensate none")
    return means


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                    "generation_config.json")


def local_model_dir(name: str, revision: str | None = None) -> Path:
    """A directory holding the base checkpoint: local as given, else the Hub snapshot (safetensors only)."""
    path = Path(resolve_model_path(name))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated: one line for the user
        raise UserError(f"cannot fetch {name!r} from the Hugging Face Hub ({type(e).__name__}): "
                        f"pass a local directory") from None


def _label_head(files: list[Path], adapter: ArchAdapter, prompt_dir: Path | None
                ) -> tuple[torch.Tensor, frozenset[str], list[int]]:
    """The verbalizer rows of the output head (or of the tied input embedding), and the names to drop."""
    if not adapter.causal or prompt_dir is None:
        raise UserError("--slice-lm-head needs a decoder model and --prompt (its verbalizer decides the rows kept)")
    record = read_task_record(prompt_dir, "stage-1 task record")
    if record["readout"] != "lm":
        raise UserError(f"--slice-lm-head needs a prompt trained with the LM verbalizer readout, "
                        f"not {record['readout']!r}")
    where = {name: f for f in files for name in _header(f)}
    heads = [n for n in where if n.endswith("lm_head.weight")]
    source = heads[0] if heads else next(n for n in where if n.endswith("embed_tokens.weight"))  # tied embeddings
    ids = record["label_token_ids"]
    return _read(where[source], source)[torch.tensor(ids)].clone(), frozenset(heads), ids


def convert(base: str, skeleton_path: Path, prompt_dir: Path | None, out: Path, *, revision: str | None = None,
            allow_pickle: bool = False, overwrite: bool = False, slice_lm_head: bool = False,
            compensate: str = "none", scores: Path | None = None, settings: dict | None = None) -> dict:
    """Build the compact model directory `out` (atomically); returns parameter counts: full, compact
    (stored, padded to the widest layer) and kept (each layer at its own width).

    `slice_lm_head` (classification-only decoders): the vocabulary projection is replaced by its
    verbalizer rows in label_head.safetensors and the model is saved as its base class (e.g.
    LlamaModel), so inference computes a few logits instead of the whole vocabulary.

    `compensate="mean"` folds each removed FFN neuron's mean activation (from the attribution pass,
    `scores`, default: attribution.safetensors beside the skeleton) into the FFN output bias.

    `settings`: the convert stage's settings record (skeleton_ds.lineage), kept in the config's
    skeleton_ds block so the compact model says what it was made from.
    """
    from transformers import AutoConfig

    base_dir = local_model_dir(base, revision)
    config = AutoConfig.from_pretrained(base_dir)
    adapter = adapter_for(config.model_type)
    geometry = adapter.geometry(config)
    skeleton, record = load_skeleton(skeleton_path, geometry)
    check_identity(record["base_model"], model_identity(base, str(base_dir), config, revision),
                   str(skeleton_path))
    files = checkpoint_files(base_dir, allow_pickle=allow_pickle)  # refuse early, before anything is written
    if prompt_dir is not None and not (Path(prompt_dir) / "prompt.safetensors").is_file():
        raise UserError(f"{prompt_dir} has no prompt.safetensors: pass a stage-1 prompt directory (or no --prompt)")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists: pass --overwrite to replace it")
    config_dict = json.loads((base_dir / "config.json").read_text())
    label_head, drop, label_ids = (_label_head(files, adapter, prompt_dir) if slice_lm_head
                                   else (None, frozenset(), None))
    produced, flag = {}, None
    if compensate == "mean":
        means = compensation_means(Path(scores or Path(skeleton_path).parent / "attribution.safetensors"), geometry,
                                   record["base_model"])
        produced, flag = compensation_tensors(files, adapter, skeleton, means)
    elif compensate != "none":
        raise UserError(f"--compensate must be mean or none, got {compensate!r}")
    padding = _padding(files, adapter, layer_slices(adapter, geometry, skeleton), drop, produced)
    with checkpoint.atomic_dir(out, overwrite=overwrite) as staging:
        convert_weights(base_dir, staging, adapter, geometry, skeleton, allow_pickle=allow_pickle, drop=drop,
                        produced=produced)
        small = compact_config(config_dict, adapter, geometry, skeleton, bias_flag=flag)
        small["skeleton_ds"] = {"base_model": record["base_model"], "task": record["task"], "compensate": compensate}
        if settings is not None:
            small["skeleton_ds"]["settings"] = settings
        if label_head is not None:
            small["architectures"] = [a.replace("ForCausalLM", "Model") for a in small.get("architectures") or []]
            small["tie_word_embeddings"] = False
            small["skeleton_ds"]["label_token_ids"] = label_ids
            checkpoint.save_tensors(staging / "label_head.safetensors", {"weight": label_head},
                                    {"label_token_ids": json.dumps(label_ids)})
        for name in _TOKENIZER_FILES:
            if (base_dir / name).is_file():
                (staging / name).write_bytes((base_dir / name).read_bytes())
        (staging / "skeleton.json").write_bytes(Path(skeleton_path).read_bytes())
        if prompt_dir is not None:
            for name in ("prompt.safetensors", "task.json"):
                (staging / name).write_bytes((Path(prompt_dir) / name).read_bytes())
        full = sum(_numel(info["shape"]) for f in files for info in _header(f).values())
        compact = sum(_numel(info["shape"]) for f in checkpoint_files(staging) for info in _header(f).values())
        compact += label_head.numel() if label_head is not None else 0
        # kept: what runs once each layer is cut to its own width (skeleton_ds.widths); compact: what is stored
        counts = {"parameters_full": full, "parameters_compact": compact, "parameters_kept": compact - padding}
        small["skeleton_ds"]["parameters"] = counts
        checkpoint.write_json(staging / "config.json", small)
        prompt_summary = _prompt_summary(prompt_dir)  # made_by stays out of config.json: its date would change
        checkpoint.write_json(staging / model_card.METRICS, model_card.compact_metrics(  # the model's identity hash
            full=(prompt_summary or {}).get("metrics"), before=None, after=None,
            task=model_card.task_data(prompt_summary), made_by=model_card.made_by()))
        model_card.write_compact_card(staging)
        checkpoint.write_manifest(staging)
    return counts


def _prompt_summary(prompt_dir: Path | None) -> dict | None:
    """Stage 1's metrics.json beside the prompt (the full model's dev metrics), if the prompt has one."""
    path = Path(prompt_dir) / "metrics.json" if prompt_dir is not None else None
    return checkpoint.read_json(path, "prompt metrics") if path is not None and path.is_file() else None
