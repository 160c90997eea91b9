"""experiments.study_layers on a finished tiny run: its ends agree with the pipeline's own numbers and with
each other, every layer is scored, and a directory that is not a localized run is refused."""

from __future__ import annotations

import json

import pytest

from conftest import run_stages
from skeleton_ds.errors import UserError



def _study():
    from skeleton_ds.experiments import study_layers

    return study_layers


def test_layer_study_on_a_finished_run(tiny_models, sentiment_files, tmp_path):
    run = run_stages(tiny_models["llama"], sentiment_files, tmp_path / "run", "--ffn-keep", "0.25",
                     "--head-keep", "0.5")
    study = _study()
    assert study.study(["--run", str(run), "--block-size", "1", "--max-eval-examples", "0",
                        "--output", str(tmp_path / "one")]) == 0
    assert study.study(["--run", str(run), "--block-size", "100", "--max-eval-examples", "0",
                        "--output", str(tmp_path / "all")]) == 0
    per_layer = json.loads((tmp_path / "one" / "study.json").read_text())["results"][0]
    whole = json.loads((tmp_path / "all" / "study.json").read_text())["results"][0]
    stage1 = json.loads((run / "prompt" / "metrics.json").read_text())["metrics"]["accuracy"]

    assert per_layer["unpruned"] == pytest.approx(stage1)  # the run's own dev set and prompt
    assert [b["layers"] for b in per_layer["blocks"]] == [[i] for i in range(len(per_layer["ffn_sizes"]))]
    assert [b["ffn_kept"] for b in per_layer["blocks"]] == per_layer["ffn_sizes"]
    # one block holding every layer: pruning it alone is the whole skeleton, restoring it is no mask
    [block] = whole["blocks"]
    assert block["pruned_alone"] == whole["skeleton"] and block["restored"] == whole["unpruned"]
    assert (tmp_path / "one" / "study.png").stat().st_size > 0
    assert "| 0-0 |" in (tmp_path / "one" / "study.md").read_text()


def test_layer_study_refuses_a_run_without_a_skeleton(tmp_path):
    with pytest.raises(UserError, match="no prompt/metrics.json"):
        _study().study(["--run", str(tmp_path), "--output", str(tmp_path / "out")])
