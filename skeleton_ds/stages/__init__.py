"""Stage orchestration, the top layer: one recipe per pipeline stage and the pipeline that runs them.

    recipe.py         the Recipe interface the pipeline drives, RecipeBase, recipe_class (from the StageSpec)
    common.py         TaskModelRun (the recipe base of stages that run the model), read_prompt_record
    prompt_tuning.py  stage 1 PromptTuningRecipe, stage 5 RetuneRecipe
    attribute.py      stage 2 AttributionRecipe (drives skeleton_ds.attribution)
    localize.py       stage 3 LocalizeRecipe (drives skeleton_ds.localization)
    convert.py        stage 4 ConvertRecipe (drives skeleton_ds.conversion)
    teacher.py        TeacherRecipe: the full model's outputs that re-tuning distills from
    settings.py       the settings record each stage writes (its StageSpec's flags and shared parts)
    schedule.py       the steps of a keep schedule (iterative localization)
    pipeline.py       run_pipeline, summarize

Stages may import the algorithm modules and the shared helpers; neither of those imports a stage
(tests/test_layout.py checks it).
"""
