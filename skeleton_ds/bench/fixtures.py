"""Checkpoints to benchmark, built by the real pipeline code: a random base of a shape, a synthetic
prompt on it, compact models localized and converted from it (tests build their fixtures here too)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from skeleton_ds import checkpoint
from skeleton_ds.architectures import adapter_for
from skeleton_ds.attribution import random_scores
from skeleton_ds.localization import select, skeleton_record
from skeleton_ds.model_identity import model_identity
from skeleton_ds.prompt import task_record
from skeleton_ds.tasks import Task
from skeleton_ds.bench.config import SHAPES

def random_base(shape: str | dict, directory: Path, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", *, words: Sequence[str] | None = None,
                max_shard_size: str | None = None) -> Path:
    """A random-init decoder of a named shape (or a config dict with its model_type), saved as an ordinary HF
    directory with a word-level tokenizer, complete or absent (written aside, then renamed). The tokenizer's
    words: `words` (a task's vocabulary, with BOS added as LLaMA's does), else w3, w4, ... for the whole
    vocabulary. `max_shard_size`: saved in shards of this size (safetensors writes one shard at a time)."""
    import os
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=1, eos_token_id=2,
                                  tie_word_embeddings=False)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(staging, safe_serialization=True,
                          **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    del model
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab = specials | ({w: i for i, w in enumerate(words, len(specials))} if words is not None
                        else {f"w{i}": i for i in range(len(specials), config.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if words is not None:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(staging)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)
    return directory


_SYNTHETIC = Task(name="bench", fields=("text",), template="{text} {answer}", label_names=("negative", "positive"),
                  verbalizer=("w5", "w6"), metrics=("accuracy",))


def synthetic_prompt_dir(base: Path, out: Path, prompt_length: int, readout: str) -> Path:
    """A random prompt (and head) with the task.json stage 1 would write, for random-weight shapes."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    g = torch.Generator().manual_seed(1)
    tensors = {"prompt": torch.randn(prompt_length, config.hidden_size, generator=g) * 0.02}
    if readout == "head":
        tensors |= {"head.weight": torch.randn(2, config.hidden_size, generator=g) * 0.02, "head.bias": torch.zeros(2)}
    record = task_record(_SYNTHETIC, readout=readout, label_token_ids=None if readout == "head" else [5, 6],
                         model=str(base), model_path=str(base), revision=None, prompt_length=prompt_length,
                         base_model=model_identity(str(base), str(base), config, None), max_length=512,
                         padding_side=adapter_for(config.model_type).padding_side)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save_tensors(out / "prompt.safetensors", tensors, {"readout": readout})
    checkpoint.write_json(out / "task.json", record)
    return out


def compact_checkpoint(base: Path, prompt_dir: Path, scores: dict | None, out: Path, *, ffn_keep: float,
                       head_keep: float, align: int, slice_lm_head: bool, mode: str = "uniform",
                       protect: float = 0.0) -> Path:
    """The real localize + convert code on given (or seeded random) scores."""
    from transformers import AutoConfig

    from skeleton_ds.conversion import convert

    config = AutoConfig.from_pretrained(base)
    geometry = adapter_for(config.model_type).geometry(config)
    scores = scores or random_scores(geometry, seed=0)
    skeleton = select(scores, geometry, ffn_keep=ffn_keep, head_keep=head_keep, align=align, mode=mode, protect=protect)
    identity = json.loads((prompt_dir / "task.json").read_text())["base_model"]
    meta = {"task": "bench", "base_model": identity, "geometry": asdict(geometry), "scorer": "given",
            "reduce": "abs-sum", "include_prompt": False, "examples": 0}
    skeleton_file = out.with_suffix(".skeleton.json")
    checkpoint.write_json(skeleton_file, skeleton_record(skeleton, meta, keep_mode=mode, ffn_keep=ffn_keep,
                                                         head_keep=head_keep, align=align, protect_outliers=protect))
    convert(identity["name_or_path"], skeleton_file, prompt_dir, out, overwrite=True, slice_lm_head=slice_lm_head)
    return out
