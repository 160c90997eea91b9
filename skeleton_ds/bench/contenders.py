"""The contenders: our Predictor on the full and compact models, and the PEFT model a prompt-tuning
user runs, each with its weight counts."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable

import torch

from skeleton_ds import checkpoint, data
from skeleton_ds.attribution import read_attribution
from skeleton_ds.inference import InferenceConfig, Predictor, tensor_bytes
from skeleton_ds.loading import resolve_model_path
from skeleton_ds.localization import keep_count
from skeleton_ds.tasks import Task
from skeleton_ds.bench.config import PACKAGED_READOUT, BenchConfig, note
from skeleton_ds.bench.fixtures import compact_checkpoint, random_base, synthetic_prompt_dir

# --------------------------------------------------------------- contenders
@dataclass
class Contender:
    name: str
    run: Callable[[list[data.Encoded]], torch.Tensor]
    """Label logits of one batch of encoded inputs (collation and device transfer included)."""
    config: dict
    prompt_cached: bool
    head: str
    parameters: int
    weight_bytes: int
    ffn_keep: float = 1.0
    head_keep: float = 1.0
    quant: str = "none"
    predictor: Predictor | None = None
    seconds: dict[tuple[str, int], list[float]] = field(default_factory=dict)  # per workload key
    peak_bytes: dict[tuple[str, int], int] = field(default_factory=dict)


def _weights(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, bytes resident): an NF4 tensor packs two weights per byte, so its parameter count
    is read from its quantization state."""
    tensors = [*module.parameters(), *module.buffers()]
    logical = sum(t.quant_state.shape.numel() if getattr(t, "quant_state", None) is not None else t.numel()
                  for t in tensors)
    return logical, tensor_bytes(tensors)


def layer_widths(model: torch.nn.Module, adapter, config: dict) -> dict | None:
    """The FFN width and KV-head count each layer of `model` computes with, when they are not the
    config's (a per-layer-width compact model whose layers our loader cut; skeleton_ds.widths)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    layers = adapter.layer_modules(model)
    ffn = [layer.get_submodule(adapter.ffn_out).in_features for layer in layers]
    kv = [layer.get_submodule(adapter.kv_proj[0]).out_features // head_dim for layer in layers]
    uniform = (set(ffn) == {config["intermediate_size"]}
               and set(kv) == {config.get("num_key_value_heads") or heads})
    return None if uniform else {"ffn": ffn, "kv_heads": kv}


def _ours(name: str, predictor: Predictor, **extra) -> Contender:
    params, nbytes = _weights(predictor.model)
    config = predictor.model.backbone.config.to_dict()
    widths = layer_widths(predictor.model.backbone, predictor.model.adapter, config)
    if widths is not None:
        config["layer_widths"] = widths
    return Contender(name, predictor.logits, config, prompt_cached=predictor.causal and predictor.cfg.prompt_cache,
                     head="labels", parameters=params, weight_bytes=nbytes, predictor=predictor, **extra)


def _peft(full: Predictor, prompt_dir: Path, adapter_dir: Path, full_logits: bool) -> list[Contender]:
    """PEFT prompt tuning over the same loaded base weights, run the fastest standard way: under
    inference_mode, no generation cache, and on a decoder the vocabulary at the last position only
    (`logits_to_keep=1`), the label logits picked from it. An encoder (a feature extractor, the only
    encoder readout benchmarked here) computes no vocabulary: the trained head reads the mean of the
    text states. `full_logits` adds `peft-full-logits`: the whole vocabulary at every position."""
    import peft

    from skeleton_ds.interop import export_peft

    export_peft(prompt_dir, adapter_dir, overwrite=True)
    model = full.model
    wrapped = peft.PeftModel.from_pretrained(model.backbone, str(adapter_dir)).eval()
    n, device, causal = model.prompt.embedding.shape[0], full.device, full.causal
    pad = full.tokenizer.pad_token_id

    def runner(keep: int) -> Callable[[list[data.Encoded]], torch.Tensor]:
        @torch.inference_mode()
        def run(items: list[data.Encoded]) -> torch.Tensor:
            batch = data.collate(items, pad, left_pad=causal)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            if causal:
                output = wrapped(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep)
                return output.logits[:, -1, model.label_token_ids].float()
            output = wrapped(input_ids=ids, attention_mask=mask)
            return model.read_labels(output.last_hidden_state[:, n:], mask, batch["answer_index"].to(device))
        return run

    params, nbytes = _weights(model.backbone)
    config = model.backbone.config.to_dict()
    out = [Contender("peft", runner(1), config, prompt_cached=False, head="vocab-last" if causal else "labels",
                     parameters=params, weight_bytes=nbytes)]
    if full_logits and causal:  # logits_to_keep=0 keeps every position
        out.append(Contender("peft-full-logits", runner(0), config, prompt_cached=False, head="vocab-all",
                             parameters=params, weight_bytes=nbytes))
    return out


def build_contenders(cfg: BenchConfig, work: Path) -> tuple[list[Contender], Task | None]:
    # today's eager path for every contender; --graphs adds the static-shape rows (the CUDA default of infer/serve)
    infer = InferenceConfig(device=cfg.device, dtype=cfg.dtype, batch_size=max(cfg.batch_sizes), static="off")
    device, dtype = infer.torch_device(), infer.torch_dtype()
    scores = None
    if cfg.shape in PACKAGED_READOUT:
        base = Path(resolve_model_path(cfg.shape))
        if cfg.run_dir is not None:
            prompt_dir = cfg.run_dir / "prompt"
            if (cfg.run_dir / "attribution.safetensors").is_file():
                scores, _ = read_attribution(cfg.run_dir / "attribution.safetensors")
        else:
            prompt_dir = synthetic_prompt_dir(base, work / "prompt", cfg.prompt_length, PACKAGED_READOUT[cfg.shape])
    else:
        base = cfg.base_dir
        if base is None:
            start = time.perf_counter()
            base = random_base(cfg.shape, work / "base", dtype, device)
            note(f"random {cfg.shape} base saved in {time.perf_counter() - start:.1f} s")
        prompt_dir = synthetic_prompt_dir(base, work / "prompt", cfg.prompt_length, "lm")
    start = time.perf_counter()
    full = Predictor.from_prompt(str(base), prompt_dir, infer)
    note(f"full model loaded in {time.perf_counter() - start:.1f} s")
    contenders = [] if cfg.skip_peft else _peft(full, prompt_dir, work / "peft", cfg.peft_full_logits)
    contenders.append(_ours("full", full))
    decoder = full.causal
    plans = [(k, 1.0) for k in cfg.ffn_keeps]
    base_groups = full.model.backbone.config.num_key_value_heads if decoder else 1
    geometry = full.model.adapter.geometry(full.model.backbone.config)
    if decoder and cfg.head_keep < 1 and geometry.loadable_groups(keep_count(base_groups, cfg.head_keep)) < base_groups:
        plans += [(k, cfg.head_keep) for k in cfg.ffn_keeps
                  if k < 1 and (not cfg.head_ffn_keeps or k in cfg.head_ffn_keeps)]
    elif decoder and cfg.head_keep < 1:  # (LLaMA-3-8B and TinyLlama at 0.75: the head count rounds to all)
        note(f"--head-keep {cfg.head_keep:g} rounds to all {base_groups} KV groups of {cfg.shape}: "
              f"no head-pruned rows")
    graphs = cfg.graphs and decoder  # static shapes (CUDA: a captured graph per bucket)
    reused = work / "compact-0.3-1.0" if cfg.quant or cfg.compile or graphs else None  # variants below reload it
    for ffn_keep, head_keep in plans:
        start = time.perf_counter()
        out = compact_checkpoint(base, prompt_dir, scores, work / f"compact-{ffn_keep}-{head_keep}",
                                 ffn_keep=ffn_keep, head_keep=head_keep, align=cfg.align, slice_lm_head=decoder,
                                 mode=cfg.keep_mode, protect=cfg.protect_outliers)
        built = time.perf_counter() - start
        compact = Predictor.from_checkpoint(out, infer)
        note(f"compact ffn {ffn_keep:g} kv {head_keep:g}: built in {built:.1f} s, loaded in "
              f"{time.perf_counter() - start - built:.1f} s")
        # The share of KV groups actually kept, over all layers: rounded to counts transformers can load
        # (Geometry.allows_groups), and per layer under global allocation, where the config's head count is
        # only the widest layer's.
        counts = checkpoint.read_json(out / "skeleton.json", "skeleton")["head_counts"]
        kept = sum(counts) / (len(counts) * base_groups) if decoder else 1.0
        if cfg.work_dir is None and out != reused:
            # Loaded: a temporary checkpoint is not needed again. An 8B base and its compact models
            # at the default keeps take about 53 GB together in bf16: more than a GPU box may spare.
            shutil.rmtree(out)
        name = f"compact-{ffn_keep:g}" + (f"-h{kept:.2g}" if kept < 1 else "")
        contenders.append(_ours(name, compact, ffn_keep=ffn_keep, head_keep=round(kept, 4)))
    variants = [(f"compact-0.3-{q}", {"quant": q}) for q in cfg.quant]
    variants += [("compact-0.3-compiled", {"compile": True})] if cfg.compile else []
    if graphs:
        variants.append(("compact-0.3-graphs", {"static": "on"}))
        contenders.append(_ours("full-graphs",
                                Predictor.from_prompt(str(base), prompt_dir, replace(infer, static="on"))))
    for name, override in variants:  # the FFN-0.3 compact model served differently
        out = work / "compact-0.3-1.0"
        if not out.is_dir():
            compact_checkpoint(base, prompt_dir, scores, out, ffn_keep=0.3, head_keep=1.0, align=cfg.align,
                               slice_lm_head=decoder, mode=cfg.keep_mode, protect=cfg.protect_outliers)
        predictor = Predictor.from_checkpoint(out, replace(infer, **override))
        contenders.append(_ours(name, predictor, ffn_keep=0.3, quant=override.get("quant", "none")))
    task = full.task if cfg.shape in PACKAGED_READOUT and cfg.run_dir is not None else None
    return contenders, task
