"""Runs the requested stages in order; a stage whose output is complete is skipped (--overwrite redoes it)."""

from __future__ import annotations

import os

from skeleton_ds.attribution import AttributionRecipe
from skeleton_ds.config import STAGES, Config
from skeleton_ds.localization import LocalizeRecipe
from skeleton_ds.recipe import PromptTuningRecipe

RECIPES = {"prompt": PromptTuningRecipe, "attribute": AttributionRecipe, "localize": LocalizeRecipe}
assert tuple(RECIPES) == STAGES


def run_pipeline(cfg: Config) -> None:
    for stage in STAGES:
        if stage not in cfg.stages:
            continue
        recipe = RECIPES[stage](cfg)
        if recipe.done() and not cfg.overwrite:
            if os.environ.get("RANK", "0") == "0":
                print(f"skeleton_ds: stage {stage} is complete in {cfg.output}, skipping (--overwrite redoes it)")
            continue
        recipe.run()
