"""Each stage is declared once (skeleton_ds.stage_specs): the table is consistent, every recipe it names
implements the Recipe interface for its stage, and the pipeline's plan, the settings records and the lineage
check read it rather than tables of their own."""

from __future__ import annotations

import dataclasses

import pytest

from skeleton_ds.config import STAGES, Config
from skeleton_ds.stage_specs import SPECS, STAGE_ORDER
from skeleton_ds.stages.recipe import Recipe, recipe_class

RESOLVED = {"keep_mode", "protect_outliers", "teacher_outputs"}  # RunSettings.resolved: derived from flags


def test_the_order_is_the_table_and_the_stages_flag():
    assert STAGE_ORDER == tuple(s.name for s in SPECS) == STAGES


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_spec_is_consistent(spec):
    earlier = STAGE_ORDER[:STAGE_ORDER.index(spec.name)]
    assert set(spec.upstream) <= set(earlier), f"{spec.name} reads a stage that runs after it"
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(spec.flags) <= fields | RESOLVED, set(spec.flags) - fields - RESOLVED
    assert set(spec.overrides) <= set(spec.flags) and set(spec.overrides.values()) <= fields
    assert set(spec.uses) <= {"base", "task", "batch"}
    inside = lambda path: any(path == o or path.startswith(o + "/") for o in spec.outputs)  # noqa: E731
    assert inside(spec.finished) and inside(spec.record.partition("#")[0])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_each_recipe_implements_the_interface_for_its_stage(spec, tmp_path):
    cls = recipe_class(spec.name)
    assert cls.stage == spec.name
    recipe = cls(Config(output=tmp_path), {"id": "planned"})
    assert isinstance(recipe, Recipe) and recipe.settings_record() == {"id": "planned"}
    assert not recipe.done()
    marker = tmp_path / spec.finished
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_bytes(b"")
    assert recipe.done()  # the spec's marker is what finishes it


def test_a_record_is_read_where_the_spec_says(tmp_path):
    import json

    from skeleton_ds import lineage

    (tmp_path / "compact").mkdir()
    record = {"stage": "convert", "values": {}, "upstream": {}, "id": "abc"}
    (tmp_path / "compact" / "config.json").write_text(json.dumps({"skeleton_ds": {"settings": record}}))
    assert lineage.read_record(tmp_path, "convert") == record
    assert lineage.read_record(tmp_path, "localize") is None  # not finished
    with pytest.raises(ValueError, match="unknown stage"):
        lineage.read_record(tmp_path, "nonsense")
