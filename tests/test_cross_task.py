"""Cross-task passes: rows of tasks with different skeletons share one forward pass over the shared base,
each row on its own task's sliced projections, and every row's label logits equal its task's own compact
checkpoint run alone (fp32). Tasks differ in FFN keep, head keep, per-layer widths, prompt length,
readout and compensation."""

from __future__ import annotations

import pytest
import torch

from conftest import run_stages
from skeleton_ds.inference import InferenceConfig, Predictor
from skeleton_ds.serving.multitask import MultiTaskModel
from skeleton_ds.tasks import Example

FP32 = InferenceConfig(device="cpu", dtype="fp32", batch_size=4)
TEXTS = ["the movie was good", "an awful plot", "quite a nice story", "the actor was bad", "it was fine",
         "a very very happy film , the story was quite nice and the actor was great", "bad"]
TASKS = {  # name -> flags: each skeleton slices differently
    "heads": ("--ffn-keep", "0.5", "--head-keep", "0.5", "--seed", "1"),
    "global": ("--ffn-keep", "0.25", "--keep-mode", "global", "--prompt-length", "6", "--seed", "2"),
    "comp": ("--ffn-keep", "0.5", "--compensate", "mean", "--seed", "3"),
    "head-readout": ("--ffn-keep", "0.75", "--readout", "head", "--seed", "4"),
}


@pytest.fixture(scope="module")
def task_runs(tiny_models, sentiment_files, tmp_path_factory):
    """Per base: the tasks this architecture can build (Qwen2 has no FFN bias to compensate with; a BERT
    checkpoint cannot drop heads, and this one reads a trained head already)."""
    root = tmp_path_factory.mktemp("cross-task")
    unbuildable = {"qwen2": {"comp"}, "bert-head": {"heads", "head-readout"}}
    runs = {}
    for base in ("llama", "qwen2", "bert-head"):
        for name, flags in TASKS.items():
            if name in unbuildable.get(base, ()):
                continue
            runs.setdefault(base, {})[name] = run_stages(tiny_models[base], sentiment_files, root / base / name, *flags)
    return runs


def _tagged(names: list[str]) -> list[tuple[str, Example]]:
    return [(names[i % len(names)], Example((text,), -1)) for i, text in enumerate(TEXTS * 3)]


@pytest.mark.parametrize("prompt_cache", [True, False], ids=["prompt-cache", "prompt-as-input"])
@pytest.mark.parametrize("base", ["llama", "qwen2", "bert-head"])
def test_a_mixed_pass_equals_each_task_alone(base, prompt_cache, task_runs, tiny_models):
    if base == "bert-head" and not prompt_cache:
        pytest.skip("an encoder has no prompt cache: one path")
    cfg = InferenceConfig(device="cpu", dtype="fp32", batch_size=4, prompt_cache=prompt_cache)
    runs = task_runs[base]
    served = MultiTaskModel(str(tiny_models[base]), [f"{n}={d}" for n, d in runs.items()], cfg=cfg, mix_tasks=True)
    tagged = _tagged(list(runs))
    mixed = served.mixed_logits(tagged)
    for name, run in runs.items():
        alone = Predictor.from_checkpoint(run / "compact", cfg)
        rows = [i for i, (n, _) in enumerate(tagged) if n == name]
        expected = alone.logits(alone.encode([tagged[i][1] for i in rows]))
        torch.testing.assert_close(torch.stack([mixed[i] for i in rows]), expected, rtol=0, atol=1e-5)
    answers = served.predict_mixed(tagged)
    assert [a["label"] for a in answers] == [served.tasks[n].task.label_names[int(m.argmax())]
                                             for (n, _), m in zip(tagged, mixed)]


def test_tasks_sharing_attention_apart_in_a_pass_share_one_product(task_runs, tiny_models):
    """A head-pruning task between two that keep every head: their rows are not adjacent, and still share the
    attention products (an index, not a slice), each row equal to its compact checkpoint alone."""
    runs = {n: task_runs["llama"][n] for n in ("global", "heads", "comp")}
    served = MultiTaskModel(str(tiny_models["llama"]), [f"{n}={d}" for n, d in runs.items()], cfg=FP32, mix_tasks=True)
    seen = []
    served._routed.routed["0.self_attn.q_proj"].register_forward_hook(
        lambda module, args, out: seen.append([type(g.rows).__name__ for g in module.groups]))
    tagged = _tagged(list(runs))
    mixed = served.mixed_logits(tagged)
    assert ["Tensor", "slice"] in seen  # global + comp through one index; heads alone
    for name, run in runs.items():
        alone = Predictor.from_checkpoint(run / "compact", FP32)
        rows = [i for i, (n, _) in enumerate(tagged) if n == name]
        torch.testing.assert_close(torch.stack([mixed[i] for i in rows]),
                                   alone.logits(alone.encode([tagged[i][1] for i in rows])), rtol=0, atol=1e-5)


def test_a_pass_routes_shared_projections_once(task_runs, tiny_models):
    """Where tasks keep every head of a layer, their rows share one product there; the FFN is per task."""
    runs = task_runs["llama"]
    served = MultiTaskModel(str(tiny_models["llama"]), [f"{n}={runs[n]}" for n in ("global", "comp")], cfg=FP32,
                            mix_tasks=True)
    seen = {}

    def count_groups(key):
        def hook(module, args, out):
            seen.setdefault(key, len(module.groups))
        return hook

    for key, module in served._routed.routed.items():
        module.register_forward_hook(count_groups(key))
    served.mixed_logits(_tagged(["global", "comp"]))
    layer = "0.self_attn.q_proj"
    assert seen[layer] == 1 and seen["0.mlp.down_proj"] == 2
    assert all(not m.groups for m in served._routed.routed.values())  # no weights kept past the pass


def test_mixed_passes_evict_and_still_answer_alone(task_runs, tiny_models):
    """A cache that holds one task at a time: passes evict and re-materialise, and answers do not change."""
    runs = task_runs["llama"]
    dirs = [f"{n}={d}" for n, d in runs.items()]
    roomy = MultiTaskModel(str(tiny_models["llama"]), dirs, cfg=FP32, mix_tasks=True)
    small = MultiTaskModel(str(tiny_models["llama"]), dirs, cfg=FP32, mix_tasks=True,
                           cache_bytes=max(roomy.task_bytes.values()))
    tagged = _tagged(list(runs))
    for _ in range(2):
        assert small.predict_mixed(tagged) == roomy.predict_mixed(tagged)
        assert small.cache_bytes() <= small.budget
    stats = small.cache_stats().values()
    assert sum(s.evictions for s in stats) >= len(runs) and sum(s.misses for s in stats) > len(runs)


def test_mixed_passes_need_the_cross_task_model(task_runs, tiny_models):
    served = MultiTaskModel(str(tiny_models["llama"]), [f"a={task_runs['llama']['heads']}"], cfg=FP32, mix_tasks=False)
    assert not served.mixes_tasks
    with pytest.raises(RuntimeError, match="mix_tasks=True"):
        served.predict_mixed(_tagged(["a"]))


@pytest.mark.realdata
def test_real_minilm_mixed_pass_equals_each_task_alone(tmp_path):
    """The real MiniLM, two skeletons with random prompts and heads of different lengths: FFN 0.3 uniform
    and FFN 0.5 global (each layer its own width), rows mixed in passes of 4."""
    from pathlib import Path

    from skeleton_ds.bench import compact_checkpoint, synthetic_prompt_dir
    from skeleton_ds.loading import resolve_model_path

    base = Path(resolve_model_path("minilm"))
    compacts = {
        "third": compact_checkpoint(base, synthetic_prompt_dir(base, tmp_path / "p20", 20, "head"), None,
                                    tmp_path / "third", ffn_keep=0.3, head_keep=1.0, align=64, slice_lm_head=False),
        "half": compact_checkpoint(base, synthetic_prompt_dir(base, tmp_path / "p12", 12, "head"), None,
                                   tmp_path / "half", ffn_keep=0.5, head_keep=1.0, align=64, slice_lm_head=False,
                                   mode="global")}
    served = MultiTaskModel("minilm", [f"{n}={d}" for n, d in compacts.items()], cfg=FP32, mix_tasks=True)
    tagged = _tagged(list(compacts))
    mixed = served.mixed_logits(tagged)
    for name, compact in compacts.items():
        alone = Predictor.from_checkpoint(compact, FP32)
        rows = [i for i, (n, _) in enumerate(tagged) if n == name]
        torch.testing.assert_close(torch.stack([mixed[i] for i in rows]),
                                   alone.logits(alone.encode([tagged[i][1] for i in rows])), rtol=0, atol=1e-5)


def test_length_buckets_bound_padding_and_pass_size():
    from skeleton_ds.serving.cross_task import length_buckets

    assert length_buckets([5, 6, 9, 10, 30, 31], 32, 2.0) == [range(0, 4), range(4, 6)]  # 10 <= 2 x 5 < 30
    assert length_buckets([5] * 5, 2, 2.0) == [range(0, 2), range(2, 4), range(4, 5)]
    assert length_buckets([5, 50], 32, float("inf")) == [range(0, 2)]
    assert length_buckets([], 32, 2.0) == []


def test_profile_script_times_three_ways_and_names_the_operators(task_runs, tiny_models, tmp_path):
    """skeleton_ds/experiments/profile_mixed.py end to end on the tiny LLaMA tasks (bounded: 2 batches, 1 round)."""
    import json
    import subprocess
    import sys

    from conftest import REPO
    from skeleton_ds.provenance import missing_fields

    out = tmp_path / "profile.json"
    command = [sys.executable, "-m", "skeleton_ds.experiments.profile_mixed", "--base", str(tiny_models["llama"]),
               "--rows", "6",
               "--batches", "2", "--rounds", "1", "--threads", "1", "--output", str(out),
               *(arg for n, d in task_runs["llama"].items() for arg in ("--task-dir", f"{n}={d}"))]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["ms_per_batch"]) == {"skeletons, one mixed pass", "skeletons, one pass per task",
                                           "plain prompt tuning, one mixed pass"}
    assert all(v > 0 for v in record["ms_per_batch"].values()) and record["mixed_pass_operators"]
    assert missing_fields(record) == []
