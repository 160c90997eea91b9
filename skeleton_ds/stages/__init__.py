"""Stage orchestration, the top layer: one recipe per pipeline stage and the pipeline that runs them.

    common.py         TaskModelRun (shared stage setup), read_prompt_record, subset, generic_spec
    prompt_tuning.py  stage 1 PromptTuningRecipe, stage 5 RetuneRecipe
    attribute.py      stage 2 AttributionRecipe (drives skeleton_ds.attribution)
    localize.py       stage 3 LocalizeRecipe (drives skeleton_ds.localization)
    convert.py        stage 4 ConvertRecipe (drives skeleton_ds.conversion)
    pipeline.py       run_pipeline, summarize
    reproduce.py      the results table: every task x keep x scorer control, through run_pipeline

Stages may import the algorithm modules and the shared helpers; neither of those imports a stage
(tests/test_layout.py checks it).
"""
