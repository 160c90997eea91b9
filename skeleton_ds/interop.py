"""Export a trained prompt as a PEFT prompt-tuning adapter, so plain PEFT users can load it:

    skeleton-ds export-peft --prompt DIR/prompt --output DIR/peft
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "DIR/peft")

Decoders export as task type CAUSAL_LM: the label is the argmax over the verbalizer tokens of the
logits at the last position. Encoders export as FEATURE_EXTRACTION: the MLM verbalizer is read at
the [MASK] position (shifted by the prompt length), and a trained head (head.safetensors, copied
alongside) reads the mean of the text positions' states. `readout.json` records which, and the
label-token ids. PEFT counts positions from 0 over prompt, padding and text alike, so decoders agree
with skeleton_ds exactly on unpadded inputs (skeleton_ds skips left padding when counting).

`readout.json` also carries `input_template`: format it with an example's fields and tokenize the text as
one string, as any PEFT or transformers user does, and the ids are the ones skeleton_ds trained and
evaluates on (`data.encode`), so the adapter predicts what `skeleton-ds infer` predicts.
"""

from __future__ import annotations

from pathlib import Path

from skeleton_ds import checkpoint, model_card
from skeleton_ds.data import input_template
from skeleton_ds.errors import UserError
from skeleton_ds.prompt import read_task_record


LABEL_POSITION = {
    "lm": "last: the LM logits of the label_token_ids at the last position",
    "mlm": "mask: the MLM logits of the label_token_ids at the mask token (PEFT's outputs put the "
           "num_virtual_tokens first, so add that to the mask's index in input_ids)",
    "head": "head: head.safetensors applied to the mean of the text positions' last hidden states "
            "(those after the num_virtual_tokens)",
}
"""Where a PEFT user reads the label, by readout (readout.json's label_position)."""


def export_peft(prompt_dir: Path, out: Path, *, overwrite: bool = False) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    if not (prompt_dir / "prompt.safetensors").is_file():
        raise UserError(f"{prompt_dir} has no prompt.safetensors: point --prompt at a stage-1 (or retune) output")
    record = read_task_record(prompt_dir)
    tensors = checkpoint.load_tensors(prompt_dir / "prompt.safetensors")
    config = AutoConfig.from_pretrained(record["model_path"])
    prompt = tensors["prompt"]
    adapter_config = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM" if record["readout"] == "lm" else "FEATURE_EXTRACTION",
        "num_virtual_tokens": prompt.shape[0], "token_dim": prompt.shape[1], "num_transformer_submodules": 1,
        "num_attention_heads": config.num_attention_heads, "num_layers": config.num_hidden_layers,
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None, "base_model_name_or_path": record["model_path"], "revision": record.get("revision"),
        "inference_mode": True, "auto_mapping": None,
    }
    readout = {k: record[k] for k in ("task", "readout", "fields", "label_names", "label_token_ids", "template",
                                      "max_length", "encoding")}
    mask = AutoTokenizer.from_pretrained(record["model_path"]).mask_token if record["readout"] == "mlm" else None
    readout |= {"input_template": input_template(record["template"], record["readout"], mask),
                "label_position": LABEL_POSITION[record["readout"]]}
    with checkpoint.atomic_dir(out, overwrite=overwrite) as staging:
        checkpoint.write_json(staging / "adapter_config.json", adapter_config)
        checkpoint.save_tensors(staging / "adapter_model.safetensors", {"prompt_embeddings": prompt}, {"format": "pt"})
        checkpoint.write_json(staging / "readout.json", readout)
        head = {k: v for k, v in tensors.items() if k.startswith("head.")}
        if head:
            checkpoint.save_tensors(staging / "head.safetensors", head, {"format": "pt"})
        summary = prompt_dir / "metrics.json"  # the dev metrics measured when the prompt was trained
        metrics = checkpoint.read_json(summary, "prompt metrics").get("metrics") if summary.is_file() else None
        (staging / model_card.CARD).write_text(model_card.peft_card(record, metrics, adapter_config,
                                                                    model_card.made_by(), readout))
    return out
