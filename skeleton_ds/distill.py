"""Distillation in re-tuning: the compact model's prompt learns to answer as the full model does.

Re-tuning on hard labels alone gives one bit per example to a model whose every layer has moved. The
teacher, the full model with its stage-1 prompt, gives more: its label distribution at the answer
position, and the hidden states there (the final one, which the LM head reads, and chosen layers'
outputs, as CoFi's layer distillation matches them). The compact model keeps the base's hidden size, so
its states compare directly. The teacher's outputs are computed once per run (stage `teacher`, written
to DIR/teacher.safetensors) and read by re-tuning, so no full-model forward runs per step:

    loss = cross-entropy(labels) + kl x T^2 x KL(teacher_T || student_T) + hidden x mean MSE(states)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from skeleton_ds import checkpoint
from skeleton_ds.errors import UserError
from skeleton_ds.prompt import FINAL_STATE, layer_state

FORMAT = "skeleton_ds.teacher/1"
LOGITS = "logits"


def outputs_needed(kl: float, hidden: float, layers: tuple[int, ...]) -> list[str]:
    """The teacher tensors re-tuning reads under these weights (none: no distillation, no teacher pass)."""
    if not kl and not hidden:
        return []
    return [LOGITS] + ([FINAL_STATE] + [layer_state(layer) for layer in layers] if hidden else [])


def hidden_layers(outputs: list[str]) -> tuple[int, ...]:
    return tuple(int(name.split(".", 1)[1]) for name in outputs if name.startswith("layer."))


def loss(student_logits: torch.Tensor, student_hidden: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], *,
         kl: float, temperature: float, hidden: float) -> torch.Tensor:
    """The distillation terms for one batch (added to the label loss). `teacher` holds the batch's rows of the
    teacher tensors; `student_hidden` the student's states under the same names."""
    total = student_logits.new_zeros(())
    if kl:
        t = temperature
        total = total + kl * t * t * F.kl_div(F.log_softmax(student_logits.float() / t, -1),
                                              F.log_softmax(teacher[LOGITS].float() / t, -1),
                                              log_target=True, reduction="batchmean")
    if hidden:
        names = [name for name in teacher if name != LOGITS]
        total = total + hidden * sum(F.mse_loss(student_hidden[n].float(), teacher[n].float())
                                     for n in names) / len(names)
    return total


def write_teacher(path: Path, tensors: dict[str, torch.Tensor], settings: dict) -> None:
    checkpoint.save_tensors_atomic(path, tensors, {"format": FORMAT, "settings": json.dumps(settings),
                                                   "outputs": json.dumps(sorted(tensors))})


def read_teacher(path: Path, needed: list[str], examples: int) -> dict[str, torch.Tensor]:
    """The teacher tensors re-tuning needs, checked against what it will index them with."""
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist: re-tuning with distillation reads the teacher's outputs; run "
                        f"--stages teacher first (same --output)")
    tensors = checkpoint.load_tensors(path)
    missing = [name for name in needed if name not in tensors]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: redo --stages teacher with these --distill-* flags "
                        f"(--overwrite)")
    wrong = [name for name in needed if tensors[name].shape[0] != examples]
    if wrong:
        raise UserError(f"{path} holds {tensors[wrong[0]].shape[0]} examples, re-tuning trains on {examples}: redo "
                        f"--stages teacher with these flags (--overwrite)")
    return {name: tensors[name] for name in needed}
