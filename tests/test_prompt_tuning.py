"""Stage 1 in-process on tiny models, over architectures x ZeRO stages (world size 1)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import ARCHS, DS_CONFIGS, generic_flags
from skeleton_ds import engine
from skeleton_ds.config import config_from_args
from skeleton_ds.stages.prompt_tuning import PromptTuningRecipe

READOUT = {"llama": "lm", "qwen2": "lm", "bert-mlm": "mlm", "bert-head": "head", "roberta-mlm": "mlm"}


def _recipe(model_dir, files, out, stage, *extra) -> PromptTuningRecipe:
    argv = ["--model", str(model_dir), "--config", str(DS_CONFIGS / f"zero{stage}.json"), "--output", str(out),
            "--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--lr", "0.1", "--head-lr", "0.05",
            "--seed", "3", *generic_flags(files), *extra]
    return PromptTuningRecipe(config_from_args(argv))


def _backbone_state(recipe) -> dict[str, torch.Tensor]:
    params = dict(recipe.model.backbone.named_parameters())
    with engine.gathered(params.values()):
        return {k: v.detach().clone() for k, v in params.items()}


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_only_prompt_trains_and_loss_falls(arch, stage, tiny_models, sentiment_files, tmp_path):
    recipe = _recipe(tiny_models[arch], sentiment_files, tmp_path / "run", stage, "--epochs", "4")
    recipe.setup()
    assert recipe.readout == READOUT[arch]

    # Only the prompt (and the head) carry gradients and optimizer state.
    trainable = {n for n, p in recipe.model.named_parameters() if p.requires_grad}
    expected = {"prompt.embedding"} | ({"head.weight", "head.bias"} if arch == "bert-head" else set())
    assert trainable == expected
    optimized = {id(p) for group in recipe.engine.optimizer.param_groups for p in group["params"]}
    model_params = {id(p) for p in recipe.model.backbone.parameters()}
    assert not optimized & model_params

    before_weights = _backbone_state(recipe)
    prompt_before = load_prompt_now(recipe)
    loss_before = recipe.evaluate()["loss"]
    recipe.train()
    loss_after = recipe.evaluate()["loss"]
    after_weights = _backbone_state(recipe)

    assert loss_after < loss_before - 0.05, (loss_before, loss_after)
    assert before_weights.keys() == after_weights.keys()
    for name, value in before_weights.items():
        assert torch.equal(value, after_weights[name]), f"backbone weight {name} changed"
    assert not torch.equal(prompt_before, load_prompt_now(recipe))


def load_prompt_now(recipe) -> torch.Tensor:
    with engine.gathered([recipe.model.prompt.embedding]):
        return recipe.model.prompt.embedding.detach().clone()


@pytest.mark.parametrize("arch", ["llama", "bert-head"])
def test_run_writes_complete_prompt_artifact(arch, tiny_models, sentiment_files, tmp_path):
    out = tmp_path / "run"
    metrics = _recipe(tiny_models[arch], sentiment_files, out, 2, "--max-steps", "3").run()
    assert set(metrics) >= {"accuracy", "macro_f1", "loss"}
    files = sorted(p.name for p in (out / "prompt").iterdir())
    assert files == ["metrics.json", "prompt.safetensors", "task.json"]
    tensors = load_file(str(out / "prompt" / "prompt.safetensors"))
    assert tensors["prompt"].shape == (4, 32)
    assert ("head.weight" in tensors) == (arch == "bert-head")
    assert not list(out.glob(".prompt.partial-*"))


def test_zero3_offload_config_trains(tiny_models, sentiment_files, tmp_path):
    """ds_configs/zero3_offload.json: parameters and optimizer state on CPU (DeepSpeedCPUAdam)."""
    recipe = _recipe(tiny_models["llama"], sentiment_files, tmp_path / "run", "3_offload", "--max-steps", "3")
    metrics = recipe.run()
    assert engine.zero_stage(recipe.ds_config) == 3
    assert recipe.ds_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "accuracy" in metrics and (tmp_path / "run" / "prompt" / "prompt.safetensors").is_file()
