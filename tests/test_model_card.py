"""Model cards: a compact checkpoint's README.md names the task, keep ratios and accuracy that its own records
hold, before and after re-tuning, and its manifest covers it; export-peft writes one for the adapter."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_stages
from skeleton_ds import checkpoint
from skeleton_ds.model_card import CARD, METRICS, compact_card, hub_id


def _metric(value: float) -> str:
    return f"{value:.4f}"


@pytest.fixture(scope="module")
def converted(tiny_models, sentiment_files, tmp_path_factory):
    """Stages 1-4 on the tiny LLaMA-GQA (half its KV groups, a per-layer FFN) and on BERT."""
    root = tmp_path_factory.mktemp("cards")
    return {"llama": run_stages(tiny_models["llama"], sentiment_files, root / "llama", "--head-keep", "0.5",
                                "--keep-mode", "global"),
            "bert-head": run_stages(tiny_models["bert-head"], sentiment_files, root / "bert-head")}


@pytest.mark.parametrize("arch", ["llama", "bert-head"])
def test_card_names_what_the_records_hold_before_and_after_retuning(arch, converted, tiny_models, sentiment_files,
                                                                     tmp_path):
    out = tmp_path / "run"
    shutil.copytree(converted[arch], out)
    compact = out / "compact"
    card = (compact / CARD).read_text()
    skeleton = json.loads((compact / "skeleton.json").read_text())
    task = json.loads((compact / "task.json").read_text())
    metrics = json.loads((compact / METRICS).read_text())
    full = json.loads((out / "prompt" / "metrics.json").read_text())["metrics"]
    assert metrics["full_model"] == full and metrics["before_retune"] is None and metrics["after_retune"] is None
    assert card.startswith("---\nlibrary_name: \"transformers\"\n")
    assert f"# {task['task']}: a Skeleton compact model of" in card
    assert f"| FFN keep | {skeleton['ffn_keep']} ({skeleton['keep_mode']} allocation" in card
    assert f"| attention head keep | {skeleton['head_keep']}: {sum(skeleton['head_counts'])} of" in card
    assert f"| the full base model, prompt-tuned | {_metric(full['accuracy'])} |" in card
    assert "| this model, prompt re-tuned on it | not measured |" in card
    counts = json.loads((compact / "config.json").read_text())["skeleton_ds"]["parameters"]
    assert counts == {k: v for k, v in json.loads((out / "conversion.json").read_text()).items() if k in counts}
    assert f"{counts['parameters_kept']:,} computed" in card
    checkpoint.verify_manifest(compact)
    assert {CARD, METRICS} <= set(json.loads((compact / "manifest.json").read_text())["files"])

    run_stages(tiny_models[arch], sentiment_files, out, *(["--head-keep", "0.5", "--keep-mode", "global"]
                                                          if arch == "llama" else []), "--stages", "teacher,retune")
    retune = json.loads((out / "retune" / "metrics.json").read_text())
    metrics = json.loads((compact / METRICS).read_text())
    assert metrics["before_retune"] == retune["before_retune"] and metrics["after_retune"] == retune["metrics"]
    assert metrics["task"]["data_sha256"]["train"] == checkpoint.sha256(sentiment_files[0])
    card = (compact / CARD).read_text()
    assert card == compact_card(compact)  # rendered from the records now in the directory
    before, after = metrics["before_retune"]["accuracy"], metrics["after_retune"]["accuracy"]
    assert f"| this model with the full model's prompt (before re-tuning) | {_metric(before)} |" in card
    assert f"| this model, prompt re-tuned on it | {_metric(after)} |" in card
    assert f"train `{checkpoint.sha256(sentiment_files[0])[:12]}`" in card
    checkpoint.verify_manifest(compact)  # the card and metrics were rewritten with the prompt, then the manifest


def test_card_names_the_code_and_how_to_load(converted):
    card = (converted["llama"] / "compact" / CARD).read_text()
    assert "skeleton-ds infer --checkpoint DIR --input -" in card
    assert ("from transformers import AutoModelForCausalLM\n"
            "model = AutoModelForCausalLM.from_pretrained(\"DIR\")" in card)
    assert "## Made by\n\nskeleton_ds " in card and "code `" in card
    assert "base_model:" not in card.split("---")[1]  # a local directory is not a Hub id


def test_base_model_hub_ids():
    assert hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert hub_id("/models/llama") is None and hub_id("runs/x/compact") is None


def test_export_peft_writes_a_card(converted, tmp_path):
    from skeleton_ds.interop import export_peft

    prompt = converted["llama"] / "prompt"
    out = export_peft(prompt, tmp_path / "peft")
    card = (out / CARD).read_text()
    record = json.loads((prompt / "task.json").read_text())
    accuracy = json.loads((prompt / "metrics.json").read_text())["metrics"]["accuracy"]
    assert card.startswith("---\nlibrary_name: \"peft\"\n")
    assert f"# {record['task']}: a soft prompt for" in card
    assert f"({record['prompt_length']} virtual tokens" in card
    assert f"| {_metric(accuracy)} |" in card
    assert "PeftModel.from_pretrained" in card
