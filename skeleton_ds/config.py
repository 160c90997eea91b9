"""The one run configuration, built from CLI flags and validated once, before any work starts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path

from skeleton_ds.errors import UserError
from skeleton_ds.stage_specs import STAGE_ORDER
from skeleton_ds.tasks import GenericTaskSpec, check_task_parts

STAGES = STAGE_ORDER
"""Pipeline stages this build implements, in run order."""


GENERIC = "generic task (--task generic)"
TUNING = "prompt tuning (stages prompt, retune)"
LOCATING = "attribution and localization (stages attribute, localize)"
CONVERTING = "conversion (stage convert)"
CHECKS = {"positive": (lambda v: v > 0, "must be positive"), "non_negative": (lambda v: v >= 0, "must be >= 0"),
          "fraction": (lambda v: 0 < v <= 1, "must be in (0, 1]"), "at_least_1": (lambda v: v >= 1, "must be >= 1")}
"""Per-flag checks a field's metadata names (`check=`), applied by Config.validate."""


def comma_list(value: str) -> tuple[str, ...]:
    """A comma list flag's value (every command's comma lists parse with these three)."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def int_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in comma_list(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {value!r}") from None


def float_list(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in comma_list(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {value!r}") from None


def flag(default, help: str = "", *, group: str | None = None, parse=None, choices: tuple[str, ...] = (),
         check: str | None = None, option: str | None = None, metavar: str | None = None, parser_default=...):
    """A Config field and its command-line flag, declared together: the parser (build_parser), the per-flag
    validation (choices, check) and docs/cli.md are generated from this. `parse` turns the flag's text into the
    value (default: the default's type); `option` names a flag other than --field-name; `parser_default`, when
    given, is the parser's default where Config resolves the field later (config_from_args)."""
    return field(default=default, metadata={"help": help, "group": group, "parse": parse, "choices": choices,
                                            "check": check, "option": option, "metavar": metavar,
                                            "parser_default": parser_default})


@dataclass
class Config:
    model: str = flag("minilm", "HF model id or local directory; packaged: 'minilm' (all-MiniLM-L6-v2), "
                      "'smollm2-135m' (SmolLM2-135M-Instruct, its Q4_1 GGUF converted once), 'qwen2.5-1.5b' (opt-in: "
                      "skeleton-ds models fetch qwen2.5-1.5b)")
    task: str = flag("sst2", "sst2 rte mrpc qnli boolq cb copa wic generic")
    output: Path = flag(Path("runs/minilm-sst2"), "run directory")
    ds_config: Path = flag(Path("ds_configs/zero2.json"), "DeepSpeed JSON config: a path, or a packaged config by name "
                           "(zero0, zero2, zero3, zero3_offload); default ds_configs/zero2.json, the packaged zero2 "
                           "outside a checkout", option="--config")
    stages: tuple[str, ...] = flag(STAGES, f"comma list of {','.join(STAGES)}", parse=comma_list)
    data_dir: Path | None = flag(None, "read GLUE/SuperGLUE files from DIR/<TASK>/ instead of the Hugging Face Hub",
                                 parse=Path)
    revision: str | None = flag(None, "Hub revision of --model", parse=str)
    # generic task (--task generic)
    train_file: Path | None = flag(None, "training examples: .csv, .tsv, .json or .jsonl", group=GENERIC, parse=Path)
    dev_file: Path | None = flag(None, "dev examples, in the same formats", group=GENERIC, parse=Path)
    text_columns: tuple[str, ...] = flag((), "comma list of input columns", group=GENERIC, parse=comma_list)
    label_column: str = flag("label", "the column holding the label", group=GENERIC)
    label_names: tuple[str, ...] | None = flag(None, "comma list; default: sorted train labels", group=GENERIC,
                                               parse=comma_list)
    template: str | None = flag(None, "e.g. '{text_a} ? {answer} , {text_b}'", group=GENERIC, parse=str)
    verbalizer: tuple[str, ...] | None = flag(None, "one word per label", group=GENERIC, parse=comma_list)
    # prompt tuning
    prompt_length: int = flag(20, "soft prompt tokens", group=TUNING, check="positive")
    prompt_init: str = flag("vocab", "'vocab' or 'text:<init words>'", group=TUNING)
    readout: str = flag("auto", "auto | verbalizer (LM/MLM head) | head (trained classifier)", group=TUNING,
                        choices=("auto", "verbalizer", "head"))
    epochs: float = flag(1.0, "passes over the training examples", group=TUNING)
    max_steps: int = flag(0, "optimizer steps; 0: from --epochs", group=TUNING, check="non_negative")
    lr: float = flag(3e-2, "learning rate of the prompt", group=TUNING, check="positive")
    head_lr: float = flag(1e-2, "learning rate of a trained classifier head (--readout head)", group=TUNING,
                          check="positive")
    warmup_steps: int = flag(0, "linear warm-up steps", group=TUNING, check="non_negative")
    weight_decay: float = flag(0.0, "the optimizer's weight decay (AdamW in the shipped configs) on the prompt "
                               "and head", group=TUNING, check="non_negative")
    retune_epochs: float = flag(0.0, "epochs of re-tuning (stage 5); 0: --epochs", group=TUNING, check="non_negative")
    retune_lr: float = flag(0.0, "learning rate of re-tuning; 0: --lr", group=TUNING, check="non_negative")
    # distillation in re-tuning (stage teacher computes the full model's outputs once; see skeleton_ds.distill)
    distill_kl: float | None = flag(None, "re-tuning: weight of T^2 x KL(teacher || student) between the full model's "
                                    "and the skeleton's label distributions; 0: off; default: 1 for decoders, off for "
                                    "encoders", group=TUNING, check="non_negative", parse=float, metavar="W")
    distill_temperature: float = flag(2.0, "re-tuning: the KL term's temperature T", group=TUNING, check="positive")
    distill_hidden: float | None = flag(None, "re-tuning: weight of the mean squared error between the full model's "
                                        "and the skeleton's final hidden state at the answer position; 0: off; "
                                        "default: 1 for decoders, off for encoders", group=TUNING,
                                        check="non_negative", parse=float, metavar="W")
    distill_layers: tuple[int, ...] = flag((), "re-tuning: also match these layers' outputs at the answer position "
                                           "(with --distill-hidden)", group=TUNING, parse=int_list, metavar="L,...")
    batch_size: int = flag(0, "global batch; 0: train_batch_size of the DeepSpeed config", group=TUNING,
                           check="non_negative")
    max_length: int = flag(128, "tokens per example (the prompt not counted)", group=TUNING, check="positive")
    seed: int = flag(42, "seed of the prompt, data order and subsets", group=TUNING)
    max_train_examples: int = flag(0, "cap on training examples, a seeded subset (0: all)", group=TUNING,
                                   check="non_negative")
    max_eval_examples: int = flag(0, "cap on dev examples, a seeded subset (0: all)", group=TUNING,
                                  check="non_negative")
    precision: str = flag("auto", "auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16", group=TUNING,
                          choices=("auto", "fp32", "bf16", "fp16"))
    quant: str = flag("none", "none | 8bit | 4bit: load the frozen backbone in bitsandbytes 8-bit or NF4 weights "
                      "(stages prompt, attribute, retune; one device per rank, not with ZeRO-3)", group=TUNING,
                      choices=("none", "8bit", "4bit"))
    save_every: int = flag(200, "optimizer steps between resumable checkpoints", group=TUNING, check="positive")
    keep_checkpoints: int = flag(2, "resumable checkpoints kept", group=TUNING, check="positive")
    resume: bool = flag(False, "continue an interrupted stage from its latest checkpoint in --output (same settings "
                        "only)", group=TUNING)
    overwrite: bool = flag(False, "redo from the first finished stage whose recorded settings differ from these flags "
                           "(none differ: every requested stage); without it a changed stage stops the run",
                           group=TUNING)
    # attribution (stage 2)
    scorer: str = flag("attribution", "attribution | integrated-gradients | random | weight-magnitude | "
                       "activation-magnitude", group=LOCATING,
                       choices=("attribution", "integrated-gradients", "random", "weight-magnitude",
                                "activation-magnitude"))
    attr_reduce: str = flag("abs-sum", "abs-sum (|sum_t h*g|) | mean-abs (mean_t |h*g|) | signed | max (max_t h*g)",
                            group=LOCATING, choices=("abs-sum", "mean-abs", "signed", "max"))
    attr_positions: str = flag("text", "text (every text token) | answer (only where the label is read): the "
                               "positions whose contributions count", group=LOCATING, choices=("text", "answer"))
    ig_steps: int = flag(4, "integrated-gradients: steps from zero FFN activations to their values (each one forward "
                         "and backward)", group=LOCATING, check="at_least_1")
    attr_include_prompt: bool = flag(False, "count prompt positions too", group=LOCATING)
    attr_examples: int = flag(0, "cap on training examples scored (0: all)", group=LOCATING, check="non_negative")
    # localization (stage 3)
    ffn_keep: float = flag(0.3, "fraction of FFN neurons kept (default: the last of --keep-schedule, else 0.3)",
                           group=LOCATING, check="fraction", parser_default=None)
    keep_schedule: tuple[float, ...] = flag((), "iterative localization: localize, convert and re-tune at each FFN "
                                            "keep in turn, scoring each step on the compact model the step before "
                                            "made (e.g. 0.5,0.3); the re-tuning budget is shared out evenly over "
                                            "the steps; steps before the last go in OUTPUT/steps/", group=LOCATING,
                                            parse=float_list, metavar="K1,K2,...")
    head_keep: float = flag(1.0, "fraction of attention KV groups kept per layer", group=LOCATING, check="fraction")
    align: int = flag(64, "kept FFN count is a multiple of this", group=LOCATING, check="at_least_1")
    keep_mode: str = flag("auto", "uniform (same count every layer) | global (one threshold across layers) | auto "
                          "(default: global for decoders, uniform for encoders)", group=LOCATING,
                          choices=("auto", "uniform", "global"))
    protect_outliers: float | None = flag(None, "always keep FFN neurons whose peak |activation| is at least FACTOR x "
                                          "their layer's median peak (the massive activations of trained decoders); "
                                          "0: off; default: 20 for decoders, off for encoders", group=LOCATING,
                                          parse=float, metavar="FACTOR")
    # conversion (stage 4)
    allow_pickle: bool = flag(False, "convert a base checkpoint stored as pickle (.bin); refused by default: loading a "
                              "pickle can run code", group=CONVERTING)
    slice_lm_head: bool = flag(False, "decoders: keep only the verbalizer rows of the LM head in the compact model",
                               group=CONVERTING)
    compensate: str = flag("none", "none | mean: fold each removed FFN neuron's mean activation (measured in the "
                           "attribution pass) times its output weights into the FFN output bias (LLaMA via "
                           "mlp_bias; BERT, RoBERTa)", group=CONVERTING, choices=("none", "mean"))
    # set by the keep schedule (skeleton_ds.stages.schedule), never a flag: the finished step whose compact model
    # and re-tuned prompt this run scores and re-tunes from, instead of the base model and the stage-1 prompt
    previous_step: Path | None = field(default=None, metadata={"internal": True})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise UserError(f"unknown stage(s) {', '.join(unknown)}: "
                            f"--stages takes a comma list of {', '.join(STAGES)}")
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            option = meta.get("option") or "--" + f.name.replace("_", "-")
            if meta.get("choices") and value not in meta["choices"]:
                raise UserError(f"{option} must be one of {', '.join(meta['choices'])}, got {value!r}")
            if meta.get("check") and value is not None and not CHECKS[meta["check"]][0](value):
                raise UserError(f"{option} {CHECKS[meta['check']][1]}, got {value}")
        if self.distill_layers and self.distill_hidden == 0:
            raise UserError("--distill-layers matches those layers' hidden states: give their weight with "
                            "--distill-hidden W (> 0)")
        if any(layer < 0 for layer in self.distill_layers):
            raise UserError(f"--distill-layers takes layer indices from 0, got {list(self.distill_layers)}")
        if not self.epochs > 0 and not self.max_steps:
            raise UserError("--epochs must be positive (or give --max-steps)")
        self._validate_schedule()
        if self.protect_outliers is not None and self.protect_outliers and self.protect_outliers <= 1:
            raise UserError(f"--protect-outliers is a factor over the layer's median peak activation, > 1 "
                            f"(e.g. 100), or 0 for off; got {self.protect_outliers}")
        if self.prompt_init != "vocab" and not (self.prompt_init.startswith("text:") and self.prompt_init[5:].strip()):
            raise UserError(f"--prompt-init must be 'vocab' or 'text:<some words>', got {self.prompt_init!r}")
        if self.task == "generic":
            if not (self.train_file and self.dev_file and self.text_columns):
                raise UserError("--task generic needs --train-file, --dev-file and --text-columns")
            check_task_parts(self.text_columns, self.template, self.label_names, self.verbalizer)
        elif self.train_file or self.dev_file or self.text_columns:
            raise UserError("--train-file/--dev-file/--text-columns only go with --task generic")
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise UserError(f"--data-dir {self.data_dir} is not a directory")
        from skeleton_ds.ds_config import resolve_config_path  # a path, or a packaged config's name

        self.ds_config = resolve_config_path(self.ds_config)

    def generic_spec(self) -> GenericTaskSpec | None:
        """The --task generic file and column settings (None for a registered task)."""
        if self.task != "generic":
            return None
        return GenericTaskSpec(train_file=self.train_file, dev_file=self.dev_file, text_columns=self.text_columns,
                               label_column=self.label_column, label_names=self.label_names, template=self.template,
                               verbalizer=self.verbalizer)

    def _validate_schedule(self) -> None:
        schedule = self.keep_schedule
        if not schedule:
            return
        if any(not 0 < k <= 1 for k in schedule) or any(a <= b for a, b in zip(schedule, schedule[1:])):
            raise UserError(f"--keep-schedule takes FFN keeps in (0, 1], each smaller than the one before "
                            f"(e.g. 0.5,0.3,0.2), got {','.join(map(str, schedule))}")
        if schedule[-1] != self.ffn_keep:
            raise UserError(f"--keep-schedule ends at the final FFN keep, but its last entry {schedule[-1]} is not "
                            f"--ffn-keep {self.ffn_keep}: drop --ffn-keep or make the two agree")
        if self.compensate != "none" and len(schedule) > 1:
            raise UserError("--compensate needs the mean activation of every removed neuron, which a keep schedule "
                            "measures only for the neurons of its last step: use one of the two")
        if self.max_steps and len(schedule) > 1:
            raise UserError("--keep-schedule shares the re-tuning budget out over its steps by epochs: give it as "
                            "--retune-epochs (or --epochs), not --max-steps")


def add_flag(parser, name: str, *, help: str | None = None, enforce_choices: bool = False) -> None:
    """Add Config field `name`'s flag, as its `flag` metadata declares it, to `parser` (or an argument group).
    Another command that takes the same setting adds it this way too (`skeleton-ds convert --compensate`), with
    `enforce_choices` where no Config validates its value, and its own `help` where it reads differently there."""
    f = Config.__dataclass_fields__[name]
    meta = f.metadata
    default = f.default if meta.get("parser_default", ...) is ... else meta["parser_default"]
    kwargs = {"dest": name, "default": default, "help": help or meta.get("help") or None}
    if isinstance(f.default, bool):
        kwargs["action"] = "store_true"
    else:
        kwargs["type"] = meta.get("parse") or type(f.default)
        kwargs |= {"metavar": meta["metavar"]} if meta.get("metavar") else {}
        kwargs |= {"choices": meta["choices"]} if enforce_choices and meta.get("choices") else {}
    parser.add_argument(meta.get("option") or "--" + name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """`skeleton-ds train`'s parser, generated from Config's fields (their `flag` metadata)."""
    p = argparse.ArgumentParser(prog="skeleton-ds train",
                                description="Prompt-tune a frozen model under DeepSpeed ZeRO (skeleton_ds).")
    groups: dict[str | None, argparse._ActionsContainer] = {None: p}
    for f in fields(Config):
        if f.metadata.get("internal"):
            continue
        group = f.metadata.get("group")
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        add_flag(groups[group], f.name)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def as_flags(values: dict) -> list[str]:
    """The `skeleton-ds train` flags that set these Config fields: the readable record of a typed plan
    (config_from_args of them gives the same fields)."""
    argv = []
    for name, value in values.items():
        f = Config.__dataclass_fields__[name]
        option = f.metadata.get("option") or "--" + name.replace("_", "-")
        if isinstance(f.default, bool):
            argv += [option] if value else []
        else:
            argv += [option, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return argv


def config_from_args(argv: list[str] | None = None) -> Config:
    ns = vars(build_parser().parse_args(argv))
    ns.pop("local_rank", None)  # the deepspeed launcher passes it; LOCAL_RANK in the env is what we use
    if ns["ffn_keep"] is None:  # the schedule's last keep is the final one; the field's default otherwise
        ns["ffn_keep"] = ns["keep_schedule"][-1] if ns["keep_schedule"] else Config.ffn_keep
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in ns.items() if k in known})
