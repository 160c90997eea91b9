"""How much faster a compact checkpoint answers than what users run today, measured in one process.

    python launch/bench.py --shape llama-160m --lengths fixed,sst2 --data-dir ../shared/data \\
        --output runs/bench/llama-160m
    python launch/bench.py --shape minilm --run-dir runs/minilm-sst2 --data-dir ../shared/data \\
        --output runs/bench/minilm
    python launch/bench.py --shape llama3-8b --device cuda --dtype bf16 --output runs/bench/llama3-8b   # GPU only

Contenders, all answering the same inputs in the same process:
- `peft`: the full model with the same prompt through `peft` prompt tuning (PeftModel over the base
  model) run the fastest standard way its users have: under inference_mode, no generation cache
  (`use_cache=False`) and, on a decoder, the vocabulary computed at the last position only
  (`logits_to_keep=1`), the label logits picked from it; on an encoder the trained head on the mean
  of the text states (an encoder's PEFT forward computes no vocabulary);
- `peft-full-logits` (decoders, `--peft-full-logits`): the same PEFT call with the whole vocabulary
  at every position, as a plain CausalLM forward computes it (the contender of earlier tables);
- `full`: our Predictor on the full model (prompt cache, label-only logits);
- `compact-F[-hH]`: our Predictor on compact checkpoints at FFN keep F (and KV-group keep H), made by
  the real localize + convert code (random scores for random-weight shapes: speed does not depend on
  which neurons are kept; the run's attribution scores for `minilm` or `smollm2-135m` with `--run-dir`).
Inputs (`--lengths`): `fixed`, one batch of `--text-length` random tokens per example; `sst2`, the
token counts of real SST-2 dev sentences through the task template, cut into length-sorted batches as
the Predictor cuts them, so padding and batching costs show.
After a warm-up, each round times every contender once, in a rotated order, so drift and noise hit
all of them alike; the median and quartiles over rounds are reported. Each row also gets a roofline:
max(FLOPs / peak FLOP/s, bytes read / peak bandwidth), the peaks measured in the same process (a large
matmul in the run's dtype, a large copy), and the share of it the measured time reaches. The FLOP
ratio of two contenders is reported beside their speed-up, as a ratio (not a bound). The other decoder
shapes have random weights (speed does not need trained ones), so only the packaged models (`minilm`,
`smollm2-135m`) report accuracy.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from collections.abc import Callable

import torch

from skeleton_ds import checkpoint, data
from skeleton_ds.architectures import adapter_for
from skeleton_ds.attribution import random_scores, read_attribution
from skeleton_ds.errors import UserError
from skeleton_ds.inference import InferenceConfig, Predictor, evaluation_examples, sync, tensor_bytes
from skeleton_ds.loading import resolve_model_path
from skeleton_ds.localization import keep_count, select, skeleton_record
from skeleton_ds.model_identity import model_identity
from skeleton_ds.prompt import task_record
from skeleton_ds.tasks import Task, compute_metrics, get_task, load_split

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
    "smollm2-135m": {},  # the real packaged SmolLM2-135M-Instruct (its GGUF converted once)
}
PACKAGED_READOUT = {"minilm": "head", "smollm2-135m": "lm"}
"""Shapes with real weights (packaged models) and the readout of a synthetic prompt on them."""
GPU_ONLY = {"llama3-8b"}
LENGTHS = ("fixed", "sst2")


@dataclass
class BenchConfig:
    shape: str = "llama-160m"
    output: Path = Path("runs/bench")
    device: str = "auto"
    dtype: str = "auto"
    batch_sizes: tuple[int, ...] = (32, 1)
    text_length: int = 128
    prompt_length: int = 20
    rounds: int = 10
    warmup: int = 2
    ffn_keeps: tuple[float, ...] = (1.0, 0.5, 0.3, 0.2)
    head_keep: float = 0.75  # decoders: also compact models with this KV-group keep (1.0: none)
    head_ffn_keeps: tuple[float, ...] = ()  # the FFN keeps those head-pruned models have (empty: every one < 1)
    align: int = 64
    run_dir: Path | None = None  # packaged models: a pipeline output (prompt + attribution scores) for real accuracy
    data_dir: Path | None = None
    quant: tuple[str, ...] = ()  # extra contenders: the FFN-0.3 compact model in these bitsandbytes modes
    work_dir: Path | None = None  # where base and compact checkpoints are built (default: a temporary dir)
    base_dir: Path | None = None  # random shapes: a base random_base saved earlier (several benches, one build)
    seed: int = 0
    skip_peft: bool = False
    compile: bool = False  # also time the FFN-0.3 compact model under torch.compile (dynamic shapes)
    graphs: bool = False  # decoders: also time full and FFN-0.3 compact at static shapes (CUDA: captured graphs)
    profile: bool = False  # profile the FFN-0.3 compact model's batches (operator time vs wall time)
    lengths: tuple[str, ...] = ("fixed",)  # input groups: fixed text_length tokens; sst2: SST-2 dev lengths
    sst2_examples: int = 64  # sst2: examples per timed call, as whole length-sorted batches
    peft_full_logits: bool = False  # decoders: also PEFT computing the whole vocabulary at every position
    keep_mode: str = "uniform"  # uniform | global: per-layer widths (real scores, --run-dir), cut by our loader
    protect_outliers: float = 0.0  # as the localize flag (needs scores with activation peaks)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise UserError(f"--shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.shape in GPU_ONLY and not torch.cuda.is_available():
            raise UserError(f"--shape {self.shape} needs a GPU (about 16 GB in bf16 per copy); none is available here")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.rounds < 1 or self.warmup < 0:
            raise UserError("--batch-sizes must be positive, --rounds >= 1 and --warmup >= 0")
        if any(not 0 < k <= 1 for k in (*self.ffn_keeps, self.head_keep)):
            raise UserError("keep ratios must be in (0, 1]")
        if self.run_dir is not None and self.shape not in PACKAGED_READOUT:
            raise UserError(f"--run-dir applies to the packaged models ({', '.join(PACKAGED_READOUT)}): a pipeline "
                            f"output on that model")
        if self.run_dir is not None and not (self.run_dir / "prompt" / "prompt.safetensors").is_file():
            raise UserError(f"--run-dir {self.run_dir} has no prompt/prompt.safetensors: run the pipeline there first")
        bad = [q for q in self.quant if q not in ("8bit", "4bit")]
        if bad:
            raise UserError(f"--quant takes 8bit and/or 4bit, got {', '.join(bad)}")
        if not self.lengths or len(set(self.lengths)) < len(self.lengths) or set(self.lengths) - set(LENGTHS):
            raise UserError(f"--lengths takes a comma list of {', '.join(LENGTHS)} (each once), "
                            f"got {','.join(self.lengths)}")
        if "sst2" in self.lengths and self.data_dir is None:
            raise UserError("--lengths sst2 reads SST-2/dev.tsv under --data-dir: pass it (e.g. ../shared/data)")
        if self.keep_mode not in ("uniform", "global") or (self.protect_outliers and self.protect_outliers <= 1):
            raise UserError("--keep-mode takes uniform or global, and --protect-outliers a factor > 1 (or 0)")
        if self.base_dir is not None:
            if self.shape in PACKAGED_READOUT or not (self.base_dir / "config.json").is_file():
                raise UserError(f"--base-dir applies to the random shapes and needs a saved model: {self.base_dir}")
            saved = json.loads((self.base_dir / "config.json").read_text())
            sizes = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size")
            wrong = [k for k in sizes if saved.get(k) != SHAPES[self.shape].get(k)]
            if wrong:
                raise UserError(f"--base-dir {self.base_dir} is not the {self.shape} shape (it differs in "
                                f"{', '.join(wrong)}): build it with --shape {self.shape}")
        if set(self.head_ffn_keeps) - set(self.ffn_keeps):
            raise UserError("--head-ffn-keeps must be among --ffn-keeps")
        if self.sst2_examples < 1:
            raise UserError("--sst2-examples must be >= 1")
        if self.peft_full_logits and (self.shape == "minilm" or self.skip_peft):
            raise UserError("--peft-full-logits applies to decoder shapes with PEFT timed (an encoder's PEFT forward "
                            "computes no vocabulary)")
        if not self.skip_peft and importlib.util.find_spec("peft") is None:
            raise UserError("the PEFT contender needs peft: pip install 'skeleton-ds[bench]' (or pass --skip-peft)")
        InferenceConfig(device=self.device, dtype=self.dtype)  # validates device and dtype


def _note(message: str) -> None:
    """A progress line on stderr: building an 8B model's checkpoints takes minutes, and a log that
    stops shows where."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------- FLOPs
HEADS = ("labels", "vocab-last", "vocab-all")
"""What a contender's output layer computes: label rows (or a classifier head) at one position, the
whole vocabulary at the last position (`logits_to_keep=1`), or the whole vocabulary at every position."""


def _layers(config: dict) -> list[tuple[int, int, int]]:
    """Per layer: (attention weights, FFN weights, query heads). Attention: q, o and k, v; FFN: gate, up,
    down (LLaMA) or in, out (BERT). A per-layer-width compact model (skeleton_ds.widths) records its
    layers' own sizes under `layer_widths`; otherwise every layer has the config's."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    gated = adapter_for(config["model_type"]).causal
    widths = config.get("layer_widths") or {"ffn": [config["intermediate_size"]] * config["num_hidden_layers"],
                                            "kv_heads": [kv] * config["num_hidden_layers"]}
    per_group = heads // kv
    return [(hidden * head_dim * 2 * (g * per_group + g), f * hidden * (3 if gated else 2), g * per_group)
            for f, g in zip(widths["ffn"], widths["kv_heads"])]


def _head_rows(config: dict, head: str, labels: int) -> int:
    return labels if head == "labels" else config["vocab_size"]


def flop_breakdown(config: dict, *, batch: int, text: int, prompt: int, prompt_cached: bool, head: str,
                   labels: int) -> dict[str, float]:
    """Multiply-adds x 2 of one forward, by part: `linear` (every projection over the positions
    computed: the prompt's too unless its keys and values are cached), `attention` (QK^T and AV over
    all keys, as SDPA with a padding mask computes them) and `head` (see HEADS)."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    layers = _layers(config)
    keys = prompt + text
    queries = text if prompt_cached else keys
    positions = keys if head == "vocab-all" else 1
    return {"linear": float(batch * 2 * queries * sum(attn + ffn for attn, ffn, _ in layers)),
            "attention": float(batch * 2 * 2 * head_dim * queries * keys * sum(q for _, _, q in layers)),
            "head": float(batch * positions * 2 * hidden * _head_rows(config, head, labels))}


def forward_flops(config: dict, **shape) -> float:
    return sum(flop_breakdown(config, **shape).values())


def bytes_read(config: dict, *, batch: int, text: int, head: str, labels: int, element_bytes: int) -> float:
    """Bytes one forward must read at least: every layer's projection weights and the output rows it
    computes, once per batch, plus the embedding rows of its input tokens. Not counted (so this stays a
    lower bound): norms, biases, activations, the cached prompt keys and values."""
    weights = (sum(attn + ffn for attn, ffn, _ in _layers(config))
               + _head_rows(config, head, labels) * config["hidden_size"])
    return float(element_bytes * (weights + batch * text * config["hidden_size"]))


def roofline_seconds(flops: float, nbytes: float, peak_flop_per_s: float, peak_bytes_per_s: float) -> float:
    """The least time a forward can take on a machine: its arithmetic at peak FLOP/s or its reads at
    peak bandwidth, whichever is longer."""
    return max(flops / peak_flop_per_s, nbytes / peak_bytes_per_s)


def _best_seconds(work: Callable[[], object], device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


class PeakProbe:
    """This device's peak FLOP/s (a large square matmul in the run's dtype) and memory bandwidth (a large
    copy, read plus written bytes as STREAM counts them): what the roofline divides by. Sampled before,
    during (once per round) and after the timing, the best kept: on a shared machine a busy moment only
    lowers a sample, so the best is the one nearest the machine's peak."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.size, self.copy_bytes = (8192, 2**30) if device.type == "cuda" else (2048, 2**28)
        self.device, self.dtype = device, dtype
        self.a, self.b = (torch.randn(self.size, self.size, device=device).to(dtype) for _ in range(2))
        self.src = torch.ones(self.copy_bytes // 4, device=device)
        self.dst = torch.empty_like(self.src)
        self.matmul_s = self.copy_s = float("inf")
        self.samples = 0
        self._matmul(), self._copy()  # warm-up: allocation, kernel selection

    def _matmul(self) -> None:
        torch.mm(self.a, self.b)

    def _copy(self) -> None:
        self.dst.copy_(self.src)

    def sample(self, repeats: int = 1) -> None:
        self.matmul_s = min(self.matmul_s, _best_seconds(self._matmul, self.device, repeats))
        self.copy_s = min(self.copy_s, _best_seconds(self._copy, self.device, repeats))
        self.samples += repeats

    def record(self) -> dict:
        dtype = str(self.dtype).replace("torch.", "")
        return {"matmul_tflop_per_s": float(f"{2 * self.size**3 / self.matmul_s / 1e12:.4g}"),
                "copy_gb_per_s": float(f"{2 * self.copy_bytes / self.copy_s / 1e9:.4g}"),
                "matmul": f"[{self.size} x {self.size}] @ [{self.size} x {self.size}] {dtype}, best of {self.samples}",
                "copy": f"{self.copy_bytes // 2**20} MiB float32 copy, read + written bytes, best of {self.samples}"}


def random_base(shape: str, directory: Path, dtype: torch.dtype, device: torch.device) -> Path:
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
                         base_model=model_identity(str(base), str(base), config, None), max_length=512,
                         padding_side=adapter_for(config.model_type).padding_side)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save_tensors(out / "prompt.safetensors", tensors, {"readout": readout})
    checkpoint.write_json(out / "task.json", record)
    return out


def compact_checkpoint(base: Path, prompt_dir: Path, scores: dict | None, out: Path, *, ffn_keep: float,
                       head_keep: float, align: int, slice_lm_head: bool, mode: str = "uniform",
                       protect: float = 0.0) -> Path:
    """The real localize + convert code on given (or seeded random) scores."""
    from transformers import AutoConfig

    from skeleton_ds.conversion import convert

    config = AutoConfig.from_pretrained(base)
    geometry = adapter_for(config.model_type).geometry(config)
    scores = scores or random_scores(geometry, seed=0)
    skeleton = select(scores, geometry, ffn_keep=ffn_keep, head_keep=head_keep, align=align, mode=mode, protect=protect)
    identity = json.loads((prompt_dir / "task.json").read_text())["base_model"]
    meta = {"task": "bench", "base_model": identity, "geometry": asdict(geometry), "scorer": "given",
            "reduce": "abs-sum", "include_prompt": False, "examples": 0}
    skeleton_file = out.with_suffix(".skeleton.json")
    checkpoint.write_json(skeleton_file, skeleton_record(skeleton, meta, keep_mode=mode, ffn_keep=ffn_keep,
                                                         head_keep=head_keep, align=align, protect_outliers=protect))
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
            _note(f"random {cfg.shape} base saved in {time.perf_counter() - start:.1f} s")
        prompt_dir = synthetic_prompt_dir(base, work / "prompt", cfg.prompt_length, "lm")
    start = time.perf_counter()
    full = Predictor.from_prompt(str(base), prompt_dir, infer)
    _note(f"full model loaded in {time.perf_counter() - start:.1f} s")
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
        _note(f"--head-keep {cfg.head_keep:g} rounds to all {base_groups} KV groups of {cfg.shape}: "
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
        _note(f"compact ffn {ffn_keep:g} kv {head_keep:g}: built in {built:.1f} s, loaded in "
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


# ------------------------------------------------------------------ inputs
@dataclass
class Workload:
    """What one timed call answers: `batches` of encoded inputs, each one forward (one batch for
    `fixed`; length-sorted SST-2 batches for `sst2`)."""
    lengths: str
    batch: int
    batches: list[list[data.Encoded]]

    @property
    def key(self) -> tuple[str, int]:
        return self.lengths, self.batch

    @property
    def examples(self) -> int:
        return sum(map(len, self.batches))

    def widths(self) -> list[int]:
        """Each batch's padded length (collate pads to its longest input)."""
        return [max(len(e.input_ids) for e in b) for b in self.batches]

    def record(self) -> dict:
        tokens = [len(e.input_ids) for b in self.batches for e in b]
        padded = sum(w * len(b) for w, b in zip(self.widths(), self.batches))
        return {"lengths": self.lengths, "batch": self.batch, "examples": self.examples, "batches": len(self.batches),
                "tokens_mean": round(statistics.mean(tokens), 1), "tokens_min": min(tokens), "tokens_max": max(tokens),
                "padding_share": round(1 - sum(tokens) / padded, 4)}


def _random_items(lengths: list[int], vocab: int, g: torch.Generator) -> list[data.Encoded]:
    """Random token ids of the given lengths (speed does not depend on which tokens), read at the last one."""
    return [data.Encoded(torch.randint(3, vocab, (n,), generator=g).tolist(), n - 1, 0) for n in lengths]


def _inputs(batch: int, length: int, vocab: int, seed: int) -> list[data.Encoded]:
    return _random_items([length] * batch, vocab, torch.Generator().manual_seed(seed))


def sst2_lengths(data_dir: Path, tokenizer, readout: str) -> list[int]:
    """Token counts of the SST-2 dev sentences through the sst2 task template, as the pipeline encodes
    them for this readout, sorted (the order the Predictor batches them in)."""
    task = get_task("sst2", decoder=readout == "lm")
    items = data.encode(task, load_split(task, "dev", data_dir), tokenizer, max_length=512, readout=readout)
    return sorted(len(e.input_ids) for e in items)


def sst2_workload(lengths: list[int], batch: int, examples: int, vocab: int, seed: int) -> Workload:
    """About `examples` inputs as whole batches of the length-sorted dev set, taken at evenly spaced
    quantiles (each batch pads as the Predictor's batch over the whole dev set would)."""
    cuts = [lengths[i:i + batch] for i in range(0, len(lengths), batch)]
    n = min(len(cuts), max(1, round(examples / batch)))
    picked = [cuts[int((i + 0.5) * len(cuts) / n)] for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return Workload("sst2", batch, [_random_items(b, vocab, g) for b in picked])


def _length_tokenizer(cfg: BenchConfig, full: Predictor) -> tuple[object, str]:
    """The tokenizer that gives SST-2 lengths: the base's for a packaged model; a random-weight shape has
    only a word-level stand-in, so the packaged MiniLM's WordPiece tokenizer counts for it."""
    if cfg.shape in PACKAGED_READOUT:
        return full.tokenizer, f"the base model's ({cfg.shape})"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    return tokenizer, ("all-MiniLM-L6-v2 WordPiece (this random-weight shape has no real tokenizer here), "
                       "through the decoder template: a start token, no end token")


def build_workloads(cfg: BenchConfig, full: Predictor, vocab: int) -> tuple[list[Workload], str | None]:
    """Every (lengths, batch size) the run times, and which tokenizer gave the SST-2 lengths."""
    workloads = [Workload("fixed", b, [_inputs(b, cfg.text_length, vocab, cfg.seed)])
                 for b in cfg.batch_sizes] if "fixed" in cfg.lengths else []
    if "sst2" not in cfg.lengths:
        return workloads, None
    tokenizer, described = _length_tokenizer(cfg, full)
    lengths = sst2_lengths(cfg.data_dir, tokenizer, full.model.readout)
    workloads += [sst2_workload(lengths, b, cfg.sst2_examples, vocab, cfg.seed) for b in cfg.batch_sizes]
    return workloads, described


# ------------------------------------------------------------------ timing
def _run(c: Contender, w: Workload) -> None:
    for items in w.batches:
        c.run(items)


def time_contenders(contenders: list[Contender], workloads: list[Workload], cfg: BenchConfig,
                    device: torch.device, probe: PeakProbe) -> None:
    for w in workloads:
        for c in contenders:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            for _ in range(max(1, cfg.warmup)):
                _run(c, w)
            sync(device)
            if device.type == "cuda":
                c.peak_bytes[w.key] = c.weight_bytes + torch.cuda.max_memory_allocated(device) - before
            c.seconds[w.key] = []
        for r in range(cfg.rounds):
            probe.sample()
            shift = r % len(contenders)
            for c in contenders[shift:] + contenders[:shift]:
                sync(device)
                start = time.perf_counter()
                _run(c, w)
                sync(device)
                c.seconds[w.key].append(time.perf_counter() - start)


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


REFERENCES = ("peft", "full")
"""The contenders every row's speed-up is measured against (the fair PEFT contender and our full path)."""


@dataclass(frozen=True)
class Machine:
    """What the cost model needs about the run: element size of the weights and the measured peaks."""
    element_bytes: int
    peak_flop_per_s: float
    peak_bytes_per_s: float


def workload_cost(c: Contender, w: Workload, cfg: BenchConfig, machine: Machine
                  ) -> tuple[float, float | None, str | None]:
    """(FLOPs, roofline seconds, what limits it) of one call on the workload, summed over its batches.
    No roofline for bitsandbytes weights: their kernels compute in a precision whose peak is not measured."""
    flops = roofline = compute = memory = 0.0
    for items, width in zip(w.batches, w.widths()):
        shape = dict(batch=len(items), text=width, head=c.head, labels=2)
        f = forward_flops(c.config, prompt=cfg.prompt_length, prompt_cached=c.prompt_cached, **shape)
        nbytes = bytes_read(c.config, element_bytes=machine.element_bytes, **shape)
        flops += f
        roofline += roofline_seconds(f, nbytes, machine.peak_flop_per_s, machine.peak_bytes_per_s)
        compute += f / machine.peak_flop_per_s
        memory += nbytes / machine.peak_bytes_per_s
    if c.quant != "none":
        return flops, None, None
    return flops, roofline, "FLOPs" if compute >= memory else "bytes"


def summarize(contenders: list[Contender], workloads: list[Workload], cfg: BenchConfig, machine: Machine,
              accuracy: dict[str, dict]) -> list[dict]:
    """One row per contender and workload: latency per batch, throughput, FLOPs, the roofline and the
    share of it reached, speed-ups and the FLOP ratios beside them."""
    rows = []
    for w in workloads:
        cost = {c.name: workload_cost(c, w, cfg, machine) for c in contenders}
        median = {c.name: _quartiles(c.seconds[w.key])[1] for c in contenders}
        per_batch = len(w.batches)
        for c in contenders:
            q1, q2, q3 = _quartiles(c.seconds[w.key])
            flops, roofline, limit = cost[c.name]
            peak = c.peak_bytes.get(w.key)
            row = {"contender": c.name, "lengths": w.lengths, "batch": w.batch, "examples": w.examples,
                   "batches": per_batch, "ffn_keep": c.ffn_keep, "head_keep": c.head_keep, "quant": c.quant,
                   "parameters": c.parameters, "weight_mib": round(c.weight_bytes / 2**20, 1),
                   "peak_mib": None if peak is None else round(peak / 2**20, 1),
                   "ms_median": round(q2 / per_batch * 1e3, 3), "ms_q1": round(q1 / per_batch * 1e3, 3),
                   "ms_q3": round(q3 / per_batch * 1e3, 3), "examples_per_s": round(w.examples / q2, 2),
                   "gflop": float(f"{flops / per_batch / 1e9:.4g}"), "tflop_per_s": float(f"{flops / q2 / 1e12:.4g}"),
                   "roofline_ms": None if roofline is None else round(roofline / per_batch * 1e3, 3),
                   "roofline_limit": limit, "of_roofline": None if roofline is None else round(roofline / q2, 4)}
            for ref in REFERENCES:
                if ref in cost:
                    speedup, ratio = median[ref] / q2, cost[ref][0] / flops
                    row |= {f"speedup_vs_{ref}": round(speedup, 3), f"flop_ratio_vs_{ref}": round(ratio, 3),
                            f"of_flop_ratio_vs_{ref}": round(speedup / ratio, 3)}
            rows.append(row | ({"accuracy": accuracy[c.name]} if c.name in accuracy else {}))
    return rows


def _accuracy(contenders: list[Contender], task: Task, data_dir: Path | None, batch: int) -> dict[str, dict]:
    """Dev metrics of every contender on the real task (PEFT through its own forward)."""
    examples, _ = evaluation_examples(task, data_dir, "dev")
    reference = next(c.predictor for c in contenders if c.predictor is not None)
    items = reference.encode(examples)
    labels = [e.label for e in items]
    out = {}
    for c in contenders:
        logits = torch.cat([c.run(items[i:i + batch]) for i in range(0, len(items), batch)])
        out[c.name] = compute_metrics(task, logits.argmax(-1).tolist(), labels)
    return out


def run_bench(cfg: BenchConfig, command: str | None = None) -> dict:
    """Build, time and summarize every contender; write OUTPUT/bench.{json,md,png}. `command` is what the
    provenance record says was run (default: this process's command line)."""
    from skeleton_ds.provenance import provenance

    infer = InferenceConfig(device=cfg.device, dtype=cfg.dtype)
    device, dtype = infer.torch_device(), infer.torch_dtype()
    began = time.perf_counter()
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="skeleton-bench-") as tmp:
        work = cfg.work_dir or Path(tmp)
        contenders, task = build_contenders(cfg, work)
        seconds["build"] = round(time.perf_counter() - began, 1)
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        vocab = contenders[0].config["vocab_size"]
        full = next(c.predictor for c in contenders if c.name == "full")
        workloads, length_tokenizer = build_workloads(cfg, full, vocab)
        accuracy = _accuracy(contenders, task, cfg.data_dir, max(cfg.batch_sizes)) if task is not None else {}
        start = time.perf_counter()
        probe = PeakProbe(device, dtype)
        probe.sample(repeats=3)
        _note(f"{len(contenders)} contenders built in {seconds['build']:.1f} s; timing {cfg.rounds} rounds of "
              f"{len(workloads)} workloads")
        time_contenders(contenders, workloads, cfg, device, probe)
        probe.sample(repeats=3)
        peaks = probe.record()
        del probe
        seconds["timing"] = round(time.perf_counter() - start, 1)
        profiles = [profile_contender(c, _inputs(b, cfg.text_length, vocab, cfg.seed), device)
                    for c in contenders if cfg.profile and c.name == "compact-0.3" for b in cfg.batch_sizes]
    seconds["total"] = round(time.perf_counter() - began, 1)
    machine = Machine(torch.tensor([], dtype=dtype).element_size(), peaks["matmul_tflop_per_s"] * 1e12,
                      peaks["copy_gb_per_s"] * 1e9)
    rows = summarize(contenders, workloads, cfg, machine, accuracy)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
           "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        env |= {"gpu_memory_mib": round(torch.cuda.get_device_properties(device).total_memory / 2**20),
                "all_contenders_resident_mib": round(resident / 2**20)}  # every contender's weights at once
    result = {"format": "skeleton_ds.bench/2", "shape": cfg.shape, "provenance": provenance(command),
              "environment": env, "settings": checkpoint.json_record(cfg), "peaks": peaks,
              "cost_model": COST_MODEL, "workloads": [w.record() for w in workloads],
              "length_tokenizer": length_tokenizer, "rows": rows, "profiles": profiles, "seconds": seconds}
    cfg.output.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(cfg.output / "bench.json", result)
    (cfg.output / "bench.md").write_text(markdown_table(result))
    from skeleton_ds.plots import plot_bench

    plot_bench(rows, cfg.output / "bench.png", title=f"{cfg.shape} on {env['device']} ({env['dtype']})")
    return result


COST_MODEL = ("FLOPs: every projection over the positions computed (the prompt's too without the prompt cache), "
              "attention scores and values over all keys, the output rows computed; bytes read: every layer's "
              "projection weights and the output rows computed, once per batch, and the input tokens' embedding "
              "rows (norms, biases, activations and cached prompt keys/values not counted: a lower bound); "
              "roofline = max(FLOPs / peak matmul FLOP/s, bytes / peak copy bandwidth), per batch")


def _inputs_cell(result: dict, row: dict) -> str:
    return f"fixed {result['settings']['text_length']}" if row["lengths"] == "fixed" else "SST-2 dev"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def _table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = result["rows"]
    refs = [r for r in ("peft", "peft-full-logits", "full") if f"speedup_vs_{r}" in rows[0]]  # (the
    # H100 table of format 1 was measured against peft-full-logits)
    header = ["contender", "inputs", "batch", "params (M)", "weights MiB", "peak MiB", "GFLOP/batch",
              "ms/batch median (q1-q3)", "examples/s", "roofline ms/batch (limit)", "of roofline"]
    header += [f"x {r} (FLOP ratio, % of it)" for r in refs] + (["accuracy"] if "accuracy" in rows[0] else [])
    table = []
    for r in rows:
        roofline = "-" if r.get("roofline_ms") is None else f"{r['roofline_ms']:.1f} ({r['roofline_limit']})"
        cells = [r["contender"], _inputs_cell(result, r), str(r["batch"]), f"{r['parameters'] / 1e6:.1f}",
                 f"{r['weight_mib']:.0f}", "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
                 f"{r['gflop']:.1f}",
                 f"{r['ms_median']:.1f} ({r['ms_q1']:.1f}-{r['ms_q3']:.1f})", f"{r['examples_per_s']:.1f}",
                 roofline, _percent(r.get("of_roofline"))]
        cells += [f"{r[f'speedup_vs_{ref}']:.2f} ({r[f'flop_ratio_vs_{ref}']:.2f}, "
                  f"{_percent(r[f'of_flop_ratio_vs_{ref}'])})" for ref in refs]
        if "accuracy" in rows[0]:
            cells.append(f"{r['accuracy']['accuracy']:.4f}" if "accuracy" in r else "-")
        table.append(cells)
    return header, table


def _markdown_rows(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown_table(result: dict) -> str:
    """The tables as Markdown (bench.md), for READMEs and reports: the rows; when recorded, each
    workload's inputs and the measured peaks with the code version; the profile (--profile)."""
    lines = _markdown_rows(*_table(result))
    if result.get("workloads"):
        lines += [""] + _markdown_rows(
            ["inputs", "batch", "examples per call", "batches", "tokens per example, mean (min-max)", "padding"],
            [[_inputs_cell(result, w), str(w["batch"]), str(w["examples"]), str(w["batches"]),
              f"{w['tokens_mean']:.1f} ({w['tokens_min']}-{w['tokens_max']})", f"{w['padding_share']:.1%}"]
             for w in result["workloads"]])
    if result.get("peaks"):
        p, made = result["peaks"], result["provenance"]
        lines += [""] + _markdown_rows(
            ["peak matmul TFLOP/s", "peak copy GB/s", "code", "load average (1 min)", "date"],
            [[f"{p['matmul_tflop_per_s']:.3g} ({p['matmul']})", f"{p['copy_gb_per_s']:.3g} ({p['copy']})",
              made["code_version"], str(made["device"].get("load_average_1min", "-")), made["date"]]])
    if result["profiles"]:  # --profile: where one batch's time goes
        lines += [""] + _markdown_rows(
            ["profiled", "batch", "ms wall", "ms in PyTorch operators", "outside operators", "top operators (ms)"],
            [[p["contender"], str(p["batch"]), f"{p['wall_ms']:.1f}", f"{p['aten_self_ms']:.1f}",
              f"{p['outside_ops_share']:.1%}", ", ".join(f"{o['op']} {o['ms']:.1f}" for o in p["top_ops"])]
             for p in result["profiles"]])
    return "\n".join(lines) + "\n"


def print_summary(result: dict, output: Path) -> None:
    """The rich table of a run_bench result."""
    from skeleton_ds.ui import print_table

    header, table = _table(result)
    env = result["environment"]
    print_table(f"{result['shape']}: {env['device']}, {env['dtype']}, {env['threads']} threads, {env['date']}",
                header, table, caption=f"{output / 'bench.json'}, {output / 'bench.png'}")
    peaks = result["peaks"]
    print(f"roofline peaks: {peaks['matmul_tflop_per_s']:.3g} TFLOP/s ({peaks['matmul']}), "
          f"{peaks['copy_gb_per_s']:.3g} GB/s ({peaks['copy']})")
    for prof in result["profiles"]:
        ops = ", ".join(f"{o['op']} {o['ms']:.1f}" for o in prof["top_ops"])
        print(f"profile {prof['contender']} batch {prof['batch']}: {prof['wall_ms']:.1f} ms wall, "
              f"{prof['aten_self_ms']:.1f} ms in operators ({100 * prof['outside_ops_share']:.1f}% outside); "
              f"top: {ops}")
