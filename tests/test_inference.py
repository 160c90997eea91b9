"""Inference: the prompt-cache fast path equals the plain path, a compact checkpoint answers exactly
like the masked full model, tampered or wrong inputs are refused with one clear error."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_stages
from skeleton_ds import data
from skeleton_ds.cli import infer, run_command
from skeleton_ds.inference import InferenceConfig, Predictor, PromptCachedDecoder
from skeleton_ds.loading import load_backbone
from skeleton_ds.localization import load_skeleton, masked
from skeleton_ds.prompt import PromptedClassifier


def _random_items(rng: random.Random, lengths: list[int], vocab: int) -> list[data.Encoded]:
    return [data.Encoded([rng.randrange(3, vocab) for _ in range(n)], n - 1, 0) for n in lengths]


@pytest.mark.parametrize("readout", ["lm", "head"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_cache_equals_plain_path(arch, readout, tiny_models):
    backbone = load_backbone(str(tiny_models[arch]), readout="head" if readout == "head" else "verbalizer",
                             dtype=torch.float32)
    model = PromptedClassifier(backbone.model, backbone.adapter, readout, 5, 2, None if readout == "head" else [7, 9])
    torch.manual_seed(0)
    model.prompt.embedding.data.normal_(0, 0.5)
    model.eval()
    cached = PromptCachedDecoder(model)
    rng = random.Random(0)
    vocab = backbone.model.config.vocab_size
    pad = backbone.tokenizer.pad_token_id
    for lengths in ([9], [1], [3, 11, 7, 1, 11, 5, 2]):  # batch 1 and mixed lengths (left padding)
        items = _random_items(rng, lengths, vocab)
        batch = data.collate(items, pad, left_pad=True)
        args = (batch["input_ids"], batch["attention_mask"], batch["answer_index"])
        alone = data.collate(items[:1], pad, left_pad=True)
        with torch.inference_mode():
            plain, fast = model(*args), cached(*args)
            fast_alone = cached(alone["input_ids"], alone["attention_mask"], alone["answer_index"])
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
        assert torch.equal(fast.argmax(-1), plain.argmax(-1))
        torch.testing.assert_close(fast_alone, plain[:1], rtol=1e-4, atol=1e-5)  # padding changes nothing


@pytest.fixture(scope="module")
def runs(tiny_models, sentiment_files, tmp_path_factory):
    """Stages 1-4 (no re-tuning, so the compact model carries the stage-1 prompt)."""
    root = tmp_path_factory.mktemp("infer")
    return {
        "llama": run_stages(tiny_models["llama"], sentiment_files, root / "llama", "--head-keep", "0.5"),
        "qwen2": run_stages(tiny_models["qwen2"], sentiment_files, root / "qwen2", "--head-keep", "0.5",
                           "--slice-lm-head"),
        "bert-head": run_stages(tiny_models["bert-head"], sentiment_files, root / "bert-head"),
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert-head"])
def test_compact_predictor_equals_masked_full_model(arch, runs, tiny_models, sentiment_files):
    out = runs[arch]
    compact = Predictor.from_checkpoint(out / "compact", InferenceConfig(device="cpu", batch_size=8))
    # The reference masks the full model's pruned units in the forward pass; its prompt positions must be
    # recomputed under the mask too, so it runs without the prompt cache.
    full = Predictor.from_prompt(str(tiny_models[arch]), out / "prompt",
                                 InferenceConfig(device="cpu", batch_size=8, prompt_cache=False))
    examples = [ex for ex in _dev_examples(sentiment_files[1], compact)]
    items = compact.encode(examples)
    skeleton, _ = load_skeleton(out / "skeleton.json")
    adapter = full.model.adapter
    with masked(full.model.backbone, adapter, adapter.geometry(full.model.backbone.config), skeleton):
        expected = full.logits(items)
    got = compact.logits(items)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    predictions = compact.predict(examples)
    assert [p["label"] for p in predictions] == [compact.task.label_names[i] for i in expected.argmax(-1).tolist()]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in predictions)
    metrics = compact.evaluate(examples)
    assert metrics["examples"] == len(examples) and 0 <= metrics["metrics"]["accuracy"] <= 1


def _dev_examples(dev_csv, predictor):
    from skeleton_ds.tasks import Example

    rows = [line.rsplit(",", 1) for line in dev_csv.read_text().splitlines()[1:]]
    names = predictor.task.label_names
    return [Example((text,), names.index(label)) for text, label in rows]


def test_retuned_compact_checkpoint_scores_what_the_retune_stage_measured(runs, tiny_models, sentiment_files,
                                                                          tmp_path):
    """After stage 5 the compact directory carries a prompt trained on the compact model itself."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(runs["llama"], out)
    run_stages(tiny_models["llama"], sentiment_files, out, "--head-keep", "0.5", "--stages", "teacher,retune")
    retuned = json.loads((out / "retune" / "metrics.json").read_text())["metrics"]
    predictor = Predictor.from_checkpoint(out / "compact", InferenceConfig(device="cpu", batch_size=8))
    result = predictor.evaluate(_dev_examples(sentiment_files[1], predictor))
    assert result["metrics"]["accuracy"] == pytest.approx(retuned["accuracy"], abs=1e-9)
    # Its prompt belongs to the compact model: the full base model refuses it.
    with pytest.raises(Exception, match="made for base model"):
        Predictor.from_prompt(str(tiny_models["llama"]), out / "compact", InferenceConfig(device="cpu"))


def test_tampered_compact_checkpoint_is_refused(runs, tmp_path):
    import shutil

    copy = tmp_path / "compact"
    shutil.copytree(runs["llama"] / "compact", copy)
    weights = copy / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(Exception, match="model.safetensors does not match"):
        Predictor.from_checkpoint(copy, InferenceConfig(device="cpu"))


# ----------------------------------------------------------------- the CLI
def _infer(argv, capsys) -> tuple[int, str, str]:
    code = run_command(infer, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_answers_records_and_plain_text(runs, tmp_path, capsys):
    records = tmp_path / "in.jsonl"
    records.write_text('{"text": "a good movie", "label": "pos"}\n\n{"text": "an awful plot", "label": "neg"}\n')
    out_file = tmp_path / "out.jsonl"
    code, _, err = _infer(["--checkpoint", str(runs["llama"] / "compact"), "--input", str(records),
                           "--output", str(out_file), "--device", "cpu"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(lines) == 2 and all(set(p) == {"label", "probabilities"} for p in lines)
    assert set(lines[0]["probabilities"]) == {"neg", "pos"}
    assert "accuracy" in err  # labelled input: metrics on stderr

    text = tmp_path / "in.txt"
    text.write_text("a good movie\nthe plot was bad\n")
    code, stdout, err = _infer(["--checkpoint", str(runs["bert-head"] / "compact"), "--input", str(text),
                                "--device", "cpu"], capsys)
    assert code == 0, err
    assert [json.loads(line)["label"] in ("neg", "pos") for line in stdout.splitlines()] == [True, True]


def _assert_one_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(("content", "needles"), [
    ('{"sentence": "a good movie"}\n', ("no field 'text'", "text")),  # unknown task fields
    ("\n\n", ("no input records",)),  # empty input
    ('{"text": "a good movie", "label": "maybe"}\n', ("'maybe'", "neg, pos")),  # wrong label set
    ('{"text": "a good movie"\n', ("not valid JSON",)),
])
def test_cli_bad_records(content, needles, runs, tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text(content)
    out_file = tmp_path / "out.jsonl"
    code, _, err = _infer(["--checkpoint", str(runs["llama"] / "compact"), "--input", str(bad),
                           "--output", str(out_file), "--device", "cpu"], capsys)
    _assert_one_error(code, err, *needles)
    assert not out_file.exists()


def test_cli_refuses_a_directory_that_is_not_a_compact_checkpoint(runs, tiny_models, tmp_path, capsys):
    records = tmp_path / "in.txt"
    records.write_text("a good movie\n")
    code, _, err = _infer(["--checkpoint", str(tiny_models["llama"]), "--input", str(records)], capsys)
    _assert_one_error(code, err, "not a compact checkpoint", "manifest.json")
    code, _, err = _infer(["--checkpoint", str(runs["llama"] / "compact"), "--task", "sst2", "--data-dir",
                           str(tmp_path), "--device", "cpu"], capsys)
    _assert_one_error(code, err, "generic", "sst2")


def test_cli_task_with_input_is_checked_against_the_checkpoint(runs, tmp_path, capsys):
    """`infer --checkpoint DIR --task T --input -` once stopped with "give what to answer as --input FILE (or - for
    standard input), or as --task T", as if neither flag had been given. Through the real process: with --input,
    --task checks the checkpoint's task; the records are answered when it matches, and one error names both tasks
    when it does not."""
    compact = runs["llama"] / "compact"  # trained on the synthetic task 'generic'
    record = '{"text": "a good movie"}\n'

    def cli(task: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "skeleton_ds.cli", "infer", "--checkpoint", str(compact),
                               "--task", task, "--input", "-", "--device", "cpu"], input=record, cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    wrong = cli("sst2")
    assert wrong.returncode == 2, wrong.stderr
    assert wrong.stderr.splitlines() == [f"error: compact {compact} answers task 'generic', not 'sst2': drop --task "
                                         f"(the records are read as 'generic') or pass --task generic"]
    right = cli("generic")
    assert right.returncode == 0, right.stderr
    assert [json.loads(line)["label"] in ("neg", "pos") for line in right.stdout.splitlines()] == [True]
    # --data-dir reads a split: it has no meaning with --input, and alone it needs --task
    code, _, err = _infer(["--checkpoint", str(compact), "--input", "-", "--data-dir", str(tmp_path)], capsys)
    _assert_one_error(code, err, "--data-dir", "drop --data-dir")
    code, _, err = _infer(["--checkpoint", str(compact), "--data-dir", str(tmp_path)], capsys)
    _assert_one_error(code, err, "--data-dir D needs --task T")
    code, _, err = _infer(["--checkpoint", str(compact)], capsys)
    _assert_one_error(code, err, "give what to answer", "--input FILE", "--task T")


def test_cli_rejects_invalid_flag_values(runs, tmp_path, capsys):
    records = tmp_path / "in.txt"
    records.write_text("a good movie\n")
    compact = str(runs["llama"] / "compact")
    code, _, err = _infer(["--checkpoint", compact, "--input", str(records), "--quant", "3bit"], capsys)
    _assert_one_error(code, err, "--quant")
    code, _, err = _infer(["--input", str(records)], capsys)
    _assert_one_error(code, err, "--checkpoint", "--base")


def test_prompt_trained_on_inputs_encoded_otherwise_is_refused(runs, tiny_models, tmp_path, capsys):
    """A task.json without the current encoding (skeleton_ds 0.2 encoded template pieces apart) would be fed ids
    it never saw: infer, export-peft and verify refuse it, naming what to re-run."""
    import shutil

    from skeleton_ds.cli import export_peft
    from skeleton_ds.verify import verify

    run = shutil.copytree(runs["llama"], tmp_path / "run")
    prompt = run / "prompt"
    record = json.loads((prompt / "task.json").read_text())
    assert record["encoding"] == data.ENCODING
    (prompt / "task.json").write_text(json.dumps({k: v for k, v in record.items() if k != "encoding"}))
    records = tmp_path / "in.txt"
    records.write_text("a good movie\n")
    code, _, err = _infer(["--base", str(tiny_models["llama"]), "--prompt", str(prompt), "--input", str(records)],
                          capsys)
    _assert_one_error(code, err, "template pieces", "--overwrite")
    assert run_command(export_peft, ["--prompt", str(prompt), "--output", str(tmp_path / "peft")]) == 2
    assert not (tmp_path / "peft").exists()
    assert any(not f.ok and "template pieces" in f.detail for f in verify(run))
