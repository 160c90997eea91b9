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
