"""skeleton_ds/experiments/scale_run.py end to end on the small shape, and the ZeRO-3 loading it measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import DS_CONFIGS, REPO, SHARED_DATA
from skeleton_ds.distributed import without_rendezvous
from skeleton_ds.provenance import missing_fields
from skeleton_ds.stage_specs import STAGE_ORDER

STAGES = ("load", *STAGE_ORDER)  # load: the backbone load alone


@pytest.mark.multirank
def test_scale_run_small_reports_every_stage_and_rank(tmp_path):
    """2 ZeRO-3 ranks and 1 ZeRO-0 rank (the offload run is the same code path as ZeRO-3 and only slower)."""
    report, md = tmp_path / "scale_run.json", tmp_path / "scale_run.md"
    env = without_rendezvous(os.environ)
    done = subprocess.run([sys.executable, "-m", "skeleton_ds.experiments.scale_run", "--shape", "small", "--runs",
                           "zero0,zero3",
                           "--steps", "2", "--work", str(tmp_path / "work"), "--json", str(report), "--md", str(md)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["shape"] == "small" and result["base"]["parameters"] > 1e6
    assert missing_fields(result) == []
    for run, ranks in (("zero0", 1), ("zero3", 2)):
        stages = result["runs"][run]["stages"]
        assert tuple(stages) == STAGES
        for stage, entry in stages.items():
            assert sorted(entry["ranks"]) == [str(r) for r in range(ranks)], (run, stage)
            for values in entry["ranks"].values():
                assert values["peak_rss_mib"] > 0 and values["hwm_mib"] > 0 and values["peak_anon_mib"] > 0
        assert all(v > 0 for v in result["runs"][run]["seconds_per_step"].values())
        assert stages["convert"]["conversion"]["staging_seen"]
        infer = result["runs"][run]["infer"]  # skeleton-ds infer on the compact model this launch made
        assert infer["examples"] == 4 and infer["peak_rss_mib"] > 0 and infer["command"].startswith("skeleton-ds infer")
        after = result["runs"][run]["accuracy"]["skeleton_after_retune"]
        assert abs(infer["accuracy"] - after) <= 0.25 + 1e-9, (infer, after)  # same prompt: at most a near-tie flips
        shares = [p["fraction"] for p in stages["load"]["after_load"].values()]
        assert len(shares) == ranks and all(abs(f - 1 / ranks) < 0.05 for f in shares)  # ZeRO-3: about half each
    assert set(result["ratios"]["zero3"]) == set(STAGES)
    assert result["runs"]["zero3"]["backbone_fraction_on_rank0"] <= 0.55
    text = md.read_text()
    assert "| prompt |" in text and "python -m skeleton_ds.experiments.scale_run --shape small" in text


def test_zero3_load_equals_from_pretrained_and_streams(tiny_models, monkeypatch):
    """Under ZeRO-3 load_backbone fills the partitioned model module by module from the safetensors
    files (transformers' own path reads the whole checkpoint on rank 0): same values as a plain
    from_pretrained, for every architecture, tied weights included. A checkpoint that lacks a weight
    the model has (an MLM checkpoint loaded as a bare encoder: no pooler) takes transformers' path."""
    from skeleton_ds import distributed, loading
    from skeleton_ds.ds_config import resolve_ds_config

    distributed.init_distributed()
    ds_config = resolve_ds_config(DS_CONFIGS / "zero3.json", world_size=1, batch_size=8, lr=0.1,
                                  precision="fp32")
    streamed = []
    original = loading._load_partitioned

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        streamed.append(model is not None)
        return model

    monkeypatch.setattr(loading, "_load_partitioned", spy)
    from deepspeed.runtime.zero.partition_parameters import Init

    partitioned_shapes = []
    convert = Init._convert_to_deepspeed_param

    def record(self, param):
        partitioned_shapes.append(tuple(param.shape))
        return convert(self, param)

    monkeypatch.setattr(Init, "_convert_to_deepspeed_param", record)
    cases = [("llama", "verbalizer"), ("qwen2", "verbalizer"), ("bert-mlm", "verbalizer"), ("bert-head", "head"),
             ("roberta-mlm", "verbalizer"), ("bert-mlm", "head")]
    for arch, readout in cases:
        streamed.clear()
        partitioned_shapes.clear()
        zero3 = loading.load_backbone(str(tiny_models[arch]), ds_config, readout=readout).model
        plain = loading.load_backbone(str(tiny_models[arch]), {}, readout=readout).model
        assert streamed == [arch != "bert-mlm" or readout != "head"], (arch, readout)
        expected = dict(plain.named_parameters(remove_duplicate=False))
        params = dict(zero3.named_parameters())
        # On CPU ranks the streamed load maps the vocabulary matrices from the checkpoint (loading._map_vocabulary):
        # buffers, not partitions, and never saved in a checkpoint
        vocabulary = {name for name, module in zero3.named_modules()
                      if module in (zero3.get_input_embeddings(), zero3.get_output_embeddings())}
        mapped = {f"{name}.weight" for name in vocabulary} if streamed[0] else set()
        assert set(params) == {n for n in dict(plain.named_parameters()) if n not in mapped}
        assert all(hasattr(p, "ds_id") for p in params.values())  # partitioned
        with distributed.gathered(params.values()):
            for name, p in params.items():
                if streamed[0]:
                    assert torch.equal(p.data, expected[name]), (arch, name)
        buffers = dict(zero3.named_buffers(remove_duplicate=False))
        for name in mapped:
            assert torch.equal(buffers[name], expected[name]) and name not in zero3.state_dict(), (arch, name)
            # a matrix to be mapped is never partitioned, not even while the model is built (loading's peak)
            assert tuple(expected[name].shape) not in partitioned_shapes, (arch, name)
        for name, buffer in zero3.named_buffers():
            if name not in mapped:
                assert torch.equal(buffer, dict(plain.named_buffers())[name]), (arch, name)


@pytest.mark.multirank
@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_DATA / "SST-2" / "dev.tsv").is_file(), reason="../shared/data/SST-2 not present")
def test_scale_run_on_real_sst2_reports_dev_accuracy(tmp_path):
    """--data-dir: the same ZeRO-3 stages learn real SST-2, and the record adds each run's dev accuracy."""
    report, md = tmp_path / "r.json", tmp_path / "r.md"
    done = subprocess.run([sys.executable, "-m", "skeleton_ds.experiments.scale_run", "--shape", "small", "--runs",
                           "zero3", "--steps", "2", "--data-dir", str(SHARED_DATA), "--train-examples", "16",
                           "--dev-examples", "8", "--work", str(tmp_path / "work"), "--json", str(report),
                           "--md", str(md)],
                          cwd=REPO, env=without_rendezvous(os.environ), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["task"] == "sst2" and "--max-eval-examples 8" in " ".join(result["stage_flags"])
    accuracy = result["runs"]["zero3"]["accuracy"]
    assert accuracy["dev_examples"] == 8
    for key in ("full_prompt_tuned", "skeleton_before_retune", "skeleton_after_retune"):
        assert 0.0 <= accuracy[key] <= 1.0 and (accuracy[key] * 8).is_integer(), key
    assert "Dev accuracy on SST-2" in md.read_text()


def test_zero3_load_without_a_stored_head_takes_transformers_path(tiny_models, tmp_path):
    """The vocabulary matrices are left unpartitioned while the model is built, for the maps that replace them; a
    checkpoint that lacks one (an untied LM head not stored) is loaded by transformers' own path instead."""
    import shutil

    from safetensors.torch import load_file, save_file

    from skeleton_ds import distributed, loading
    from skeleton_ds.ds_config import resolve_ds_config

    distributed.init_distributed()
    path = tmp_path / "llama"
    shutil.copytree(tiny_models["llama"], path)
    weights = load_file(str(path / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    ds_config = resolve_ds_config(DS_CONFIGS / "zero3.json", world_size=1, batch_size=8, lr=0.1, precision="fp32")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    zero3 = HfDeepSpeedConfig(ds_config)  # as load_backbone holds it: models are built partitioned (zero.Init)
    try:
        streamed = loading._load_partitioned(AutoModelForCausalLM, AutoConfig.from_pretrained(path), str(path), None,
                                             torch.float32)
    finally:
        del zero3
        unset_hf_deepspeed_config()
    assert streamed is None
    model = loading.load_backbone(str(path), ds_config, readout="verbalizer").model
    assert all(not hasattr(p, "skeleton_unpartitioned_shape") for p in model.parameters())
