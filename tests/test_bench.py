"""The benchmark runs end to end on a tiny shape (a smoke test: no timing assertions), and its FLOP
model agrees with PyTorch's own FLOP counter on the same forward passes."""

from __future__ import annotations

import json

import pytest
import torch

from skeleton_ds.bench import BenchConfig, build_contenders, flop_breakdown
from skeleton_ds.cli import bench, run_command


def test_bench_tiny_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "bench"
    code = run_command(bench, ["--shape", "tiny", "--out", str(out), "--rounds", "2", "--warmup", "1",
                               "--batch-sizes", "4,1", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "bench.json").read_text())
    names = {r["contender"] for r in result["rows"]}
    assert {"peft", "full", "compact-1", "compact-0.5", "compact-0.3", "compact-0.2"} <= names
    assert {r["batch"] for r in result["rows"]} == {4, 1}
    for row in result["rows"]:
        assert row["ms_q1"] <= row["ms_median"] <= row["ms_q3"] and row["examples_per_s"] > 0
        assert row["of_bound_vs_peft"] == pytest.approx(row["speedup_vs_peft"] / row["bound_vs_peft"], rel=1e-2)
        assert row["tflop_per_s"] == pytest.approx(row["gflop"] / row["ms_median"], rel=2e-2)
    assert 0 < result["seconds"]["build"] <= result["seconds"]["total"] and result["seconds"]["timing"] > 0
    assert result["environment"]["transformers"] and result["environment"]["peft"]
    by = {(r["contender"], r["batch"]): r for r in result["rows"]}
    assert by[("compact-1", 4)]["bound_vs_full"] == 1.0  # keep 1.0 is the full architecture
    assert by[("compact-0.5", 4)]["bound_vs_full"] > 1.2 and by[("compact-0.5", 4)]["parameters"] < by[("full", 4)]["parameters"]
    assert by[("full", 4)]["bound_vs_peft"] > 1.0  # prompt cache + label-only logits
    assert (out / "bench.png").stat().st_size > 1000
    captured = capsys.readouterr()
    assert "compact-0.5" in captured.out  # the rich table
    assert "bench: compact ffn 0.5 kv 1: built in" in captured.err  # progress, for minutes-long GPU builds


def test_flop_model_matches_torch_flop_counter(tmp_path):
    """PyTorch's counter sees the projections and the head (it does not count the CPU SDPA kernel,
    whose two matmuls flop_breakdown adds by formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    from skeleton_ds.data import Encoded

    cfg = BenchConfig(shape="tiny", device="cpu", ffn_keeps=(1.0, 0.5), head_keep=0.5, batch_sizes=(3,), rounds=1)
    contenders, _ = build_contenders(cfg, tmp_path)
    items = [Encoded(list(range(5, 5 + 16)), 15, 0)] * 3
    for c in contenders:
        with FlopCounterMode(display=False) as counter:
            c.run(items)
        parts = flop_breakdown(c.config, batch=3, text=16, prompt=cfg.prompt_length, prompt_cached=c.prompt_cached,
                               head=c.head, labels=2)
        assert counter.get_total_flops() == pytest.approx(parts["linear"] + parts["head"], rel=0.01), c.name
    assert {c.name for c in contenders} >= {"peft", "full", "compact-0.5-h0.5"}
    torch.testing.assert_close(contenders[1].run(items), contenders[0].run(items), rtol=1e-4, atol=1e-4)


def test_profile_accounts_for_the_batch(tmp_path):
    out = tmp_path / "bench"
    cfg_args = ["--shape", "tiny", "--out", str(out), "--rounds", "1", "--warmup", "1", "--batch-sizes", "2",
                "--device", "cpu", "--skip-peft", "--ffn-keeps", "1.0,0.3", "--head-keep", "1.0", "--profile"]
    assert run_command(bench, cfg_args) == 0
    (prof,) = json.loads((out / "bench.json").read_text())["profiles"]
    assert prof["contender"] == "compact-0.3" and prof["batch"] == 2
    assert 0 < prof["aten_self_ms"] <= prof["wall_ms"] and 0 <= prof["outside_ops_share"] < 1
    assert any("mm" in op["op"] or "linear" in op["op"] for op in prof["top_ops"])
