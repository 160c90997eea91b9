"""The real Qwen2.5-Coder-1.5B-Instruct (--model qwen2.5-1.5b, opt-in: skeleton-ds models fetch qwen2.5-1.5b): one short
real stage on real SST-2 files. Skipped, saying why, where its 22 part packages are not installed (CI never
downloads them)."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA
from skeleton_ds import packaged_models

SPEC = packaged_models.PACKAGED["qwen2.5-1.5b"]

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not packaged_models.installed(SPEC),
                                 reason="qwen2.5-1.5b is opt-in and not installed: "
                                        "skeleton-ds models fetch qwen2.5-1.5b"),
              pytest.mark.skipif(not (SHARED_DATA / "SST-2" / "dev.tsv").is_file(),
                                 reason="../shared/data/SST-2 not present")]


def test_one_prompt_tuning_step_on_the_real_sharded_checkpoint(tmp_path):
    from skeleton_ds.cli import run_command, train

    path = packaged_models.resolve_model_path("qwen2.5-1.5b")  # assembled and converted once, then cached
    source = json.loads((packaged_models.Path(path) / packaged_models.SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == SPEC.parts.sha256 and len(source["parts"]) == 22
    config = json.loads((packaged_models.Path(path) / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"]) == ("qwen2", 28, 1536, 8960, 12, 2)

    out = tmp_path / "run"
    assert run_command(train, ["--model", "qwen2.5-1.5b", "--task", "sst2", "--data-dir", str(SHARED_DATA),
                               "--output", str(out), "--config", "ds_configs/zero2.json", "--stages", "prompt",
                               "--batch-size", "4", "--prompt-length", "4", "--max-steps", "1",
                               "--max-train-examples", "8", "--max-eval-examples", "8"]) == 0
    summary = json.loads((out / "prompt" / "metrics.json").read_text())
    assert summary["steps"] == 1 and summary["dev_examples"] == 8
    assert summary["settings"]["values"]["base"]["weights_sha256"] == SPEC.parts.sha256


def test_compact_equals_the_masked_full_model_on_real_inputs(tmp_path):
    """The 1.5B through prompt, attribution, localization (FFN 0.3, 1 of 2 KV groups, each layer at its own
    width) and the streaming conversion: in fp32 on real SST-2 dev text with the stage-1 prompt, the compact
    model answers as the full model with the pruned units masked."""
    import dataclasses

    import torch

    from skeleton_ds.cli import run_command, train
    from skeleton_ds.inference import InferenceConfig, Predictor
    from skeleton_ds.localization import load_skeleton, masked
    from skeleton_ds.tasks import get_task, load_split, subset

    out = tmp_path / "run"
    assert run_command(train, ["--model", "qwen2.5-1.5b", "--task", "sst2", "--data-dir", str(SHARED_DATA),
                               "--output", str(out), "--config", "ds_configs/zero2.json",
                               "--stages", "prompt,attribute,localize,convert", "--batch-size", "4",
                               "--prompt-length", "4", "--max-steps", "1", "--max-train-examples", "8",
                               "--max-eval-examples", "8", "--attr-examples", "8", "--ffn-keep", "0.3",
                               "--head-keep", "0.5"]) == 0
    skeleton, _ = load_skeleton(out / "skeleton.json")
    assert max(map(len, skeleton.heads)) <= 2 and not skeleton.is_uniform()  # global allocation: widths vary
    cfg = InferenceConfig(device="cpu", dtype="fp32", batch_size=4)
    compact = Predictor.from_checkpoint(out / "compact", cfg)
    items = compact.encode(subset(load_split(get_task("sst2", decoder=True), "dev", SHARED_DATA), 8, 1))
    got = compact.logits(items)
    del compact
    # no prompt cache: a cache is computed once at load, before the mask, and would hold the unmasked prompt
    full = Predictor.from_prompt("qwen2.5-1.5b", out / "prompt", dataclasses.replace(cfg, prompt_cache=False))
    adapter = full.model.adapter
    with masked(full.model.backbone, adapter, adapter.geometry(full.model.backbone.config), skeleton):
        expected = full.logits(items)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
