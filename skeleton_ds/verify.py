"""`skeleton-ds verify DIR`: check a run directory or a compact checkpoint before trusting it.

    skeleton-ds verify runs/minilm-sst2            # every stage's output in a run directory
    skeleton-ds verify runs/minilm-sst2/compact    # one compact checkpoint

Reads only JSON and safetensors headers/tensors (never a pickle) and reports every problem it finds,
not just the first, each naming the file and what is wrong: manifest hashes and sizes, truncated or
corrupt safetensors, a skeleton that does not fit the model it claims (indices out of range,
duplicated, unsorted, sizes that disagree with the config), a prompt whose shape does not match the
hidden size or its task record, artifacts made for another base model, stages that disagree with
each other (a compact model built from another skeleton than the one beside it: skeleton_ds.lineage),
unfinished stages and leftover temporary files from interrupted writes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from skeleton_ds import checkpoint, lineage
from skeleton_ds.data import ENCODING
from skeleton_ds.architectures import Geometry, adapter_for
from skeleton_ds.model_identity import directory_config_hash
from skeleton_ds.errors import UserError
from skeleton_ds.localization import keep_count, unit_problems


@dataclass(frozen=True)
class Finding:
    ok: bool
    subject: str
    detail: str = ""


class _Report:
    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def ok(self, subject: str, detail: str = "") -> None:
        self.findings.append(Finding(True, subject, detail))

    def bad(self, subject: str, detail: str) -> None:
        self.findings.append(Finding(False, subject, detail))

    def json(self, path: Path, what: str) -> dict | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            self.bad(str(path), f"{what} is missing")
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.bad(str(path), f"{what} is not valid JSON ({e})")
            return None
        if not isinstance(data, dict):
            self.bad(str(path), f"{what} must be a JSON object")
            return None
        return data


def _tensors(report: _Report, path: Path) -> dict | None:
    try:
        header = checkpoint.safetensors_header(path)
    except FileNotFoundError:
        report.bad(str(path), "missing")
        return None
    except ValueError as e:
        report.bad(str(path), str(e))
        return None
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _leftovers(report: _Report, directory: Path) -> None:
    for p in sorted(directory.glob(".*")):
        if ".partial-" in p.name or ".tmp-" in p.name or ".old-" in p.name:
            report.bad(str(p), "left over from an interrupted write: delete it (the finished artifact never uses it)")


def check_skeleton(report: _Report, path: Path) -> dict | None:
    """skeleton.json on its own: format, indices against its recorded geometry, sizes, keep settings."""
    record = report.json(path, "skeleton")
    if record is None:
        return None
    if record.get("format") != "skeleton_ds.skeleton/1":
        report.bad(str(path), "not a skeleton_ds skeleton.json (format field)")
        return None
    try:
        geometry = Geometry(**record["geometry"])
        ffn = [layer["ffn"] for layer in record["layers"]]
        heads = [layer["heads"] for layer in record["layers"]]
    except (KeyError, TypeError) as e:
        report.bad(str(path), f"malformed skeleton record ({e})")
        return None
    before = len(report.findings)
    if len(ffn) != geometry.layers:
        report.bad(str(path), f"{len(ffn)} layers, but its model has {geometry.layers}")
    for problem in unit_problems(ffn, geometry.ffn_size, "FFN") + unit_problems(heads, geometry.kv_heads, "KV-group"):
        report.bad(str(path), problem)
    if record.get("ffn_sizes") != [len(f) for f in ffn] or record.get("head_counts") != [len(h) for h in heads]:
        report.bad(str(path), "ffn_sizes/head_counts disagree with the kept index lists")
    if record.get("keep_mode") == "uniform" and len({len(f) for f in ffn}) > 1:
        report.bad(str(path), "keep_mode uniform, but layers keep different FFN counts")
    if record.get("keep_mode") == "uniform" and ffn and isinstance(record.get("ffn_keep"), (int, float)):
        expected = keep_count(geometry.ffn_size, record["ffn_keep"], int(record.get("align", 1)))
        if len(ffn[0]) != expected:
            report.bad(str(path), f"keeps {len(ffn[0])} FFN neurons per layer, but ffn_keep {record['ffn_keep']} with "
                                  f"align {record.get('align')} gives {expected}")
    if len(report.findings) == before:
        report.ok(str(path), f"{geometry.layers} layers, "
                             f"FFN {sum(map(len, ffn))}/{geometry.layers * geometry.ffn_size} "
                             f"kept, KV groups {sum(map(len, heads))}/{geometry.layers * geometry.kv_heads} kept")
    return record


def check_prompt(report: _Report, directory: Path, hidden_size: int | None, identities: list[str]) -> dict | None:
    """prompt.safetensors + task.json: shapes against the record and the model's hidden size."""
    record = report.json(directory / "task.json", "task record")
    tensors = _tensors(report, directory / "prompt.safetensors")
    if record is None or tensors is None:
        return record
    where = str(directory / "prompt.safetensors")
    before = len(report.findings)
    shape = tensors.get("prompt", {}).get("shape")
    if shape is None:
        report.bad(where, "has no 'prompt' tensor")
    elif shape[0] != record.get("prompt_length"):
        report.bad(where, f"prompt has {shape[0]} positions, "
                          f"task.json says prompt_length {record.get('prompt_length')}")
    elif hidden_size and shape[1] != hidden_size:
        report.bad(where, f"prompt width {shape[1]} != the model's hidden size {hidden_size}: made for another model")
    if record.get("readout") == "head":
        head = tensors.get("head.weight", {}).get("shape")
        if head != [len(record.get("label_names", [])), shape[1] if shape else None]:
            report.bad(where, f"head.weight {head} does not fit {len(record.get('label_names', []))} labels")
    if record.get("encoding") != ENCODING:
        report.bad(str(directory / "task.json"),
                   f"trained on inputs encoded as {record.get('encoding', 'template pieces')}"
                   f", not {ENCODING}: re-run its stages with this version")
    if identities and record.get("base_model", {}).get("config_sha256") not in identities:
        report.bad(str(directory / "task.json"),
                   f"made for base model {record.get('base_model', {}).get('name_or_path')!r}, "
                   f"not the model these artifacts belong to")
    if len(report.findings) == before:
        report.ok(where, f"prompt {shape}, task {record.get('task')}, readout {record.get('readout')}")
    return record


def check_compact(report: _Report, directory: Path) -> None:
    _leftovers(report, directory)
    if not (directory / "manifest.json").is_file():
        report.bad(str(directory / "manifest.json"), "missing: the conversion did not finish (re-run --stages convert)")
    else:
        manifest = report.json(directory / "manifest.json", "manifest") or {}
        listed = manifest.get("files", {})
        bad = 0
        for name, entry in listed.items():
            path = directory / name
            if not path.is_file():
                report.bad(str(path), "listed in manifest.json but missing")
                bad += 1
            elif path.stat().st_size != entry.get("bytes") or checkpoint.sha256(path) != entry.get("sha256"):
                report.bad(str(path), "does not match its sha256/size in manifest.json (modified or corrupt)")
                bad += 1
        extra = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                       if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")
                       and str(p.relative_to(directory)) not in listed)
        if extra:
            report.bad(str(directory), f"files not in manifest.json: {', '.join(extra[:5])}")
        if not bad:
            report.ok(str(directory / "manifest.json"), f"{len(listed)} files match their sha256")
    config = report.json(directory / "config.json", "model config")
    if config is None:
        return
    try:
        adapter = adapter_for(config.get("model_type"))
    except UserError as e:
        report.bad(str(directory / "config.json"), str(e))
        return
    shards = sorted(directory.glob("model*.safetensors"))
    if not shards:
        report.bad(str(directory), "no model*.safetensors weights")
    names: dict[str, list[int]] = {}
    for shard in shards:
        names |= {k: v["shape"] for k, v in (_tensors(report, shard) or {}).items()}
    skeleton = check_skeleton(report, directory / "skeleton.json") if (directory / "skeleton.json").is_file() else None
    origin = config.get("skeleton_ds", {}).get("base_model", {})
    if skeleton is not None:
        if skeleton["base_model"].get("config_sha256") != origin.get("config_sha256"):
            report.bad(str(directory / "skeleton.json"), "made for another base model than config.json records")
        sizes, counts = skeleton["ffn_sizes"], skeleton["head_counts"]
        geometry = Geometry(**skeleton["geometry"])
        if config.get("intermediate_size") != max(sizes):
            report.bad(str(directory / "config.json"), f"intermediate_size {config.get('intermediate_size')} != the "
                                                        f"skeleton's largest FFN layer {max(sizes)}")
        if config.get("num_hidden_layers") != len(sizes):
            report.bad(str(directory / "config.json"), f"num_hidden_layers {config.get('num_hidden_layers')} != the "
                                                        f"skeleton's {len(sizes)} layers")
        kv = config.get("num_key_value_heads", config.get("num_attention_heads"))
        if max(counts) < geometry.kv_heads and kv != geometry.padded_groups(max(counts)):
            report.bad(str(directory / "config.json"), f"{kv} KV heads, the skeleton keeps up to {max(counts)} groups")
    for i in range(config.get("num_hidden_layers", 0)):
        for path in adapter.ffn_in:
            key = next((k for k in names if k.endswith(f"{adapter.layers}.{i}.{path}.weight")), None)
            if key is None:
                report.bad(str(directory), f"no weight for layer {i} {path}")
            elif names[key][0] != config.get("intermediate_size"):
                report.bad(str(directory), f"{key} has {names[key][0]} rows, config intermediate_size is "
                                           f"{config.get('intermediate_size')}")
    if (directory / "prompt.safetensors").is_file() or (directory / "task.json").is_file():
        # A stage-1 prompt belongs to the base model; a re-tuned one to the compact model itself, whose
        # identity hashes this config: both are accepted, anything else was made for another model.
        try:
            own = directory_config_hash(directory)
        except (OSError, ValueError) as e:
            report.bad(str(directory / "config.json"), f"transformers cannot read it ({str(e).splitlines()[0]})")
            return
        check_prompt(report, directory, config.get("hidden_size"), [origin.get("config_sha256"), own])


def check_run(report: _Report, run: Path) -> None:
    _leftovers(report, run)
    skeleton_record = None
    identities: list[str] = []
    stages = {"prompt": run / "prompt" / "prompt.safetensors", "attribute": run / "attribution.safetensors",
              "localize": run / "skeleton.json", "convert": run / "compact" / "manifest.json",
              "teacher": run / "teacher.safetensors", "retune": run / "retune" / "prompt.safetensors"}
    done = [s for s, marker in stages.items() if marker.is_file()]
    for stage in ("prompt", "retune"):
        latest = run / "checkpoints" / stage / "latest"
        if latest.is_file() and stage not in done:
            report.bad(f"stage {stage}", f"unfinished (checkpoint {latest.read_text().strip()}): run the same command "
                                         f"with --resume")
    if (run / "checkpoints" / "attribute" / "partial.safetensors").is_file() and "attribute" not in done:
        report.bad("stage attribute", "unfinished (partial scores saved): run the same command with --resume")
    if any((run / "checkpoints" / "teacher").glob("rank*.safetensors")) and "teacher" not in done:
        report.bad("stage teacher", "unfinished (partial rows saved): run the same command with --resume")
    if "teacher" in done:
        rows = {name: info.get("shape", [None])[0]
                for name, info in (_tensors(report, stages["teacher"]) or {}).items()}
        if len(set(rows.values())) > 1:
            report.bad(str(stages["teacher"]), f"its outputs cover different numbers of examples: {rows}")
    report.ok("stages complete", ", ".join(done) or "none")
    if (run / "skeleton.json").is_file():
        skeleton_record = check_skeleton(report, run / "skeleton.json")
    hidden = (skeleton_record or {}).get("geometry", {}).get("hidden_size") or None
    if skeleton_record:
        identities.append(skeleton_record["base_model"].get("config_sha256"))
    if "prompt" in done:
        prompt = check_prompt(report, run / "prompt", hidden, identities)
        if prompt and not identities:
            identities.append(prompt.get("base_model", {}).get("config_sha256"))
        if skeleton_record and prompt and prompt.get("task") != skeleton_record.get("task"):
            report.bad(str(run / "skeleton.json"), f"for task {skeleton_record.get('task')!r}, the prompt is for "
                                                   f"{prompt.get('task')!r}")
    if "attribute" in done:
        tensors = _tensors(report, run / "attribution.safetensors")
        if tensors is not None:
            from safetensors import safe_open

            with safe_open(str(run / "attribution.safetensors"), "pt") as f:
                meta = f.metadata() or {}
            geometry = Geometry(**json.loads(meta.get("geometry", "{}") or "{}")) if meta.get("geometry") else None
            wrong = [k for i in range(geometry.layers if geometry else 0)
                     for k, n in ((f"ffn.{i}", geometry.ffn_size), (f"heads.{i}", geometry.kv_heads))
                     if tensors.get(k, {}).get("shape") != [n]]
            if geometry is None or wrong:
                report.bad(str(run / "attribution.safetensors"), f"scores do not fit their geometry: {wrong[:4]}")
            elif identities and json.loads(meta["base_model"]).get("config_sha256") not in identities:
                report.bad(str(run / "attribution.safetensors"), "scores were made for another base model")
            else:
                report.ok(str(run / "attribution.safetensors"), f"{meta.get('scorer')} scores, {meta.get('examples')} "
                                                                 f"examples")
    if (run / "compact").is_dir():
        check_compact(report, run / "compact")
    if "retune" in done:
        check_prompt(report, run / "retune", None, [])
    for name in ("metrics.json", "conversion.json", "prompt/metrics.json", "retune/metrics.json"):
        if (run / name).is_file() and report.json(run / name, name) is not None:
            report.ok(str(run / name))
    check_lineage(report, run, done)


def check_lineage(report: _Report, run: Path, done: list[str]) -> None:
    """Each finished stage was built from the outputs beside it (its recorded inputs' settings ids)."""
    problems = lineage.lineage_problems(run)
    for subject, detail in problems:
        report.bad(subject, detail)
    compact_skeleton = run / "compact" / "skeleton.json"  # the skeleton conversion sliced, copied into the model
    if compact_skeleton.is_file() and (run / "skeleton.json").is_file() and \
            compact_skeleton.read_bytes() != (run / "skeleton.json").read_bytes():
        report.bad(str(run / "compact"), f"was sliced with another skeleton than {run / 'skeleton.json'}: redo convert "
                                         f"with --overwrite")
    unrecorded = [s for s in done if lineage.read_record(run, s) is None]
    if unrecorded:
        report.ok("stage settings", f"not recorded for {', '.join(unrecorded)} (made by an older skeleton_ds)")
    elif done and not problems:
        report.ok("stage settings", "every finished stage was built from the outputs beside it")


def verify(path: Path) -> list[Finding]:
    """Every finding about a run directory or a compact checkpoint (ok ones too)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory: pass a run directory (--output of train) or a compact checkpoint")
    report = _Report()
    if (path / "config.json").is_file() or (path / "manifest.json").is_file():
        check_compact(report, path)
    elif any((path / p).exists() for p in ("prompt", "skeleton.json", "attribution.safetensors", "checkpoints",
                                           "metrics.json", "compact")):
        check_run(report, path)
    else:
        raise UserError(f"{path} holds neither a skeleton_ds run (prompt/, skeleton.json, ...) nor a compact "
                        f"checkpoint (config.json, manifest.json)")
    return report.findings


def as_json(findings: list[Finding]) -> str:
    return json.dumps({"ok": all(f.ok for f in findings), "findings": [asdict(f) for f in findings]}, indent=2)
