"""Inputs are encoded as every other tool encodes them: on the real SmolLM2 and MiniLM tokenizers, for every
registered task and readout, `data.encode` gives the plain tokenization of the rendered template (written here
with str.format, independently of data.encode's rendering); a text that must be cut stays within
--max-length, each field keeping its start."""

from __future__ import annotations

import pytest

from conftest import SHARED_DATA
from skeleton_ds import data, packaged_models
from skeleton_ds.tasks import TASK_NAMES, Example, get_task, load_split

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not (SHARED_DATA / "SST-2" / "dev.tsv").is_file(),
                                 reason="../shared/data/SST-2 not present")]

REGISTERED = [name for name in TASK_NAMES if name != "generic"]
N = 40


@pytest.fixture(scope="module")
def tokenizers(smollm2):
    from transformers import AutoTokenizer

    return {"smollm2": AutoTokenizer.from_pretrained(smollm2),
            "minilm": AutoTokenizer.from_pretrained(packaged_models.resolve_model_path("minilm"))}


# (tokenizer, readout, decoder phrasing): the decoder reads its LM at the last token, the encoder fills a mask;
# both can carry a trained head.
CASES = [("smollm2", "lm", True), ("smollm2", "head", True), ("minilm", "mlm", False), ("minilm", "head", False)]


def _examples(task) -> list[Example]:
    """Real dev examples where ../shared/data has the task; else real SST-2 sentences in every field."""
    try:
        return load_split(task, "dev", SHARED_DATA)[:N]
    except Exception:
        sentences = [ex.texts[0] for ex in load_split(get_task("sst2"), "dev", SHARED_DATA)[:N + len(task.fields)]]
        return [Example(tuple(sentences[i + k] if f != "word" else sentences[i + k].split()[0]
                              for k, f in enumerate(task.fields)), 0) for i in range(N)]


def _plain_text(task, example: Example, tokenizer, readout: str) -> str:
    values = dict(zip(task.fields, example.texts))
    if readout == "mlm":
        return task.template.format(**values, answer=tokenizer.mask_token)
    return task.template[:task.template.index("{answer}")].rstrip().format(**values)


@pytest.mark.parametrize("name", REGISTERED)
@pytest.mark.parametrize("which,readout,decoder", CASES)
def test_encoding_is_the_plain_tokenization_of_the_rendered_text(name, which, readout, decoder, tokenizers):
    tok = tokenizers[which]
    task = get_task(name, decoder=decoder)
    examples = _examples(task)
    encoded = data.encode(task, examples, tok, max_length=512, readout=readout)
    compared = 0
    for example, enc in zip(examples, encoded):
        plain = tok(_plain_text(task, example, tok, readout))["input_ids"]
        if len(plain) > 512:
            continue
        assert enc.input_ids == plain, (name, example.texts)
        if readout == "mlm":
            assert enc.input_ids[enc.answer_index] == tok.mask_token_id
        else:
            assert enc.answer_index == len(enc.input_ids) - 1
        compared += 1
    assert compared >= N // 2


@pytest.mark.parametrize("name", REGISTERED)
@pytest.mark.parametrize("which,readout,decoder", CASES)
def test_truncation_fits_the_budget_and_keeps_each_fields_start(name, which, readout, decoder, tokenizers):
    tok = tokenizers[which]
    task = get_task(name, decoder=decoder)
    examples = _examples(task)
    template_only = len(tok(_plain_text(task, Example(("",) * len(task.fields), 0), tok, readout))["input_ids"])
    max_length = template_only + 3 * len(task.fields)  # a few tokens a field: most texts must be cut
    encoded = data.encode(task, examples, tok, max_length=max_length, readout=readout)
    cut = 0
    for example, enc in zip(examples, encoded):
        assert len(enc.input_ids) <= max_length
        assert enc.input_ids == tok(enc.text)["input_ids"]  # still the plain encoding of what was rendered
        if readout == "mlm":
            assert enc.input_ids[enc.answer_index] == tok.mask_token_id
        kept = _field_prefixes(task, enc.text, example, tok, readout)
        assert all(k >= 1 for k, value in zip(kept, example.texts) if value.strip()), (enc.text, example.texts)
        cut += kept != [len(v) for v in example.texts]
    assert cut >= N // 2


def _field_prefixes(task, text: str, example: Example, tok, readout: str) -> list[int]:
    """How many characters of each field `text` holds: it must read as the template rendered with a prefix of
    each field (a parse that backtracks, since a cut field can end in what the next literal starts with)."""
    import string

    pieces = [(literal, field) for literal, field, _, _ in string.Formatter().parse(task.template)]
    if readout != "mlm":
        upto = [f for _, f in pieces].index("answer")
        pieces = pieces[:upto] + [(pieces[upto][0].rstrip(), None)]
    values = dict(zip(task.fields, example.texts)) | {"answer": tok.mask_token or ""}

    def parse(index: int, pos: int) -> dict | None:
        if index == len(pieces):
            return {} if pos == len(text) else None
        literal, field = pieces[index]
        if not text.startswith(literal, pos):
            return None
        pos += len(literal)
        if field is None:
            return {} if pos == len(text) else None
        value = values[field]
        for n in range(len(value), -1, -1):
            if text.startswith(value[:n], pos):
                rest = parse(index + 1, pos + n)
                if rest is not None:
                    return rest | {field: n}
        return None

    kept = parse(0, 0)
    assert kept is not None, text
    return [kept[f] for f in task.fields]
