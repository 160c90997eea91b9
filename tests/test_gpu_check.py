"""The device script's CPU dry run (launch/gpu_check.py on tiny shapes): both phases run end to end and
write what the GPU run will bring back, with provenance, so device time goes to measuring."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA
from skeleton_ds.distributed import without_rendezvous
from skeleton_ds.provenance import missing_fields
from skeleton_ds.stage_specs import STAGE_ORDER


@pytest.mark.realdata
@pytest.mark.multirank
def test_gpu_check_dry_run_on_cpu_writes_every_phase(tmp_path):
    out = tmp_path / "out"
    env = without_rendezvous(os.environ)
    done = subprocess.run([sys.executable, "launch/gpu_check.py", "--device", "cpu", "--bench-shape", "tiny",
                           "--train-shape", "tiny", "--data-dir", str(SHARED_DATA), "--output", str(out), "--work",
                           str(tmp_path / "work"), "--examples", "32", "--rounds", "1", "--batch-sizes", "1,2",
                           "--aligns", "64,128"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "gpu_check.json").read_text())
    assert missing_fields(record) == [] and set(record["seconds"]) == {"bench", "train"}
    assert sorted(p.name for p in out.iterdir()) == ["align128.json", "bench.json", "bench.png", "gpu_check.json"]
    rows = {(r["contender"], r["batch"]) for r in record["bench"]["bench"]["rows"]}
    names = {"peft", "full", "compact-0.5", "compact-0.3", "compact-0.2", "compact-0.3-h0.5", "full-graphs",
             "compact-0.3-graphs"}
    assert rows == {(name, b) for name in names for b in (1, 2)}
    assert all(r["of_roofline"] is not None for r in record["bench"]["bench"]["rows"])
    assert {r["contender"] for r in record["bench"]["align128"]["rows"]} == {"full", "compact-0.3"}
    for zero in ("zero2", "zero3"):
        run = record["train"][zero]
        assert run["returncode"] == 0 and run["backend"] == "gloo"
        assert set(run["stages"]) == {*STAGE_ORDER, "infer"}
        assert all(s["seconds"] > 0 and s["peak_bytes"] > 0 for s in run["stages"].values())
        assert run["stages"]["prompt"]["seconds_per_step"] > 0 and run["stages"]["retune"]["steps"] > 0
        assert 0 <= run["stages"]["infer"]["accuracy"] <= 1
