"""Distillation in re-tuning on a tiny LLaMA: the teacher stage's outputs are the full model's with the stage-1
prompt, stored once and reused, refused when its data changed, equal on 1 rank and 2 ZeRO-3 ranks; the re-tuning
loss is cross-entropy plus the distillation terms, computed here by hand."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import DS_CONFIGS, generic_flags, write_sentiment_csv
from skeleton_ds.cli import run_command, train
from skeleton_ds.config import config_from_args
from skeleton_ds.errors import UserError
from skeleton_ds.stages.attribute import AttributionRecipe
from skeleton_ds.stages.prompt_tuning import RetuneRecipe
from test_distributed import launch

DISTILL = ("--distill-kl", "0.7", "--distill-temperature", "3", "--distill-hidden", "0.3", "--distill-layers", "0")


def _argv(model, files, out, stage=2, *extra):
    return ["--model", str(model), "--config", str(DS_CONFIGS / f"zero{stage}.json"), "--output", str(out),
            "--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--lr", "0.1", "--seed", "3",
            "--max-steps", "3", "--align", "8", "--ffn-keep", "0.5", *generic_flags(files), *extra]


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_teacher_holds_the_full_models_outputs_and_retuning_adds_the_terms(tiny_models, sentiment_files, tmp_path):
    out = tmp_path / "run"
    argv = _argv(tiny_models["llama"], sentiment_files, out, 2, *DISTILL)
    assert run_command(train, argv + ["--stages", "prompt,attribute,localize,convert,teacher"]) == 0
    teacher = load_file(str(out / "teacher.safetensors"))
    assert sorted(teacher) == ["final", "layer.0", "logits"]

    reference = AttributionRecipe(config_from_args(argv))  # the full model with the stage-1 prompt
    reference.setup()
    items = list(range(8))
    batch = reference.collate([reference.train_set[i] for i in items])
    with torch.no_grad():
        logits, states = reference.model(batch["input_ids"], batch["attention_mask"], batch["answer_index"],
                                         hidden_layers=(0,))
    assert teacher["logits"].shape[0] == len(reference.train_set) == 96
    torch.testing.assert_close(teacher["logits"][:8], logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(teacher["final"][:8], states["final"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(teacher["layer.0"][:8], states["layer.0"], rtol=1e-5, atol=1e-6)

    retune = RetuneRecipe(config_from_args(argv + ["--stages", "retune"]))
    retune.setup()
    student = retune.collate([retune.train_set[i] for i in items])
    got = retune.train_loss(items)
    s_logits, s_states = retune.model(student["input_ids"], student["attention_mask"], student["answer_index"],
                                      hidden_layers=(0,))
    t = 3.0  # --distill-temperature (not the default 2, so the test sees the flag)
    p_teacher = F.softmax(teacher["logits"][:8] / t, -1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(s_logits / t, -1))).sum(-1).mean()
    mse = (((s_states["final"] - teacher["final"][:8]) ** 2).mean()
           + ((s_states["layer.0"] - teacher["layer.0"][:8]) ** 2).mean())
    expected = F.cross_entropy(s_logits, student["labels"]) + 0.7 * t * t * kl + 0.3 * mse / 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (0.7 * t * t * kl + 0.3 * mse / 2).item() > 1e-4  # the terms are there, not zero


def test_teacher_is_stored_once_reused_and_refused_when_its_data_changed(tiny_models, tmp_path, capsys):
    train_file, dev_file = (write_sentiment_csv(tmp_path / "train.csv", 48, 1),
                            write_sentiment_csv(tmp_path / "dev.csv", 16, 2))
    out = tmp_path / "run"
    argv = _argv(tiny_models["llama"], (train_file, dev_file), out, 2, *DISTILL)
    assert run_command(train, argv) == 0
    made = (out / "teacher.safetensors").stat().st_mtime_ns
    first = (out / "retune" / "metrics.json").stat().st_mtime_ns
    # Another KL weight: re-tuning is redone, the teacher (whose outputs do not depend on it) is reused.
    heavier = [a if a != "0.7" else "2.0" for a in argv]
    assert run_command(train, heavier) == 2 and "retune: distill_kl 0.7 -> 2.0" in capsys.readouterr().err
    assert run_command(train, heavier + ["--overwrite"]) == 0
    assert "stage teacher is complete" in capsys.readouterr().out
    assert (out / "teacher.safetensors").stat().st_mtime_ns == made
    assert (out / "retune" / "metrics.json").stat().st_mtime_ns != first
    # Its data changed: the teacher is refused, naming the difference.
    write_sentiment_csv(train_file, 48, 7)
    assert run_command(train, heavier + ["--stages", "teacher"]) == 2
    assert "teacher: task.data_sha256.train" in capsys.readouterr().err
    # Distilling needs the teacher's outputs: without them re-tuning says which stage to run.
    (out / "teacher.safetensors").unlink()
    assert run_command(train, heavier + ["--stages", "retune", "--overwrite"]) == 2
    assert "--stages teacher" in capsys.readouterr().err


def test_without_distillation_the_teacher_stage_loads_nothing_and_writes_an_empty_record(tiny_models, sentiment_files,
                                                                                        tmp_path):
    out = tmp_path / "run"
    off = ("--distill-kl", "0", "--distill-hidden", "0")  # decoders distill by default
    assert run_command(train, _argv(tiny_models["llama"], sentiment_files, out, 2, *off, "--stages",
                                    "prompt,teacher")) == 0
    assert load_file(str(out / "teacher.safetensors")) == {}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert-mlm", "roberta-mlm"])
def test_the_architecture_decides_the_default_distillation(arch, tiny_models, sentiment_files, tmp_path):
    """Decoders re-tune distilled (label KL + final hidden state, docs/results/study_keep.md), encoders on labels
    alone; the default and the same weights named explicitly are the same run, and --distill-layers without a
    hidden weight is refused where the architecture gives none."""
    from skeleton_ds.stages.settings import RunSettings

    decoder = arch in ("llama", "qwen2")
    settings = RunSettings(config_from_args(_argv(tiny_models[arch], sentiment_files, tmp_path / "a")))
    values = settings.values("retune")
    assert (values["distill_kl"], values["distill_hidden"]) == ((1.0, 1.0) if decoder else (0.0, 0.0))
    assert settings.values("teacher")["teacher_outputs"] == (["logits", "final"] if decoder else [])
    same = ("--distill-kl", "1", "--distill-hidden", "1") if decoder else ("--distill-kl", "0")
    named = RunSettings(config_from_args(_argv(tiny_models[arch], sentiment_files, tmp_path / "b", 2, *same)))
    assert named.values("retune") == values
    layers = RunSettings(config_from_args(_argv(tiny_models[arch], sentiment_files, tmp_path / "c", 2,
                                                "--distill-layers", "0")))
    if decoder:
        assert layers.values("teacher")["teacher_outputs"] == ["logits", "final", "layer.0"]
    else:
        with pytest.raises(UserError, match="--distill-hidden"):
            layers.values("teacher")


@pytest.mark.multirank
def test_teacher_on_two_zero3_ranks_equals_one_rank(tiny_models, sentiment_files, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    model = tiny_models["llama"]
    _ok(launch(0, _argv(model, sentiment_files, one, 2, *DISTILL, "--stages", "prompt,teacher")))
    two.mkdir()
    shutil.copytree(one / "prompt", two / "prompt")
    # 95 examples: the last rank's shard is padded, and the padding must not reach the file
    _ok(launch(2, _argv(model, sentiment_files, two, 3, *DISTILL, "--stages", "teacher", "--max-train-examples", "95")))
    _ok(launch(0, _argv(model, sentiment_files, one, 2, *DISTILL, "--stages", "teacher", "--max-train-examples", "95",
                        "--overwrite")))
    a, b = load_file(str(one / "teacher.safetensors")), load_file(str(two / "teacher.safetensors"))
    assert a.keys() == b.keys() and a["logits"].shape[0] == 95
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert-head"])
def test_the_final_state_is_the_vector_the_label_is_read_from(arch, tiny_models, sentiment_files, tmp_path):
    """The teacher's `final` is what the readout reads: the LM head's label rows (decoder) or the trained head
    (encoder, mean-pooled) applied to it give the teacher's logits."""
    import json

    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert run_command(train, _argv(tiny_models[arch], sentiment_files, out, 2, *DISTILL,
                                    "--stages", "prompt,teacher")) == 0
    teacher = load_file(str(out / "teacher.safetensors"))
    if arch == "llama":
        ids = json.loads((out / "prompt" / "task.json").read_text())["label_token_ids"]
        rows = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).get_output_embeddings().weight[ids].detach()
        read = teacher["final"] @ rows.T
    else:
        head = load_file(str(out / "prompt" / "prompt.safetensors"))
        read = teacher["final"] @ head["head.weight"].T + head["head.bias"]
    torch.testing.assert_close(read, teacher["logits"], rtol=1e-4, atol=1e-5)
