"""How much faster a compact checkpoint answers than what users run today, measured in one process.

    python launch/bench.py --shape llama-160m --out runs/bench/llama-160m
    python launch/bench.py --shape minilm --run-dir runs/minilm-sst2 --data-dir ../shared/data --out runs/bench/minilm
    python launch/bench.py --shape llama3-8b --device cuda --dtype bf16 --out runs/bench/llama3-8b   # GPU only

Contenders, all answering the same inputs in the same process:
- `peft`: the full model with the same prompt through `peft` prompt tuning (PeftModel over the base
  model, full forward, label logits picked from its output): what a user would pick today;
- `full`: our Predictor on the full model (prompt cache, label-only logits);
- `compact-F[-hH]`: our Predictor on compact checkpoints at FFN keep F (and KV-group keep H), made by
  the real localize + convert code (random scores for random-weight shapes: speed does not depend on
  which neurons are kept; the run's attribution scores for `minilm --run-dir`).
After a warm-up, each round times every contender once, in a rotated order, so drift and noise hit
all of them alike; the median and quartiles over rounds are reported. The FLOP count of each
contender's forward (linear layers, attention scores, the head, the prompt positions it computes)
gives the arithmetic bound of each speed-up, and `of bound` says how much of it the measured
speed-up reaches. Decoder shapes have random weights (speed does not need trained ones), so only
`minilm` reports accuracy.
"""

from __future__ import annotations

import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from skeleton_ds import checkpoint, data, engine
from skeleton_ds.adapters import adapter_for
from skeleton_ds.attribution import random_scores, read_attribution
from skeleton_ds.errors import UserError
from skeleton_ds.inference import InferenceConfig, Predictor, evaluation_examples, sync, tensor_bytes
from skeleton_ds.localization import keep_count, select, skeleton_record
from skeleton_ds.prompt import task_record
from skeleton_ds.tasks import Task, compute_metrics

_LLAMA = dict(model_type="llama", vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)
SHAPES: dict[str, dict] = {
    "tiny": dict(_LLAMA, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
    "llama-160m": dict(_LLAMA, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12),
    "tinyllama-1.1b": dict(_LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4),
    "llama3-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "minilm": {},  # the real packaged all-MiniLM-L6-v2
}
GPU_ONLY = {"llama3-8b"}


@dataclass
class BenchConfig:
    shape: str = "llama-160m"
    out: Path = Path("runs/bench")
    device: str = "auto"
    dtype: str = "auto"
    batch_sizes: tuple[int, ...] = (32, 1)
    text_length: int = 128
    prompt_length: int = 20
    rounds: int = 10
    warmup: int = 2
    ffn_keeps: tuple[float, ...] = (1.0, 0.5, 0.3, 0.2)
    head_keep: float = 0.75  # decoders: also compact models with this KV-group keep (1.0: none)
    align: int = 64
    run_dir: Path | None = None  # minilm: a pipeline output (prompt + attribution scores) for real accuracy
    data_dir: Path | None = None
    quant: tuple[str, ...] = ()  # extra contenders: the FFN-0.3 compact model in these bitsandbytes modes
    work_dir: Path | None = None  # where base and compact checkpoints are built (default: a temporary dir)
    seed: int = 0
    skip_peft: bool = False
    compile: bool = False  # also time the FFN-0.3 compact model under torch.compile
    profile: bool = False  # profile the FFN-0.3 compact model's batches (operator time vs wall time)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise UserError(f"--shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.shape in GPU_ONLY and not torch.cuda.is_available():
            raise UserError(f"--shape {self.shape} needs a GPU (about 16 GB in bf16 per copy); none is available here")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.rounds < 1 or self.warmup < 0:
            raise UserError("--batch-sizes must be positive, --rounds >= 1 and --warmup >= 0")
        if any(not 0 < k <= 1 for k in (*self.ffn_keeps, self.head_keep)):
            raise UserError("keep ratios must be in (0, 1]")
        if self.run_dir is not None and self.shape != "minilm":
            raise UserError("--run-dir applies to --shape minilm (a pipeline output on the packaged MiniLM)")
        if self.run_dir is not None and not (self.run_dir / "prompt" / "prompt.safetensors").is_file():
            raise UserError(f"--run-dir {self.run_dir} has no prompt/prompt.safetensors: run the pipeline there first")
        bad = [q for q in self.quant if q not in ("8bit", "4bit")]
        if bad:
            raise UserError(f"--quant takes 8bit and/or 4bit, got {', '.join(bad)}")
        InferenceConfig(device=self.device, dtype=self.dtype)  # validates device and dtype


def _note(message: str) -> None:
    """A progress line on stderr: building an 8B model's checkpoints takes minutes, and a log that
    stops shows where."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------- FLOPs
def flop_breakdown(config: dict, *, batch: int, text: int, prompt: int, prompt_cached: bool, head: str,
                   labels: int) -> dict[str, float]:
    """Multiply-adds x 2 of one forward, by part: `linear` (every projection over the positions
    computed: the prompt's too unless its keys and values are cached), `attention` (QK^T and AV over
    all keys, as SDPA with a padding mask computes them) and `head`: `labels` (label rows at one
    position, or a classifier head on one pooled state) or `vocab` (the whole vocabulary at every
    position, as a CausalLM forward computes it)."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    gated = adapter_for(config["model_type"]).causal  # LLaMA family: gate, up, down; BERT: in, out
    ffn = config["intermediate_size"] * hidden * (3 if gated else 2)
    attn = hidden * head_dim * (2 * heads + 2 * kv)  # q, o and k, v
    keys = prompt + text
    queries = text if prompt_cached else keys
    out = {"labels": 2 * hidden * labels, "vocab": 2 * keys * hidden * config["vocab_size"]}[head]
    return {"linear": float(batch * layers * 2 * queries * (attn + ffn)),
            "attention": float(batch * layers * 2 * 2 * heads * head_dim * queries * keys),
            "head": float(batch * out)}


def forward_flops(config: dict, **shape) -> float:
    return sum(flop_breakdown(config, **shape).values())


# ------------------------------------------------------------ building models
def _random_base(shape: str, directory: Path, dtype: torch.dtype, device: torch.device) -> Path:
    """A random-init decoder of the named shape, saved as an ordinary HF directory with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=1, eos_token_id=2,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(directory)
    return directory


_SYNTHETIC = Task(name="bench", fields=("text",), template="{text} {answer}", label_names=("negative", "positive"),
                  verbalizer=("w5", "w6"), metrics=("accuracy",))


def synthetic_prompt_dir(base: Path, out: Path, prompt_length: int, readout: str) -> Path:
    """A random prompt (and head) with the task.json stage 1 would write, for random-weight shapes."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    g = torch.Generator().manual_seed(1)
    tensors = {"prompt": torch.randn(prompt_length, config.hidden_size, generator=g) * 0.02}
    if readout == "head":
        tensors |= {"head.weight": torch.randn(2, config.hidden_size, generator=g) * 0.02, "head.bias": torch.zeros(2)}
    record = task_record(_SYNTHETIC, readout=readout, label_token_ids=None if readout == "head" else [5, 6],
                         model=str(base), model_path=str(base), revision=None, prompt_length=prompt_length,
                         base_model=engine.model_identity(str(base), str(base), config, None), max_length=512,
                         padding_side=adapter_for(config.model_type).padding_side)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save_tensors(out / "prompt.safetensors", tensors, {"readout": readout})
    checkpoint.write_json(out / "task.json", record)
    return out


def compact_checkpoint(base: Path, prompt_dir: Path, scores: dict | None, out: Path, *, ffn_keep: float,
                       head_keep: float, align: int, slice_lm_head: bool) -> Path:
    """The real localize + convert code on given (or seeded random) scores."""
    from transformers import AutoConfig

    from skeleton_ds.surgery import convert

    config = AutoConfig.from_pretrained(base)
    geometry = adapter_for(config.model_type).geometry(config)
    scores = scores or random_scores(geometry, seed=0)
    skeleton = select(scores, geometry, ffn_keep=ffn_keep, head_keep=head_keep, align=align, mode="uniform")
    identity = json.loads((prompt_dir / "task.json").read_text())["base_model"]
    meta = {"task": "bench", "base_model": identity, "geometry": asdict(geometry), "scorer": "given",
            "reduce": "abs-sum", "include_prompt": False, "examples": 0}
    skeleton_file = out.with_suffix(".skeleton.json")
    checkpoint.write_json(skeleton_file, skeleton_record(skeleton, meta, keep_mode="uniform", ffn_keep=ffn_keep,
                                                         head_keep=head_keep, align=align))
    convert(identity["name_or_path"], skeleton_file, prompt_dir, out, overwrite=True, slice_lm_head=slice_lm_head)
    return out


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
    seconds: dict[int, list[float]] = field(default_factory=dict)
    peak_bytes: dict[int, int] = field(default_factory=dict)


def _weights(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, bytes resident): an NF4 tensor packs two weights per byte, so its parameter count
    is read from its quantization state."""
    tensors = [*module.parameters(), *module.buffers()]
    logical = sum(t.quant_state.shape.numel() if getattr(t, "quant_state", None) is not None else t.numel()
                  for t in tensors)
    return logical, tensor_bytes(tensors)


def _ours(name: str, predictor: Predictor, **extra) -> Contender:
    params, nbytes = _weights(predictor.model)
    config = predictor.model.backbone.config.to_dict()
    return Contender(name, predictor.logits, config, prompt_cached=predictor.causal and predictor.cfg.prompt_cache,
                     head="labels", parameters=params, weight_bytes=nbytes, predictor=predictor, **extra)


def _peft(full: Predictor, prompt_dir: Path, adapter_dir: Path) -> Contender:
    """PEFT prompt tuning over the same loaded base weights, used as its docs show: a full forward,
    then the label logits picked from its output (last position for a decoder; the trained head on
    the mean of the text states for a feature extractor, the only encoder readout benchmarked here)."""
    import peft

    from skeleton_ds.interop import export_peft

    export_peft(prompt_dir, adapter_dir, overwrite=True)
    model = full.model
    wrapped = peft.PeftModel.from_pretrained(model.backbone, str(adapter_dir)).eval()
    n, device, causal = model.prompt.embedding.shape[0], full.device, full.causal
    pad = full.tokenizer.pad_token_id

    @torch.inference_mode()
    def run(items: list[data.Encoded]) -> torch.Tensor:
        batch = data.collate(items, pad, left_pad=causal)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        output = wrapped(input_ids=ids, attention_mask=mask)
        if causal:
            return output.logits[:, -1, model.label_token_ids].float()
        return model.read_labels(output.last_hidden_state[:, n:], mask, batch["answer_index"].to(device))

    params, nbytes = _weights(model.backbone)
    return Contender("peft", run, model.backbone.config.to_dict(), prompt_cached=False,
                     head="vocab" if causal else "labels", parameters=params, weight_bytes=nbytes)


def build_contenders(cfg: BenchConfig, work: Path) -> tuple[list[Contender], Task | None]:
    infer = InferenceConfig(device=cfg.device, dtype=cfg.dtype, batch_size=max(cfg.batch_sizes))
    device, dtype = infer.torch_device(), infer.torch_dtype()
    scores = None
    if cfg.shape == "minilm":
        base = Path(engine.resolve_model_path("minilm"))
        if cfg.run_dir is not None:
            prompt_dir = cfg.run_dir / "prompt"
            if (cfg.run_dir / "attribution.safetensors").is_file():
                scores, _ = read_attribution(cfg.run_dir / "attribution.safetensors")
        else:
            prompt_dir = synthetic_prompt_dir(base, work / "prompt", cfg.prompt_length, "head")
    else:
        start = time.perf_counter()
        base = _random_base(cfg.shape, work / "base", dtype, device)
        prompt_dir = synthetic_prompt_dir(base, work / "prompt", cfg.prompt_length, "lm")
        _note(f"random {cfg.shape} base saved in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    full = Predictor.from_prompt(str(base), prompt_dir, infer)
    _note(f"full model loaded in {time.perf_counter() - start:.1f} s")
    contenders = [] if cfg.skip_peft else [_peft(full, prompt_dir, work / "peft")]
    contenders.append(_ours("full", full))
    decoder = full.causal
    plans = [(k, 1.0) for k in cfg.ffn_keeps]
    base_groups = full.model.backbone.config.num_key_value_heads if decoder else 1
    geometry = full.model.adapter.geometry(full.model.backbone.config)
    if decoder and cfg.head_keep < 1 and geometry.loadable_groups(keep_count(base_groups, cfg.head_keep)) < base_groups:
        plans += [(k, cfg.head_keep) for k in cfg.ffn_keeps if k < 1]
    elif decoder and cfg.head_keep < 1:  # (LLaMA-3-8B and TinyLlama at 0.75: the head count rounds to all)
        _note(f"--head-keep {cfg.head_keep:g} rounds to all {base_groups} KV groups of {cfg.shape}: no head-pruned rows")
    reused = work / "compact-0.3-1.0" if cfg.quant or cfg.compile else None  # the variants below load it again
    for ffn_keep, head_keep in plans:
        start = time.perf_counter()
        out = compact_checkpoint(base, prompt_dir, scores, work / f"compact-{ffn_keep}-{head_keep}",
                                 ffn_keep=ffn_keep, head_keep=head_keep, align=cfg.align, slice_lm_head=decoder)
        built = time.perf_counter() - start
        compact = Predictor.from_checkpoint(out, infer)
        _note(f"compact ffn {ffn_keep:g} kv {head_keep:g}: built in {built:.1f} s, loaded in "
              f"{time.perf_counter() - start - built:.1f} s")
        if cfg.work_dir is None and out != reused:
            # Loaded: a temporary checkpoint is not needed again. An 8B base and its compact models
            # at the default keeps take about 53 GB together in bf16: more than a GPU box may spare.
            shutil.rmtree(out)
        # The head count actually kept (rounded to one transformers can load; see Geometry.allows_groups).
        kept = compact.model.backbone.config.num_key_value_heads / base_groups if decoder else 1.0
        name = f"compact-{ffn_keep:g}" + (f"-h{kept:.2g}" if kept < 1 else "")
        contenders.append(_ours(name, compact, ffn_keep=ffn_keep, head_keep=round(kept, 4)))
    variants = [(f"compact-0.3-{q}", {"quant": q}) for q in cfg.quant]
    variants += [("compact-0.3-compiled", {"compile": True})] if cfg.compile else []
    for name, override in variants:  # the FFN-0.3 compact model served differently
        out = work / "compact-0.3-1.0"
        if not out.is_dir():
            compact_checkpoint(base, prompt_dir, scores, out, ffn_keep=0.3, head_keep=1.0, align=cfg.align,
                               slice_lm_head=decoder)
        predictor = Predictor.from_checkpoint(out, replace(infer, **override))
        contenders.append(_ours(name, predictor, ffn_keep=0.3, quant=override.get("quant", "none")))
    task = full.task if cfg.shape == "minilm" and cfg.run_dir is not None else None
    return contenders, task


# ------------------------------------------------------------------ timing
def _inputs(batch: int, length: int, vocab: int, seed: int) -> list[data.Encoded]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g).tolist()
    return [data.Encoded(row, length - 1, 0) for row in ids]


def time_contenders(contenders: list[Contender], cfg: BenchConfig, device: torch.device, vocab: int) -> None:
    for batch in cfg.batch_sizes:
        items = _inputs(batch, cfg.text_length, vocab, cfg.seed)
        for c in contenders:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            for _ in range(max(1, cfg.warmup)):
                c.run(items)
            sync(device)
            if device.type == "cuda":
                c.peak_bytes[batch] = c.weight_bytes + torch.cuda.max_memory_allocated(device) - before
            c.seconds[batch] = []
        for r in range(cfg.rounds):
            shift = r % len(contenders)
            for c in contenders[shift:] + contenders[:shift]:
                sync(device)
                start = time.perf_counter()
                c.run(items)
                sync(device)
                c.seconds[batch].append(time.perf_counter() - start)


def profile_contender(contender: Contender, items: list[data.Encoded], device: torch.device, repeats: int = 3) -> dict:
    """Where one batch's time goes: torch.profiler's operator self times against the wall clock. What
    no operator accounts for is Python (ours and the model's) between kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    contender.run(items)
    with profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            contender.run(items)
        sync(device)
        wall = (time.perf_counter() - start) / repeats
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    op_us = sum(e.self_cpu_time_total for e in ops) / repeats
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    return {"contender": contender.name, "batch": len(items), "wall_ms": round(wall * 1e3, 3),
            "aten_self_ms": round(op_us / 1e3, 3), "outside_ops_share": round(max(0.0, 1 - op_us / 1e6 / wall), 4),
            "top_ops": [{"op": e.key, "ms": round(e.self_cpu_time_total / repeats / 1e3, 3)} for e in top]}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarize(contenders: list[Contender], cfg: BenchConfig, accuracy: dict[str, dict]) -> list[dict]:
    """One row per contender and batch size: latency, throughput, FLOPs, speed-ups and their bounds."""
    rows = []
    by_name = {c.name: c for c in contenders}
    for batch in cfg.batch_sizes:
        flops = {c.name: forward_flops(c.config, batch=batch, text=cfg.text_length, prompt=cfg.prompt_length,
                                       prompt_cached=c.prompt_cached, head=c.head, labels=2) for c in contenders}
        median = {c.name: _quartiles(c.seconds[batch])[1] for c in contenders}
        for c in contenders:
            q1, q2, q3 = _quartiles(c.seconds[batch])
            row = {"contender": c.name, "batch": batch, "ffn_keep": c.ffn_keep, "head_keep": c.head_keep,
                   "quant": c.quant, "parameters": c.parameters, "weight_mib": round(c.weight_bytes / 2**20, 1),
                   "peak_mib": round(c.peak_bytes[batch] / 2**20, 1) if batch in c.peak_bytes else None,
                   "ms_median": round(q2 * 1e3, 3), "ms_q1": round(q1 * 1e3, 3), "ms_q3": round(q3 * 1e3, 3),
                   "examples_per_s": round(batch / q2, 2), "gflop": round(flops[c.name] / 1e9, 3),
                   "tflop_per_s": float(f"{flops[c.name] / q2 / 1e12:.4g}")}
            for ref in ("peft", "full"):
                if ref in by_name:
                    speedup, bound = median[ref] / q2, flops[ref] / flops[c.name]
                    row |= {f"speedup_vs_{ref}": round(speedup, 3), f"bound_vs_{ref}": round(bound, 3),
                            f"of_bound_vs_{ref}": round(speedup / bound, 3)}
            rows.append(row | ({"accuracy": accuracy[c.name]} if c.name in accuracy else {}))
    return rows


def _accuracy(contenders: list[Contender], task: Task, data_dir: Path | None, batch: int) -> dict[str, dict]:
    """Dev metrics of every contender on the real task (PEFT through its own forward)."""
    examples = evaluation_examples(task, data_dir, "dev")
    reference = next(c.predictor for c in contenders if c.predictor is not None)
    items = reference.encode(examples)
    labels = [e.label for e in items]
    out = {}
    for c in contenders:
        logits = torch.cat([c.run(items[i:i + batch]) for i in range(0, len(items), batch)])
        out[c.name] = compute_metrics(task, logits.argmax(-1).tolist(), labels)
    return out


def run_bench(cfg: BenchConfig) -> dict:
    device = InferenceConfig(device=cfg.device).torch_device()
    began = time.perf_counter()
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="skeleton-bench-") as tmp:
        work = cfg.work_dir or Path(tmp)
        contenders, task = build_contenders(cfg, work)
        seconds["build"] = round(time.perf_counter() - began, 1)
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        vocab = contenders[0].config["vocab_size"]
        accuracy = _accuracy(contenders, task, cfg.data_dir, max(cfg.batch_sizes)) if task is not None else {}
        start = time.perf_counter()
        _note(f"{len(contenders)} contenders built in {seconds['build']:.1f} s; timing {cfg.rounds} rounds")
        time_contenders(contenders, cfg, device, vocab)
        seconds["timing"] = round(time.perf_counter() - start, 1)
        profiles = [profile_contender(c, _inputs(b, cfg.text_length, vocab, cfg.seed), device)
                    for c in contenders if cfg.profile and c.name == "compact-0.3" for b in cfg.batch_sizes]
    seconds["total"] = round(time.perf_counter() - began, 1)
    rows = summarize(contenders, cfg, accuracy)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "dtype": str(InferenceConfig(device=cfg.device, dtype=cfg.dtype).torch_dtype()).replace("torch.", ""),
           "date": time.strftime("%Y-%m-%d")} | _versions()
    if device.type == "cuda":
        env |= {"cuda": torch.version.cuda,
                "gpu_memory_mib": round(torch.cuda.get_device_properties(device).total_memory / 2**20),
                "all_contenders_resident_mib": round(resident / 2**20)}  # every contender's weights at once
    result = {"format": "skeleton_ds.bench/1", "shape": cfg.shape, "environment": env,
              "settings": checkpoint.json_record(cfg), "rows": rows,
              "profiles": profiles, "seconds": seconds}
    cfg.out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(cfg.out / "bench.json", result)
    (cfg.out / "bench.md").write_text(markdown_table(result))
    from skeleton_ds.plots import plot_bench

    plot_bench(rows, cfg.out / "bench.png", title=f"{cfg.shape} on {env['device']} ({env['dtype']})")
    return result


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = result["rows"]
    refs = [r for r in ("peft", "full") if f"speedup_vs_{r}" in rows[0]]
    header = ["contender", "batch", "params (M)", "weights MiB", "peak MiB", "GFLOP", "ms/batch median (q1-q3)",
              "examples/s"] + [f"x {r} (bound, % of it)" for r in refs] + (["accuracy"] if "accuracy" in rows[0] else [])
    table = []
    for r in rows:
        cells = [r["contender"], str(r["batch"]), f"{r['parameters'] / 1e6:.1f}", f"{r['weight_mib']:.0f}",
                 "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}", f"{r['gflop']:.1f}",
                 f"{r['ms_median']:.1f} ({r['ms_q1']:.1f}-{r['ms_q3']:.1f})", f"{r['examples_per_s']:.1f}"]
        cells += [f"{r[f'speedup_vs_{ref}']:.2f} ({r[f'bound_vs_{ref}']:.2f}, {100 * r[f'of_bound_vs_{ref}']:.0f}%)"
                  for ref in refs]
        if "accuracy" in rows[0]:
            cells.append(f"{r['accuracy']['accuracy']:.4f}" if "accuracy" in r else "-")
        table.append(cells)
    return header, table


def markdown_table(result: dict) -> str:
    """The table as Markdown (bench.md), for READMEs and reports."""
    header, table = _table(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    if result["profiles"]:  # --profile: where one batch's time goes
        lines += ["", "| profiled | batch | ms wall | ms in PyTorch operators | outside operators | top operators (ms) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['contender']} | {p['batch']} | {p['wall_ms']:.1f} | {p['aten_self_ms']:.1f} | "
                  f"{p['outside_ops_share']:.1%} | " + ", ".join(f"{o['op']} {o['ms']:.1f}" for o in p["top_ops"]) + " |"
                  for p in result["profiles"]]
    return "\n".join(lines) + "\n"


def print_summary(result: dict, out: Path) -> None:
    """The rich table of a run_bench result."""
    from skeleton_ds.ui import print_table

    header, table = _table(result)
    env = result["environment"]
    print_table(f"{result['shape']}: {env['device']}, {env['dtype']}, {env['threads']} threads, {env['date']}",
                header, table, caption=f"{out / 'bench.json'}, {out / 'bench.png'}")
    for prof in result["profiles"]:
        ops = ", ".join(f"{o['op']} {o['ms']:.1f}" for o in prof["top_ops"])
        print(f"profile {prof['contender']} batch {prof['batch']}: {prof['wall_ms']:.1f} ms wall, "
              f"{prof['aten_self_ms']:.1f} ms in operators ({100 * prof['outside_ops_share']:.1f}% outside); top: {ops}")
