"""What every stage's recipe is (the interface the pipeline drives), and the base they share.

A recipe is built from the run's Config and the settings record the pipeline planned for it (None when it
runs on its own: it then computes the record from its flags and the inputs on disk). `done()` reads the
stage's finished marker (its StageSpec); `run()` does the work and writes the record into its outputs.
Which recipe runs which stage is the StageSpec's too (`recipe_class`).
"""

from __future__ import annotations

import importlib
from typing import ClassVar, Protocol, runtime_checkable

from skeleton_ds.config import Config
from skeleton_ds.stage_specs import SPEC
from skeleton_ds.stages.settings import RunSettings


@runtime_checkable
class Recipe(Protocol):
    stage: ClassVar[str]
    cfg: Config

    def done(self) -> bool: ...

    def run(self) -> object: ...


class RecipeBase:
    """The recipes' common part: the Config, the planned settings record, the finished check."""

    stage: ClassVar[str] = ""

    def __init__(self, cfg: Config, planned: dict | None = None):
        self.cfg = cfg
        self.planned = planned

    def done(self) -> bool:
        return (self.cfg.output / SPEC[self.stage].finished).is_file()

    def settings_record(self) -> dict:
        """The record this stage writes: the one the pipeline planned, or, run on its own, the one its flags
        and the inputs on disk give."""
        if self.planned is None:
            self.planned = RunSettings(self.cfg).on_disk(self.stage)
        return self.planned


def recipe_class(stage: str) -> type[Recipe]:
    """The recipe class the stage's StageSpec names."""
    module, _, name = SPEC[stage].recipe.partition(":")
    return getattr(importlib.import_module(module), name)
