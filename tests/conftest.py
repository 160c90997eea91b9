"""Tiny models built in code (LLaMA with GQA, BERT with and without an MLM head), saved as ordinary
Hugging Face directories so tests load them through the same from_pretrained path users hit."""

from __future__ import annotations

import csv
import os
import random
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DS_CONFIGS = REPO / "ds_configs"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["good", "great", "fine", "nice", "happy"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly"]
FILLER = ["the", "movie", "was", "plot", "actor", "story", "very", "quite", "film", "scene"]
VERBALIZER = ["no", "yes"]
VOCAB = sorted(set(POSITIVE + NEGATIVE + FILLER + VERBALIZER + ["a", "?", "text", ":", "answer", "it"]))

ARCHS = ("llama", "qwen2", "bert-mlm", "bert-head", "roberta-mlm")


def _sentence(rng: random.Random, positive: bool) -> str:
    words = rng.choices(FILLER, k=rng.randint(2, 6))
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words)


def write_sentiment_csv(path: Path, n: int, seed: int) -> Path:
    """A learnable two-class task: the label is which sentiment word the sentence contains."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            positive = i % 2 == 0
            w.writerow([_sentence(rng, positive), "pos" if positive else "neg"])
    return path


_DECODER_SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=96, initializer_range=0.2)


def _save_llama(path: Path, width: int = 32) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    # Deliberately no pad token, like LLaMA's own tokenizer.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    # GQA: 4 query heads share 2 key/value heads.
    size = _DECODER_SIZE | {"hidden_size": width, "intermediate_size": 2 * width}
    config = LlamaConfig(vocab_size=len(vocab), **size, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                         tie_word_embeddings=False)
    _save(LlamaForCausalLM, config, tokenizer, path)


def _save_qwen2(path: Path) -> None:
    """Qwen2: q/k/v biases, tied embeddings, and a byte-level BPE tokenizer (trained here on the vocabulary)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(VOCAB)] * 20 + ["It was", "Answer:"], vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(path))
    tokenizer = Qwen2Tokenizer.from_pretrained(str(path))
    config = Qwen2Config(vocab_size=len(tokenizer), **_DECODER_SIZE, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id)
    _save(Qwen2ForCausalLM, config, tokenizer, path)


def _save_bert(path: Path, mlm: bool, family: str = "bert", width: int = 32) -> None:
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer, RobertaConfig, RobertaForMaskedLM

    path.mkdir(parents=True, exist_ok=True)
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + VOCAB) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(path))  # (transformers 5 ignores a vocab_file argument)
    if family == "roberta":  # the architecture under test is the model; a WordPiece vocabulary serves it
        config = RobertaConfig(vocab_size=5 + len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=98, initializer_range=0.2,
                               pad_token_id=0, bos_token_id=2, eos_token_id=3)
        _save(RobertaForMaskedLM, config, tokenizer, path)
        return
    config = BertConfig(vocab_size=5 + len(VOCAB), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=96, initializer_range=0.2)
    _save(BertForMaskedLM if mlm else BertModel, config, tokenizer, path)


def _save(cls, config, tokenizer, path: Path) -> None:
    import torch

    torch.manual_seed(0)
    model = cls(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    _save_llama(root / "llama")
    _save_qwen2(root / "qwen2")
    _save_bert(root / "bert-mlm", mlm=True)
    _save_bert(root / "bert-head", mlm=False)
    _save_bert(root / "roberta-mlm", mlm=True, family="roberta")
    return {name: root / name for name in ARCHS}


def smollm2_gguf() -> Path:
    from skeleton_ds import packaged_models

    spec = packaged_models.PACKAGED["smollm2-135m"]
    return packaged_models._package_folder(spec) / spec.gguf_file


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The packaged SmolLM2-135M, converted once per test session into a fresh cache (so the suite
    exercises the conversion); subprocesses find it through the inherited SKELETON_DS_CACHE."""
    from skeleton_ds import packaged_models

    os.environ["SKELETON_DS_CACHE"] = str(tmp_path_factory.mktemp("skeleton-ds-cache"))
    return Path(packaged_models.resolve_model_path("smollm2-135m"))


@pytest.fixture(scope="session")
def wide_models(tmp_path_factory) -> dict[str, Path]:
    """LLaMA-GQA and BERT 64 wide: bitsandbytes' CPU NF4 kernels quantize in blocks of 64 input features."""
    root = tmp_path_factory.mktemp("wide")
    _save_llama(root / "llama", width=64)
    _save_bert(root / "bert-head", mlm=False, width=64)
    return {"llama": root / "llama", "bert-head": root / "bert-head"}


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def max_abs(tensors: dict) -> float:
    """The scale a difference is read against: the largest absolute value in a state dict."""
    return max(v.abs().max().item() for v in tensors.values())


@pytest.fixture
def measured(request) -> dict:
    """Figures a test measured (`measured["accuracy"] = ...`). skeleton_ds/experiments/measured.py runs the tests with
    SKELETON_DS_MEASURED set to a folder and builds docs/results/measured.json from what they keep there; in an
    ordinary run nothing is written."""
    figures: dict = {}
    yield figures
    folder = os.environ.get("SKELETON_DS_MEASURED")
    if folder and figures:
        from skeleton_ds.checkpoint import write_json

        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
        write_json(Path(folder) / f"{name}.json", {"test": request.node.nodeid, "figures": figures})


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return write_sentiment_csv(root / "train.csv", 96, seed=1), write_sentiment_csv(root / "dev.csv", 40, seed=2)


def generic_flags(files: tuple[Path, Path]) -> list[str]:
    train, dev = files
    return ["--task", "generic", "--train-file", str(train), "--dev-file", str(dev), "--text-columns", "text",
            "--label-names", "neg,pos", "--verbalizer", ",".join(VERBALIZER), "--template", "{text} ? {answer}"]


def run_stages(model_dir, files, out, *extra):
    """Stages 1-4 on a tiny model with the sentiment task, in process (no re-tuning, so the compact
    model carries the stage-1 prompt); flags in `extra` win over these defaults."""
    from skeleton_ds.config import config_from_args
    from skeleton_ds.stages.pipeline import run_pipeline

    argv = ["--model", str(model_dir), "--config", str(DS_CONFIGS / "zero2.json"), "--output", str(out),
            "--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--lr", "0.1", "--seed", "3",
            "--max-steps", "4", "--align", "8", "--ffn-keep", "0.5", "--stages", "prompt,attribute,localize,convert",
            *generic_flags(files), *extra]
    run_pipeline(config_from_args(argv))
    return out
