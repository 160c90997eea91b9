"""Stage 2 on tiny models: the hooks compute exactly activation x gradient, the scores rank units
by their real effect, and the stage refuses inputs it cannot use."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import DS_CONFIGS, generic_flags
from skeleton_ds.attribution import UnitRecorder, read_attribution
from skeleton_ds.cli import run_command, train
from skeleton_ds.config import config_from_args
from skeleton_ds.localization import Skeleton, masked, top_units
from skeleton_ds.stages.attribute import AttributionRecipe
from skeleton_ds.stages.pipeline import run_pipeline


def _argv(model_dir, files, out, stage=2, *extra):
    return ["--model", str(model_dir), "--config", str(DS_CONFIGS / f"zero{stage}.json"), "--output", str(out),
            "--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--lr", "0.1", "--head-lr", "0.05",
            "--seed", "3", "--align", "8", *generic_flags(files), *extra]


@pytest.fixture(scope="module")
def trained(tiny_models, sentiment_files, tmp_path_factory):
    """A stage-1 prompt per architecture, trained once for this module."""
    runs = {}
    for arch in ("llama", "bert-head"):
        out = tmp_path_factory.mktemp(f"trained-{arch}")
        run_pipeline(config_from_args(_argv(tiny_models[arch], sentiment_files, out, 2, "--epochs", "4",
                                            "--stages", "prompt")))
        runs[arch] = out
    return runs


def _attribution(arch, stage, tiny_models, sentiment_files, out, *extra) -> AttributionRecipe:
    rec = AttributionRecipe(config_from_args(_argv(tiny_models[arch], sentiment_files, out, stage, *extra)))
    rec.setup()
    return rec


def _gates(rec):
    """Reference: multiply each unit by a gate alpha = 1; d(log p)/d(alpha) is sum_t h_t * g_t."""
    adapter, geo = rec.backbone.adapter, rec.geometry
    width = geo.heads_per_group * geo.head_dim
    gates, handles = [], []
    for layer in adapter.layer_modules(rec.model.backbone):
        a_ffn = torch.ones(geo.ffn_size, requires_grad=True)
        a_head = torch.ones(geo.kv_heads, requires_grad=True)
        gates += [a_ffn, a_head]
        site = layer.get_submodule(adapter.ffn_site)
        if adapter.ffn_site_reads_input:
            handles.append(site.register_forward_pre_hook(lambda m, args, a=a_ffn: (args[0] * a,)))
        else:
            handles.append(site.register_forward_hook(lambda m, args, out, a=a_ffn: out * a))
        handles.append(layer.get_submodule(adapter.attn_out).register_forward_pre_hook(
            lambda m, args, a=a_head: (args[0] * a.repeat_interleave(width),)))
    return gates, handles


def _mean_gold_logprob(rec, items) -> torch.Tensor:
    batch = rec.collate(items)
    logits = rec.model(batch["input_ids"], batch["attention_mask"], batch["answer_index"])
    return F.log_softmax(logits, -1).gather(1, batch["labels"][:, None]).mean()


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("arch", ["llama", "bert-head"])
def test_scores_are_exactly_activation_times_gradient(arch, stage, trained, tiny_models, sentiment_files, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[arch] / "prompt", out / "prompt")
    rec = _attribution(arch, stage, tiny_models, sentiment_files, out, "--attr-reduce", "signed",
                       "--attr-include-prompt")
    signed, n = rec.score()
    assert n == len(rec.train_set) == 96

    gates, handles = _gates(rec)
    try:
        total = sum(_mean_gold_logprob(rec, rec.train_set[i:i + 8]) * len(rec.train_set[i:i + 8])
                    for i in range(0, len(rec.train_set), 8))
        reference = torch.autograd.grad(total, gates)
    finally:
        for h in handles:
            h.remove()
    for layer in range(rec.geometry.layers):
        torch.testing.assert_close(signed[f"ffn.{layer}"], reference[2 * layer] / n, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(signed[f"heads.{layer}"], reference[2 * layer + 1] / n, rtol=1e-4, atol=1e-7)

    # abs-sum on a single example is |sum_t h_t g_t| of that example
    rec.train_set = rec.train_set[:1]
    rec.cfg.attr_reduce = "abs-sum"
    single, _ = rec.score()
    rec.cfg.attr_reduce = "signed"
    signed_single, _ = rec.score()
    for key in (k for k in single if not k.startswith(("ffn_mean.", "ffn_peak."))):
        torch.testing.assert_close(single[key], signed_single[key].abs())

    # ffn_mean.i (bias compensation's input): the mean FFN activation over the counted positions (prompt
    # included here: this test runs with --attr-include-prompt)
    recorder = UnitRecorder(rec.model.backbone, rec.backbone.adapter)
    batch = rec.collate(rec.train_set)
    with torch.no_grad(), recorder.recording():
        rec.model(batch["input_ids"], batch["attention_mask"], batch["answer_index"])
    rec.cfg.attr_include_prompt = False
    text_only, _ = rec.score()
    for layer in range(rec.geometry.layers):
        expected = recorder.ffn[layer][0].float().mean(0)  # one unpadded example: every position is real
        torch.testing.assert_close(single[f"ffn_mean.{layer}"], expected, rtol=1e-5, atol=1e-6)
        text = recorder.ffn[layer][0, rec.prompt_length:].float().mean(0)  # by default: the text positions only
        torch.testing.assert_close(text_only[f"ffn_mean.{layer}"], text, rtol=1e-5, atol=1e-6)
        # ffn_peak.i (outlier protection's input): the largest |activation| at any real position, prompt included
        peak = recorder.ffn[layer][0].float().abs().amax(0)
        torch.testing.assert_close(text_only[f"ffn_peak.{layer}"], peak, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "bert-head"])
def test_removing_low_scored_units_hurts_less_than_high_scored(arch, trained, tiny_models, sentiment_files, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[arch] / "prompt", out / "prompt")
    rec = _attribution(arch, 2, tiny_models, sentiment_files, out)
    scores, _ = rec.score()
    geo, k = rec.geometry, rec.geometry.ffn_size // 4
    all_heads = [list(range(geo.kv_heads))] * geo.layers

    def without(pick) -> Skeleton:
        removed = [set(pick(scores[f"ffn.{i}"])) for i in range(geo.layers)]
        return Skeleton(ffn=[[j for j in range(geo.ffn_size) if j not in r] for r in removed], heads=all_heads)

    top = without(lambda s: top_units(s, k))
    bottom = without(lambda s: top_units(-s, k))
    with torch.no_grad():
        base = _mean_gold_logprob(rec, rec.train_set)
        with masked(rec.model.backbone, rec.backbone.adapter, geo, top):
            drop_top = base - _mean_gold_logprob(rec, rec.train_set)
        with masked(rec.model.backbone, rec.backbone.adapter, geo, bottom):
            drop_bottom = base - _mean_gold_logprob(rec, rec.train_set)
    assert abs(drop_bottom) < abs(drop_top), (float(drop_bottom), float(drop_top))
    assert abs(drop_bottom) < 0.5 * abs(drop_top)


def test_full_stages_write_attribution_skeleton_and_pictures(trained, tiny_models, sentiment_files, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained["llama"] / "prompt", out / "prompt")
    argv = _argv(tiny_models["llama"], sentiment_files, out, 3, "--stages", "attribute,localize", "--ffn-keep", "0.5",
                 "--head-keep", "0.5")
    assert run_command(train, argv) == 0
    scores, meta = read_attribution(out / "attribution.safetensors")
    assert sorted(scores) == ["ffn.0", "ffn.1", "ffn_mean.0", "ffn_mean.1", "ffn_peak.0", "ffn_peak.1", "heads.0",
                              "heads.1"]
    assert scores["ffn.0"].dtype == torch.float32 and scores["heads.0"].shape == (2,)  # 2 KV groups (GQA)
    assert meta["task"] == "generic" and meta["examples"] == 96 and meta["reduce"] == "abs-sum"
    import json

    record = json.loads((out / "skeleton.json").read_text())
    # the decoder defaults: one threshold across layers, outliers protected; half of all units overall
    assert (record["keep_mode"], record["protect_outliers"], record["align"]) == ("global", 20.0, 8)
    assert abs(sum(record["ffn_sizes"]) - 64) <= 16 and 2 <= sum(record["head_counts"]) < 4  # (rounded per layer)
    assert record["base_model"]["config_sha256"] == meta["base_model"]["config_sha256"]
    for png in ("skeleton_ffn.png", "skeleton_heads.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _error(argv, capsys) -> str:
    assert run_command(train, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_stage_without_prerequisite_is_refused(tiny_models, sentiment_files, tmp_path, capsys):
    out = tmp_path / "run"
    err = _error(_argv(tiny_models["llama"], sentiment_files, out, 2, "--stages", "attribute"), capsys)
    assert "--stages prompt first" in err
    err = _error(_argv(tiny_models["llama"], sentiment_files, out, 2, "--stages", "localize"), capsys)
    assert "--stages attribute first" in err
    assert not (out / "attribution.safetensors").exists() and not (out / "skeleton.json").exists()


def test_attribution_of_another_base_model_is_refused(trained, tiny_models, sentiment_files, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained["llama"] / "prompt", out / "prompt")
    assert run_command(train, _argv(tiny_models["llama"], sentiment_files, out, 2, "--stages", "attribute")) == 0
    capsys.readouterr()
    err = _error(_argv(tiny_models["qwen2"], sentiment_files, out, 2, "--stages", "localize"), capsys)
    assert "made for base model" in err
    err = _error(_argv(tiny_models["qwen2"], sentiment_files, tmp_path / "other", 2, "--stages", "attribute"), capsys)
    assert "no trained prompt" in err
    shutil.copytree(trained["llama"] / "prompt", tmp_path / "other" / "prompt")
    err = _error(_argv(tiny_models["qwen2"], sentiment_files, tmp_path / "other", 2, "--stages", "attribute"), capsys)
    assert "made for base model" in err
    assert not (out / "skeleton.json").exists() and not (tmp_path / "other" / "attribution.safetensors").exists()


@pytest.mark.parametrize(("flag", "value"), [("--ffn-keep", "0"), ("--ffn-keep", "1.5"), ("--head-keep", "-0.2")])
def test_keep_ratio_outside_unit_interval_is_refused(flag, value, tiny_models, sentiment_files, tmp_path, capsys):
    err = _error(_argv(tiny_models["llama"], sentiment_files, tmp_path / "run", 2, flag, value), capsys)
    assert flag in err and "(0, 1]" in err


def _token_contributions(rec, items):
    """Reference per-token FFN contributions h_t * g_t [B, T, F] per layer, and the counted text positions."""
    batch = rec.collate(items)
    recorder = UnitRecorder(rec.model.backbone, rec.backbone.adapter)
    with recorder.recording():
        logits = rec.model(batch["input_ids"], batch["attention_mask"], batch["answer_index"])
        gold = F.log_softmax(logits.float(), -1).gather(1, batch["labels"][:, None]).sum()
        grads = torch.autograd.grad(gold, recorder.ffn)
    contributions = [(h * g).detach() for h, g in zip(recorder.ffn, grads)]
    return contributions, batch


@pytest.mark.parametrize("arch", ["llama", "bert-head"])
def test_answer_positions_and_max_reduction_against_token_contributions(arch, trained, tiny_models, sentiment_files,
                                                                         tmp_path):
    """`--attr-positions answer` counts h*g at the answer position only; `--attr-reduce max` is the largest signed
    h*g over the text positions (the Skeleton authors' reduction)."""
    out = tmp_path / "run"
    shutil.copytree(trained[arch] / "prompt", out / "prompt")
    rec = _attribution(arch, 2, tiny_models, sentiment_files, out, "--attr-reduce", "signed", "--attr-positions",
                       "answer")
    rec.train_set = rec.train_set[:8]
    answer, n = rec.score()
    rec.cfg.attr_positions, rec.cfg.attr_reduce = "text", "max"
    top, _ = rec.score()
    contributions, batch = _token_contributions(rec, rec.train_set)
    rows, p = torch.arange(n), rec.prompt_length
    for layer, c in enumerate(contributions):
        at_answer = c[rows, p + batch["answer_index"]].sum(0) / n
        torch.testing.assert_close(answer[f"ffn.{layer}"], at_answer, rtol=1e-4, atol=1e-7)
        text = batch["attention_mask"].bool()
        largest = c[:, p:].masked_fill(~text[..., None], float("-inf")).amax(1).sum(0) / n
        torch.testing.assert_close(top[f"ffn.{layer}"], largest, rtol=1e-4, atol=1e-7)
    assert not torch.equal(answer["ffn.0"], top["ffn.0"])


@pytest.mark.parametrize("stage,reduce", [(2, "abs-sum"), (2, "max"), (3, "abs-sum")])
@pytest.mark.parametrize("arch", ["llama", "bert-head"])
def test_integrated_gradients_with_one_step_is_activation_times_gradient(arch, stage, reduce, trained, tiny_models,
                                                                          sentiment_files, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[arch] / "prompt", out / "prompt")
    rec = _attribution(arch, stage, tiny_models, sentiment_files, out, "--attr-reduce", reduce)
    rec.train_set = rec.train_set[:16]
    first_order, _ = rec.score()
    rec.cfg.scorer, rec.cfg.ig_steps = "integrated-gradients", 1
    one_step, _ = rec.score()
    assert first_order.keys() == one_step.keys()
    for key in first_order:
        torch.testing.assert_close(one_step[key], first_order[key], rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", ["llama", "bert-head"])
def test_integrated_gradients_average_the_gate_gradients_along_the_path(arch, trained, tiny_models, sentiment_files,
                                                                        tmp_path):
    """With k steps, a neuron's signed score is d(log p)/d(gate) averaged over every FFN gate set to 1/k, 2/k, ..., 1
    (computed here with gates on the modules, apart from the recorder); heads keep activation x gradient."""
    out = tmp_path / "run"
    shutil.copytree(trained[arch] / "prompt", out / "prompt")
    rec = _attribution(arch, 2, tiny_models, sentiment_files, out, "--attr-reduce", "signed", "--attr-include-prompt",
                       "--scorer", "integrated-gradients", "--ig-steps", "3")
    rec.train_set = rec.train_set[:8]
    integrated, n = rec.score()
    rec.cfg.scorer = "attribution"
    first_order, _ = rec.score()

    gates, handles = _gates(rec)
    ffn_gates = gates[0::2]
    try:
        path = []
        for k in (1, 2, 3):
            with torch.no_grad():
                for gate in ffn_gates:
                    gate.fill_(k / 3)
            total = _mean_gold_logprob(rec, rec.train_set) * n
            path.append(torch.autograd.grad(total, ffn_gates))
    finally:
        for h in handles:
            h.remove()
    for layer in range(rec.geometry.layers):
        expected = sum(step[layer] for step in path) / 3 / n
        torch.testing.assert_close(integrated[f"ffn.{layer}"], expected, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(integrated[f"heads.{layer}"], first_order[f"heads.{layer}"], rtol=1e-6, atol=0)
    assert not torch.allclose(integrated["ffn.0"], first_order["ffn.0"])
