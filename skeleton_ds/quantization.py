"""Weight quantization of a frozen model: the `--quant` modes and their bitsandbytes settings.

The inference settings check a `--quant` mode against QUANT_MODES before any model is read, and
`loading.load_backbone` asks `quantization_config` for the settings that load the linear layers as
8-bit or NF4; this is the one place a mode is mapped to bitsandbytes.
"""

from __future__ import annotations

import torch

from skeleton_ds.errors import UserError

QUANT_MODES = ("none", "8bit", "4bit")


def quantization_config(quant: str, compute_dtype: torch.dtype):
    """bitsandbytes settings for a frozen model: LLM.int8() or NF4 weights (with double quantization)."""
    if quant not in QUANT_MODES:
        raise UserError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)
