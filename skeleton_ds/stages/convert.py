"""Pipeline stage 4: the compact model DIR/compact, converted from the base checkpoint and DIR/skeleton.json.

    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR --stages convert
    skeleton-ds convert --base M --skeleton DIR/skeleton.json --prompt DIR/prompt \\
        --output DIR/compact   # on its own

The conversion itself (streaming, slicing, padding) is skeleton_ds.conversion; this stage runs it on
rank 0 and writes DIR/conversion.json (parameter counts full vs compact).
"""

from __future__ import annotations

import torch

from skeleton_ds import checkpoint, distributed
from skeleton_ds.config import Config
from skeleton_ds.conversion import convert, summary_line
from skeleton_ds.errors import UserError
from skeleton_ds.stages.recipe import RecipeBase


class ConvertRecipe(RecipeBase):
    """Stage 4 inside the pipeline: rank 0 converts from the on-disk base checkpoint (streaming,
    never holding the model) while the other ranks wait; every rank validates first so a bad input
    stops all of them with the same message."""

    stage = "convert"

    def __init__(self, cfg: Config, planned: dict | None = None):
        super().__init__(cfg, planned)
        self.out = cfg.output / "compact"

    def run(self) -> dict:
        cfg = self.cfg
        skeleton = cfg.output / "skeleton.json"
        if not skeleton.is_file():
            raise UserError(f"{skeleton} does not exist: run --stages localize first (same --output)")
        dist = distributed.init_distributed()
        failure = [None]
        summary = {}
        if dist.is_main:
            try:
                summary = convert(cfg.model, skeleton, cfg.output / "prompt", self.out, revision=cfg.revision,
                                  allow_pickle=cfg.allow_pickle, overwrite=True, slice_lm_head=cfg.slice_lm_head,
                                  compensate=cfg.compensate, scores=cfg.output / "attribution.safetensors",
                                  settings=self.settings_record())
                checkpoint.write_json(cfg.output / "conversion.json", summary | {"settings": self.settings_record()})
            except UserError as e:
                failure = [str(e)]
        torch.distributed.broadcast_object_list(failure, src=0)
        if failure[0]:
            raise UserError(failure[0])
        if dist.is_main:
            print(summary_line(summary, self.out))
        return summary
