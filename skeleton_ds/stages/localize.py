"""Pipeline stage 3: keep the top-scoring units of every layer (the task's skeleton).

    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR --stages localize

Reads DIR/attribution.safetensors, checks it belongs to --model, selects the kept units with
skeleton_ds.localization (--keep-mode, --ffn-keep, --head-keep, --align) and writes DIR/skeleton.json
(last, so its presence marks the stage done) with the pictures DIR/skeleton_ffn.png and
DIR/skeleton_heads.png. Needs no process group and no model weights: only the model's config.
"""

from __future__ import annotations

import os

import torch

from skeleton_ds import checkpoint
from skeleton_ds.architectures import Geometry
from skeleton_ds.attribution import read_attribution
from skeleton_ds.config import Config
from skeleton_ds.loading import resolve_model_path
from skeleton_ds.localization import Skeleton, check_scores, select, skeleton_record
from skeleton_ds.model_identity import check_identity, model_identity
from skeleton_ds.stages.recipe import RecipeBase


class LocalizeRecipe(RecipeBase):
    stage = "localize"

    def __init__(self, cfg: Config, planned: dict | None = None):
        super().__init__(cfg, planned)
        self.source = cfg.output / "attribution.safetensors"
        self.out_file = cfg.output / "skeleton.json"

    def run(self) -> Skeleton:
        from transformers import AutoConfig

        from skeleton_ds.plots import plot_skeleton

        cfg = self.cfg
        scores, meta = read_attribution(self.source)
        path = resolve_model_path(cfg.model)
        model_config = AutoConfig.from_pretrained(path, revision=cfg.revision)
        check_identity(meta["base_model"], model_identity(cfg.model, path, model_config, cfg.revision),
                       str(self.source))
        geometry = Geometry(**meta["geometry"])
        check_scores(scores, geometry, str(self.source))
        values = self.settings_record()["values"]  # the architecture's defaults resolved once, in the record
        keep_mode, protect = values["keep_mode"], values["protect_outliers"]
        within = meta["within"] and Skeleton(ffn=meta["within"]["ffn"], heads=meta["within"]["heads"])
        skeleton = select(scores, geometry, ffn_keep=cfg.ffn_keep, head_keep=cfg.head_keep, align=cfg.align,
                          mode=keep_mode, protect=protect, within=within)
        if os.environ.get("RANK", "0") == "0":
            plot_skeleton(scores, skeleton, geometry, cfg.output / "skeleton_ffn.png",
                          cfg.output / "skeleton_heads.png")
            record = skeleton_record(skeleton, meta, keep_mode=keep_mode, ffn_keep=cfg.ffn_keep,
                                     head_keep=cfg.head_keep, align=cfg.align, protect_outliers=protect)
            record["settings"] = self.settings_record()
            checkpoint.write_json(self.out_file, record)  # last: marks done
            print(f"skeleton_ds: skeleton (FFN {skeleton.ffn_sizes()[0]}/{geometry.ffn_size} per layer"
                  f"{'' if skeleton.is_uniform() else ', sizes vary'}) -> {self.out_file}")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return skeleton
