"""Encoding, truncation, padding, batching and DeepSpeed-config resolution (pure functions)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from conftest import DS_CONFIGS
from skeleton_ds import data
from skeleton_ds.ds_config import resolve_ds_config
from skeleton_ds.errors import UserError
from skeleton_ds.tasks import Example, get_task


@pytest.mark.parametrize(("lengths", "budget", "expected"), [
    ([3, 4], 10, [3, 4]),
    ([10, 2], 6, [4, 2]),        # the longest field is cut first
    ([10, 9], 11, [6, 5]),       # both cut to a common level, the spare token to the first
    ([7, 7, 1], 9, [4, 4, 1]),
])
def test_fit_lengths_cuts_longest_first(lengths, budget, expected):
    assert data.fit_lengths(lengths, budget) == expected


@pytest.fixture(scope="module")
def tokenizers(tiny_models):
    return {name: AutoTokenizer.from_pretrained(path) for name, path in tiny_models.items()}


def test_mlm_encoding_places_mask_and_truncates(tokenizers):
    tok = tokenizers["bert-mlm"]
    task = get_task("rte")
    long = " ".join(["movie"] * 40)
    [enc] = data.encode(task, [Example((long, "good plot"), 1)], tok, max_length=20, readout="mlm")
    assert len(enc.input_ids) == 20
    assert enc.input_ids[enc.answer_index] == tok.mask_token_id
    assert enc.input_ids[0] == tok.cls_token_id and enc.input_ids[-1] == tok.sep_token_id
    assert tok.convert_tokens_to_ids("good") in enc.input_ids  # the short field survives whole


def test_decoder_encoding_ends_at_answer_slot(tokenizers):
    tok = tokenizers["llama"]
    task = get_task("sst2")  # "{sentence} It was {answer}."
    [enc] = data.encode(task, [Example(("good movie",), 1)], tok, max_length=32, readout="lm")
    assert enc.answer_index == len(enc.input_ids) - 1
    assert enc.input_ids[0] == tok.bos_token_id
    # the literal before the slot ("It was") closes the input; the "." after the slot is not there
    assert enc.input_ids[-1] == tok.convert_tokens_to_ids("was")
    assert tok.convert_tokens_to_ids("good") in enc.input_ids


def test_collate_pads_left_for_decoders_and_right_for_encoders():
    items = [data.Encoded([5, 6, 7], 2, 0), data.Encoded([8], 0, 1)]
    left = data.collate(items, pad_id=0, left_pad=True)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["answer_index"].tolist() == [2, 2]
    right = data.collate(items, pad_id=0, left_pad=False)
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["answer_index"].tolist() == [2, 0]


def test_global_batches_split_identically_over_ranks():
    batches = data.epoch_batches(50, 8, seed=1, epoch=0)
    assert len(batches) == 6 and all(len(b) == 8 for b in batches)
    assert batches == data.epoch_batches(50, 8, seed=1, epoch=0) != data.epoch_batches(50, 8, seed=1, epoch=1)
    one = data.rank_micro_batches(batches[0], 0, 1, 2)
    two = [m for r in range(2) for m in data.rank_micro_batches(batches[0], r, 2, 1)]
    assert sum(one, []) == sum(two, []) == batches[0]


def test_eval_shards_cover_each_example_once_with_equal_lengths():
    shards = [data.eval_shard(7, r, 3) for r in range(3)]
    assert {len(idx) for idx, _ in shards} == {3}
    assert sum((idx[:real] for idx, real in shards), []) == list(range(7))


def test_ds_config_resolution(tmp_path):
    cfg = resolve_ds_config(DS_CONFIGS / "zero3.json", world_size=4, batch_size=0, lr=0.1, precision="auto")
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"]) == (32, 8)
    assert cfg["optimizer"]["params"]["lr"] == 0.1
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False  # CPU: fp32
    assert resolve_ds_config(DS_CONFIGS / "zero2.json", world_size=2, batch_size=6, lr=1,
                             precision="bf16")["bf16"]["enabled"]
    with pytest.raises(UserError, match="multiple of 3"):
        resolve_ds_config(DS_CONFIGS / "zero2.json", world_size=3, batch_size=0, lr=0.1, precision="auto")
    auto = tmp_path / "auto.json"
    auto.write_text(json.dumps({"train_batch_size": "auto"}))
    with pytest.raises(UserError, match="'auto'"):
        resolve_ds_config(auto, world_size=1, batch_size=0, lr=0.1, precision="auto")
