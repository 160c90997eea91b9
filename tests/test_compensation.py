"""Bias compensation (`--compensate mean`): the removed FFN neurons' mean activations, folded into the
FFN output bias, make the compact model equal the masked model whose removed neurons output their
means; the means come from the attribution pass; compensated compacts load with plain transformers
and serve on shared weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from conftest import run_stages
from skeleton_ds.architectures import Geometry, adapter_for
from skeleton_ds.attribution import read_attribution, write_scores
from skeleton_ds.cli import convert as convert_command, run_command
from skeleton_ds.conversion import convert
from skeleton_ds.inference import InferenceConfig, Predictor
from skeleton_ds.localization import load_skeleton, masked
from skeleton_ds.model_identity import model_identity
from skeleton_ds.serving.multitask import MultiTaskModel
from test_conversion import MODEL_CLASS, write_skeleton
from test_multitask import _logits


def _means_file(model_dir, path, geometry: Geometry) -> list[torch.Tensor]:
    """A scores file carrying mean activations (of both signs, as GELU/SiLU products have)."""
    config = AutoConfig.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(11)
    means = [torch.randn(geometry.ffn_size, generator=g) for _ in range(geometry.layers)]
    tensors = {f"ffn.{i}": torch.rand(geometry.ffn_size) for i in range(geometry.layers)}
    tensors |= {f"heads.{i}": torch.rand(geometry.kv_heads) for i in range(geometry.layers)}
    tensors |= {f"ffn_mean.{i}": m for i, m in enumerate(means)}
    write_scores(path, tensors, task="generic", scorer="attribution", reduce="abs-sum", include_prompt=False,
                 examples=8, base_model=model_identity(str(model_dir), str(model_dir), config, None),
                 geometry=geometry)
    return means


@pytest.mark.parametrize(("arch", "ffn_keep", "head_keep", "mode"),
                         [("llama", 0.3, 0.5, "uniform"), ("llama", 0.5, 1.0, "global"),
                          ("bert-head", 0.3, 1.0, "uniform"), ("bert-mlm", 0.5, 1.0, "global")])
def test_compensated_compact_equals_masked_model_with_means(arch, ffn_keep, head_keep, mode, tiny_models, tmp_path):
    base = tiny_models[arch]
    skeleton, geometry = write_skeleton(base, tmp_path / "skeleton.json", ffn_keep=ffn_keep, head_keep=head_keep,
                                        mode=mode)
    means = _means_file(base, tmp_path / "attribution.safetensors", geometry)
    convert(str(base), tmp_path / "skeleton.json", None, tmp_path / "compact", compensate="mean")
    convert(str(base), tmp_path / "skeleton.json", None, tmp_path / "plain")

    cls = MODEL_CLASS[arch]
    full = cls.from_pretrained(base).eval()
    compact = cls.from_pretrained(tmp_path / "compact").eval()  # plain transformers: mlp_bias is a standard option
    plain = cls.from_pretrained(tmp_path / "plain").eval()
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert config["skeleton_ds"]["compensate"] == "mean"
    assert config.get("mlp_bias", False) == (arch == "llama")
    adapter = adapter_for(config["model_type"])

    ids = torch.randint(5, 25, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        with masked(full, adapter, geometry, skeleton, fill=means):
            expected = full(input_ids=ids, attention_mask=mask)[0]
        with masked(full, adapter, geometry, skeleton):
            zeroed = full(input_ids=ids, attention_mask=mask)[0]
        got = compact(input_ids=ids, attention_mask=mask)[0]
        uncompensated = plain(input_ids=ids, attention_mask=mask)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(uncompensated, zeroed, rtol=0, atol=1e-5)
    assert (got - uncompensated).abs().max() > 1e-3, "the fold must change the output (means are not zero)"


def test_compensation_refused_where_the_architecture_has_no_bias_option(tiny_models, tmp_path, capsys):
    base = tiny_models["qwen2"]
    _, geometry = write_skeleton(base, tmp_path / "skeleton.json", ffn_keep=0.5, head_keep=1.0, mode="uniform")
    _means_file(base, tmp_path / "attribution.safetensors", geometry)
    code = run_command(convert_command, ["--base", str(base), "--skeleton", str(tmp_path / "skeleton.json"),
                                         "--output", str(tmp_path / "compact"), "--compensate", "mean"])
    err = capsys.readouterr().err
    assert code == 2 and "qwen2" in err and "--compensate none" in err
    assert not (tmp_path / "compact").exists()


def test_scores_without_means_are_refused(tiny_models, tmp_path, capsys):
    base = tiny_models["llama"]
    _, geometry = write_skeleton(base, tmp_path / "skeleton.json", ffn_keep=0.5, head_keep=1.0, mode="uniform")
    config = AutoConfig.from_pretrained(base)
    write_scores(tmp_path / "attribution.safetensors", {"ffn.0": torch.rand(geometry.ffn_size)}, task="generic",
                 scorer="random", reduce="abs-sum", include_prompt=False, examples=0, geometry=geometry,
                 base_model=model_identity(str(base), str(base), config, None))
    code = run_command(convert_command, ["--base", str(base), "--skeleton", str(tmp_path / "skeleton.json"),
                                         "--output", str(tmp_path / "compact"), "--compensate", "mean"])
    assert code == 2 and "mean FFN activations" in capsys.readouterr().err
    assert not (tmp_path / "compact").exists()


@pytest.fixture(scope="module")
def compensated_runs(tiny_models, sentiment_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("compensated")
    return {arch: run_stages(tiny_models[arch], sentiment_files, root / arch, "--ffn-keep", "0.5",
                             "--compensate", "mean",
                             *(("--head-keep", "0.5") if arch == "llama" else ()))
            for arch in ("llama", "bert-head")}


@pytest.mark.parametrize("arch", ["llama", "bert-head"])
def test_pipeline_folds_the_attribution_pass_means(arch, compensated_runs, tiny_models):
    """The scores file carries each neuron's mean activation, and the compact's FFN output bias is the
    base bias plus the removed neurons' output columns times those means."""
    run = compensated_runs[arch]
    scores, _ = read_attribution(run / "attribution.safetensors")
    skeleton, _ = load_skeleton(run / "skeleton.json")
    base = {k: v for f in sorted(tiny_models[arch].glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    compact = load_file(str(run / "compact" / "model.safetensors"))
    adapter = adapter_for(AutoConfig.from_pretrained(tiny_models[arch]).model_type)
    for i, kept in enumerate(skeleton.ffn):
        mean = scores[f"ffn_mean.{i}"]
        assert mean.isfinite().all() and mean.abs().sum() > 0
        suffix = f"{adapter.layers}.{i}.{adapter.ffn_out}"
        weight = next(v for k, v in base.items() if k.endswith(suffix + ".weight"))
        base_bias = next((v for k, v in base.items() if k.endswith(suffix + ".bias")), torch.zeros(weight.shape[0]))
        removed = torch.ones(weight.shape[1], dtype=torch.bool)
        removed[kept] = False
        expected = base_bias.double() + weight.double()[:, removed] @ mean.double()[removed]
        got = next(v for k, v in compact.items() if k.endswith(suffix + ".bias"))
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "bert-head"])
def test_compensated_task_on_shared_weights_equals_its_compact(arch, compensated_runs, tiny_models):
    cpu = InferenceConfig(device="cpu", batch_size=8)
    registry = MultiTaskModel(str(tiny_models[arch]), [f"t={compensated_runs[arch]}"], cfg=cpu)
    compact = Predictor.from_checkpoint(compensated_runs[arch] / "compact", cpu)
    torch.testing.assert_close(_logits(registry._resident("t").predictor), _logits(compact), rtol=1e-4, atol=1e-5)
