"""The stage-1 prompt exported as a PEFT adapter gives the same label logits through PEFT."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from conftest import DS_CONFIGS, generic_flags
from skeleton_ds.cli import export_peft, run_command
from skeleton_ds.config import config_from_args
from skeleton_ds.stages.attribute import AttributionRecipe
from skeleton_ds.stages.pipeline import run_pipeline

peft = pytest.importorskip("peft")

BASE_CLASS = {"llama": AutoModelForCausalLM, "bert-mlm": AutoModelForMaskedLM, "bert-head": AutoModel}


@pytest.mark.parametrize("arch", ["llama", "bert-mlm", "bert-head"])
def test_peft_adapter_reproduces_our_label_logits(arch, tiny_models, sentiment_files, tmp_path):
    out = tmp_path / "run"
    argv = ["--model", str(tiny_models[arch]), "--config", str(DS_CONFIGS / "zero2.json"), "--output", str(out),
            "--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--max-steps", "4", "--lr", "0.1",
            *generic_flags(sentiment_files)]
    run_pipeline(config_from_args(argv + ["--stages", "prompt"]))
    assert run_command(export_peft, ["--prompt", str(out / "prompt"), "--output", str(tmp_path / "peft")]) == 0

    ours = AttributionRecipe(config_from_args(argv))  # our full-model path with the stage-1 prompt
    ours.setup()
    base = BASE_CLASS[arch].from_pretrained(tiny_models[arch]).eval()
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    n = 4
    head = load_file(str(tmp_path / "peft" / "head.safetensors")) if arch == "bert-head" else None
    readout = json.loads((tmp_path / "peft" / "readout.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch])
    with open(sentiment_files[1], newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)][:10]
    for text, item in zip(texts, ours.dev_set):  # one at a time: no padding, so positions agree (see interop docstring)
        batch = ours.collate([item])
        # A PEFT user's input: readout.json's template, formatted and tokenized as one string
        plain = tokenizer(readout["input_template"].format(text=text), return_tensors="pt")
        assert plain["input_ids"][0].tolist() == item.input_ids
        with torch.no_grad():
            expected = ours.model(batch["input_ids"], batch["attention_mask"], batch["answer_index"])
            output = theirs(**plain)
            if readout["label_position"].startswith("last"):
                got = output.logits[:, -1, readout["label_token_ids"]]
            elif readout["label_position"].startswith("mask"):
                mask = plain["input_ids"][0].tolist().index(tokenizer.mask_token_id)
                got = output.logits[:, n + mask, readout["label_token_ids"]]
            else:
                pooled = output.last_hidden_state[:, n:].mean(1)
                got = pooled @ head["head.weight"].T + head["head.bias"]
        torch.testing.assert_close(got.float(), expected, rtol=1e-4, atol=1e-5)
