"""Decoder inference at fixed shapes, so a GPU runs it as captured graphs instead of ~1,000 kernel launches.

A batch of b inputs of at most l tokens runs as a bucket (B, L): B the smallest batch bucket >= b (1, 2,
4, ..., the batch size) and L the smallest multiple of `LENGTH_STEP` >= l, or the task's max length.
Everything a pass touches is allocated once and written in place:
- the prompt's keys and values, computed once (prompt_key_values) and written once into one buffer per
  layer sized for the largest bucket, [B_max, kv heads, prompt + L_max, head dim]; a bucket's cache is a
  view of it, [:B, :, :prompt + L], whose text positions each pass overwrites (a transformers StaticCache);
- per bucket: token ids, the attention mask (its prompt columns set to 1 once) and answer indices.
The forward is then one function of fixed-shape tensors. On CUDA it is captured as a CUDA graph per bucket
(torch.cuda.CUDAGraph, on first use; every bucket's graph shares one memory pool), and a pass is one graph
replay instead of ~1,000 kernel launches; with `compile`, torch.compile (mode="reduce-overhead": inductor's
kernels, captured by inductor) replaces the explicit capture. Rows and columns added to reach the bucket are
padding that the mask hides; positions count real tokens only (as the plain path), so padding never shifts
them: fed the same bucket-padded batch, the eager path gives the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skeleton_ds.errors import UserError
from skeleton_ds.prompt import PromptedClassifier

LENGTH_STEP = 32


@dataclass(frozen=True)
class Buckets:
    """The shapes a pass may take: batch sizes and text lengths."""

    batches: tuple[int, ...]
    lengths: tuple[int, ...]

    @classmethod
    def up_to(cls, batch_size: int, max_length: int) -> Buckets:
        batches = [1]
        while batches[-1] * 2 < batch_size:
            batches.append(batches[-1] * 2)
        if batch_size > 1:
            batches.append(batch_size)
        return cls(tuple(batches), (*range(LENGTH_STEP, max_length, LENGTH_STEP), max_length))

    def shape(self, batch: int, length: int) -> tuple[int, int]:
        """The bucket (B, L) a batch of `batch` inputs of at most `length` tokens runs in."""
        if batch > self.batches[-1]:
            raise UserError(f"a batch of {batch} is larger than the largest static batch bucket ({self.batches[-1]}): "
                            f"cut batches at --batch-size")
        if length > self.lengths[-1]:
            raise UserError(f"an input of {length} tokens is longer than the largest static length bucket "
                            f"({self.lengths[-1]}, the task's max length): encode with that max length, or run "
                            f"with --static off")
        return (next(b for b in self.batches if b >= batch), next(n for n in self.lengths if n >= length))


def prompt_key_values(model: PromptedClassifier) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The soft prompt's keys and values per layer, [1, kv heads, prompt, head dim]: with causal attention
    they never depend on the input, so they are computed once."""
    base = model.backbone.base_model
    n = model.prompt.embedding.shape[0]
    embeds = model.prompt(1).to(model.backbone.get_input_embeddings().weight.dtype)
    with torch.inference_mode():
        out = base(inputs_embeds=embeds, attention_mask=torch.ones(1, n, dtype=torch.long, device=embeds.device),
                   position_ids=torch.arange(n, device=embeds.device)[None], use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


@dataclass
class _Slot:
    """One bucket's preallocated inputs and its cache (views of the shared prompt-cache buffers)."""

    ids: torch.Tensor  # [B, L]
    mask: torch.Tensor  # [B, prompt + L]; prompt columns are 1
    answer: torch.Tensor  # [B]
    cache: object  # transformers StaticCache over views [:B, :, :prompt + L]
    graph: object = None  # CUDA: the captured pass, replayed on these very tensors
    out: torch.Tensor | None = None  # its output (overwritten by every replay)


class StaticPromptDecoder(nn.Module):
    """Same inputs and outputs as PromptedClassifier.forward (and PromptCachedDecoder), at bucketed shapes."""

    def __init__(self, model: PromptedClassifier, buckets: Buckets, pad_id: int, compile: bool = False):
        super().__init__()
        if not model.adapter.causal:
            raise ValueError("static prompt caches need a decoder (causal attention)")
        self.model, self.buckets, self.pad_id = model, buckets, pad_id
        self.prompt_length = model.prompt.embedding.shape[0]
        self.device = model.prompt.embedding.device
        most = self.prompt_length + buckets.lengths[-1]
        self._prompt_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        for keys, values in prompt_key_values(model):
            k = keys.new_zeros(buckets.batches[-1], keys.shape[1], most, keys.shape[3])
            v = values.new_zeros(buckets.batches[-1], values.shape[1], most, values.shape[3])
            k[:, :, :self.prompt_length] = keys  # written once; no pass writes below the prompt length
            v[:, :, :self.prompt_length] = values
            self._prompt_cache.append((k, v))
        self._slots: dict[tuple[int, int], _Slot] = {}
        cuda = self.device.type == "cuda"
        self.capture = cuda and not compile  # explicit CUDA graphs (torch.compile captures its own)
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._step = torch.compile(self._run, fullgraph=True, dynamic=False,
                                   mode="reduce-overhead" if cuda else None) if compile else self._run

    def warm_up(self) -> int:
        """Build (CUDA: capture; with compile: compile) every bucket now, so no request pays for it; returns
        how many. A server that must answer in bounded time starts with this (--warmup-buckets)."""
        for batch in self.buckets.batches:
            for length in self.buckets.lengths:
                ids = torch.full((batch, length), self.pad_id, dtype=torch.long, device=self.device)
                self(ids, torch.ones_like(ids), torch.full((batch,), length - 1, dtype=torch.long, device=self.device))
        return len(self.buckets.batches) * len(self.buckets.lengths)

    def held_tensors(self) -> list[torch.Tensor]:
        """What this path holds beyond the model: the prompt-cache buffers (every bucket's cache is a view)."""
        return [t for pair in self._prompt_cache for t in pair]

    def _slot(self, batch: int, length: int) -> _Slot:
        slot = self._slots.get((batch, length))
        if slot is None:
            from transformers import StaticCache

            n = self.prompt_length
            cache = StaticCache(config=self.model.backbone.config, max_cache_len=n + length)
            for layer, (k, v) in zip(cache.layers, self._prompt_cache):
                layer.keys, layer.values = k[:batch, :, :n + length], v[:batch, :, :n + length]
                (layer.batch_size, layer.num_heads, layer.k_head_dim,
                 layer.v_head_dim) = batch, k.shape[1], k.shape[3], v.shape[3]
                layer.device, layer.cumulative_length = self.device, torch.tensor(n, device=self.device)
                layer.is_initialized = True
                for tensor in (layer.keys, layer.values, layer.cumulative_length):
                    torch._dynamo.mark_static_address(tensor)
            mask = torch.zeros(batch, n + length, dtype=torch.long, device=self.device)
            mask[:, :n] = 1
            slot = _Slot(torch.full((batch, length), self.pad_id, dtype=torch.long, device=self.device), mask,
                         torch.zeros(batch, dtype=torch.long, device=self.device), cache)
            self._slots[(batch, length)] = slot
        return slot

    def _replay(self, slot: _Slot) -> torch.Tensor:
        """The bucket's pass as a CUDA graph: captured on first use (after two warm-up passes on a side
        stream, as CUDA graphs require), replayed after."""
        if slot.graph is None:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run(slot.ids, slot.mask, slot.answer, slot.cache)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                slot.out = self._run(slot.ids, slot.mask, slot.answer, slot.cache)
            slot.graph = graph
        slot.graph.replay()
        return slot.out

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor, cache) -> torch.Tensor:
        n = self.prompt_length
        for layer in cache.layers:  # the text positions of the last pass are overwritten from the prompt's end
            layer.cumulative_length.fill_(n)
        text_mask = mask[:, n:]
        positions = n + text_mask.cumsum(-1) - 1  # as the plain path: pads sit at n - 1
        states = self.model.backbone.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                                cache=cache, use_cache=True).last_hidden_state
        return self.model.read_labels(states, text_mask, answer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_index: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        B, L = self.buckets.shape(batch, length)
        slot, n = self._slot(B, L), self.prompt_length
        slot.ids.fill_(self.pad_id)
        slot.mask[:, n:].zero_()
        slot.answer.zero_()
        # left padding: the inputs end at the bucket's last column, as collate ends them at the batch's
        slot.ids[:batch, L - length:].copy_(input_ids, non_blocking=True)
        slot.mask[:batch, n + L - length:].copy_(attention_mask, non_blocking=True)
        slot.answer[:batch].copy_(answer_index + (L - length), non_blocking=True)
        out = self._replay(slot) if self.capture else self._step(slot.ids, slot.mask, slot.answer, slot.cache)
        return out[:batch].clone()  # a copy: a captured graph writes its next replay into the same memory
