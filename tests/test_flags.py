"""Every flag of `skeleton-ds train` does what it says: its parser default is its Config default, and each one, set to
a value other than its default on a tiny LLaMA, shows its effect where it acts (the model, the data, the optimizer
and its schedule, the scores, the skeleton, the compact model, re-tuning). A Config field with neither a case here
nor a named test elsewhere fails the coverage test, so a new flag cannot be added without showing that it acts
(one, --weight-decay, was once only recorded)."""

from __future__ import annotations

import ast
import json
import shutil
from dataclasses import fields

import pytest
import torch

from conftest import DS_CONFIGS, REPO, generic_flags
from skeleton_ds.cli import run_command, train
from skeleton_ds.config import Config, build_parser, config_from_args
from skeleton_ds.errors import UserError
from skeleton_ds.stages.prompt_tuning import PromptTuningRecipe


def _argv(model, files, out, *extra) -> list[str]:
    return ["--model", str(model), "--config", str(DS_CONFIGS / "zero2.json"), "--output", str(out),
            "--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--seed", "3", "--align", "8",
            *generic_flags(files), *extra]


def test_each_parser_default_is_the_config_default():
    assert config_from_args([]) == Config()
    defaults = {f.name: f.default for f in fields(Config)}
    resolved_later = {action.dest for action in build_parser()._actions
                      if action.dest in defaults and action.default != defaults[action.dest]}
    assert resolved_later == {"ffn_keep"}  # None in the parser: the keep schedule's last entry, else Config's 0.3



def test_every_flag_is_generated_from_its_field():
    """One definition per setting: each Config field but the internal one is a train flag with its help text,
    and the parser knows no setting Config lacks."""
    actions = {a.dest: a for a in build_parser()._actions if a.dest not in ("help", "local_rank")}
    for f in fields(Config):
        if f.metadata.get("internal"):
            assert f.name not in actions, f.name
        else:
            assert f.name in actions and actions[f.name].help, f"{f.name}: no flag, or a flag without help"
    assert set(actions) <= {f.name for f in fields(Config)}


def test_a_setting_another_command_takes_is_the_same_definition(tmp_path, capsys):
    """convert's --compensate is train's: the same choices, refused by the parser where no Config checks it."""
    from skeleton_ds.cli import convert

    with pytest.raises(SystemExit) as exit_:
        convert(["--base", "b", "--skeleton", "s.json", "--output", str(tmp_path / "c"), "--compensate", "median"])
    assert exit_.value.code == 2
    choices = Config.__dataclass_fields__["compensate"].metadata["choices"]
    assert f"(choose from {', '.join(map(repr, choices))})" in capsys.readouterr().err
    with pytest.raises(UserError, match="--compensate must be one of none, mean"):
        Config(compensate="median")

# ------------------------------------------------------------------ stage 1: seen after setup()
def _group_lr(recipe, group=0):
    return recipe.engine.basic_optimizer.param_groups[group]["initial_lr"]


STAGE1 = {  # flag: (extra argv, probe(recipe, default_recipe) -> bool)
    "prompt_length": (["--prompt-length", "6"], lambda r, d: r.model.prompt.embedding.shape[0] == 6),
    "prompt_init": (["--prompt-init", "text:good"],
                    lambda r, d: torch.equal(r.model.prompt.embedding[0], r.model.prompt.embedding[3])
                    and not torch.equal(r.model.prompt.embedding, d.model.prompt.embedding)),
    "readout": (["--readout", "head"], lambda r, d: r.model.head is not None and d.model.head is None),
    "epochs": (["--epochs", "2"], lambda r, d: r.total_steps == 2 * d.total_steps),
    "max_steps": (["--max-steps", "5"], lambda r, d: r.total_steps == 5 != d.total_steps),
    "lr": (["--lr", "0.07"], lambda r, d: _group_lr(r) == 0.07 != _group_lr(d)),
    "head_lr": (["--readout", "head", "--head-lr", "0.002"], lambda r, d: _group_lr(r, 1) == 0.002),
    "warmup_steps": (["--warmup-steps", "4"],
                     lambda r, d: abs(r.scheduler.get_last_lr()[0] - _group_lr(r) / 4) < 1e-12),
    "weight_decay": (["--weight-decay", "0.25"],
                     lambda r, d: r.engine.basic_optimizer.param_groups[0]["weight_decay"] == 0.25),
    "batch_size": (["--batch-size", "16"],
                   lambda r, d: r.global_batch == 16 and r.steps_per_epoch * 2 == d.steps_per_epoch),
    "max_length": (["--max-length", "8"],
                   lambda r, d: max(len(e.input_ids) for e in r.train_set) <= 8
                   < max(len(e.input_ids) for e in d.train_set)),
    "seed": (["--seed", "9"], lambda r, d: not torch.equal(r.model.prompt.embedding, d.model.prompt.embedding)),
    "max_train_examples": (["--max-train-examples", "40"], lambda r, d: len(r.train_set) == 40 < len(d.train_set)),
    "max_eval_examples": (["--max-eval-examples", "10"], lambda r, d: len(r.dev_set) == 10 < len(d.dev_set)),
    "precision": (["--precision", "bf16"], lambda r, d: r.model.prompt.embedding.dtype == torch.bfloat16
                  and d.model.prompt.embedding.dtype == torch.float32),
    "model": ([], None),  # replaced below: needs the other tiny model's path
    "revision": (["--revision", "v2"], lambda r, d: r.settings_record()["values"]["base"]["revision"] == "v2"
                 and d.settings_record()["values"]["base"]["revision"] is None),
    "ds_config": (["--config", str(DS_CONFIGS / "zero3.json")],
                  lambda r, d: r.ds_config["zero_optimization"]["stage"] == 3
                  != d.ds_config["zero_optimization"]["stage"]),
}


@pytest.fixture(scope="module")
def default_recipe(tiny_models, sentiment_files, tmp_path_factory):
    recipe = PromptTuningRecipe(config_from_args(_argv(tiny_models["llama"], sentiment_files,
                                                       tmp_path_factory.mktemp("default") / "run")))
    recipe.setup()
    return recipe


@pytest.mark.parametrize("flag", sorted(STAGE1))
def test_a_stage1_flag_acts(flag, default_recipe, tiny_models, sentiment_files, tmp_path):
    extra, probe = STAGE1[flag]
    if flag == "model":
        extra = ["--model", str(tiny_models["qwen2"])]
        probe = lambda r, d: r.backbone.model.config.model_type == "qwen2" != d.backbone.model.config.model_type  # noqa: E731
    recipe = PromptTuningRecipe(config_from_args(_argv(tiny_models["llama"], sentiment_files, tmp_path / "run",
                                                       *extra)))
    recipe.setup()
    assert probe(recipe, default_recipe), flag


# ------------------------------------------------------------------ later stages: seen in their outputs
def _attribution(run):
    from skeleton_ds.attribution import read_attribution

    return read_attribution(run / "attribution.safetensors")


def _skeleton(run):
    return json.loads((run / "skeleton.json").read_text())


def _retune(run):
    return json.loads((run / "retune" / "metrics.json").read_text())


LATER = {  # flag: (stages to redo, extra argv, probe(run, default_run) -> bool)
    "scorer": ("attribute,localize", ["--scorer", "random"],
               lambda r, d: _attribution(r)[1]["scorer"] == "random"
               and _skeleton(r)["layers"] != _skeleton(d)["layers"]),
    "attr_reduce": ("attribute", ["--attr-reduce", "max"],
                    lambda r, d: not torch.equal(_attribution(r)[0]["ffn.0"], _attribution(d)[0]["ffn.0"])),
    "attr_positions": ("attribute", ["--attr-positions", "answer"],
                       lambda r, d: not torch.equal(_attribution(r)[0]["ffn.0"], _attribution(d)[0]["ffn.0"])),
    "ig_steps": ("attribute", ["--scorer", "integrated-gradients", "--ig-steps", "2"],
                 lambda r, d: _attribution(r)[1]["steps"] == 2
                 and not torch.equal(_attribution(r)[0]["ffn.0"], _attribution(d)[0]["ffn.0"])),
    "attr_include_prompt": ("attribute", ["--attr-include-prompt"],
                            lambda r, d: not torch.equal(_attribution(r)[0]["ffn.0"], _attribution(d)[0]["ffn.0"])),
    "attr_examples": ("attribute", ["--attr-examples", "16"], lambda r, d: _attribution(r)[1]["examples"] == 16),
    "ffn_keep": ("localize", ["--ffn-keep", "0.5"],
                 lambda r, d: sum(_skeleton(r)["ffn_sizes"]) == 64 > sum(_skeleton(d)["ffn_sizes"])),
    "keep_schedule": ("attribute,localize,convert,teacher,retune", ["--keep-schedule", "0.5,0.3"],
                      lambda r, d: (r / "steps" / "ffn-0.5" / "compact").is_dir()
                      and len(json.loads((r / "metrics.json").read_text())["keep_schedule"]) == 2),
    "head_keep": ("localize", ["--head-keep", "0.5"],
                  lambda r, d: sum(_skeleton(r)["head_counts"]) < sum(_skeleton(d)["head_counts"]) == 4),
    "align": ("localize", ["--align", "16"], lambda r, d: all(n % 16 == 0 for n in _skeleton(r)["ffn_sizes"])
              and any(n % 16 for n in _skeleton(d)["ffn_sizes"])),
    "keep_mode": ("localize", ["--keep-mode", "uniform"],
                  lambda r, d: len(set(_skeleton(r)["ffn_sizes"])) == 1 < len(set(_skeleton(d)["ffn_sizes"]))),
    "protect_outliers": ("localize", ["--protect-outliers", "1.5"],
                         lambda r, d: _skeleton(r)["protect_outliers"] == 1.5
                         and _skeleton(r)["layers"] != _skeleton(d)["layers"]),
    "slice_lm_head": ("convert", ["--slice-lm-head"],
                      lambda r, d: (r / "compact" / "label_head.safetensors").is_file()
                      and not (d / "compact" / "label_head.safetensors").exists()),
    "compensate": ("convert", ["--compensate", "mean"],
                   lambda r, d: json.loads((r / "compact" / "config.json").read_text()).get("mlp_bias") is True),
    "retune_epochs": ("retune", ["--retune-epochs", "2"], lambda r, d: _retune(r)["steps"] == 4 * _retune(d)["steps"]),
    "retune_lr": ("retune", ["--retune-lr", "0.5"],
                  lambda r, d: _retune(r)["settings"]["values"]["lr"] == 0.5
                  and _retune(r)["metrics"]["loss"] != _retune(d)["metrics"]["loss"]),
    "keep_checkpoints": ("retune", ["--save-every", "1", "--keep-checkpoints", "3"],  # the default keeps 2
                         lambda r, d: len(list((r / "checkpoints" / "retune").glob("step*"))) == 3
                         < _retune(r)["steps"]),
    "save_every": ("retune", ["--save-every", "1", "--keep-checkpoints", "50"],
                   lambda r, d: len(list((r / "checkpoints" / "retune").glob("step*"))) == _retune(r)["steps"] > 1),
}


@pytest.fixture(scope="module")
def default_run(tiny_models, sentiment_files, tmp_path_factory):
    """Every stage once with the defaults (one epoch of stage 1, so re-tuning has a few steps)."""
    out = tmp_path_factory.mktemp("later") / "default"
    assert run_command(train, _argv(tiny_models["llama"], sentiment_files, out, "--epochs", "0.5")) == 0
    return out


@pytest.mark.parametrize("flag", sorted(LATER))
def test_a_later_stage_flag_acts(flag, default_run, tiny_models, sentiment_files, tmp_path):
    stages, extra, probe = LATER[flag]
    run = tmp_path / "run"
    shutil.copytree(default_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    argv = _argv(tiny_models["llama"], sentiment_files, run, "--epochs", "0.5", *extra)
    assert run_command(train, argv + ["--stages", stages, "--overwrite"]) == 0
    assert probe(run, default_run), flag


# ------------------------------------------------------------------ coverage
ELSEWHERE = {  # Config field: a test that shows its effect (file::function)
    "task": "test_real_minilm.py::test_minilm_prompt_tuning_beats_majority_on_sst2_dev",
    "output": "test_pipeline.py::test_rerun_skips_finished_stages_and_manifest_mismatch_is_refused",
    "stages": "test_pipeline.py::test_rerun_skips_finished_stages_and_manifest_mismatch_is_refused",
    "data_dir": "test_real_minilm.py::test_minilm_prompt_tuning_beats_majority_on_sst2_dev",
    "train_file": "test_tasks.py::test_generic_spec_passed_to_load_split",
    "dev_file": "test_tasks.py::test_generic_spec_passed_to_load_split",
    "text_columns": "test_tasks.py::test_generic_json_booleans_and_explicit_spec",
    "label_column": "test_tasks.py::test_generic_json_booleans_and_explicit_spec",
    "label_names": "test_tasks.py::test_generic_json_booleans_and_explicit_spec",
    "template": "test_tasks.py::test_generic_json_booleans_and_explicit_spec",
    "verbalizer": "test_tasks.py::test_generic_json_booleans_and_explicit_spec",
    "distill_kl": "test_distill.py::test_teacher_holds_the_full_models_outputs_and_retuning_adds_the_terms",
    "distill_temperature": "test_distill.py::test_teacher_holds_the_full_models_outputs_and_retuning_adds_the_terms",
    "distill_hidden": "test_distill.py::test_teacher_holds_the_full_models_outputs_and_retuning_adds_the_terms",
    "distill_layers": "test_distill.py::test_teacher_holds_the_full_models_outputs_and_retuning_adds_the_terms",
    "quant": "test_prompt_tuning.py::test_quantized_frozen_backbone_trains_the_prompt_and_scores_units",
    "resume": "test_distributed.py::test_kill_and_resume_gives_the_same_prompt",
    "overwrite": "test_settings_check.py::test_overwrite_redoes_the_changed_stage_and_what_follows",
    "allow_pickle": "test_conversion.py::test_pickle_base_needs_allow_pickle",
    "previous_step": "test_schedule.py::test_each_step_is_a_valid_compact_model_within_the_one_before",
}


def _tests_in(file: str) -> set[str]:
    tree = ast.parse((REPO / "tests" / file).read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def test_every_config_field_has_a_test_that_shows_its_effect():
    shown = set(STAGE1) | set(LATER) | set(ELSEWHERE) | {"weight_decay"}
    missing = sorted(f.name for f in fields(Config) if f.name not in shown)
    assert not missing, f"flags with no test showing their effect: {missing}"
    absent = [ref for ref in ELSEWHERE.values() if ref.split("::")[1] not in _tests_in(ref.split("::")[0])]
    assert not absent, f"named tests that do not exist: {absent}"
