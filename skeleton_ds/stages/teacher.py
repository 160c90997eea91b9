"""Pipeline stage `teacher`: the full model's outputs on the training examples, for distillation in re-tuning.

    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR --stages teacher \
        --distill-kl 1 --distill-hidden 1 --distill-layers 10,20

Loads the stage-1 prompt onto the frozen base model (as attribution does), runs it once over the
training examples re-tuning will see, and writes DIR/teacher.safetensors: the label logits at the answer
position (`logits` [N, labels]) and, when hidden states are matched, the final state there (`final` [N,
hidden]) and each chosen layer's output (`layer.L`); the settings record in its metadata ties it to the
prompt and data it came from. Without --distill-* weights nothing needs computing: the file then holds
no tensors and no model is loaded. Each rank runs its shard of the examples (padded to equal batch
counts), and rank 0 writes the gathered rows in example order.

Resumable like the other stages: every --save-every batches, and when a SIGUSR1/SIGTERM asks the job to
stop, each rank writes the rows it has to DIR/checkpoints/teacher/rank<R>.safetensors; `--resume` with
the same ranks continues from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

from skeleton_ds import checkpoint, data, distill, distributed, preemption
from skeleton_ds.config import Config
from skeleton_ds.errors import UserError
from skeleton_ds.stages.common import TaskModelRun, read_prompt_record

PARTIAL_FORMAT = "skeleton_ds.teacher-partial/1"


class TeacherRecipe(TaskModelRun):
    stage = "teacher"

    def __init__(self, cfg: Config, planned: dict | None = None):
        super().__init__(cfg, planned)
        self.prompt_dir = cfg.output / "prompt"
        self.out_file = cfg.output / "teacher.safetensors"
        self.partial_dir = cfg.output / "checkpoints" / "teacher"

    def outputs(self) -> list[str]:
        return self.settings_record()["values"]["teacher_outputs"]

    def setup(self) -> None:
        cfg = self.cfg
        record = read_prompt_record(self.prompt_dir, cfg)
        if self.partial_dir.is_dir() and any(self.partial_dir.iterdir()) and not (cfg.resume or cfg.overwrite):
            raise UserError(f"{self.partial_dir} holds the rows of an unfinished teacher pass: pass --resume to "
                            f"continue it or --overwrite to start over")
        self.build_prompted_base(record, self.prompt_dir)
        self.layers = distill.hidden_layers(self.outputs())
        depth = self.backbone.adapter.geometry(self.backbone.model.config).layers
        if any(layer >= depth for layer in self.layers):
            raise UserError(f"--distill-layers {','.join(map(str, self.layers))}: the model has layers 0..{depth - 1}")

        import deepspeed

        self.engine, *_ = deepspeed.initialize(model=self.model, config=self.ds_config)

    @torch.no_grad()
    def compute(self) -> dict[str, torch.Tensor]:
        """This rank's rows of every output, over its shard of the training examples (a collective)."""
        cfg, names = self.cfg, self.outputs()
        indices, _ = data.eval_shard(len(self.train_set), self.dist.rank, self.dist.world_size)
        micro = self.ds_config["train_micro_batch_size_per_gpu"]
        starts = list(range(0, len(indices), micro))
        signature = self._signature(len(starts))
        rows, done = self._resume(signature) if cfg.resume else ({name: [] for name in names}, 0)
        self.engine.eval()
        with self.report.progress(len(starts), done, "teacher", "{examples} examples") as bar:
            for b in range(done, len(starts)):
                batch = self.collate([self.train_set[j] for j in indices[starts[b]:starts[b] + micro]])
                logits, states = self.engine.module(batch["input_ids"], batch["attention_mask"], batch["answer_index"],
                                                    hidden_layers=self.layers)
                found = states | {distill.LOGITS: logits}
                for name in names:
                    rows[name].append(found[name].float().cpu())
                bar.update(b + 1, examples=min(len(indices), starts[b] + micro))
                preemption.step_delay()
                stop = preemption.agreed_stop()
                if b + 1 < len(starts) and (stop or (b + 1) % cfg.save_every == 0):
                    self._save_partial(rows, b + 1, signature)
                if stop and b + 1 < len(starts):
                    raise preemption.Preempted(
                        f"teacher stopped on {preemption.signal_name()} after batch {b + 1}/{len(starts)}; rows in "
                        f"{self.partial_dir}: run the same command with --resume")
        return {name: torch.cat(parts) for name, parts in rows.items()}

    def gather(self, mine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's rows in example order (eval_shard gives rank r the r-th contiguous block, padded to
        equal length), cut to the real examples; on every rank."""
        out = {}
        for name, rows in mine.items():
            local = rows.to(distributed.device())
            parts = [torch.empty_like(local) for _ in range(self.dist.world_size)]
            torch.distributed.all_gather(parts, local)
            out[name] = torch.cat([p.cpu() for p in parts])[:len(self.train_set)].contiguous()
        return out

    # ----------------------------------------------------------- partial rows
    def _signature(self, batches: int) -> str:
        blob = json.dumps({"settings": self.settings_record()["id"], "batches": batches,
                           "world_size": self.dist.world_size,
                           "micro": self.ds_config["train_micro_batch_size_per_gpu"],
                           "prompt": checkpoint.sha256(self.prompt_dir / "prompt.safetensors")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _partial_file(self):
        return self.partial_dir / f"rank{self.dist.rank}.safetensors"

    def _save_partial(self, rows: dict[str, list[torch.Tensor]], batches: int, signature: str) -> None:
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.save_tensors_atomic(self._partial_file(), {n: torch.cat(p) for n, p in rows.items()},
                                       {"format": PARTIAL_FORMAT, "batches": str(batches), "signature": signature})
        torch.distributed.barrier()

    def _resume(self, signature: str) -> tuple[dict[str, list[torch.Tensor]], int]:
        path = self._partial_file()
        names = self.outputs()
        if not path.is_file():
            self.report.note("--resume: no partial teacher rows yet, starting from the beginning")
            return {name: [] for name in names}, 0
        from safetensors import safe_open

        with checkpoint.unreadable_as_user_error(path), safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != PARTIAL_FORMAT or meta.get("signature") != signature:
                raise UserError(f"{path} comes from a teacher pass with other settings (or another world size): use "
                                f"the same flags and ranks to resume, or pass --overwrite to start over")
            rows = {name: [f.get_tensor(name)] for name in names}
        batches = int(meta["batches"])
        self.report.note(f"resumed the teacher pass from {path} at batch {batches}")
        return rows, batches

    def run(self) -> None:
        if not self.outputs():  # no distillation: nothing to compute, and no model to load
            if os.environ.get("RANK", "0") == "0":
                distill.write_teacher(self.out_file, {}, self.settings_record())
            return
        self.setup()
        if self.cfg.overwrite and not self.cfg.resume and self.dist.is_main:
            shutil.rmtree(self.partial_dir, ignore_errors=True)
        torch.distributed.barrier()
        rows = self.gather(self.compute())
        if self.dist.is_main:
            distill.write_teacher(self.out_file, rows, self.settings_record())
            shutil.rmtree(self.partial_dir, ignore_errors=True)
        torch.distributed.barrier()
        self.report.note(f"teacher outputs ({', '.join(rows)}, {len(self.train_set)} examples) -> {self.out_file}")
        del self.engine, self.model, self.backbone
