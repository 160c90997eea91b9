"""Malformed input across the pipeline and `infer`, one table: every case must end with exactly one
`error:` line that says what is wrong, a non-zero exit, and no artifact left that looks complete.

Each case gets a fresh copy of a finished tiny run (stages prompt..convert on a tiny LLaMA-GQA) to
break, and names the command to run, what to break, and words its error must contain.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import pytest

from conftest import DS_CONFIGS, generic_flags, run_stages
from skeleton_ds.cli import convert, infer, run_command, train, verify

STAGE_OUTPUTS = ("prompt", "attribution.safetensors", "skeleton.json", "compact", "retune")


@pytest.fixture(scope="module")
def finished_run(tiny_models, sentiment_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "run"
    return run_stages(tiny_models["llama"], sentiment_files, out, "--head-keep", "0.5")


@dataclass
class Case:
    id: str
    command: Callable
    argv: Callable[[Path, dict], list[str]]
    """(work dir holding run/, data/ and the tiny models) -> argv."""
    breaks: Callable[[Path], None] = lambda work: None
    needles: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    """Stage outputs deleted from the finished run first (the stage under test must write them again)."""


def _write(path: Path, content: str | bytes) -> Callable[[Path], None]:
    def breaks(work: Path) -> None:
        target = work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return breaks


def _edit_json(path: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def breaks(work: Path) -> None:
        record = json.loads((work / path).read_text())
        change(record)
        (work / path).write_text(json.dumps(record))
    return breaks


def _truncate(path: str, keep: float = 0.5) -> Callable[[Path], None]:
    def breaks(work: Path) -> None:
        data = (work / path).read_bytes()
        (work / path).write_bytes(data[:int(len(data) * keep)])
    return breaks


def _flip_header(path: str) -> Callable[[Path], None]:
    """Flip bits inside the safetensors JSON header (its length field stays valid)."""
    def breaks(work: Path) -> None:
        data = bytearray((work / path).read_bytes())
        (length,) = struct.unpack("<Q", data[:8])
        for i in range(12, min(8 + length, 40)):
            data[i] ^= 0xFF
        (work / path).write_bytes(bytes(data))
    return breaks


def _flip_data(path: str) -> Callable[[Path], None]:
    def breaks(work: Path) -> None:
        data = bytearray((work / path).read_bytes())
        data[-3] ^= 0x40
        (work / path).write_bytes(bytes(data))
    return breaks


def _ds(work: Path, config: dict) -> Path:
    path = work / "ds.json"
    path.write_text(json.dumps(config))
    return path


def _train(*extra: str, ds: dict | None = None, data: tuple[str, str] | None = None):
    """Pipeline argv on the tiny LLaMA: a stage subset of the finished run (out = work/run)."""
    def argv(work: Path, models: dict) -> list[str]:
        config = _ds(work, ds) if ds is not None else DS_CONFIGS / "zero2.json"
        files = (work / data[0], work / data[1]) if data else (work / "train.csv", work / "dev.csv")
        flags = ["--model", str(models["llama"]), "--config", str(config), "--output", str(work / "run"),
                 "--prompt-length", "4", "--max-length", "24", "--max-steps", "2", "--align", "8", "--seed", "3",
                 *generic_flags(files), *extra]
        return flags if ds is not None else flags + ["--batch-size", "8"]  # a config case brings its own batch
    return argv


def _prompt_stage(**kw):
    return _train("--stages", "prompt", **kw)


CSV_HEADER = "text,label\n"
CASES = [
    # --- DeepSpeed configs -------------------------------------------------------------------------
    Case("ds-batch-not-a-number", train, _prompt_stage(ds={"train_batch_size": "eight"}),
         needles=("train_batch_size", "integer"), removed=("prompt",)),
    Case("ds-accumulation-zero", train, _prompt_stage(ds={"train_batch_size": 8, "gradient_accumulation_steps": 0}),
         needles=("gradient_accumulation_steps", "positive"), removed=("prompt",)),
    Case("ds-negative-batch", train, _prompt_stage(ds={"train_batch_size": -8}),
         needles=("train_batch_size", "positive"), removed=("prompt",)),
    Case("ds-zero-stage-unknown", train, _prompt_stage(ds={"train_batch_size": 8, "zero_optimization": {"stage": 5}}),
         needles=("zero_optimization.stage", "0, 1, 2 or 3"), removed=("prompt",)),
    Case("ds-zero-section-not-object", train, _prompt_stage(ds={"train_batch_size": 8, "zero_optimization": 3}),
         needles=("zero_optimization", "object"), removed=("prompt",)),
    Case("ds-inconsistent-batch", train,
         _prompt_stage(ds={"train_batch_size": 8, "train_micro_batch_size_per_gpu": 3,
                           "gradient_accumulation_steps": 2}),
         needles=("inconsistent",), removed=("prompt",)),
    Case("ds-not-an-object", train, _prompt_stage(ds=[{"train_batch_size": 8}]),
         needles=("JSON object",), removed=("prompt",)),
    # --- data files ----------------------------------------------------------------------------------
    Case("data-row-missing-a-field", train, _prompt_stage(data=("bad.csv", "dev.csv")),
         _write(Path("bad.csv"), CSV_HEADER + "a good movie,pos\n" * 8 + "the bad plot\n"),
         needles=("bad.csv", "line 10", "fields"), removed=("prompt",)),
    Case("data-latin1-encoding", train, _prompt_stage(data=("bad.csv", "dev.csv")),
         _write(Path("bad.csv"), (CSV_HEADER + "caf\xe9 was good,pos\n" * 16).encode("latin-1")),
         needles=("bad.csv", "UTF-8"), removed=("prompt",)),
    Case("data-utf16-encoding", train, _prompt_stage(data=("bad.csv", "dev.csv")),
         _write(Path("bad.csv"), (CSV_HEADER + "a good movie,pos\n" * 16).encode("utf-16")),
         needles=("bad.csv", "UTF-8"), removed=("prompt",)),
    Case("data-unknown-label", train, _prompt_stage(data=("train.csv", "bad.csv")),
         _write(Path("bad.csv"), CSV_HEADER + "a good movie,pos\nan odd movie,maybe\n"),
         needles=("bad.csv", "maybe"), removed=("prompt",)),
    Case("data-empty-file", train, _prompt_stage(data=("empty.csv", "dev.csv")), _write(Path("empty.csv"), ""),
         needles=("empty.csv",), removed=("prompt",)),
    Case("data-header-only", train, _prompt_stage(data=("train.csv", "empty.csv")),
         _write(Path("empty.csv"), CSV_HEADER), needles=("empty.csv", "no examples"), removed=("prompt",)),
    Case("data-jsonl-broken-line", train, _prompt_stage(data=("bad.jsonl", "dev.csv")),
         _write(Path("bad.jsonl"), '{"text": "a good movie", "label": "pos"}\n{"text": "bad", "label": \n'),
         needles=("bad.jsonl", "line 2"), removed=("prompt",)),
    Case("data-missing-column", train, _prompt_stage(data=("bad.csv", "dev.csv")),
         _write(Path("bad.csv"), "sentence,label\na good movie,pos\n"), needles=("bad.csv", "text"),
         removed=("prompt",)),
    # --- model checkpoints ---------------------------------------------------------------------------
    Case("base-model-truncated", train, _prompt_stage(), _truncate("llama/model.safetensors"),
         needles=("model.safetensors",), removed=("prompt",)),
    Case("base-model-header-bit-flipped", train, _prompt_stage(), _flip_header("llama/model.safetensors"),
         needles=("model.safetensors",), removed=("prompt",)),
    # --- stage artifacts -----------------------------------------------------------------------------
    Case("prompt-truncated", train, _train("--stages", "attribute"), _truncate("run/prompt/prompt.safetensors"),
         needles=("prompt.safetensors",), removed=("attribution.safetensors",)),
    Case("prompt-wrong-width", train, _train("--stages", "attribute"),
         _write(Path("run/prompt/prompt.safetensors"), b""), needles=("prompt.safetensors",),
         removed=("attribution.safetensors",)),
    Case("scores-truncated", train, _train("--stages", "localize"), _truncate("run/attribution.safetensors"),
         needles=("attribution.safetensors",), removed=("skeleton.json",)),
    Case("skeleton-index-out-of-range", train, _train("--stages", "convert"),
         _edit_json("run/skeleton.json", lambda r: r["layers"][0]["ffn"].__setitem__(-1, 10_000)),
         needles=("skeleton.json", "out of range"), removed=("compact",)),
    Case("skeleton-duplicate-index", train, _train("--stages", "convert"),
         _edit_json("run/skeleton.json", lambda r: r["layers"][1]["ffn"].__setitem__(1, r["layers"][1]["ffn"][0])),
         needles=("skeleton.json", "duplicate"), removed=("compact",)),
    Case("skeleton-unsorted", train, _train("--stages", "convert"),
         _edit_json("run/skeleton.json", lambda r: r["layers"][0]["ffn"].reverse()),
         needles=("skeleton.json", "sorted"), removed=("compact",)),
    Case("skeleton-negative-head", train, _train("--stages", "convert"),
         _edit_json("run/skeleton.json", lambda r: r["layers"][0].__setitem__("heads", [-1])),
         needles=("skeleton.json", "out of range"), removed=("compact",)),
    Case("skeleton-for-another-base", train, _train("--stages", "convert"),
         _edit_json("run/skeleton.json",
                    lambda r: r["base_model"].update(config_sha256="0" * 64, name_or_path="other")),
         needles=("skeleton.json", "other"), removed=("compact",)),
    Case("skeleton-not-json", train, _train("--stages", "convert"), _write(Path("run/skeleton.json"), "{layers: ["),
         needles=("skeleton.json", "JSON"), removed=("compact",)),
    Case("convert-disk-full", convert,
         lambda work, models: ["--base", str(models["llama"]), "--skeleton", str(work / "run/skeleton.json"),
                               "--prompt", str(work / "run/prompt"), "--output", str(work / "run/compact"),
                               "--overwrite"],
         needles=("No space left", "free"), removed=("compact",)),
    # --- infer ---------------------------------------------------------------------------------------
    Case("infer-bit-flipped-weights", infer,
         lambda work, models: ["--checkpoint", str(work / "run/compact"), "--input", str(work / "in.jsonl")],
         _flip_data("run/compact/model.safetensors"), needles=("model.safetensors", "sha256")),
    Case("infer-truncated-weights-no-manifest", infer,
         lambda work, models: ["--checkpoint", str(work / "run/compact"), "--input", str(work / "in.jsonl")],
         lambda work: (_truncate("run/compact/model.safetensors")(work), (work / "run/compact/manifest.json").unlink()),
         needles=("compact", "manifest")),
    Case("infer-record-not-json", infer,
         lambda work, models: ["--checkpoint", str(work / "run/compact"), "--input", str(work / "bad.jsonl")],
         _write(Path("bad.jsonl"), '{"text": "fine"}\n{"text": \n'), needles=("bad.jsonl", "line 2")),
    Case("infer-latin1-input", infer,
         lambda work, models: ["--checkpoint", str(work / "run/compact"), "--input", str(work / "bad.jsonl")],
         _write(Path("bad.jsonl"), '{"text": "caf\xe9"}\n'.encode("latin-1")), needles=("bad.jsonl", "UTF-8")),
    Case("infer-batch-size-zero", infer,
         lambda work, models: ["--checkpoint", str(work / "run/compact"), "--input", str(work / "in.jsonl"),
                               "--batch-size", "0"], needles=("--batch-size",)),
    Case("infer-output-disk-full", infer,
         lambda work, models: ["--checkpoint", str(work / "run/compact"), "--input", str(work / "in.jsonl"),
                               "--output", str(work / "predictions.jsonl")], needles=("No space left",)),
]


def _complete_looking(work: Path) -> list[str]:
    """Outputs that a reader would take as finished, and temporaries an interrupted write left."""
    found = [str(p.relative_to(work)) for p in work.rglob("*")
             if ".partial-" in p.name or ".tmp-" in p.name or ".old-" in p.name]
    run = work / "run"
    for name in STAGE_OUTPUTS:
        if (run / name).exists():
            found.append(f"run/{name}")
    if (work / "predictions.jsonl").exists():
        found.append("predictions.jsonl")
    return found


def _disk_full(monkeypatch, case_id: str) -> None:
    """Make writes fail as a full disk does: ENOSPC after some bytes have landed."""
    import errno
    import os

    def no_space(path) -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if case_id == "convert-disk-full":
        import skeleton_ds.conversion as conversion

        real = conversion.write_streaming

        def failing(path, entries, tensors, metadata):
            real(path, entries[:1], [next(iter(tensors))], metadata)
            raise no_space(path)

        monkeypatch.setattr(conversion, "write_streaming", failing)
    else:
        def failing_write_text(self, data, *args, **kwargs):
            self.write_bytes(data[:10].encode())
            raise no_space(self)

        monkeypatch.setattr(Path, "write_text", failing_write_text)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, finished_run, tiny_models, sentiment_files, tmp_path, capsys, monkeypatch):
    work = tmp_path
    shutil.copytree(finished_run, work / "run")
    shutil.copytree(tiny_models["llama"], work / "llama")
    shutil.copy(sentiment_files[0], work / "train.csv")
    shutil.copy(sentiment_files[1], work / "dev.csv")
    (work / "in.jsonl").write_text('{"text": "a good movie"}\n')
    for name in case.removed:
        target = work / "run" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(work / "run" / "checkpoints", ignore_errors=True)  # finished stages keep theirs; not under test
    models = {"llama": work / "llama"}
    case.breaks(work)
    before = set(_complete_looking(work))
    if "disk-full" in case.id:
        _disk_full(monkeypatch, case.id)
    capsys.readouterr()
    code = run_command(case.command, case.argv(work, models))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for needle in case.needles:
        assert needle in lines[0], lines[0]
    left = set(_complete_looking(work)) - before
    assert not left, f"left behind: {sorted(left)}"


# --- verify names what is wrong ------------------------------------------------------------------------
VERIFY_CASES = [
    ("bit-flipped-weights", _flip_data("run/compact/model.safetensors"), "compact", "model.safetensors"),
    ("truncated-shard", _truncate("run/compact/model.safetensors", 0.9), "compact", "truncated"),
    ("manifest-missing", lambda w: (w / "run/compact/manifest.json").unlink(), "compact", "manifest.json"),
    ("skeleton-duplicate", _edit_json("run/skeleton.json",
                                      lambda r: r["layers"][1]["ffn"].__setitem__(1, r["layers"][1]["ffn"][0])),
     "run", "duplicate"),
    ("skeleton-sizes-disagree", _edit_json("run/compact/skeleton.json", lambda r: r["layers"][0]["ffn"].pop()),
     "compact", "ffn_sizes"),
    ("prompt-wrong-length", _edit_json("run/prompt/task.json", lambda r: r.update(prompt_length=9)),
     "run", "prompt_length"),
    ("leftover-staging", lambda w: (w / "run/.prompt.partial-x").mkdir(), "run", "interrupted write"),
    ("unfinished-stage", lambda w: (shutil.rmtree(w / "run/prompt"),
                                    (w / "run/checkpoints/prompt").mkdir(parents=True, exist_ok=True),
                                    (w / "run/checkpoints/prompt/latest").write_text("step00000002")),
     "run", "--resume"),
]


def test_verify_accepts_a_finished_run(finished_run, capsys):
    assert run_command(verify, [str(finished_run)]) == 0
    assert run_command(verify, [str(finished_run / "compact")]) == 0
    assert "verified" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "breaks", "target", "needle"), VERIFY_CASES, ids=[c[0] for c in VERIFY_CASES])
def test_verify_names_the_problem(name, breaks, target, needle, finished_run, tmp_path, capsys):
    shutil.copytree(finished_run, tmp_path / "run")
    breaks(tmp_path)
    capsys.readouterr()
    code = run_command(verify, [str(tmp_path / "run" / ("compact" if target == "compact" else ""))])
    out = capsys.readouterr().out
    assert code == 1
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failures and any(needle in line for line in failures), out


def test_verify_refuses_a_directory_that_is_not_an_artifact(tmp_path, capsys):
    assert run_command(verify, [str(tmp_path)]) == 2
    assert "neither" in capsys.readouterr().err
