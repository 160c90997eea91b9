"""The static-shape decoder path (skeleton_ds.static_shapes) answers as today's eager path: every length
bucket, batches that fall between batch buckets, left padding, per-layer widths and pruned heads; inputs
longer than the largest bucket are refused; under torch.compile a bucket is compiled once."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import run_stages
from skeleton_ds.errors import UserError
from skeleton_ds.inference import InferenceConfig, Predictor
from skeleton_ds.static_shapes import LENGTH_STEP, Buckets, StaticPromptDecoder
from skeleton_ds.tasks import Example

EAGER = InferenceConfig(device="cpu", dtype="fp32", batch_size=8, static="off")
STATIC = replace(EAGER, static="on")
WORDS = "the movie was good an awful plot quite a nice story the actor was bad it was fine".split()


@pytest.fixture(scope="module")
def runs(tiny_models, sentiment_files, tmp_path_factory):
    """Compact decoders with long inputs allowed (max length 90: length buckets 32, 64, 90)."""
    root = tmp_path_factory.mktemp("static")
    return {"llama": run_stages(tiny_models["llama"], sentiment_files, root / "llama", "--max-length", "90",
                                "--keep-mode", "global", "--head-keep", "0.5"),
            "qwen2": run_stages(tiny_models["qwen2"], sentiment_files, root / "qwen2", "--max-length", "90")}


def _examples(count: int) -> list[Example]:
    """Texts from 1 to ~85 words, so the batches reach every length bucket."""
    return [Example((" ".join(WORDS[j % len(WORDS)] for j in range(1 + (i * 7) % 85)),), -1) for i in range(count)]


def test_buckets_cover_every_batch_and_length_up_to_the_limits():
    buckets = Buckets.up_to(24, 100)
    assert buckets.batches == (1, 2, 4, 8, 16, 24) and buckets.lengths == (32, 64, 96, 100)
    assert buckets.shape(3, 33) == (4, 64) and buckets.shape(17, 97) == (24, 100) and buckets.shape(1, 1) == (1, 32)
    with pytest.raises(UserError, match="longer than the largest static length bucket"):
        buckets.shape(1, 101)
    with pytest.raises(UserError, match="larger than the largest static batch bucket"):
        buckets.shape(25, 10)
    assert Buckets.up_to(1, 32) == Buckets((1,), (32,))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_path_answers_as_the_eager_path_in_every_bucket(arch, runs):
    eager = Predictor.from_checkpoint(runs[arch] / "compact", EAGER)
    static = Predictor.from_checkpoint(runs[arch] / "compact", STATIC)
    assert isinstance(static.forward, StaticPromptDecoder)
    items = static.encode(_examples(43))  # batches of 8 and a last one of 3 (bucket 4)
    lengths = {static.forward.buckets.shape(1, len(i.input_ids))[1] for i in items}
    assert lengths == set(static.forward.buckets.lengths)
    expected = eager.logits(items)
    got = static.logits(items)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert {b for b, _ in static.forward._slots} >= {4, 8}
    # A bucket reused with other inputs (shorter, fewer rows) leaves nothing behind from the last pass.
    again = static.logits(items[:5])
    torch.testing.assert_close(again, eager.logits(items[:5]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_path_is_bit_identical_to_eager_on_the_same_padded_batch(arch, runs):
    """The only numeric difference from today's path is the padding a bucket adds: fed the same bucket-padded
    batch (left-padded columns, all-pad rows), the eager prompt-cached path gives the very same bits."""
    from skeleton_ds import data

    eager = Predictor.from_checkpoint(runs[arch] / "compact", EAGER)
    static = Predictor.from_checkpoint(runs[arch] / "compact", STATIC)
    batch = data.collate(static.encode(_examples(6)[:6]), static.tokenizer.pad_token_id, left_pad=True)
    rows, width = batch["input_ids"].shape
    B, L = static.forward.buckets.shape(rows, width)
    assert (B, L) != (rows, width)
    ids = torch.full((B, L), static.tokenizer.pad_token_id)
    mask, answer = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    ids[:rows, L - width:], mask[:rows, L - width:] = batch["input_ids"], batch["attention_mask"]
    answer[:rows] = batch["answer_index"] + (L - width)
    with torch.inference_mode():
        expected = eager.forward(ids, mask, answer)[:rows]
        got = static.forward(batch["input_ids"], batch["attention_mask"], batch["answer_index"])
    assert torch.equal(got, expected)


def test_static_path_equals_the_plain_full_model_with_the_prompt(runs, tiny_models):
    """No prompt cache on the reference side: the full model runs the prompt's positions itself."""
    plain = Predictor.from_prompt(str(tiny_models["llama"]), runs["llama"] / "prompt",
                                  replace(EAGER, prompt_cache=False))
    static = Predictor.from_prompt(str(tiny_models["llama"]), runs["llama"] / "prompt", STATIC)
    items = static.encode(_examples(11))
    torch.testing.assert_close(static.logits(items), plain.logits(items), rtol=1e-5, atol=1e-5)


def test_inputs_longer_than_the_largest_bucket_are_refused(runs):
    static = Predictor.from_checkpoint(runs["llama"] / "compact", STATIC)
    top = static.forward.buckets.lengths[-1]
    long = static.encode([Example((" ".join(WORDS * 20),), -1)], max_length=top + LENGTH_STEP)
    assert len(long[0].input_ids) > top
    with pytest.raises(UserError, match="longer than the largest static length bucket"):
        static.logits(long)


def test_static_is_off_on_cpu_by_default_and_refuses_a_bad_value():
    assert (not InferenceConfig(device="cpu").static_shapes()
            and InferenceConfig(device="cpu", static="on").static_shapes())
    with pytest.raises(UserError, match="--static must be auto, on or off"):
        InferenceConfig(device="cpu", static="yes")


def test_compiled_static_path_compiles_a_bucket_once(runs):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = Predictor.from_checkpoint(runs["llama"] / "compact", replace(STATIC, compile=True))
    eager = Predictor.from_checkpoint(runs["llama"] / "compact", EAGER)
    items = compiled.encode(_examples(8))  # one pass, one bucket
    first = compiled.logits(items)
    bucket = compiled.forward.buckets.shape(8, max(len(i.input_ids) for i in items))
    frames = counters["stats"]["unique_graphs"]
    for rows in (items[3:], items[2:], items[1:]):  # other inputs in the same bucket (5-7 rows, the longest kept)
        assert compiled.forward.buckets.shape(len(rows), max(len(i.input_ids) for i in rows)) == bucket
        torch.testing.assert_close(compiled.logits(rows), eager.logits(rows), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == frames  # no recompilation within the bucket
    compiled.logits(items[5:])  # 3 rows: bucket 4, a graph of its own (the counter does move)
    assert counters["stats"]["unique_graphs"] > frames
    torch.testing.assert_close(first, eager.logits(items), rtol=1e-4, atol=1e-4)


def test_warm_up_builds_every_bucket_at_load_and_nothing_compiles_after(runs):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    cfg = replace(STATIC, compile=True, batch_size=2, warmup_buckets=True)
    warmed = Predictor.from_checkpoint(runs["llama"] / "compact", cfg)
    buckets = warmed.forward.buckets
    assert set(warmed.forward._slots) == {(b, n) for b in buckets.batches for n in buckets.lengths}  # 2 x 3
    frames = counters["stats"]["unique_graphs"]
    items = warmed.encode(_examples(9))
    eager = Predictor.from_checkpoint(runs["llama"] / "compact", replace(EAGER, batch_size=2))
    torch.testing.assert_close(warmed.logits(items), eager.logits(items), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == frames


def test_a_served_task_runs_static_and_counts_its_prompt_cache(runs, tiny_models):
    from skeleton_ds.serving.multitask import MultiTaskModel

    served = {cfg.static: MultiTaskModel(str(tiny_models["llama"]), [f"t={runs['llama']}"], cfg=cfg, mix_tasks=False)
              for cfg in (EAGER, STATIC)}  # one task per pass: static buckets (mixed passes run eager)
    examples = served["on"].parse_inputs("t", [e.texts[0] for e in _examples(9)])
    assert isinstance(served["on"]._resident("t").predictor.forward, StaticPromptDecoder)
    on, off = (served[k].predict("t", examples) for k in ("on", "off"))
    assert [a["label"] for a in on] == [a["label"] for a in off]
    assert all(abs(a["probabilities"][k] - b["probabilities"][k]) < 1e-5
               for a, b in zip(on, off) for k in a["probabilities"])
    # the static path holds its prompt cache sized for the largest bucket: counted against the cache budget
    assert served["on"].memory()["tasks"]["t"] > served["off"].memory()["tasks"]["t"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_cuda_graphs_answer_as_the_eager_path(runs):
    cfg = InferenceConfig(device="cuda", dtype="fp32", batch_size=8)
    eager = Predictor.from_checkpoint(runs["llama"] / "compact", replace(cfg, static="off"))
    graphs = Predictor.from_checkpoint(runs["llama"] / "compact", replace(cfg, static="on"))
    assert graphs.forward.capture
    items = graphs.encode(_examples(43))
    for rows in (items, items[:5], items):  # captured, then replayed on other inputs
        torch.testing.assert_close(graphs.logits(rows), eager.logits(rows), rtol=1e-4, atol=1e-4)
    assert all(slot.graph is not None for slot in graphs.forward._slots.values())
