"""Examples -> token ids -> batches, identically on every rank.

Batches are built from a seeded permutation of the whole training set and then split across
ranks, so a run on N ranks sees exactly the global batches a run on one rank sees, and a resumed
run can skip to the batch where the checkpoint was taken.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from collections.abc import Sequence

import torch

from skeleton_ds.errors import UserError
from skeleton_ds.tasks import Example, Task


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    answer_index: int
    """Where the label is read: the mask token (MLM) or the last token (decoder LM)."""
    label: int
    text: str = ""
    """The rendered input these ids are the plain tokenization of (fields cut to fit, if they were)."""


ENCODING = "rendered-text"
"""How examples become token ids: the template is rendered with the example's fields into one string,
which the tokenizer encodes whole, exactly as a PEFT, transformers-pipeline or vLLM user feeds the same
text. Recorded in each prompt's task.json and in the stages' settings records, so a prompt trained on
inputs encoded otherwise (skeleton_ds 0.2 tokenized the template's literals and the fields apart, and a
word lost its leading space) is refused, never fed inputs it was not trained on."""


def _special_suffix(tokenizer) -> list[int]:
    """Special tokens the tokenizer appends after a sequence (e.g. [SEP] or </s>)."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[start + len(bare):]
    return []


def _template_pieces(template: str, readout: str) -> list[tuple[str, str | None]]:
    """(literal, field) pairs up to where the label is read: an MLM keeps its answer slot (the mask) and
    what follows; decoders and heads stop right before the answer, without the space before it."""
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


def input_template(template: str, readout: str, mask_token: str | None) -> str:
    """The text a user of another tool formats with an example's fields and tokenizes as one string (with the
    tokenizer's special tokens) to get exactly the ids `encode` gives, when no field was cut."""
    def escaped(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}")

    return "".join(escaped(literal) + ("" if field is None else escaped(mask_token or "") if field == "answer"
                                       else "{" + field + "}")
                   for literal, field in _template_pieces(template, readout))


def _render(pieces: Sequence[tuple[str, str | None]], values: dict[str, str],
           mask: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """The input text, and the character span of each field (and of the mask, as "answer")."""
    text, spans = "", {}
    for literal, field in pieces:
        text += literal
        if field is not None:
            value = mask if field == "answer" else values[field]
            spans[field] = (len(text), len(text) + len(value))
            text += value
    return text, spans


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


def _tokens_in(span: tuple[int, int], offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of the tokens whose characters overlap `span` (special tokens have none)."""
    start, end = span
    return [i for i, (s, e) in enumerate(offsets) if s < end and e > start]


_MAX_FITS = 8  # re-tokenizing a cut text can merge a token or two across the cut; each round removes the excess


def encode(task: Task, examples: Sequence[Example], tokenizer, *, max_length: int, readout: str) -> list[Encoded]:
    """Render each example through the task template and tokenize the whole text; a text over `max_length`
    tokens has its longest fields cut (by their tokens' character offsets, each keeping its start) until it fits."""
    pieces = _template_pieces(task.template, readout)
    fields = [f for _, f in pieces if f not in (None, "answer")]
    mask_id = tokenizer.mask_token_id
    if readout == "mlm" and mask_id is None:
        raise UserError("the MLM readout needs a tokenizer with a mask token")
    mask = tokenizer.mask_token if readout == "mlm" else ""
    suffix = _special_suffix(tokenizer) if readout == "lm" else []  # a decoder reads the label right after the text
    values = [{f: ex.texts[task.fields.index(f)] for f in fields} for ex in examples]
    out: list[Encoded | None] = [None] * len(examples)
    pending = list(range(len(examples)))
    if not pending:
        return []
    for _ in range(_MAX_FITS):
        rendered = [_render(pieces, values[i], mask) for i in pending]
        try:
            batch = tokenizer([text for text, _ in rendered], add_special_tokens=True, return_offsets_mapping=True)
        except NotImplementedError:
            raise UserError(f"tokenizer {type(tokenizer).__name__} gives no character offsets: load the model's "
                            f"fast (tokenizers) tokenizer") from None
        still = []
        for i, (text, spans), ids, offsets in zip(pending, rendered, batch["input_ids"], batch["offset_mapping"]):
            if suffix and ids[-len(suffix):] == suffix:
                ids, offsets = ids[:-len(suffix)], offsets[:-len(suffix)]
            excess = len(ids) - max_length
            if excess <= 0:
                out[i] = Encoded(ids, _answer_index(ids, offsets, spans, mask_id, readout), examples[i].label, text)
                continue
            tokens = [_tokens_in(spans[f], offsets) for f in fields]
            room = sum(map(len, tokens)) - excess
            if room < len(fields):
                raise UserError(f"--max-length {max_length} leaves no room for the text of task {task.name} "
                                f"(its template and special tokens take {len(ids) - sum(map(len, tokens))}): "
                                f"raise --max-length")
            for f, kept, keep in zip(fields, tokens, fit_lengths([len(t) for t in tokens], room)):
                if keep < len(kept):
                    start, end = spans[f]
                    values[i][f] = values[i][f][:min(end, offsets[kept[keep - 1]][1]) - start]
            still.append(i)
        pending = still
        if not pending:
            return out  # type: ignore[return-value]
    raise UserError(f"could not fit task {task.name}'s text into --max-length {max_length} tokens: raise --max-length")


def _answer_index(ids: list[int], offsets, spans: dict[str, tuple[int, int]], mask_id, readout: str) -> int:
    """Where the label is read: the template's mask token (MLM), else the last token."""
    if readout != "mlm":
        return len(ids) - 1
    for i in _tokens_in(spans["answer"], offsets):
        if ids[i] == mask_id:
            return i
    raise UserError("the tokenizer did not keep the template's mask token whole: use a tokenizer whose mask "
                    "token is a special token")


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
