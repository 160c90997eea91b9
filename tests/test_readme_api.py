"""The Python API examples run: the inference guide's whole-pipeline example, on a tiny LLaMA and the synthetic
sentiment task (only the model, task and data flags and the record's field name are substituted), then the
README's inference snippet on the checkpoint it made."""

from __future__ import annotations

import re

from conftest import DS_CONFIGS, REPO, generic_flags


def test_readme_python_api_example_runs(tiny_models, sentiment_files, tmp_path, monkeypatch, capsys):
    guide = (REPO / "docs" / "inference.md").read_text()
    block = re.search(r"#+ Python API\n\n```python\n(.*?)```", guide, re.S).group(1)
    flags = ['"--model", "minilm", "--task", "sst2", "--data-dir", "../shared/data",', '"sentence"']
    assert all(f in block for f in flags), "the README example changed: update this test's substitutions"
    tiny = [str(tiny_models["llama"]), *generic_flags(sentiment_files), "--config", str(DS_CONFIGS / "zero2.json"),
            "--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--max-steps", "2", "--align", "8"]
    code = block.replace(flags[0], f'"--model", *{tiny!r},').replace(flags[1], '"text"')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert (tmp_path / "runs" / "minilm-sst2" / "compact" / "manifest.json").is_file()
    assert "'accuracy'" in out and out.count("'label'") == 2

    snippet = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    assert "Predictor.from_checkpoint(\"runs/minilm-sst2/compact\"" in snippet
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.count("'label'") == 1
