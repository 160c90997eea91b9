"""The cost model: FLOPs and bytes of a forward pass, the measured peaks, and the roofline they give."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from skeleton_ds.architectures import adapter_for
from skeleton_ds.inference import sync


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
