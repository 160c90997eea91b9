"""The inputs every contender answers: fixed-length random batches, or SST-2 dev lengths cut into batches
as the Predictor cuts them."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from skeleton_ds import data
from skeleton_ds.inference import Predictor
from skeleton_ds.loading import resolve_model_path
from skeleton_ds.tasks import get_task, load_split
from skeleton_ds.bench.config import PACKAGED_READOUT, BenchConfig

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


def fixed_inputs(batch: int, length: int, vocab: int, seed: int) -> list[data.Encoded]:
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
    workloads = [Workload("fixed", b, [fixed_inputs(b, cfg.text_length, vocab, cfg.seed)])
                 for b in cfg.batch_sizes] if "fixed" in cfg.lengths else []
    if "sst2" not in cfg.lengths:
        return workloads, None
    tokenizer, described = _length_tokenizer(cfg, full)
    lengths = sst2_lengths(cfg.data_dir, tokenizer, full.model.readout)
    workloads += [sst2_workload(lengths, b, cfg.sst2_examples, vocab, cfg.seed) for b in cfg.batch_sizes]
    return workloads, described
