"""Many tasks in one forward pass over shared weights.

Skeleton's tasks share every tensor their skeletons do not slice: embeddings, norms, the vocabulary head,
and attention wherever all heads are kept. `RoutedBackbone` runs those once over a batch whose rows belong
to different tasks. Each projection a skeleton may slice (the FFN's input and output projections; q, k, v
and the attention output) becomes a `RoutedLinear`, which runs one matrix product per group of rows that
share its weights: every row of every task that keeps all heads of a layer shares one product there.
A loop over groups, not a grouped-GEMM kernel: on CPU the loop is what such a kernel would do, and on a
GPU the groups of a long-tail load are small enough that launch cost, not the loop, decides.

It stays exact, and free of architecture code, by padding between projections. A projection whose outputs
a task narrowed (its FFN neurons, its kept heads) writes the task's values into the first columns: attention
pads with zeros to the base width, so the head reshape and rotary embeddings see base shapes; the FFN pads
only to the widest task in the pass. The projection that reads them back (FFN down, attention output) reads
only the task's own first columns, so the padding never reaches a result: a padded head attends to zero
values, outputs zeros, and is never read. A decoder's prompt keys and values stay per task (each computed
once on the task's own compact model) and are placed into each row's slots of the pass's cache, padded the
same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skeleton_ds import data
from skeleton_ds.architectures import ArchAdapter
from skeleton_ds.prompt import PromptedClassifier

Weights = tuple[torch.Tensor, "torch.Tensor | None"]  # a projection's weight and bias
MAX_PAD_RATIO = 2.0  # a row padded to at most twice its length (length_buckets)
Rows = slice | torch.Tensor  # a task's rows in a pass: a slice when they are contiguous (mixed_logits makes them so)


@dataclass
class Group:
    rows: Rows | None  # the group's rows in the pass's batch; None: every row
    weight: torch.Tensor
    bias: torch.Tensor | None


class RoutedLinear(nn.Module):
    """A base projection whose rows run on their own task's weights, one product per group of rows.

    `narrowed` says which side a skeleton slices: "out" (the task keeps some outputs: FFN input projections,
    q/k/v) or "in" (the task reads only its first columns of a padded input: FFN output and attention output
    projections). Narrower outputs are padded: q/k/v with zeros to the base width (`base_width`: the head
    reshape needs it; a padded head attends to zero values and outputs zeros), FFN neurons only to the widest
    task in the pass, left unset beyond a row's own task's width: the activation between runs over them, and
    the output projection never reads them."""

    def __init__(self, base: nn.Linear, narrowed: str, base_width: bool = False):
        super().__init__()
        if narrowed not in ("in", "out"):
            raise ValueError(f"narrowed must be 'in' or 'out', got {narrowed!r}")
        self.in_features, self.out_features, self.narrowed = base.in_features, base.out_features, narrowed
        self.base_width = base_width
        self.groups: list[Group] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.groups:
            raise RuntimeError("a routed projection ran outside a routed pass (RoutedBackbone.route)")
        if self.narrowed == "in":
            if len(self.groups) == 1 and self.groups[0].rows is None:
                return self._product(x, self.groups[0])
            out = x.new_empty((*x.shape[:-1], self.out_features))
            for group in self.groups:
                out[group.rows] = self._product(x[group.rows], group)
            return out
        width = self.out_features if self.base_width else max(g.weight.shape[0] for g in self.groups)
        if len(self.groups) == 1 and self.groups[0].rows is None:
            y = self._product(x, self.groups[0])
            return F.pad(y, (0, width - y.shape[-1])) if y.shape[-1] < width else y
        out = (x.new_zeros if self.base_width else x.new_empty)((*x.shape[:-1], width))
        for group in self.groups:
            y = self._product(x[group.rows], group)
            out[group.rows, ..., :y.shape[-1]] = y
        return out

    def _product(self, x: torch.Tensor, group: Group) -> torch.Tensor:
        if self.narrowed == "in":
            return F.linear(x[..., :group.weight.shape[1]], group.weight, group.bias)
        return F.linear(x, group.weight, group.bias)


def routed_paths(adapter: ArchAdapter) -> dict[str, tuple[str, bool]]:
    """The projections inside one layer that a skeleton may slice: path -> (narrowed side, padded to base width)."""
    return {**{p: ("out", False) for p in adapter.ffn_in},
            **{p: ("out", True) for p in (adapter.q_proj, *adapter.kv_proj)},
            adapter.ffn_out: ("in", False), adapter.attn_out: ("in", False)}


def projections(backbone: nn.Module, adapter: ArchAdapter) -> dict[str, Weights]:
    """A task's (compact) model's weights at every routed projection, keyed "layer.path"."""
    out = {}
    for index, layer in enumerate(adapter.layer_modules(backbone)):
        for path in routed_paths(adapter):
            module = layer.get_submodule(path)
            out[f"{index}.{path}"] = (module.weight, module.bias)
    return out


class RoutedBackbone:
    """The base model with every routed projection replaced; all other tensors are the base's own (shared
    by reference, never copied). `route` tells every projection, before a pass, whose weights each row runs."""

    def __init__(self, base: nn.Module, adapter: ArchAdapter):
        shared = {id(t): t for t in [*base.parameters(), *base.buffers()]}
        self.model = copy.deepcopy(base, memo=shared)  # new modules, the base's tensors
        self.routed: dict[str, RoutedLinear] = {}
        for index, layer in enumerate(adapter.layer_modules(self.model)):
            for path, (narrowed, base_width) in routed_paths(adapter).items():
                owner, _, leaf = path.rpartition(".")
                parent = layer.get_submodule(owner) if owner else layer
                self.routed[f"{index}.{path}"] = routed = RoutedLinear(getattr(parent, leaf), narrowed, base_width)
                setattr(parent, leaf, routed)

    def route(self, groups: Sequence[tuple[Rows, dict[str, Weights]]]) -> None:
        """groups: (a task's rows, that task's `projections`). Rows whose tasks share a projection's tensors
        (a layer where they keep every head) share one product there."""
        for key, module in self.routed.items():
            merged: dict[tuple, tuple[list[Rows], Weights]] = {}
            for rows, weights in groups:
                weight, bias = weights[key]
                merged.setdefault((_identity(weight), _identity(bias)), ([], (weight, bias)))[0].append(rows)
            module.groups = [Group(None if len(merged) == 1 else _union(rows), weight, bias)
                             for rows, (weight, bias) in merged.values()]

    def clear(self) -> None:
        """Forget the last pass's routes, so no task's weights outlive its eviction through them."""
        for module in self.routed.values():
            module.groups = []


def _identity(tensor: torch.Tensor | None) -> tuple | None:
    """Two tasks' tensors are the same when they view the same memory the same way (each task's module tree
    wraps the base's shared tensors in parameters of its own)."""
    return None if tensor is None else (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())


def _union(rows: list[Rows]) -> Rows:
    """Several tasks' rows as one index (adjacent slices stay a slice)."""
    if len(rows) == 1:
        return rows[0]
    if all(isinstance(r, slice) for r in rows) and all(a.stop == b.start for a, b in zip(rows, rows[1:])):
        return slice(rows[0].start, rows[-1].stop)
    return torch.cat([torch.arange(r.start, r.stop) if isinstance(r, slice) else r.cpu() for r in rows])


def row_groups(names: Sequence[str], device: torch.device) -> dict[str, Rows]:
    """Each task's rows in a pass, tasks in order of first appearance: a slice where they are contiguous
    (a view, no gather or scatter), else an index tensor."""
    out: dict[str, Rows] = {}
    for name in dict.fromkeys(names):
        index = [i for i, n in enumerate(names) if n == name]
        contiguous = index[-1] - index[0] + 1 == len(index)
        out[name] = slice(index[0], index[-1] + 1) if contiguous else torch.tensor(index, device=device)
    return out


def _indices(rows: Rows) -> list[int]:
    return list(range(rows.start, rows.stop)) if isinstance(rows, slice) else rows.tolist()


def mixed_forward(backbone: nn.Module, models: dict[str, PromptedClassifier], names: list[str],
                  input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_index: torch.Tensor,
                  prompt_kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None) -> list[torch.Tensor]:
    """Label logits per row, each row with its own task's prompt and readout, in one pass of `backbone`
    (the shared base, or a routed one already routed for these rows).

    Prompts may differ in length (n <= n_max). With `prompt_kv` (decoders: each task's cached prompt keys and
    values) a row's cache is [its prompt, masked gap to n_max] and the pass runs the text only. Without, the
    prompt is an input: a decoder's row is [prompt, masked gap, left-padded text], an encoder's [prompt, text,
    masked tail]. Positions count real tokens only, so every text sits where it would alone."""
    groups = row_groups(names, input_ids.device)
    causal = next(iter(models.values())).adapter.causal
    lengths = {name: models[name].prompt.embedding.shape[0] for name in groups}
    n_max = max(lengths.values())
    batch, width = input_ids.shape
    kwargs: dict = {}
    if prompt_kv is not None:
        from transformers import DynamicCache

        cache, first = DynamicCache(), next(iter(prompt_kv.values()))
        config = backbone.config  # the base's key/value heads (a task's cache may hold fewer: its kept groups)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        for layer in range(len(first)):
            keys = first[layer][0].new_zeros(batch, kv_heads, n_max, first[layer][0].shape[-1])
            values = torch.zeros_like(keys)
            for name, rows in groups.items():
                k, v = prompt_kv[name][layer]
                keys[rows, :k.shape[1], :k.shape[2]] = k
                values[rows, :v.shape[1], :v.shape[2]] = v
            cache.update(keys, values, layer)
        starts = {name: 0 for name in groups}
        offset = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        for name, rows in groups.items():
            offset[rows] = lengths[name]
        kwargs = {"input_ids": input_ids, "cache": cache, "use_cache": True,
                  "position_ids": offset[:, None] + attention_mask.long().cumsum(-1) - 1}
        prompt_mask = attention_mask.new_zeros(batch, n_max)
        for name, rows in groups.items():
            prompt_mask[rows, :lengths[name]] = 1
        mask = torch.cat([prompt_mask, attention_mask], dim=1)
    else:
        tokens = backbone.get_input_embeddings()(input_ids)
        embeds = tokens.new_zeros(batch, n_max + width, tokens.shape[-1])
        mask = attention_mask.new_zeros(batch, n_max + width)
        starts = {}
        for name, rows in groups.items():
            n = lengths[name]
            starts[name] = at = n_max if causal else n
            embeds[rows, :n] = models[name].prompt.embedding.to(tokens.dtype)
            embeds[rows, at:at + width] = tokens[rows]
            mask[rows, :n] = 1
            mask[rows, at:at + width] = attention_mask[rows]
        kwargs = {"inputs_embeds": embeds}
        if causal:
            kwargs |= {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0), "use_cache": False}
    states = backbone.base_model(attention_mask=mask, **kwargs).last_hidden_state
    out: list[torch.Tensor] = [None] * batch  # type: ignore[list-item]
    for name, rows in groups.items():
        at = starts[name]
        logits = models[name].read_labels(states[rows, at:at + width], attention_mask[rows], answer_index[rows])
        for row, value in zip(_indices(rows), logits):
            out[row] = value
    return out


def mixed_logits(tagged: Sequence[tuple[str, object]], encode: Callable[[str, list], list[data.Encoded]],
                 forward: Callable[..., list[torch.Tensor]], *, batch_size: int, pad_id: int, causal: bool,
                 device: torch.device, max_ratio: float = MAX_PAD_RATIO) -> list[torch.Tensor]:
    """Label logits (fp32, on the CPU) per (task name, example), in order: each task's records encoded its own
    way, then passes of at most `batch_size` rows cut from the length-sorted rows of all tasks together (as
    Predictor.logits cuts one task's). `forward(ids, mask, answer, names)` runs one pass."""
    names = [name for name, _ in tagged]
    items: list[data.Encoded] = [None] * len(tagged)  # type: ignore[list-item]
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        for i, item in zip(rows, encode(name, [tagged[i][1] for i in rows])):
            items[i] = item
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    out: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    first = {name: i for i, name in reversed(list(enumerate(names)))}
    for chunk in length_buckets([len(items[i].input_ids) for i in order], batch_size, max_ratio):
        chunk = sorted((order[j] for j in chunk), key=lambda i: first[names[i]])  # each task's rows together
        batch = data.collate([items[i] for i in chunk], pad_id, left_pad=causal)
        logits = forward(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "answer_index")),
                         [names[i] for i in chunk])
        for i, row in zip(chunk, logits):
            out[i] = row.float().cpu()
    return out


def length_buckets(lengths: Sequence[int], batch_size: int, max_ratio: float) -> list[range]:
    """Passes over rows sorted by length: at most `batch_size` rows, and a new pass where a row is more than
    `max_ratio` times as long as the pass's first (every row of a pass is padded to its longest). Mixed tasks
    mix lengths (a sentence beside a sentence pair): padding them all to the longest costs more than a pass."""
    passes, start = [], 0
    for j in range(1, len(lengths) + 1):
        if j == len(lengths) or j - start == batch_size or lengths[j] > max_ratio * lengths[start]:
            passes.append(range(start, j))
            start = j
    return passes


def answers(tagged: Sequence[tuple[str, object]], logits: Sequence[torch.Tensor],
            label_names: Callable[[str], Sequence[str]]) -> list[dict]:
    """One {"label", "probabilities"} per (task name, example), from its label logits."""
    out = []
    for (name, _), row in zip(tagged, logits):
        names, probs = label_names(name), row.softmax(-1)
        out.append({"label": names[int(probs.argmax())], "probabilities": {n: float(v) for n, v in zip(names, probs)}})
    return out
