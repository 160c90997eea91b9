"""All five stages in one process: the compact model with the stage-1 prompt scores exactly like the
masked full model, and a compact directory whose files do not match its manifest is refused."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import DS_CONFIGS, generic_flags
from skeleton_ds.cli import run_command, train
from skeleton_ds.config import STAGES, config_from_args
from skeleton_ds.localization import load_skeleton, masked
from skeleton_ds.stages.attribute import AttributionRecipe
from skeleton_ds.stages.pipeline import run_pipeline


def _argv(model, files, out, stage, *extra):
    return ["--model", str(model), "--config", str(DS_CONFIGS / f"zero{stage}.json"), "--output", str(out),
            "--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--lr", "0.1", "--seed", "3",
            "--max-steps", "4", "--align", "8", "--ffn-keep", "0.5", *generic_flags(files), *extra]


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize(("arch", "head_keep", "slice_head"),
                         [("llama", "0.5", False), ("bert-head", "1.0", False), ("qwen2", "0.5", True)])
def test_compact_with_stage1_prompt_equals_masked_full_model(arch, head_keep, slice_head, stage, tiny_models,
                                                            sentiment_files, tmp_path):
    out = tmp_path / "run"
    extra = ["--slice-lm-head"] if slice_head else []
    cfg = config_from_args(_argv(tiny_models[arch], sentiment_files, out, stage, "--head-keep", head_keep, *extra))
    summary = run_pipeline(cfg)
    if slice_head:  # Qwen2 ties its LM head to the input embedding: the label rows come from there
        config = json.loads((out / "compact" / "config.json").read_text())
        assert config["architectures"] == ["Qwen2Model"] and not config["tie_word_embeddings"]
        assert load_file(str(out / "compact" / "label_head.safetensors"))["weight"].shape == (2, 32)
    assert set(summary["stage_seconds"]) == set(STAGES)  # the teacher stage too: it writes an empty file
    assert summary["parameters_compact"] < summary["parameters_full"]
    assert json.loads((out / "metrics.json").read_text())["skeleton_after_retune"] == summary["skeleton_after_retune"]
    before = summary["skeleton_before_retune"]

    reference = AttributionRecipe(cfg)  # the full model with the stage-1 prompt
    reference.setup()
    skeleton, _ = load_skeleton(out / "skeleton.json", reference.geometry)
    with masked(reference.model.backbone, reference.backbone.adapter, reference.geometry, skeleton):
        expected = reference.evaluate()
    assert expected["accuracy"] == before["accuracy"]
    assert expected["loss"] == pytest.approx(before["loss"], rel=1e-5)


def test_rerun_skips_finished_stages_and_manifest_mismatch_is_refused(tiny_models, sentiment_files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _argv(tiny_models["llama"], sentiment_files, out, 2)
    assert run_command(train, argv) == 0
    capsys.readouterr()
    assert run_command(train, argv) == 0
    assert capsys.readouterr().out.count("skipping") == len(STAGES)
    # Records keep JSON types: numbers as numbers, booleans as booleans, null, lists.
    for stage in ("prompt", "retune"):
        config = json.loads((out / stage / "metrics.json").read_text())["config"]
        assert config["seed"] == 3 and config["lr"] == 0.1 and config["ffn_keep"] == 0.5
        assert config["resume"] is False and config["revision"] is None and config["text_columns"] == ["text"]
        assert config["output"] == str(out)

    weights = out / "compact" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert run_command(train, argv + ["--stages", "retune", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors does not match its sha256" in err and err.count("\n") == 1
