"""Bad input: one `error:` line saying what to fix, exit status 2, and no finished-looking output."""

from __future__ import annotations

import json
import subprocess
import sys


from conftest import DS_CONFIGS, REPO, generic_flags
from skeleton_ds.cli import run_command, train


def _run(argv, capsys) -> tuple[int, str]:
    code = run_command(train, argv)
    return code, capsys.readouterr().err


def _base(model, out, config=DS_CONFIGS / "zero2.json"):
    return ["--model", str(model), "--config", str(config), "--output", str(out), "--batch-size", "8",
            "--max-steps", "1", "--prompt-length", "4", "--max-length", "24"]


def _assert_clean_error(code, err, out, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (out / "prompt").exists()


def test_unknown_task(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run(_base(tiny_models["llama"], out) + ["--task", "sst3"], capsys)
    _assert_clean_error(code, err, out, "sst3", "sst2")


def test_missing_data_files(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "data").mkdir()
    code, err = _run(_base(tiny_models["llama"], out) + ["--task", "sst2", "--data-dir", str(tmp_path / "data")],
                     capsys)
    _assert_clean_error(code, err, out, "SST-2")


def test_label_outside_label_set(tiny_models, sentiment_files, tmp_path, capsys):
    out = tmp_path / "run"
    bad = tmp_path / "bad.csv"
    bad.write_text(sentiment_files[0].read_text() + "a good movie,maybe\n")
    flags = generic_flags((bad, sentiment_files[1]))
    code, err = _run(_base(tiny_models["llama"], out) + flags, capsys)
    _assert_clean_error(code, err, out, "maybe", str(bad))


def test_empty_split(tiny_models, sentiment_files, tmp_path, capsys):
    out = tmp_path / "run"
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    code, err = _run(_base(tiny_models["llama"], out) + generic_flags((sentiment_files[0], empty)), capsys)
    _assert_clean_error(code, err, out, str(empty))


def test_prompt_plus_length_beyond_context(tiny_models, sentiment_files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _base(tiny_models["bert-head"], out) + generic_flags(sentiment_files) + ["--prompt-length", "90"]
    code, err = _run(argv, capsys)
    _assert_clean_error(code, err, out, "--prompt-length 90", "context of 96")


def test_ds_config_not_json(tiny_models, sentiment_files, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "broken.json"
    config.write_text('{"train_batch_size": 8,}')
    code, err = _run(_base(tiny_models["llama"], out, config) + generic_flags(sentiment_files), capsys)
    _assert_clean_error(code, err, out, "not valid JSON", "line 1")


def test_ds_config_inconsistent_with_world_size(tiny_models, sentiment_files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    config = tmp_path / "fixed.json"
    config.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = [a for a in _base(tiny_models["llama"], out, config) if a not in ("--batch-size", "8")]
    code, err = _run(argv + generic_flags(sentiment_files), capsys)
    _assert_clean_error(code, err, out, "world size 2")


def test_finished_stage_is_skipped_not_redone(tiny_models, sentiment_files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _base(tiny_models["bert-head"], out) + generic_flags(sentiment_files) + ["--stages", "prompt"]
    assert run_command(train, argv) == 0
    prompt = out / "prompt" / "prompt.safetensors"
    first = prompt.stat().st_mtime_ns
    capsys.readouterr()
    assert run_command(train, argv) == 0
    assert "skipping" in capsys.readouterr().out and prompt.stat().st_mtime_ns == first
    assert run_command(train, argv + ["--overwrite"]) == 0
    assert prompt.stat().st_mtime_ns != first


def test_tokenizer_without_pad_token_is_handled(tiny_models, sentiment_files, tmp_path):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_models["llama"]).pad_token is None
    assert run_command(train, _base(tiny_models["llama"], tmp_path / "run") + generic_flags(sentiment_files)) == 0


def test_console_script_reports_error_and_exit_status(tmp_path):
    """Through a real process: the message, the status, and no traceback."""
    result = subprocess.run([sys.executable, "-m", "skeleton_ds.cli", "train", "--task", "nope", "--output",
                             str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_generic_template_and_verbalizer_are_checked_before_any_work(tiny_models, sentiment_files, tmp_path, capsys):
    """Flags that describe a task it cannot run fail in Config, before the model loads or a directory appears."""
    from skeleton_ds.config import config_from_args
    from skeleton_ds.errors import UserError

    out = tmp_path / "run"
    flags = generic_flags(sentiment_files)
    for bad, needle in ((["--template", "Answer: {answer} {text}"], "with {answer} after them"),
                        (["--verbalizer", "yes,No"], "single lowercase words"),
                        (["--label-names", "neg,pos,odd"], "give one per label")):
        argv = _base(tiny_models["llama"], out) + flags + bad  # argparse keeps the last of a repeated flag
        try:
            config_from_args(argv)
        except UserError as e:
            assert needle in str(e), e
        else:
            raise AssertionError(f"{bad} was accepted")
        code, err = _run(argv, capsys)
        _assert_clean_error(code, err, out, needle)
        assert not out.exists()


def test_output_is_the_flag_everywhere_and_out_its_deprecated_alias():
    """Where a command or launch script writes is --output, as for train and reproduce; --out, the old spelling of
    convert, export-peft, bench, hostfile and the load-test scripts, is only ever declared as its alias."""
    import re

    sources = [*(REPO / "skeleton_ds").rglob("*.py"), *(REPO / "launch").glob("*.py")]
    declared = [(path.relative_to(REPO), m.group(0)) for path in sources
                for m in re.finditer(r"add_argument\(\s*((?:\"[^\"]*\",\s*)*)\"--out\"", path.read_text())]
    assert declared, "the scan found no --out alias at all: has the declaration's spelling changed?"
    assert all(flags.startswith('add_argument("--output", "--out"') for _, flags in declared), declared
    from skeleton_ds.cli import reference

    text = reference()
    flags = [line for line in text.splitlines() if re.search(r"(?<![\w-])--out [A-Z]", line)]  # --out DIR
    assert flags and all("--output" in line for line in flags), flags
    assert " ".join(text.split()).count("--out: deprecated alias)") == len(flags), "each alias says so in its help"
