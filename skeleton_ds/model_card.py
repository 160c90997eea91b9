"""Model cards: a README.md in Hugging Face model-card form beside every compact checkpoint and PEFT export.

A directory someone finds on a shared disk or the Hub must say what it is without the run that made it. The
card is rendered only from the JSON records in the same directory (config.json's skeleton_ds block,
skeleton.json, task.json, metrics.json), so it can never claim what those records do not hold, and it is
re-rendered whenever they change (conversion, then re-tuning).
"""

from __future__ import annotations

import json
from pathlib import Path

from skeleton_ds.tables import markdown_table
from skeleton_ds import checkpoint, packaged_models

CARD = "README.md"
METRICS = "metrics.json"
"""In a compact checkpoint: dev metrics of the prompt-tuned full model and of this model before and after
re-tuning, with the data they were measured on (skeleton_ds.model_card.compact_metrics)."""


def hub_id(name: str) -> str | None:
    """The Hub id a base model name stands for: itself when it looks like one, a packaged alias's original."""
    if name in packaged_models.PACKAGED:
        return packaged_models.PACKAGED[name].hub_id
    looks_like_hub = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()
    return name if looks_like_hub else None


def compact_metrics(*, full: dict | None, before: dict | None, after: dict | None, task: dict | None,
                    made_by: dict) -> dict:
    """The compact checkpoint's metrics.json record (None: not measured yet, e.g. before re-tuning)."""
    return {"format": "skeleton_ds.compact_metrics/1", "full_model": full, "before_retune": before,
            "after_retune": after, "task": task, "made_by": made_by}


def task_data(summary: dict | None) -> dict | None:
    """The task and data a stage's metrics.json summary was measured on: name, data sha256, example counts."""
    if not summary:
        return None
    task = ((summary.get("settings") or {}).get("values") or {}).get("task") or {}
    return {"name": summary.get("task"), "data_sha256": task.get("data_sha256"),
            "train_examples": summary.get("train_examples"), "dev_examples": summary.get("dev_examples")}


def _metric_names(*rows: dict | None) -> list[str]:
    names = {k for row in rows if row for k, v in row.items() if isinstance(v, (int, float))}
    return sorted(names, key=lambda k: (k == "loss", k != "accuracy", k))  # accuracy first, loss last


def _cell(row: dict | None, name: str) -> str:
    return f"{row[name]:.4f}" if row and isinstance(row.get(name), (int, float)) else "not measured"


def _front_matter(fields: dict) -> str:
    """YAML front matter from plain values (strings quoted as JSON, which YAML reads)."""
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {json.dumps(v)}" for v in value]
        elif value is not None:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---", ""])


def license_id(name: str) -> str | None:
    """The upstream licence of a packaged alias (the only bases whose licence we know)."""
    spec = packaged_models.PACKAGED.get(name)
    return spec.license if spec else None


def _base_lines(base: dict) -> list[str]:
    name = base.get("name_or_path") or base.get("name", "?")
    lines = [f"| base model | `{name}` (revision {base.get('revision') or 'not recorded'}, config sha256 "
             f"`{str(base.get('config_sha256', '?'))[:12]}`) |"]
    spec = packaged_models.PACKAGED.get(name)
    if base.get("weights_sha256"):
        gguf = f" ({spec.gguf_file})" if spec and spec.gguf_file else ""
        lines.append(f"| base weights | dequantized from a 4-bit GGUF{gguf}, sha256 `{base['weights_sha256'][:12]}`: "
                     f"close to, not equal to, the original weights |")
    if spec:
        lines.append(f"| licence | the base model's: {spec.license} (upstream `{spec.hub_id}`) |")
    return lines


def _task_lines(task: dict, metrics_task: dict | None) -> list[str]:
    lines = [f"| task | `{task['task']}`: labels {', '.join(task['label_names'])}; template "
             f"`{json.dumps(task['template'])[1:-1]}`; readout {task['readout']} |"]
    data = (metrics_task or {}).get("data_sha256")
    if data:
        counts = {split: (metrics_task or {}).get(f"{split}_examples") for split in ("train", "dev")}
        lines.append("| data (sha256; examples) | " + "; ".join(
            f"{split} `{str(h)[:12]}`" + (f" ({counts[split]} examples)" if counts.get(split) else "")
            for split, h in sorted(data.items(), key=lambda item: item[0] != "train")) + " |")
    return lines


def compact_card(directory: Path) -> str:
    """The card of a compact checkpoint, from its own records."""
    directory = Path(directory)
    config = checkpoint.read_json(directory / "config.json", "compact model config")
    block = config.get("skeleton_ds", {})
    skeleton = checkpoint.read_json(directory / "skeleton.json", "skeleton")
    task = checkpoint.read_json(directory / "task.json", "task record") if (directory / "task.json").is_file() else None
    metrics = checkpoint.read_json(directory / METRICS, "compact metrics") if (directory / METRICS).is_file() else {}
    base = block.get("base_model", {})
    base_name = base.get("name_or_path") or base.get("name", "")
    task_name = task["task"] if task else skeleton.get("task", "?")
    counts = block.get("parameters", {})
    sizes, heads = skeleton["ffn_sizes"], skeleton["head_counts"]
    geometry = skeleton.get("geometry", {})
    made = metrics.get("made_by") or {}

    front = _front_matter({"library_name": "transformers", "license": license_id(base_name),
                           "base_model": hub_id(base_name),
                           "pipeline_tag": "text-classification",
                           "tags": ["skeleton-ds", "pruned", "prompt-tuning", f"task:{task_name}"]})
    lines = [front, f"# {task_name}: a Skeleton compact model of {base_name}", "",
             f"This is `{base_name}` cut down to the FFN neurons and attention head groups that the task `{task_name}` "
             "needs, found by activation x gradient attribution ([Skeleton](https://arxiv.org/abs/2404.11916)), "
             "with a soft prompt trained for the task. The weights are a standard checkpoint; the prompt is "
             "`prompt.safetensors` beside them.", "", *markdown_table(["", ""]), *_base_lines(base)]
    if task:
        lines += _task_lines(task, metrics.get("task"))
    ffn_total = geometry.get("ffn_size", max(sizes)) * len(sizes)
    lines += [f"| FFN keep | {skeleton['ffn_keep']} ({skeleton['keep_mode']} allocation, protect outliers "
              f"{skeleton.get('protect_outliers', 0)}): {sum(sizes)} of {ffn_total} neurons, per layer "
              f"{min(sizes)}..{max(sizes)} |",
              f"| attention head keep | {skeleton['head_keep']}: {sum(heads)} of "
              f"{geometry.get('kv_heads', max(heads)) * len(heads)} KV groups |",
              f"| scorer | {skeleton.get('attribution', {}).get('scorer', '?')} on "
              f"{skeleton.get('attribution', {}).get('examples', '?')} examples |",
              f"| bias compensation | {block.get('compensate', 'none')} |"]
    if counts:
        lines.append(f"| parameters | {counts['parameters_kept']:,} computed (each layer at its own width), "
                     f"{counts['parameters_compact']:,} stored, of {counts['parameters_full']:,} in the base |")
    full, before, after = (metrics.get(k) for k in ("full_model", "before_retune", "after_retune"))
    names = _metric_names(full, before, after)
    lines += ["", "## Dev metrics", ""]
    if names:
        lines += [*markdown_table(["model", *names]),
                  "| the full base model, prompt-tuned | " + " | ".join(_cell(full, n) for n in names) + " |",
                  "| this model with the full model's prompt (before re-tuning) | "
                  + " | ".join(_cell(before, n) for n in names) + " |",
                  "| this model, prompt re-tuned on it | " + " | ".join(_cell(after, n) for n in names) + " |"]
    else:
        lines.append("Not measured: no metrics.json was written with this model.")
    architecture = (config.get("architectures") or [""])[0]
    auto = next((f"AutoModel{suffix}" for suffix in ("ForCausalLM", "ForMaskedLM") if architecture.endswith(suffix)),
                "AutoModel")
    lines += ["", "## How to load it", "", "`DIR` is this directory. With skeleton_ds (the prompt, the label readout "
              "and each layer at its own width):", "", "```bash",
              "skeleton-ds infer --checkpoint DIR --input -   # text lines or JSON Lines in, labels out", "```", "",
              "With plain transformers (no custom code; layers a per-layer "
              "skeleton keeps narrower are zero-padded to the widest, so this computes at the padded width):", "",
              "```python", f"from transformers import {auto}", f"model = {auto}.from_pretrained(\"DIR\")",
              "```", "", "## Made by", "",
              f"skeleton_ds {made.get('version', '?')}, code `{made.get('code_version', '?')}`, "
              f"{str(made.get('date', '?'))[:10]}: `{made.get('command', '?')}`.", ""]
    return "\n".join(lines)


def write_compact_card(directory: Path) -> None:
    with checkpoint.atomic_file(Path(directory) / CARD) as tmp:
        Path(tmp).write_text(compact_card(directory))


def peft_card(prompt_record: dict, metrics: dict | None, adapter_config: dict, made_by: dict, readout: dict) -> str:
    """The card of an export-peft directory: a PEFT prompt-tuning adapter for the full base model."""
    base = adapter_config["base_model_name_or_path"]
    task = prompt_record["task"]
    names = _metric_names(metrics)
    lines = [_front_matter({"library_name": "peft", "base_model": hub_id(prompt_record.get("model", base)) or None,
                            "pipeline_tag": "text-classification",
                            "tags": ["skeleton-ds", "prompt-tuning", f"task:{task}"]}),
             f"# {task}: a soft prompt for {prompt_record.get('model', base)}", "",
             f"A PEFT prompt-tuning adapter ({adapter_config['num_virtual_tokens']} virtual tokens of width "
             f"{adapter_config['token_dim']}) exported by skeleton_ds from a prompt it trained on the frozen "
             "base model.",
             "", *markdown_table(["", ""]), *_base_lines(prompt_record.get("base_model") or {"name": base}),
             *_task_lines(prompt_record, None),
             f"| label tokens | {prompt_record.get('label_token_ids')} (`readout.json`) |"]
    if names:
        lines += ["", "## Dev metrics (as measured when the prompt was trained)", "",
                  "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
                  "| " + " | ".join(_cell(metrics, n) for n in names) + " |"]
    fields = ", ".join(f'{f}="..."' for f in readout["fields"])
    lines += ["", "## How to load it", "",
              f"Format `readout.json`'s `input_template` with an example's fields and tokenize the text as one string "
              f"(inputs were encoded that way in training: `{readout['encoding']}`, at most {readout['max_length']} "
              f"tokens); the label is read at {readout['label_position']}.", ""]
    if readout["readout"] == "lm":
        lines += ["```python", "import json", "import torch", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'readout = json.load(open("DIR/readout.json"))',
                  f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
                  f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "DIR").eval()',
                  f'text = readout["input_template"].format({fields})', "with torch.no_grad():",
                  '    logits = model(**tokenizer(text, return_tensors="pt"))'
                  '.logits[0, -1, readout["label_token_ids"]]',
                  'print(readout["label_names"][int(logits.argmax())])', "```", ""]
    else:
        auto = "AutoModelForMaskedLM" if readout["readout"] == "mlm" else "AutoModel"
        lines += ["```python", "from peft import PeftModel", f"from transformers import {auto}",
                  f"model = PeftModel.from_pretrained({auto}.from_pretrained(\"{base}\"), \"DIR\")", "```", ""]
    lines += ["## Made by", "", f"skeleton_ds {made_by.get('version', '?')}, "
              f"code `{made_by.get('code_version', '?')}`, "
              f"{str(made_by.get('date', '?'))[:10]}: `{made_by.get('command', '?')}`.", ""]
    return "\n".join(lines)


def made_by(command: str | None = None) -> dict:
    """Who made an artifact: the package version, the code version, the command and the date."""
    from skeleton_ds import __version__
    from skeleton_ds.provenance import provenance

    found = provenance(command)
    return {"version": __version__, "code_version": found["code_version"], "command": found["command"],
            "date": found["date"]}
