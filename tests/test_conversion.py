"""Stage 4: compact checkpoints equal the masked full model, load with plain transformers, stream
in bounded memory, and refuse inputs they cannot trust."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from conftest import REPO
from skeleton_ds.architectures import adapter_for
from skeleton_ds.cli import convert as convert_command, run_command
from skeleton_ds.conversion import convert
from skeleton_ds.loading import load_backbone
from skeleton_ds.localization import masked, select, skeleton_record
from skeleton_ds.model_identity import model_identity

MODEL_CLASS = {"llama": AutoModelForCausalLM, "qwen2": AutoModelForCausalLM, "bert-head": AutoModel,
               "bert-mlm": AutoModelForMaskedLM, "roberta-mlm": AutoModelForMaskedLM}


def write_skeleton(model_dir: Path, path: Path, *, ffn_keep: float, head_keep: float, mode: str, align: int = 8):
    """A skeleton from seeded random scores (later layers score higher, so a global threshold keeps
    different counts per layer), recorded exactly as the localize stage records one."""
    config = AutoConfig.from_pretrained(model_dir)
    geometry = adapter_for(config.model_type).geometry(config)
    g = torch.Generator().manual_seed(7)
    scores = {f"ffn.{i}": torch.rand(geometry.ffn_size, generator=g) + 0.3 * i for i in range(geometry.layers)}
    scores |= {f"heads.{i}": torch.rand(geometry.kv_heads, generator=g) + 0.3 * i for i in range(geometry.layers)}
    skeleton = select(scores, geometry, ffn_keep=ffn_keep, head_keep=head_keep, align=align, mode=mode)
    meta = {"task": "generic", "geometry": asdict(geometry), "scorer": "random", "reduce": "abs-sum",
            "include_prompt": False, "examples": 0,
            "base_model": model_identity(str(model_dir), str(model_dir), config, None)}
    record = skeleton_record(skeleton, meta, keep_mode=mode, ffn_keep=ffn_keep, head_keep=head_keep, align=align)
    path.write_text(json.dumps(record))
    return skeleton, geometry


CASES = [("llama", 0.3, 0.5, "uniform"), ("llama", 0.5, 0.5, "global"), ("qwen2", 0.25, 0.5, "uniform"),
         ("bert-head", 0.3, 1.0, "uniform"), ("bert-mlm", 0.5, 1.0, "global"), ("roberta-mlm", 0.3, 1.0, "uniform")]


@pytest.mark.parametrize(("arch", "ffn_keep", "head_keep", "mode"), CASES)
def test_compact_model_equals_masked_full_model(arch, ffn_keep, head_keep, mode, tiny_models, tmp_path):
    base = tiny_models[arch]
    skeleton, geometry = write_skeleton(base, tmp_path / "skeleton.json", ffn_keep=ffn_keep, head_keep=head_keep,
                                        mode=mode)
    if mode == "global":
        assert not skeleton.is_uniform(), "the case must exercise per-layer padding"
    counts = convert(str(base), tmp_path / "skeleton.json", None, tmp_path / "compact")

    cls = MODEL_CLASS[arch]
    full = cls.from_pretrained(base).eval()
    compact = cls.from_pretrained(tmp_path / "compact").eval()  # plain transformers, no remote code
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert config["intermediate_size"] == max(skeleton.ffn_sizes()) < geometry.ffn_size
    if adapter_for(config["model_type"]).causal:
        groups = max(len(h) for h in skeleton.heads)
        assert (config["num_key_value_heads"], config["num_attention_heads"]) == (groups, 2 * groups)
        assert config["head_dim"] == geometry.head_dim
    assert counts["parameters_compact"] == sum(p.numel() for p in compact.parameters()) < counts["parameters_full"]

    ids = torch.randint(5, 25, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        with masked(full, adapter_for(config["model_type"]), geometry, skeleton):
            expected = full(input_ids=ids, attention_mask=mask)[0]
        got = compact(input_ids=ids, attention_mask=mask)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_encoder_head_pruning_is_refused_with_reason(tiny_models, tmp_path):
    write_skeleton(tiny_models["bert-head"], tmp_path / "s.json", ffn_keep=0.5, head_keep=0.5, mode="uniform")
    with pytest.raises(Exception, match="head-keep 1.0"):
        convert(str(tiny_models["bert-head"]), tmp_path / "s.json", None, tmp_path / "compact")
    assert not (tmp_path / "compact").exists()


def test_convert_cli_refuses_bad_inputs(tiny_models, tmp_path, capsys):
    skeleton = tmp_path / "skeleton.json"
    write_skeleton(tiny_models["llama"], skeleton, ffn_keep=0.5, head_keep=1.0, mode="uniform")
    args = ["--base", str(tiny_models["llama"]), "--skeleton", str(skeleton), "--output", str(tmp_path / "compact")]
    assert run_command(convert_command, args) == 0
    capsys.readouterr()

    def error(argv) -> str:
        assert run_command(convert_command, argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert "--overwrite" in error(args)  # the output exists
    assert run_command(convert_command, args + ["--overwrite"]) == 0
    other = ["--base", str(tiny_models["qwen2"]), "--skeleton", str(skeleton), "--output", str(tmp_path / "o2")]
    assert "made for base model" in error(other)  # a skeleton for another base model
    assert not (tmp_path / "o2").exists()


def test_pickle_base_needs_allow_pickle(tiny_models, tmp_path, capsys):
    from safetensors.torch import load_file

    base = tmp_path / "pickled"
    base.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((tiny_models["llama"] / name).read_bytes())
    torch.save(load_file(str(tiny_models["llama"] / "model.safetensors")), base / "pytorch_model.bin")
    skeleton = tmp_path / "skeleton.json"
    write_skeleton(tiny_models["llama"], skeleton, ffn_keep=0.5, head_keep=0.5, mode="uniform")
    args = ["--base", str(base), "--skeleton", str(skeleton), "--output", str(tmp_path / "compact")]
    assert run_command(convert_command, args) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not (tmp_path / "compact").exists()
    assert run_command(convert_command, args + ["--allow-pickle"]) == 0
    reference = tmp_path / "from-safetensors"
    convert(str(tiny_models["llama"]), skeleton, None, reference)
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(tmp_path / "compact" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_RSS_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
import torch, transformers, safetensors  # what a conversion imports anyway
from skeleton_ds.cli import convert, run_command


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024


before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
code = run_command(convert, sys.argv[1:])
print(json.dumps({{"code": code, "before_mib": before, "peak_mib": status("VmHWM:")}}))
"""


def _rss_growth(*argv) -> tuple[float, float]:
    """(RSS before conversion, peak RSS growth during it) of a fresh process, in MiB."""
    script = _RSS_SCRIPT.format(repo=str(REPO))
    out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, out.stderr[-2000:]
    return result["before_mib"], result["peak_mib"] - result["before_mib"]


def test_streaming_conversion_peak_memory_is_about_one_tensor(tmp_path, measured):
    """A ~330 MB random-init LLaMA: conversion may not hold it in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = LlamaForCausalLM(config)
    base = tmp_path / "base"
    model = LlamaForCausalLM(config)
    model.save_pretrained(base)
    del model
    size_mib = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
    largest_mib = max(p.numel() for p in shapes.parameters()) * 4 / 2**20
    write_skeleton(base, tmp_path / "skeleton.json", ffn_keep=0.5, head_keep=0.5, mode="uniform", align=64)

    before, growth = _rss_growth("--base", str(base), "--skeleton", str(tmp_path / "skeleton.json"),
                                 "--output", str(tmp_path / "c"))
    print(f"checkpoint {size_mib:.0f} MiB, largest tensor {largest_mib:.0f} MiB, RSS {before:.0f} MiB before, "
          f"peak growth {growth:.0f} MiB")
    measured.update(checkpoint_mib=size_mib, largest_tensor_mib=largest_mib, rss_growth_mib=growth,
                    bound_mib=3 * largest_mib + 64)
    assert size_mib > 250
    # Bound: 3 x the largest tensor (the tensor, its slice, the bytes written) + 64 MiB slack.
    assert growth < 3 * largest_mib + 64, (growth, largest_mib, size_mib)
    assert growth < 0.6 * size_mib


@pytest.mark.parametrize(("heads", "expected_groups"), [([[0, 1, 3], [0, 1, 3]], 4), ([[0, 1, 3], [2]], 4),
                                                        ([[1, 2], [3]], 2)])
def test_head_counts_transformers_refuses_are_padded_to_a_loadable_count(heads, expected_groups, tmp_path):
    """transformers' LlamaConfig requires hidden_size % num_attention_heads == 0 even with an explicit
    head_dim, so 3 of 4 heads (hidden 32) is padded to 4 with zero-effect heads; 2 is written as is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from skeleton_ds.localization import Skeleton

    base = tmp_path / "mha"
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(base)
    geometry = adapter_for("llama").geometry(config)
    skeleton = Skeleton(ffn=[list(range(0, 64, 2))] * 2, heads=heads)
    meta = {"task": "generic", "geometry": asdict(geometry), "scorer": "random", "reduce": "abs-sum",
            "include_prompt": False, "examples": 0,
            "base_model": model_identity(str(base), str(base), config, None)}
    (tmp_path / "s.json").write_text(json.dumps(skeleton_record(skeleton, meta, keep_mode="global", ffn_keep=0.5,
                                                                head_keep=0.75, align=8)))
    convert(str(base), tmp_path / "s.json", None, tmp_path / "compact")
    compact = AutoModelForCausalLM.from_pretrained(tmp_path / "compact").eval()
    assert compact.config.num_key_value_heads == expected_groups
    full = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        with masked(full, adapter_for("llama"), geometry, skeleton):
            expected = full(input_ids=ids).logits
        torch.testing.assert_close(compact(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_uniform_head_keep_rounds_to_a_loadable_count():
    from skeleton_ds.architectures import Geometry

    def groups(hidden, heads, kv, keep):
        geometry = Geometry(layers=1, ffn_size=64, heads=heads, kv_heads=kv, head_dim=hidden // heads,
                            hidden_size=hidden)
        scores = {"ffn.0": torch.rand(64), "heads.0": torch.rand(kv)}
        return len(select(scores, geometry, ffn_keep=1.0, head_keep=keep, align=64, mode="uniform").heads[0])

    assert groups(768, 12, 12, 0.75) == 8  # LLaMA-160m: 9 heads would not load; 8 is nearest
    assert groups(2048, 32, 4, 0.75) == 4  # TinyLlama: 3 groups (24 heads) would not load; tie keeps more
    assert groups(2048, 32, 4, 0.5) == 2
    assert groups(4096, 32, 8, 0.5) == 4  # LLaMA-3-8B
    assert groups(32, 4, 4, 0.75) == 4
    assert groups(48, 4, 2, 0.5) == 1  # hidden_size 48 is a multiple of 2 query heads


@pytest.mark.parametrize(("arch", "head_keep"), [("llama", 0.5), ("qwen2", 1.0), ("bert-mlm", 1.0)])
def test_our_loader_runs_each_layer_at_its_own_width(arch, head_keep, tiny_models, tmp_path):
    """A global skeleton keeps different widths per layer: the checkpoint is padded (plain transformers
    loads it), and skeleton_ds's loader cuts every layer back to its own width with the same outputs."""
    base = tiny_models[arch]
    skeleton, geometry = write_skeleton(base, tmp_path / "skeleton.json", ffn_keep=0.4, head_keep=head_keep,
                                        mode="global")
    assert len(set(skeleton.ffn_sizes())) > 1
    counts = convert(str(base), tmp_path / "skeleton.json", None, tmp_path / "compact")
    padded = MODEL_CLASS[arch].from_pretrained(tmp_path / "compact").eval()
    readout = "head" if arch == "bert-head" else "verbalizer"
    fitted = load_backbone(str(tmp_path / "compact"), readout=readout, dtype=torch.float32)
    adapter = fitted.adapter
    for layer, width, groups in zip(adapter.layer_modules(fitted.model), skeleton.ffn_sizes(), skeleton.heads):
        assert layer.get_submodule(adapter.ffn_out).in_features == width
        if adapter.causal:
            assert layer.get_submodule(adapter.kv_proj[0]).out_features == len(groups) * geometry.head_dim
    padded_count = sum(p.numel() for p in padded.parameters())
    fitted_count = sum(p.numel() for p in fitted.model.parameters())
    assert fitted_count < padded_count
    assert counts["parameters_compact"] - counts["parameters_kept"] == padded_count - fitted_count  # the padding
    ids = torch.randint(5, 25, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        torch.testing.assert_close(fitted.model(input_ids=ids, attention_mask=mask)[0],
                                   padded(input_ids=ids, attention_mask=mask)[0], rtol=0, atol=1e-5)
    unfitted = load_backbone(str(tmp_path / "compact"), readout=readout, dtype=torch.float32, layer_widths=False)
    assert sum(p.numel() for p in unfitted.model.parameters()) == padded_count
    if adapter.causal:  # the benchmark's FLOP model reads each layer's own width off the model
        from torch.utils.flop_counter import FlopCounterMode

        from skeleton_ds.bench import flop_breakdown, layer_widths

        config = fitted.model.config.to_dict()
        config["layer_widths"] = layer_widths(fitted.model, adapter, config)
        assert config["layer_widths"]["ffn"] == skeleton.ffn_sizes()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fitted.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        parts = flop_breakdown(config, batch=3, text=11, prompt=0, prompt_cached=False, head="vocab-all", labels=2)
        assert counter.get_total_flops() == pytest.approx(parts["linear"] + parts["head"], rel=0.01)
