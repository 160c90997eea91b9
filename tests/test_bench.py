"""The benchmark runs end to end on a tiny shape (a smoke test: no timing assertions), its FLOP model
agrees with PyTorch's own FLOP counter on the same forward passes, its fair PEFT contender answers what
ours does, and its roofline arithmetic holds on known numbers."""

from __future__ import annotations

import json

import pytest
import torch

from skeleton_ds.bench import (BenchConfig, Contender, Machine, Workload, build_contenders, bytes_read, flop_breakdown,
                               roofline_seconds, sst2_workload, summarize)
from skeleton_ds.cli import bench, run_command
from skeleton_ds.data import Encoded
from skeleton_ds.provenance import missing_fields

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)


def _sst2_dir(tmp_path):
    """A few SST-2-shaped dev lines (the real file's header and columns), so the test needs no shared data."""
    folder = tmp_path / "data" / "SST-2"
    folder.mkdir(parents=True)
    sentences = ["a gorgeous , witty , seductive movie .", "unflinchingly bleak and desperate",
                 "it 's a charming and often affecting journey .", "the story is too often just a shell .",
                 "fine", "a movie that makes you think twice about what you watch , and why ."]
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{s} \t{i % 2}\n" for i, s in enumerate(sentences)))
    return tmp_path / "data"


def test_bench_tiny_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "bench"
    code = run_command(bench, ["--shape", "tiny", "--output", str(out), "--rounds", "2", "--warmup", "1",
                               "--batch-sizes", "4,1", "--device", "cpu", "--lengths", "fixed,sst2",
                               "--data-dir", str(_sst2_dir(tmp_path)), "--sst2-examples", "4", "--peft-full-logits"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "bench.json").read_text())
    assert missing_fields(result) == []
    assert result["provenance"]["command"].startswith("skeleton-ds bench --shape tiny")
    assert result["peaks"]["matmul_tflop_per_s"] > 0 and result["peaks"]["copy_gb_per_s"] > 0
    names = {r["contender"] for r in result["rows"]}
    assert {"peft", "peft-full-logits", "full", "compact-1", "compact-0.5", "compact-0.3", "compact-0.2"} <= names
    assert ({(r["lengths"], r["batch"]) for r in result["rows"]}
            == {("fixed", 4), ("fixed", 1), ("sst2", 4), ("sst2", 1)})
    for row in result["rows"]:  # every row reports its time, roofline and share (their sizes are not asserted)
        assert row["ms_q1"] <= row["ms_median"] <= row["ms_q3"] and row["examples_per_s"] > 0
        assert row["roofline_ms"] > 0 and row["roofline_limit"] in ("FLOPs", "bytes")
        assert row["of_roofline"] == pytest.approx(row["roofline_ms"] / row["ms_median"], rel=1e-2, abs=1e-3)
        assert row["of_flop_ratio_vs_peft"] == pytest.approx(row["speedup_vs_peft"] / row["flop_ratio_vs_peft"],
                                                             rel=1e-2)
        assert row["tflop_per_s"] == pytest.approx(row["gflop"] * row["batches"] / row["ms_median"] / row["batches"],
                                                   rel=2e-2)
    workloads = {(w["lengths"], w["batch"]): w for w in result["workloads"]}
    assert workloads[("sst2", 1)]["examples"] == 4 and workloads[("sst2", 4)]["batches"] == 1
    assert result["length_tokenizer"].startswith("all-MiniLM-L6-v2 WordPiece")
    assert 0 < result["seconds"]["build"] <= result["seconds"]["total"] and result["seconds"]["timing"] > 0
    by = {(r["contender"], r["lengths"], r["batch"]): r for r in result["rows"]}
    assert by[("compact-1", "fixed", 4)]["flop_ratio_vs_full"] == 1.0  # keep 1.0 is the full architecture
    assert by[("compact-0.5", "fixed", 4)]["flop_ratio_vs_full"] > 1.2
    assert by[("compact-0.5", "fixed", 4)]["parameters"] < by[("full", "fixed", 4)]["parameters"]
    assert by[("full", "fixed", 4)]["flop_ratio_vs_peft"] > 1.0  # prompt cache + label-only logits
    assert by[("peft-full-logits", "fixed", 4)]["flop_ratio_vs_peft"] < 1.0  # the whole vocabulary everywhere
    assert (out / "bench.png").stat().st_size > 1000
    assert (out / "bench.md").read_text().count("| SST-2 dev |") == 2 * len(names) + 2  # rows and workloads
    captured = capsys.readouterr()
    assert "compact-0.5" in captured.out and "roofline peaks:" in captured.out  # the rich table
    assert "bench: compact ffn 0.5 kv 1: built in" in captured.err  # progress, for minutes-long GPU builds


def test_fair_peft_answers_as_ours_and_its_flops_match_the_counter(tmp_path):
    """PyTorch's counter sees the projections and the head (it does not count the CPU SDPA kernel,
    whose two matmuls flop_breakdown adds by formula). The fair PEFT contender computes the vocabulary
    at the last position only, and its label logits are ours."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = BenchConfig(shape="tiny", device="cpu", ffn_keeps=(1.0, 0.5), head_keep=0.5, batch_sizes=(3,), rounds=1,
                      peft_full_logits=True)
    contenders, _ = build_contenders(cfg, tmp_path)
    by = {c.name: c for c in contenders}
    assert set(by) >= {"peft", "peft-full-logits", "full", "compact-0.5-h0.5"}
    assert (by["peft"].head, by["peft-full-logits"].head, by["full"].head) == ("vocab-last", "vocab-all", "labels")
    items = [Encoded(list(range(5, 5 + 16)), 15, 0), Encoded(list(range(7, 7 + 12)), 11, 0)] * 2  # left-padded
    for c in contenders:
        with FlopCounterMode(display=False) as counter:
            c.run(items[:3])
        parts = flop_breakdown(c.config, batch=3, text=16, prompt=cfg.prompt_length, prompt_cached=c.prompt_cached,
                               head=c.head, labels=2)
        assert counter.get_total_flops() == pytest.approx(parts["linear"] + parts["head"], rel=0.01), c.name
    # Equal lengths: with left padding PEFT counts positions over the pads too (ours over real tokens only),
    # which moves the prompt's rotary distance to the text by the pad count.
    same = items[0::2]
    ours = by["full"].run(same)
    torch.testing.assert_close(by["peft"].run(same), ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by["peft-full-logits"].run(same), ours, rtol=1e-4, atol=1e-4)


def test_head_pruned_contenders_under_global_allocation_are_named_by_the_share_kept(tmp_path):
    """Under --keep-mode global each layer keeps its own KV-group count and the config holds only the widest
    layer's: the row must still say heads were pruned (it once read 1.0 and took the FFN-only row's name)."""
    cfg = BenchConfig(shape="tiny", device="cpu", ffn_keeps=(0.5,), head_keep=0.5, batch_sizes=(2,), rounds=1,
                      keep_mode="global", skip_peft=True)
    contenders, _ = build_contenders(cfg, tmp_path)
    compact = [c for c in contenders if c.name.startswith("compact")]
    assert len({c.name for c in compact}) == len(compact) == 2
    pruned = next(c for c in compact if c.name != "compact-0.5")
    assert pruned.name.startswith("compact-0.5-h") and 0 < pruned.head_keep < 1


def test_roofline_arithmetic_on_known_numbers():
    assert roofline_seconds(2e12, 1e9, 1e12, 1e11) == 2.0  # compute-bound: 2 s of arithmetic, 10 ms of reads
    assert roofline_seconds(2e9, 1e9, 1e12, 1e11) == 0.01  # memory-bound: 2 ms of arithmetic, 10 ms of reads
    # Weights read once per batch: 2 layers x (attention 64*16*(2*4+2*2) + FFN 256*64*3) + 2 label rows x 64,
    # plus the input tokens' embedding rows (3 x 10 x 64), in 4-byte floats.
    layer = 64 * 16 * 12 + 256 * 64 * 3
    assert (bytes_read(TINY, batch=3, text=10, head="labels", labels=2, element_bytes=4)
            == 4 * (2 * layer + 2 * 64 + 3 * 10 * 64))
    assert (bytes_read(TINY, batch=3, text=10, head="vocab-last", labels=2, element_bytes=2)
            == 2 * (2 * layer + 512 * 64 + 3 * 10 * 64))
    # The share of the roofline a row reports is roofline / measured: a time at the roofline reads 100%.
    machine = Machine(element_bytes=4, peak_flop_per_s=1e9, peak_bytes_per_s=1e9)
    workload = Workload("fixed", 2, [[Encoded([5] * 10, 9, 0)] * 2])
    cfg = BenchConfig(shape="tiny", device="cpu", batch_sizes=(2,), prompt_length=4)
    shape = dict(batch=2, text=10, head="labels", labels=2)
    flops = sum(flop_breakdown(TINY, prompt=4, prompt_cached=True, **shape).values())
    floor = roofline_seconds(flops, bytes_read(TINY, element_bytes=4, **shape), 1e9, 1e9)
    at_floor = Contender("full", lambda items: None, TINY, prompt_cached=True, head="labels", parameters=1,
                         weight_bytes=4, seconds={workload.key: [floor, floor]})
    slower = Contender("compact", lambda items: None, TINY, prompt_cached=True, head="labels", parameters=1,
                       weight_bytes=4, seconds={workload.key: [4 * floor]})
    rows = summarize([at_floor, slower], [workload], cfg, machine, {})
    assert [r["of_roofline"] for r in rows] == [1.0, 0.25]
    assert rows[1]["speedup_vs_full"] == 0.25 and rows[1]["flop_ratio_vs_full"] == 1.0


def test_sst2_batches_are_length_sorted_whole_batches_at_spread_quantiles():
    lengths = list(range(10, 50))  # 40 sorted lengths: 10 batches of 4
    w = sst2_workload(lengths, batch=4, examples=8, vocab=100, seed=0)
    assert [[len(e.input_ids) for e in b] for b in w.batches] == [[18, 19, 20, 21], [38, 39, 40, 41]]
    assert w.widths() == [21, 41] and w.record()["padding_share"] == pytest.approx(1 - (78 + 158) / (4 * 21 + 4 * 41),
                                                                                   abs=1e-4)
    assert all(e.answer_index == len(e.input_ids) - 1 for b in w.batches for e in b)


@pytest.mark.parametrize("flags, message", [
    (["--lengths", "fixed,zipf"], "--lengths takes"),
    (["--lengths", "sst2"], "--data-dir"),
    (["--shape", "minilm", "--peft-full-logits"], "decoder shapes"),
    (["--base-dir", "/nonexistent"], "--base-dir applies to the random shapes and needs a saved model"),
    (["--ffn-keeps", "0.5", "--head-ffn-keeps", "0.3"], "--head-ffn-keeps must be among --ffn-keeps"),
])
def test_bad_bench_flags_are_one_error_line(flags, message, capsys):
    assert run_command(bench, ["--device", "cpu", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_saved_base_of_another_shape_is_refused(tmp_path, capsys):
    import json

    from skeleton_ds.bench import SHAPES

    (tmp_path / "config.json").write_text(json.dumps(SHAPES["tiny"]))
    assert run_command(bench, ["--device", "cpu", "--shape", "llama-160m", "--base-dir", str(tmp_path)]) == 2
    assert "is not the llama-160m shape (it differs in hidden_size" in capsys.readouterr().err


def test_profile_accounts_for_the_batch(tmp_path):
    out = tmp_path / "bench"
    cfg_args = ["--shape", "tiny", "--output", str(out), "--rounds", "1", "--warmup", "1", "--batch-sizes", "2",
                "--device", "cpu", "--skip-peft", "--ffn-keeps", "1.0,0.3", "--head-keep", "1.0", "--profile"]
    assert run_command(bench, cfg_args) == 0
    (prof,) = json.loads((out / "bench.json").read_text())["profiles"]
    assert prof["contender"] == "compact-0.3" and prof["batch"] == 2
    assert 0 < prof["aten_self_ms"] <= prof["wall_ms"] and 0 <= prof["outside_ops_share"] < 1
    assert any("mm" in op["op"] or "linear" in op["op"] for op in prof["top_ops"])


def test_bench_without_peft_says_which_extra_to_install(monkeypatch, capsys):
    """A wheel installed without the bench extra: one error naming it, not a traceback."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert run_command(bench, ["--device", "cpu", "--shape", "tiny"]) == 2
    assert "skeleton-ds[bench]" in capsys.readouterr().err
