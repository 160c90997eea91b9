"""One base model, many tasks: a task materialised from the shared base equals its own compact
checkpoint, shares every tensor it does not slice, and lives in a byte-bounded LRU cache. Plain prompt
tuning (the baseline): a pass mixing tasks answers what each task's Predictor answers alone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import run_stages
from skeleton_ds.errors import UserError
from skeleton_ds.inference import InferenceConfig, Predictor
from skeleton_ds.serving.baselines import PromptTuningModel
from skeleton_ds.serving.multitask import MultiTaskModel
from skeleton_ds.tasks import Example

CPU = InferenceConfig(device="cpu", batch_size=8)
TEXTS = ["the movie was good", "an awful plot", "quite a nice story", "the actor was bad", "it was fine"]


@pytest.fixture(scope="module")
def runs(tiny_models, sentiment_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    return {
        "llama-a": run_stages(tiny_models["llama"], sentiment_files, root / "llama-a", "--ffn-keep", "0.5",
                        "--head-keep", "0.5", "--seed", "1"),
        "llama-b": run_stages(tiny_models["llama"], sentiment_files, root / "llama-b", "--ffn-keep", "0.25",
                        "--keep-mode", "global", "--seed", "2"),
        "bert": run_stages(tiny_models["bert-head"], sentiment_files, root / "bert", "--ffn-keep", "0.5"),
    }


def _logits(predictor: Predictor) -> torch.Tensor:
    return predictor.logits(predictor.encode([Example((t,), -1) for t in TEXTS]))


@pytest.mark.parametrize(("base", "run"), [("llama", "llama-a"), ("llama", "llama-b"), ("bert-head", "bert")])
def test_shared_weight_task_equals_its_compact_checkpoint(base, run, runs, tiny_models):
    registry = MultiTaskModel(str(tiny_models[base]), [f"t={runs[run]}"], cfg=CPU)
    shared = registry._resident("t").predictor
    compact = Predictor.from_checkpoint(runs[run] / "compact", CPU)
    torch.testing.assert_close(_logits(shared), _logits(compact), rtol=1e-4, atol=1e-5)
    # The same through the public API, and the task's unsliced tensors are the base model's own.
    examples = registry.parse_inputs("t", TEXTS)
    assert registry.predict("t", examples) == compact.predict(examples)
    embed = shared.model.backbone.get_input_embeddings().weight
    assert embed.data_ptr() == registry.backbone.model.get_input_embeddings().weight.data_ptr()
    memory = registry.memory()
    assert 0 < memory["tasks"]["t"] == memory["cache_bytes"] < memory["shared_bytes"]
    # Each layer runs at its own width, in the shared task and in the compact checkpoint alike.
    sizes = json.loads((runs[run] / "skeleton.json").read_text())["ffn_sizes"]
    for predictor in (shared, compact):
        adapter = predictor.model.adapter
        assert [layer.get_submodule(adapter.ffn_out).in_features
                for layer in adapter.layer_modules(predictor.model.backbone)] == sizes


def test_a_compact_checkpoint_directory_is_a_task_too(runs, tiny_models):
    registry = MultiTaskModel(str(tiny_models["llama"]), [runs["llama-a"] / "compact"], cfg=CPU)
    assert registry.task_names() == ["generic"]
    compact = Predictor.from_checkpoint(runs["llama-a"] / "compact", CPU)
    examples = registry.parse_inputs("generic", [{"text": t} for t in TEXTS])
    assert registry.predict("generic", examples) == compact.predict(examples)


def test_cache_stays_within_budget_and_evicted_tasks_come_back_identical(runs, tiny_models):
    dirs = [f"a={runs['llama-a']}", f"b={runs['llama-b']}", f"c={runs['llama-a'] / 'compact'}"]
    probe = MultiTaskModel(str(tiny_models["llama"]), dirs, cfg=CPU)
    sizes = {}
    for name in "abc":
        probe.predict(name, probe.parse_inputs(name, TEXTS[:1]))
        sizes[name] = probe.memory()["tasks"][name] or sizes.get(name, 0)
    budget = max(sizes.values()) + min(sizes.values())  # room for two tasks at most, never three
    registry = MultiTaskModel(str(tiny_models["llama"]), dirs, cache_bytes=budget, cfg=CPU)
    first = {}
    for name in "abcabcbba":
        answer = registry.predict(name, registry.parse_inputs(name, TEXTS))
        assert registry.cache_bytes() <= budget
        assert answer == first.setdefault(name, answer)  # re-materialised after eviction: identical
    stats = registry.cache_stats()
    assert sum(s.evictions for s in stats.values()) >= 3
    assert sum(s.hits for s in stats.values()) >= 1
    assert all(s.hits + s.misses == "abcabcbba".count(n) for n, s in stats.items())
    # A task larger than the whole budget would be re-built on every request: refused at start, with the numbers.
    with pytest.raises(UserError, match=r"1 task\(s\) larger than the whole cache budget of 0.0 MiB \(a owns"):
        MultiTaskModel(str(tiny_models["llama"]), dirs[:1], cache_bytes=1, cfg=CPU)
    assert registry.task_bytes == sizes and [d["owned_bytes"] for d in registry.describe()] == list(sizes.values())


def test_bad_task_directories_are_refused_at_start(runs, tiny_models, tmp_path):
    with pytest.raises(UserError, match="'generic'.*localized for base model"):
        MultiTaskModel(str(tiny_models["qwen2"]), [runs["llama-a"]], cfg=CPU)
    with pytest.raises(UserError, match="NAME=DIR"):
        MultiTaskModel(str(tiny_models["llama"]), [runs["llama-a"], runs["llama-b"]], cfg=CPU)
    with pytest.raises(UserError, match="neither a pipeline output"):
        MultiTaskModel(str(tiny_models["llama"]), [tmp_path], cfg=CPU)
    tampered = tmp_path / "compact"
    shutil.copytree(runs["llama-a"] / "compact", tampered)
    (tampered / "skeleton.json").write_text(json.dumps({"tampered": True}))
    with pytest.raises(UserError, match="skeleton.json does not match"):
        MultiTaskModel(str(tiny_models["llama"]), [tampered], cfg=CPU)
    registry = MultiTaskModel(str(tiny_models["llama"]), [runs["llama-a"]], cfg=CPU)
    with pytest.raises(UserError, match="no field 'text'"):
        registry.parse_inputs("generic", [{"sentence": "x"}])
    with pytest.raises(KeyError):
        registry.parse_inputs("sst2", TEXTS)


@pytest.mark.realdata
def test_minilm_shared_weight_task_equals_its_compact_checkpoint(tmp_path):
    """The real MiniLM with a random prompt and head, FFN keep 0.3 (speed and sharing need no training)."""
    from pathlib import Path

    from skeleton_ds.bench import compact_checkpoint, synthetic_prompt_dir
    from skeleton_ds.loading import resolve_model_path

    base = Path(resolve_model_path("minilm"))
    prompt = synthetic_prompt_dir(base, tmp_path / "prompt", 20, "head")
    compact = compact_checkpoint(base, prompt, None, tmp_path / "compact", ffn_keep=0.3, head_keep=1.0, align=64,
                                 slice_lm_head=False)
    registry = MultiTaskModel("minilm", [f"sst={compact}"], cfg=CPU)
    torch.testing.assert_close(_logits(registry._resident("sst").predictor),
                               _logits(Predictor.from_checkpoint(compact, CPU)), rtol=1e-4, atol=1e-5)
    memory = registry.memory()
    # The task owns its sliced FFN (6 layers x 448 of 1536 neurons) and its prompt and head; the rest is shared.
    assert memory["tasks"]["sst"] < 0.25 * memory["shared_bytes"]


# ---------------------------------------------------------- plain prompt tuning
FP32 = InferenceConfig(device="cpu", dtype="fp32", batch_size=4)
MIXED_TEXTS = [*TEXTS, "a very very happy film , the story was quite nice and the actor was great", "bad"]


@pytest.mark.parametrize("base", ["llama", "bert-mlm", "roberta-mlm"])
def test_a_mixed_task_pass_equals_each_task_alone(base, tiny_models, sentiment_files, tmp_path):
    """Two stage-1 prompts of different lengths and readouts (verbalizer, head) on one base; rows of both
    tasks and of mixed lengths share passes of 4, and each row's label logits are its task's alone."""
    model_dir = str(tiny_models[base])
    runs = {"v": run_stages(model_dir, sentiment_files, tmp_path / "v", "--stages", "prompt", "--seed", "1"),
            "h": run_stages(model_dir, sentiment_files, tmp_path / "h", "--stages", "prompt", "--seed", "2",
                            "--prompt-length", "7", "--readout", "head")}
    served = PromptTuningModel(model_dir, [f"{name}={run}" for name, run in runs.items()], cfg=FP32)
    tagged = [("vh"[i % 3 == 0], Example((text,), -1)) for i, text in enumerate(MIXED_TEXTS * 2)]
    mixed = served.mixed_logits(tagged)
    for name, run in runs.items():
        alone = Predictor.from_prompt(model_dir, run / "prompt", FP32)  # with its prompt key/value cache (decoders)
        rows = [i for i, (n, _) in enumerate(tagged) if n == name]
        expected = alone.logits(alone.encode([tagged[i][1] for i in rows]))
        torch.testing.assert_close(torch.stack([mixed[i] for i in rows]), expected, rtol=0, atol=1e-5)
        assert [a["label"] for a in served.predict(name, [tagged[i][1] for i in rows])] == [
            alone.task.label_names[int(k)] for k in expected.argmax(-1)]
    # One base for both tasks; each owns its prompt (and head) only.
    assert {id(p.model.backbone) for p in served.predictors.values()} == {id(served.backbone)}
    memory = served.memory()
    assert 0 < memory["tasks"]["v"] < memory["tasks"]["h"] < memory["shared_bytes"]
    assert memory["cache_bytes"] == sum(memory["tasks"].values()) and memory["cache_budget"] is None


def test_prompt_tuning_refuses_what_it_cannot_serve(runs, tiny_models, tmp_path):
    with pytest.raises(UserError, match="holds no stage-1 prompt"):
        PromptTuningModel(str(tiny_models["llama"]), [tmp_path], cfg=CPU)
    with pytest.raises(UserError, match="'generic'.*trained on"):
        PromptTuningModel(str(tiny_models["qwen2"]), [runs["llama-a"]], cfg=CPU)
    with pytest.raises(UserError, match="NAME=DIR"):
        PromptTuningModel(str(tiny_models["llama"]), [runs["llama-a"], runs["llama-b"]], cfg=CPU)
    tampered = tmp_path / "compact"
    shutil.copytree(runs["llama-a"] / "compact", tampered)
    (tampered / "skeleton.json").write_text(json.dumps({"tampered": True}))
    with pytest.raises(UserError, match="skeleton.json does not match"):  # its manifest is checked
        PromptTuningModel(str(tiny_models["llama"]), [tampered], cfg=CPU)
    served = PromptTuningModel(str(tiny_models["llama"]), [f"a={runs['llama-a'] / 'compact'}"], cfg=CPU)
    assert served.task_names() == ["a"]  # a compact checkpoint ships its stage-1 prompt
    with pytest.raises(UserError, match="no field 'text'"):
        served.parse_inputs("a", [{"sentence": "x"}])
