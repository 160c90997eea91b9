"""Everything architecture-specific lives here, behind one small interface.

The rest of the code never asks `model_type`; it asks the adapter (an `ArchAdapter` adapts the
generic code to one architecture; nothing here is a PEFT adapter). An adapter is data: the
module paths (inside one transformer layer) where the units Skeleton scores live. Adding an
architecture means adding one `ArchAdapter` entry; the generic Hugging Face accessors
(`base_model`, `get_input_embeddings`, `get_output_embeddings`) cover the rest.

Units:
- an FFN neuron is one dimension of the FFN activation: the input of the down projection
  (LLaMA: act(gate) * up) or the output of the intermediate block (BERT);
- an attention unit is a KV group: the query heads that share one key/value head, scored and kept
  together (for BERT-style attention every head is its own group). Its activation is its slice of
  the input of the attention output projection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from skeleton_ds.errors import UserError


@dataclass(frozen=True)
class Geometry:
    layers: int
    ffn_size: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int = 0
    """0 when unknown (scores recorded before it was kept): every KV-group count is then allowed."""

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads

    def allows_groups(self, groups: int) -> bool:
        """Whether a compact model with this many KV groups per layer is loadable: transformers'
        decoder configs require hidden_size to be a multiple of the query-head count, even when
        head_dim is given explicitly (e.g. 9 of LLaMA-160m's 12 heads is refused, 8 is fine)."""
        return not self.hidden_size or self.hidden_size % (groups * self.heads_per_group) == 0

    def loadable_groups(self, groups: int) -> int:
        """The allowed KV-group count nearest to `groups` (ties keep more)."""
        allowed = [g for g in range(1, self.kv_heads + 1) if self.allows_groups(g)]
        return min(allowed, key=lambda g: (abs(g - groups), -g))

    def padded_groups(self, groups: int) -> int:
        """The smallest allowed KV-group count >= `groups` (a per-layer skeleton pads up to it)."""
        return next(g for g in range(groups, self.kv_heads + 1) if self.allows_groups(g))


@dataclass(frozen=True)
class RecipeDefaults:
    """The flags whose default depends on the architecture (left `auto` / unset on the command line), each
    measured where it was chosen. Encoders keep the paper's recipe, which holds on MiniLM (SST-2 within 1 point
    of full prompt tuning at FFN keep 0.3, docs/results/reproduce.md). Decoders: one threshold across layers
    and the massive-activation neurons protected, without which SmolLM2 loses the task
    (docs/results/study_decoder.md), and re-tuning distilled from the full model, label KL plus the final hidden
    state, the best recipe at FFN keep 0.3 and 0.2 (docs/results/study_keep.md)."""

    keep_mode: str = "uniform"
    protect_outliers: float = 0.0
    distill_kl: float = 0.0
    distill_hidden: float = 0.0


DECODER_DEFAULTS = RecipeDefaults(keep_mode="global", protect_outliers=20.0, distill_kl=1.0, distill_hidden=1.0)


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    causal: bool
    """Decoder LM: classify by verbalizer at the last position (left padding)."""
    layers: str
    """Path of the layer list inside `model.base_model`."""
    ffn_site: str
    """Module whose input (ffn_site_reads_input) or output is the FFN activation [.., ffn_size]."""
    ffn_site_reads_input: bool
    ffn_in: tuple[str, ...]
    """Linear layers whose output rows are FFN neurons (their weights are the neurons' input weights)."""
    ffn_out: str
    """The FFN output projection; its input columns are FFN neurons."""
    attn_out: str
    """The attention output projection; its input is the concatenation of the heads' outputs."""
    q_proj: str
    kv_proj: tuple[str, ...]
    mlm_transform: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    """Hidden state -> features that the output embedding (vocabulary decoder) consumes (MLM heads)."""
    ffn_out_bias: str | None = None
    """Where bias compensation puts its fold: "native" (the FFN output projection has a bias), the
    name of a standard config flag that gives it one (LLaMA's `mlp_bias`, which also adds biases to
    `ffn_in`, written as zeros), or None: the architecture cannot carry one and still load."""
    defaults: RecipeDefaults = RecipeDefaults()

    @property
    def padding_side(self) -> str:
        return "left" if self.causal else "right"

    def resolve(self, given: Mapping[str, object]) -> dict[str, object]:
        """The architecture-dependent flags as given, with `auto` / unset replaced by this architecture's defaults."""
        return {name: default if given[name] in (None, "auto") else given[name]
                for name, default in asdict(self.defaults).items()}

    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(model.base_model.get_submodule(self.layers))

    def geometry(self, config) -> Geometry:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return Geometry(layers=config.num_hidden_layers, ffn_size=config.intermediate_size, heads=heads,
                        kv_heads=kv_heads, head_dim=head_dim, hidden_size=config.hidden_size)


def _bert_mlm_transform(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.cls.predictions.transform(hidden)


def _roberta_mlm_transform(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    head = model.lm_head
    return head.layer_norm(F.gelu(head.dense(hidden)))


_DECODER = ArchAdapter(
    family="llama", causal=True, layers="layers", ffn_out_bias="mlp_bias", defaults=DECODER_DEFAULTS,
    ffn_site="mlp.down_proj", ffn_site_reads_input=True, ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    attn_out="self_attn.o_proj", q_proj="self_attn.q_proj", kv_proj=("self_attn.k_proj", "self_attn.v_proj"),
)
_BERT_LAYER = dict(
    causal=False, layers="encoder.layer", ffn_out_bias="native",
    ffn_site="intermediate", ffn_site_reads_input=False, ffn_in=("intermediate.dense",), ffn_out="output.dense",
    attn_out="attention.output.dense", q_proj="attention.self.query",
    kv_proj=("attention.self.key", "attention.self.value"),
)
_BERT = ArchAdapter(family="bert", mlm_transform=_bert_mlm_transform, **_BERT_LAYER)
_ROBERTA = ArchAdapter(family="roberta", mlm_transform=_roberta_mlm_transform, **_BERT_LAYER)

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": _DECODER,
    "mistral": replace(_DECODER, family="mistral", ffn_out_bias=None),  # no mlp_bias in MistralConfig
    "qwen2": replace(_DECODER, family="qwen2", ffn_out_bias=None),  # nor in Qwen2Config
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
