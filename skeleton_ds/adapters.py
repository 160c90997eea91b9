"""Everything architecture-specific lives here, behind one small interface.

The rest of the code never asks `model_type`; it asks the adapter. Adding an architecture means
adding one `ArchAdapter` entry: the generic Hugging Face accessors (`base_model`,
`get_input_embeddings`, `get_output_embeddings`) cover the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from skeleton_ds.errors import UserError


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    causal: bool
    """Decoder LM: classify by verbalizer at the last position (left padding)."""
    mlm_transform: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    """Hidden state -> features that the output embedding (vocabulary decoder) consumes."""

    @property
    def padding_side(self) -> str:
        return "left" if self.causal else "right"


def _bert_mlm_transform(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.cls.predictions.transform(hidden)


def _roberta_mlm_transform(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    head = model.lm_head
    return head.layer_norm(F.gelu(head.dense(hidden)))


_DECODER = ArchAdapter(family="llama", causal=True)
_BERT = ArchAdapter(family="bert", causal=False, mlm_transform=_bert_mlm_transform)
_ROBERTA = ArchAdapter(family="roberta", causal=False, mlm_transform=_roberta_mlm_transform)

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "bert": _BERT,
    "roberta": _ROBERTA,
}


def adapter_for(model_type: str) -> ArchAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UserError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None
