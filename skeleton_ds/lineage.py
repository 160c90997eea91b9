"""What each finished stage was made from, so a run never reuses an output its flags did not make.

Every stage's output carries one settings record:

    {"stage": "localize", "values": {"ffn_keep": 0.3, ...}, "upstream": {"attribute": "3f2a..."}, "id": "9c1e..."}

`values` are the settings the output depends on (base-model identity, task and data hashes, the
stage's own flags), `upstream` the ids of the records of the stage outputs it consumed, and `id` a
hash of all three: identical settings give identical ids, and an output built from another upstream
output has another id. The pipeline compares a finished stage's record with the one its flags give
before any work starts; `skeleton-ds verify` checks that each output's upstream ids match the
records of the outputs beside it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from skeleton_ds.stage_specs import SPEC, STAGE_ORDER


def record_id(stage: str, values: dict, upstream: dict) -> str:
    blob = json.dumps({"stage": stage, "values": values, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_record(stage: str, values: dict, upstream: dict[str, str | None]) -> dict:
    return {"stage": stage, "values": values, "upstream": upstream, "id": record_id(stage, values, upstream)}


def read_record(run: Path, stage: str) -> dict | None:
    """The settings record of a finished stage in `run`, or None (not finished, unreadable, or made
    before settings were recorded). Where it lives is the stage's `StageSpec.record`."""
    from safetensors import SafetensorError, safe_open

    if stage not in SPEC:
        raise ValueError(f"unknown stage {stage!r}")
    file, _, key = SPEC[stage].record.partition("#")
    path = Path(run) / file
    try:
        if not key:  # a safetensors file: the record is its "settings" metadata
            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get("settings")
            return json.loads(raw) if raw else None
        value = json.loads(path.read_text())
        for part in key.split("."):
            value = value.get(part, {})
        return value or None
    except (OSError, ValueError, AttributeError, SafetensorError):
        return None


def _flat(values: dict, prefix: str = "") -> dict:
    """Nested settings as dotted names (task.data_sha256.train), so a change names the innermost setting."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256: the first 12 digits tell two files apart
    return json.dumps(value) if isinstance(value, list) else str(value)


def value_changes(recorded: dict | None, expected: dict) -> list[str]:
    """Each setting whose recorded value differs from the expected one, as "name old -> new"."""
    if recorded is None:
        return ["no settings recorded (made by an older skeleton_ds)"]
    old, new = _flat(recorded.get("values", {})), _flat(expected["values"])
    return [f"{key} {_show(old.get(key, '(unset)'))} -> {_show(new.get(key, '(unset)'))}"
            for key in sorted(set(old) | set(new), key=list({**new, **old}).index) if old.get(key) != new.get(key)]


def upstream_changes(recorded: dict | None, expected: dict) -> list[str]:
    """Inputs a finished stage was built from that are not the outputs it would read now."""
    if recorded is None:
        return []
    old = recorded.get("upstream", {})
    return [f"built from another {stage} output than the one in this directory"
            for stage, current in expected["upstream"].items() if old.get(stage) != current]


def lineage_problems(run: Path) -> list[tuple[str, str]]:
    """(output, problem) for every finished stage in `run` whose recorded inputs are not the outputs beside it,
    e.g. a compact model built from another skeleton than DIR/skeleton.json."""
    run = Path(run)
    records = {stage: read_record(run, stage) for stage in STAGE_ORDER}
    problems = []
    for stage, record in records.items():
        if record is None:
            continue
        for upstream, recorded_id in record.get("upstream", {}).items():
            present = records.get(upstream)
            if present is not None and present.get("id") != recorded_id:
                problems.append((str(run / SPEC[stage].outputs[0]),
                                 f"was built from another {upstream} output than {run / SPEC[upstream].outputs[0]} "
                                 f"(recorded id {recorded_id}, present {present.get('id')}): "
                                 f"redo {stage} with --overwrite"))
    return problems
