"""What a benchmark run measures (BenchConfig, validated once) and the model shapes it can build."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from skeleton_ds.errors import UserError
from skeleton_ds.inference import InferenceConfig

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
    "qwen2.5-1.5b": {},  # the real Qwen2.5-Coder-1.5B-Instruct (opt-in: skeleton-ds models fetch qwen2.5-1.5b)
}
PACKAGED_READOUT = {"minilm": "head", "smollm2-135m": "lm", "qwen2.5-1.5b": "lm"}
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


def note(message: str) -> None:
    """A progress line on stderr: building an 8B model's checkpoints takes minutes, and a log that
    stops shows where."""
    print(f"bench: {message}", file=sys.stderr, flush=True)
