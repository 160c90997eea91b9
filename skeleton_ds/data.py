"""Examples -> token ids -> batches, identically on every rank.

Batches are built from a seeded permutation of the whole training set and then split across
ranks, so a run on N ranks sees exactly the global batches a run on one rank sees, and a resumed
run can skip to the batch where the checkpoint was taken.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Sequence

import torch

from skeleton_ds.errors import UserError
from skeleton_ds.tasks import Example, Task


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    answer_index: int
    """Where the label is read: the mask token (MLM) or the last token (decoder LM)."""
    label: int


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """Special tokens the tokenizer puts around one sequence (e.g. [CLS] ... [SEP], or <s> ...)."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []


def _template_pieces(template: str, readout: str) -> list[tuple[str, str | None]]:
    """(literal, field) pairs up to the answer slot; decoders and heads stop right before the answer."""
    pieces = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if field == "answer":
            if readout == "mlm":
                pieces.append((literal, "answer"))
            else:
                pieces.append((literal.rstrip(), None))
                break
        else:
            pieces.append((literal, field))
    return pieces


def fit_lengths(lengths: Sequence[int], budget: int) -> list[int]:
    """Cut the longest fields first until the total fits the budget (keeps each field's start)."""
    if sum(lengths) <= budget:
        return list(lengths)
    lo, hi = 0, max(lengths)
    while lo < hi:  # largest cap c with sum(min(l, c)) <= budget
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    out = [min(n, lo) for n in lengths]
    spare = budget - sum(out)
    for i, n in enumerate(lengths):
        if spare and n > lo:
            out[i] += 1
            spare -= 1
    return out


def encode(task: Task, examples: Sequence[Example], tokenizer, *, max_length: int, readout: str) -> list[Encoded]:
    """Render the task template as token pieces (fields tokenized in bulk), truncating fields to fit."""
    pieces = _template_pieces(task.template, readout)
    prefix, suffix = _special_affixes(tokenizer)
    if readout == "lm":
        suffix = []  # a decoder reads the label right after the text, never after an end-of-sequence token
    literal_ids = [tokenizer.encode(lit, add_special_tokens=False) if lit.strip() else [] for lit, _ in pieces]
    field_slots = [f for _, f in pieces if f not in (None, "answer")]
    overhead = len(prefix) + len(suffix) + sum(map(len, literal_ids)) + (1 if readout == "mlm" else 0)
    budget = max_length - overhead
    if budget < len(field_slots):
        raise UserError(f"--max-length {max_length} leaves no room for the text of task {task.name} "
                        f"(its template and special tokens take {overhead}): raise --max-length")
    field_ids = {}
    for name in set(field_slots):
        column = [ex.texts[task.fields.index(name)] for ex in examples]
        field_ids[name] = tokenizer(column, add_special_tokens=False)["input_ids"] if column else []
    mask_id = tokenizer.mask_token_id
    if readout == "mlm" and mask_id is None:
        raise UserError("the MLM readout needs a tokenizer with a mask token")
    out = []
    for i, ex in enumerate(examples):
        fitted = iter(fit_lengths([len(field_ids[f][i]) for f in field_slots], budget))
        ids = list(prefix)
        answer_index = -1
        for (_, field), lit in zip(pieces, literal_ids):
            ids.extend(lit)
            if field == "answer":
                answer_index = len(ids)
                ids.append(mask_id)
            elif field is not None:
                ids.extend(field_ids[field][i][:next(fitted)])
        ids.extend(suffix)
        if readout != "mlm":
            answer_index = len(ids) - 1
        out.append(Encoded(ids, answer_index, ex.label))
    return out


def collate(items: Sequence[Encoded], pad_id: int, left_pad: bool) -> dict[str, torch.Tensor]:
    """Dynamic padding to the longest item; left padding keeps decoders' answer at the last position."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    answer = torch.empty(len(items), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        start = width - n if left_pad else 0
        ids[row, start:start + n] = torch.tensor(e.input_ids)
        mask[row, start:start + n] = 1
        answer[row] = start + e.answer_index
    labels = torch.tensor([e.label for e in items], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "answer_index": answer, "labels": labels}


def epoch_batches(n_examples: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch; the incomplete last batch is dropped so every rank steps equally."""
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i:i + global_batch] for i in range(0, n_examples - global_batch + 1, global_batch)]


def rank_micro_batches(global_batch: list[int], rank: int, world_size: int, accumulation: int) -> list[list[int]]:
    """This rank's contiguous share of a global batch, cut into gradient-accumulation micro batches."""
    share = len(global_batch) // world_size
    mine = global_batch[rank * share:(rank + 1) * share]
    micro = share // accumulation
    return [mine[i * micro:(i + 1) * micro] for i in range(accumulation)]


def eval_shard(n_examples: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """Indices for this rank, padded with repeats so all ranks run the same number of forwards
    (ZeRO-3 gathers parameters collectively); returns (indices, how many are real)."""
    per_rank = math.ceil(n_examples / world_size)
    real = list(range(rank * per_rank, min(n_examples, (rank + 1) * per_rank)))
    return real + [0] * (per_rank - len(real)), len(real)
