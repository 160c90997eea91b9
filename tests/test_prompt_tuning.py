"""Stage 1 in-process on tiny models, over architectures x ZeRO stages (world size 1)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import ARCHS, DS_CONFIGS, generic_flags
from skeleton_ds import distributed
from skeleton_ds.config import config_from_args
from skeleton_ds.ds_config import zero_stage
from skeleton_ds.stages.prompt_tuning import PromptTuningRecipe

READOUT = {"llama": "lm", "qwen2": "lm", "bert-mlm": "mlm", "bert-head": "head", "roberta-mlm": "mlm"}


def _recipe(model_dir, files, out, stage, *extra) -> PromptTuningRecipe:
    argv = ["--model", str(model_dir), "--config", str(DS_CONFIGS / f"zero{stage}.json"), "--output", str(out),
            "--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--lr", "0.1", "--head-lr", "0.05",
            "--seed", "3", *generic_flags(files), *extra]
    return PromptTuningRecipe(config_from_args(argv))


def _backbone_state(recipe) -> dict[str, torch.Tensor]:
    params = dict(recipe.model.backbone.named_parameters())
    with distributed.gathered(params.values()):
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
    with distributed.gathered([recipe.model.prompt.embedding]):
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
    assert zero_stage(recipe.ds_config) == 3
    assert recipe.ds_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "accuracy" in metrics and (tmp_path / "run" / "prompt" / "prompt.safetensors").is_file()


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
@pytest.mark.parametrize("arch", ["llama", "bert-head"])
def test_quantized_frozen_backbone_trains_the_prompt_and_scores_units(arch, quant, wide_models, sentiment_files,
                                                                       tmp_path):
    """bitsandbytes weights for the frozen backbone on one device (ZeRO-2): the prompt still learns and
    attribution still gets activation gradients through the quantized layers."""
    import bitsandbytes as bnb

    from skeleton_ds.attribution import read_attribution
    from skeleton_ds.stages.pipeline import run_pipeline

    recipe = _recipe(wide_models[arch], sentiment_files, tmp_path / "run", 2, "--epochs", "4", "--quant", quant)
    recipe.setup()
    layer = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}[quant]
    assert any(isinstance(m, layer) for m in recipe.model.backbone.modules())

    def prompt_gradient() -> torch.Tensor:
        batch = recipe.collate(recipe.train_set[:8])
        logits = recipe.model(batch["input_ids"], batch["attention_mask"], batch["answer_index"])
        labels = batch["labels"]
        return torch.autograd.grad(torch.nn.functional.cross_entropy(logits, labels), recipe.model.prompt.embedding)[0]

    first = prompt_gradient()
    loss_before = recipe.evaluate()["loss"]  # a no-grad eval-mode forward must not switch layers to inference kernels
    torch.testing.assert_close(prompt_gradient(), first, rtol=1e-4, atol=1e-6)
    assert first.abs().sum() > 0
    recipe.train()
    assert recipe.evaluate()["loss"] < loss_before
    recipe.cleanup()

    argv = ["--model", str(wide_models[arch]), "--config", str(DS_CONFIGS / "zero2.json"), "--output",
            str(tmp_path / "pipe"), "--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--max-steps",
            "2", "--quant", quant, "--stages", "prompt,attribute", *generic_flags(sentiment_files)]
    run_pipeline(config_from_args(argv))
    scores, meta = read_attribution(tmp_path / "pipe" / "attribution.safetensors")
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in scores.values())


def test_quantized_backbone_is_refused_under_zero3(tiny_models, sentiment_files, tmp_path, capsys):
    from skeleton_ds.cli import run_command, train

    argv = ["--model", str(tiny_models["llama"]), "--config", str(DS_CONFIGS / "zero3.json"), "--output",
            str(tmp_path / "run"), "--batch-size", "8", "--max-steps", "1", "--quant", "8bit",
            *generic_flags(sentiment_files)]
    assert run_command(train, argv) == 2
    err = capsys.readouterr().err
    assert "ZeRO-3" in err and "zero2.json" in err and not (tmp_path / "run" / "prompt").exists()


@pytest.mark.parametrize("config", ["zero2", "zero3_offload"])
def test_first_run_builds_no_deepspeed_op(config, tiny_models, sentiment_files, tmp_path):
    """A fresh machine's first run compiles nothing: the prompt trains with torch's AdamW, and DeepSpeed's
    CPU backend starts without its shared-memory op (each took about a minute of ninja on 2 cores)."""
    import os
    import subprocess
    import sys

    extensions = tmp_path / "torch_extensions"
    argv = ["--model", str(tiny_models["llama"]), "--config", str(DS_CONFIGS / f"{config}.json"),
            "--output", str(tmp_path / "run"), "--stages", "prompt", "--batch-size", "8", "--prompt-length", "4",
            "--max-length", "24", "--max-steps", "2", *generic_flags(sentiment_files)]
    env = distributed.without_rendezvous(os.environ) | {"TORCH_EXTENSIONS_DIR": str(extensions)}
    done = subprocess.run([sys.executable, "-m", "skeleton_ds.cli", "train", *argv], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    built = sorted(p.name for p in extensions.iterdir()) if extensions.exists() else []
    assert built == [], f"first run built DeepSpeed ops {built}"


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_weight_decay_flag_reaches_the_optimizer(stage, tiny_models, sentiment_files, tmp_path):
    """--weight-decay, like --lr, is what the optimizer uses, whatever the DeepSpeed file says (it was once only
    recorded, while the optimizer kept the file's 0.0)."""
    recipe = _recipe(tiny_models["llama"], sentiment_files, tmp_path / "run", stage, "--weight-decay", "0.25",
                     "--max-steps", "1")
    recipe.setup()
    groups = recipe.engine.basic_optimizer.param_groups
    assert groups and all(group["weight_decay"] == 0.25 for group in groups)
    assert recipe.settings_record()["values"]["weight_decay"] == 0.25
