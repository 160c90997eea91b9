"""Input-level soft prompt (Lester et al. 2021) around a frozen backbone, with a label readout.

Three readouts, picked from the backbone's capabilities:
- decoder LM: verbalizer logits at the last position (inputs are left padded);
- encoder with an MLM head: verbalizer logits at the [MASK] position;
- encoder without one: a small trained linear head on the mean of the text tokens' states
  (sentence-embedding models such as all-MiniLM were trained for mean pooling).
Only the label rows of the vocabulary projection are computed, only at the answer position.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from skeleton_ds import checkpoint, distributed
from skeleton_ds.architectures import ArchAdapter
from skeleton_ds.data import ENCODING
from skeleton_ds.errors import UserError
from skeleton_ds.tasks import Task

READOUTS = ("lm", "mlm", "head")


class SoftPrompt(nn.Module):
    """n trainable virtual-token embeddings; a module so ZeRO-3 gathers them in its forward hook."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(length, dim))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embedding.unsqueeze(0).expand(batch_size, -1, -1)


FINAL_STATE = "final"
"""The final hidden state the label is read from (PromptedClassifier.read_vector): the answer position's, which
the LM head or MLM transform reads, or an encoder head's mean-pooled state."""


def layer_state(layer: int) -> str:
    """Layer `layer`'s output (the residual stream after it; transformers' hidden_states[layer + 1]) at the answer."""
    return f"layer.{layer}"


class PromptedClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, adapter: ArchAdapter, readout: str, prompt_length: int,
                 num_labels: int, label_token_ids: list[int] | None = None, label_head: torch.Tensor | None = None):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}")
        self.backbone = backbone
        self.adapter = adapter
        self.readout = readout
        hidden = backbone.config.hidden_size
        self.prompt = SoftPrompt(prompt_length, hidden)
        self.head = nn.Linear(hidden, num_labels) if readout == "head" else None
        if readout != "head":
            if not label_token_ids or len(label_token_ids) != num_labels:
                raise ValueError("a verbalizer readout needs one token id per label")
            self.register_buffer("label_token_ids", torch.tensor(label_token_ids, dtype=torch.long), persistent=False)
        # A compact model converted with --slice-lm-head ships only the label rows of its LM head.
        self.register_buffer("label_head", label_head, persistent=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def load_trained(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Set the prompt (`prompt`) and head (`head.weight`, `head.bias`) values, as prompt.safetensors stores them."""
        named = dict(self.named_parameters())
        for name, value in tensors.items():
            target = named["prompt.embedding" if name == "prompt" else name]
            if target.shape != value.shape:
                raise UserError(f"{name} has shape {tuple(value.shape)} but this model needs {tuple(target.shape)}")
            target.data = value.to(device=target.device, dtype=dtype).clone()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_index: torch.Tensor,
                hidden_layers: tuple[int, ...] | None = None):
        """Label logits [batch, num_labels]. `answer_index` indexes the un-prompted input. With `hidden_layers`
        (distillation), also the hidden states at the answer position: (logits, answer_states(...))."""
        batch = input_ids.shape[0]
        tokens = token_embeddings(self.backbone.get_input_embeddings(), input_ids)
        prompt = self.prompt(batch).to(tokens.dtype)
        n = prompt.shape[1]
        embeds = torch.cat([prompt, tokens], dim=1)
        mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        kwargs = {}
        if self.adapter.causal:
            # Left padding: count positions over real tokens only, so padding never shifts them.
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
            kwargs["use_cache"] = False
        if hidden_layers:
            kwargs["output_hidden_states"] = True
        out = self.backbone.base_model(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        states = out.last_hidden_state
        logits = self.read_labels(states[:, n:], attention_mask, answer_index)
        if hidden_layers is None:
            return logits
        rows = torch.arange(batch, device=states.device)
        read = {FINAL_STATE: self.read_vector(states[:, n:], attention_mask, answer_index)}
        read |= {layer_state(i): out.hidden_states[i + 1][rows, n + answer_index] for i in hidden_layers}
        return logits, read

    def read_vector(self, text_states: torch.Tensor, attention_mask: torch.Tensor,
                    answer_index: torch.Tensor) -> torch.Tensor:
        """The one final state per example the label is read from: the answer position's, or for an encoder's
        trained head the mean over the text tokens (the pooling sentence-embedding models were trained with)."""
        if self.readout == "head" and not self.adapter.causal:
            text_mask = attention_mask.unsqueeze(-1).to(text_states.dtype)
            return (text_states * text_mask).sum(1) / text_mask.sum(1).clamp(min=1)
        return text_states[torch.arange(text_states.shape[0], device=text_states.device), answer_index]

    def read_labels(self, text_states: torch.Tensor, attention_mask: torch.Tensor,
                    answer_index: torch.Tensor) -> torch.Tensor:
        """Label logits from the final states of the text positions (prompt positions already cut off).

        Shared by the plain forward and by inference paths that never compute the prompt's
        positions (a decoder's cached prompt keys and values)."""
        answer = self.read_vector(text_states, attention_mask, answer_index)
        if self.readout == "head":
            return self.head(answer.to(self.head.weight.dtype)).float()
        if self.label_head is not None:
            return F.linear(answer, self.label_head.to(answer.dtype)).float()
        if self.readout == "mlm":
            answer = self.adapter.mlm_transform(self.backbone, answer)
        return label_logits(self.backbone.get_output_embeddings(), answer, self.label_token_ids)


def token_embeddings(embedding: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The input embeddings of a batch's tokens. A plain frozen embedding table partitioned by ZeRO-3 is read row by
    row (distributed.rows: only the batch's tokens move) instead of through its module, whose hook would gather
    the whole table on every rank (151,936 x 1,536 for Qwen2.5); anything else is called as it is."""
    weight = distributed.stored(embedding, "weight")
    if type(embedding) is nn.Embedding and distributed.readable_shard(weight) and not weight.requires_grad:
        return distributed.rows(weight, input_ids)
    return embedding(input_ids)


def label_logits(vocab_projection: nn.Linear, hidden: torch.Tensor, token_ids) -> torch.Tensor:
    """Logits of a few vocabulary entries: a [labels, hidden] slice instead of the [vocab, hidden] product. Under
    ZeRO-3 only those rows are read from the ranks' shards (distributed.rows), never the whole projection."""
    ids = torch.as_tensor(token_ids, device=hidden.device)
    weight, bias = (distributed.stored(vocab_projection, name) for name in ("weight", "bias"))
    if any(t is not None and distributed.is_partitioned(t) and not distributed.readable_shard(t)
           for t in (weight, bias)):
        return vocab_projection(hidden)[:, ids].float()  # swapped out to NVMe: DeepSpeed's own gather

    def label_rows(tensor: torch.Tensor) -> torch.Tensor:
        """A partitioned tensor's label rows from the shards; any other's by indexing (which keeps any gradient).
        The weight may be a map of the checkpoint (loading._map_vocabulary) while an MLM bias is partitioned."""
        return distributed.rows(tensor, ids) if distributed.is_partitioned(tensor) else tensor[ids]

    return F.linear(hidden, label_rows(weight).to(hidden.dtype),
                    None if bias is None else label_rows(bias).to(hidden.dtype)).float()


def verbalizer_token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """The token a model emits for each word when it follows a space, as in the rendered template.
    The label is read from one token, so a word the tokenizer splits is refused rather than cut."""
    prefix = tokenizer.encode("a", add_special_tokens=False)
    ids = []
    for word in words:
        pieces = tokenizer.encode("a " + word, add_special_tokens=False)[len(prefix):]
        if len(pieces) != 1:
            raise UserError(f"verbalizer word {word!r} is {len(pieces)} tokens for this tokenizer, "
                            f"and the label is read from one: choose single-token words with --verbalizer")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise UserError(f"verbalizer words {', '.join(words)} do not map to distinct first tokens: "
                        f"choose others with --verbalizer")
    return ids


def initial_prompt_ids(vocab: int, length: int, init: str, tokenizer, seed: int) -> list[int]:
    """The tokens whose embeddings a prompt starts from: real token embeddings train faster than random vectors
    (Lester et al.). `init` "text:<words>" repeats those words' tokens; "vocab" draws seeded non-special ones."""
    if init.startswith("text:"):
        ids = tokenizer.encode(init[5:], add_special_tokens=False)
        if not ids:
            raise UserError(f"--prompt-init {init!r} encodes to no tokens")
        return (ids * (length // len(ids) + 1))[:length]
    special = set(tokenizer.all_special_ids)
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.tensor([i for i in range(vocab) if i not in special])
    return candidates[torch.randint(len(candidates), (length,), generator=generator)].tolist()


def task_record(task: Task, *, readout: str, label_token_ids: list[int] | None, model: str, model_path: str,
                revision: str | None, prompt_length: int, base_model: dict, max_length: int,
                padding_side: str) -> dict:
    """The task.json saved next to a trained prompt: everything needed to rebuild its inputs and read
    its labels (task, template, verbalizer and its token ids, readout) and the model it belongs to."""
    return {
        "task": task.name, "fields": list(task.fields), "template": task.template,
        "label_names": list(task.label_names), "verbalizer": list(task.verbalizer),
        "label_token_ids": label_token_ids, "readout": readout, "model": model,
        "model_path": model_path, "revision": revision, "prompt_length": prompt_length,
        "base_model": base_model,
        "max_length": max_length, "padding_side": padding_side, "encoding": ENCODING,
    }


def read_task_record(prompt_dir: Path, what: str = "task record") -> dict:
    """A prompt's task.json, refused when its inputs were encoded otherwise than `data.encode` encodes them
    now: the prompt would be fed token sequences it never saw, and quietly lose accuracy."""
    record = checkpoint.read_json(Path(prompt_dir) / "task.json", what)
    made_with = record.get("encoding", "template pieces (skeleton_ds 0.2)")
    if made_with != ENCODING:
        raise UserError(f"{prompt_dir} holds a prompt trained on inputs encoded as {made_with}, and this version "
                        f"encodes {ENCODING} (the template rendered, then tokenized as one string, as other tools do): "
                        f"re-run its stages with this version (skeleton-ds train ... --overwrite)")
    return record
