"""The one run configuration, built from CLI flags and validated once, before any work starts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from skeleton_ds.errors import UserError
from skeleton_ds.stage_specs import STAGE_ORDER
from skeleton_ds.tasks import check_task_parts

STAGES = STAGE_ORDER
"""Pipeline stages this build implements, in run order."""


@dataclass
class Config:
    model: str = "minilm"
    task: str = "sst2"
    output: Path = Path("runs/minilm-sst2")
    ds_config: Path = Path("ds_configs/zero2.json")
    stages: tuple[str, ...] = STAGES
    data_dir: Path | None = None
    # generic task (--task generic)
    train_file: Path | None = None
    dev_file: Path | None = None
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None
    template: str | None = None
    verbalizer: tuple[str, ...] | None = None
    # prompt tuning
    prompt_length: int = 20
    prompt_init: str = "vocab"  # "vocab" (random vocabulary embeddings) or "text:<words>"
    readout: str = "auto"  # auto | verbalizer | head
    epochs: float = 1.0
    max_steps: int = 0  # 0: derived from epochs
    lr: float = 3e-2
    head_lr: float = 1e-2
    warmup_steps: int = 0
    weight_decay: float = 0.0
    retune_epochs: float = 0.0  # re-tuning (stage 5) budget; 0: --epochs
    retune_lr: float = 0.0  # 0: --lr
    # distillation in re-tuning (stage teacher computes the full model's outputs once; see skeleton_ds.distill)
    distill_kl: float = 0.0  # weight of T^2 KL(teacher || student) over the labels; 0: off
    distill_temperature: float = 2.0
    distill_hidden: float = 0.0  # weight of the MSE of hidden states at the answer position; 0: off
    distill_layers: tuple[int, ...] = ()  # layers whose output (residual stream) is matched too, with --distill-hidden
    batch_size: int = 0  # global batch; 0: take train_batch_size from the DeepSpeed config
    max_length: int = 128
    seed: int = 42
    max_train_examples: int = 0  # 0: all
    max_eval_examples: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    quant: str = "none"  # none | 8bit | 4bit: the frozen backbone in bitsandbytes weights (one device, not ZeRO-3)
    save_every: int = 200  # optimizer steps between resumable checkpoints
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    revision: str | None = None
    # attribution (stage 2)
    scorer: str = "attribution"  # attribution | integrated-gradients | random | weight-magnitude | activation-magnitude
    attr_reduce: str = "abs-sum"  # abs-sum | mean-abs | signed | max
    attr_positions: str = "text"  # text | answer: where contributions are counted
    ig_steps: int = 4  # integrated-gradients: path steps (each one forward and backward)
    attr_include_prompt: bool = False
    attr_examples: int = 0  # 0: every training example (after --max-train-examples)
    # localization (stage 3)
    ffn_keep: float = 0.3
    keep_schedule: tuple[float, ...] = ()  # iterative localization: FFN keeps in order, ending at ffn_keep
    head_keep: float = 1.0
    align: int = 64
    # auto: the architecture's (architectures.ArchAdapter: decoders global + 20, encoders uniform + off)
    keep_mode: str = "auto"  # uniform (same count per layer) | global (one threshold across layers)
    # keep FFN neurons whose peak |activation| >= this x the layer median (0: off)
    protect_outliers: float | None = None
    # conversion (stage 4)
    allow_pickle: bool = False
    slice_lm_head: bool = False
    compensate: str = "none"  # none | mean: fold removed FFN neurons' mean activations into the output bias
    # set by the keep schedule (skeleton_ds.stages.schedule), never a flag: the finished step whose compact model
    # and re-tuned prompt this run scores and re-tunes from, instead of the base model and the stage-1 prompt
    previous_step: Path | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise UserError(f"unknown stage(s) {', '.join(unknown)}: "
                            f"--stages takes a comma list of {', '.join(STAGES)}")
        positive = {"prompt_length": self.prompt_length, "max_length": self.max_length, "lr": self.lr,
                    "head_lr": self.head_lr, "save_every": self.save_every, "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        non_negative = {"max_steps": self.max_steps, "batch_size": self.batch_size, "warmup_steps": self.warmup_steps,
                        "max_train_examples": self.max_train_examples, "max_eval_examples": self.max_eval_examples,
                        "weight_decay": self.weight_decay, "retune_epochs": self.retune_epochs,
                        "retune_lr": self.retune_lr, "distill_kl": self.distill_kl,
                        "distill_hidden": self.distill_hidden}
        for name, value in non_negative.items():
            if value < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if not self.distill_temperature > 0:
            raise UserError(f"--distill-temperature must be positive, got {self.distill_temperature}")
        if self.distill_layers and not self.distill_hidden:
            raise UserError("--distill-layers matches those layers' hidden states: give their weight with "
                            "--distill-hidden W (> 0)")
        if any(layer < 0 for layer in self.distill_layers):
            raise UserError(f"--distill-layers takes layer indices from 0, got {list(self.distill_layers)}")
        if not self.epochs > 0 and not self.max_steps:
            raise UserError("--epochs must be positive (or give --max-steps)")
        choices = {"scorer": ("attribution", "integrated-gradients", "random", "weight-magnitude",
                              "activation-magnitude"),
                   "attr_reduce": ("abs-sum", "mean-abs", "signed", "max"), "attr_positions": ("text", "answer"),
                   "keep_mode": ("auto", "uniform", "global"),
                   "compensate": ("none", "mean")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, name)!r}")
        for name in ("ffn_keep", "head_keep"):
            if not 0 < getattr(self, name) <= 1:
                raise UserError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        self._validate_schedule()
        if self.protect_outliers is not None and self.protect_outliers and self.protect_outliers <= 1:
            raise UserError(f"--protect-outliers is a factor over the layer's median peak activation, > 1 "
                            f"(e.g. 100), or 0 for off; got {self.protect_outliers}")
        if self.align < 1 or self.attr_examples < 0 or self.ig_steps < 1:
            raise UserError("--align and --ig-steps must be >= 1 and --attr-examples >= 0")
        if self.readout not in ("auto", "verbalizer", "head"):
            raise UserError(f"--readout must be auto, verbalizer or head, got {self.readout!r}")
        if self.quant not in ("none", "8bit", "4bit"):
            raise UserError(f"--quant must be none, 8bit or 4bit, got {self.quant!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
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


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _int_csv(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {value!r}") from None


def _float_csv(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """Flags mirror Config's fields one to one (underscores become dashes)."""
    d = Config.__dataclass_fields__
    p = argparse.ArgumentParser(prog="skeleton-ds train",
                                description="Prompt-tune a frozen model under DeepSpeed ZeRO (skeleton_ds).")
    p.add_argument("--config", dest="ds_config", type=Path, default=d["ds_config"].default,
                   help="DeepSpeed JSON config: a path, or a packaged config by name (zero0, zero2, zero3, "
                        "zero3_offload); default ds_configs/zero2.json, the packaged zero2 outside a checkout")
    p.add_argument("--model", default=d["model"].default,
                   help="HF model id or local directory; packaged: 'minilm' (all-MiniLM-L6-v2), "
                        "'smollm2-135m' (SmolLM2-135M-Instruct, its Q4_1 GGUF converted once)")
    p.add_argument("--task", default=d["task"].default, help="sst2 rte mrpc qnli boolq cb copa wic generic")
    p.add_argument("--output", type=Path, default=d["output"].default, help="run directory")
    p.add_argument("--stages", type=_csv, default=STAGES, help=f"comma list of {','.join(STAGES)}")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="read GLUE/SuperGLUE files from DIR/<TASK>/ instead of the Hugging Face Hub")
    g = p.add_argument_group("generic task (--task generic)")
    g.add_argument("--train-file", type=Path)
    g.add_argument("--dev-file", type=Path)
    g.add_argument("--text-columns", type=_csv, default=(), help="comma list of input columns")
    g.add_argument("--label-column", default="label")
    g.add_argument("--label-names", type=_csv, default=None, help="comma list; default: sorted train labels")
    g.add_argument("--template", default=None, help="e.g. '{text_a} ? {answer} , {text_b}'")
    g.add_argument("--verbalizer", type=_csv, default=None, help="one word per label")
    t = p.add_argument_group("prompt tuning")
    for name in ("prompt_length", "epochs", "max_steps", "lr", "head_lr", "warmup_steps", "weight_decay",
                 "batch_size", "max_length", "seed", "max_train_examples", "max_eval_examples", "save_every",
                 "keep_checkpoints"):
        default = d[name].default
        t.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    t.add_argument("--retune-epochs", type=float, default=0.0, help="epochs of re-tuning (stage 5); 0: --epochs")
    t.add_argument("--retune-lr", type=float, default=0.0, help="learning rate of re-tuning; 0: --lr")
    t.add_argument("--distill-kl", type=float, default=0.0, help="re-tuning: weight of T^2 x KL(teacher || student) "
                   "between the full model's and the skeleton's label distributions (0: off)")
    t.add_argument("--distill-temperature", type=float, default=2.0, help="re-tuning: the KL term's temperature T")
    t.add_argument("--distill-hidden", type=float, default=0.0, help="re-tuning: weight of the mean squared error "
                   "between the full model's and the skeleton's final hidden state at the answer position (0: off)")
    t.add_argument("--distill-layers", type=_int_csv, default=(), metavar="L,...",
                   help="re-tuning: also match these layers' outputs at the answer position (with --distill-hidden)")
    t.add_argument("--prompt-init", default="vocab", help="'vocab' or 'text:<init words>'")
    t.add_argument("--readout", default="auto", help="auto | verbalizer (LM/MLM head) | head (trained classifier)")
    t.add_argument("--precision", default="auto",
                   help="auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16")
    t.add_argument("--quant", default="none",
                   help="none | 8bit | 4bit: load the frozen backbone in bitsandbytes 8-bit or NF4 weights (stages "
                        "prompt, attribute, retune; one device per rank, not with ZeRO-3)")
    t.add_argument("--revision", default=None, help="Hub revision of --model")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted stage from its latest checkpoint in --output (same settings only)")
    t.add_argument("--overwrite", action="store_true",
                   help="redo from the first finished stage whose recorded settings differ from these flags (none "
                        "differ: every requested stage); without it a changed stage stops the run")
    a = p.add_argument_group("attribution and localization (stages attribute, localize)")
    a.add_argument("--scorer", default="attribution", help="attribution | integrated-gradients | random | "
                   "weight-magnitude | activation-magnitude")
    a.add_argument("--attr-reduce", default="abs-sum", help="abs-sum (|sum_t h*g|) | mean-abs (mean_t |h*g|) | signed "
                   "| max (max_t h*g)")
    a.add_argument("--attr-positions", default="text", help="text (every text token) | answer (only where the label "
                   "is read): the positions whose contributions count")
    a.add_argument("--ig-steps", type=int, default=4, help="integrated-gradients: steps from zero FFN activations to "
                   "their values (each one forward and backward)")
    a.add_argument("--attr-include-prompt", action="store_true", help="count prompt positions too")
    a.add_argument("--attr-examples", type=int, default=0, help="cap on training examples scored (0: all)")
    a.add_argument("--ffn-keep", type=float, default=None,
                   help="fraction of FFN neurons kept (default: the last of --keep-schedule, else 0.3)")
    a.add_argument("--keep-schedule", type=_float_csv, default=(), metavar="K1,K2,...",
                   help="iterative localization: localize, convert and re-tune at each FFN keep in turn, scoring "
                        "each step on the compact model the step before made (e.g. 0.5,0.3); the re-tuning "
                        "budget is shared out evenly over the steps; steps before the last go in OUTPUT/steps/")
    a.add_argument("--head-keep", type=float, default=1.0, help="fraction of attention KV groups kept per layer")
    a.add_argument("--align", type=int, default=64, help="kept FFN count is a multiple of this")
    a.add_argument("--keep-mode", default="auto", help="uniform (same count every layer) | global (one threshold "
                   "across layers) | auto (default: global for decoders, uniform for encoders)")
    a.add_argument("--protect-outliers", type=float, default=None, metavar="FACTOR",
                   help="always keep FFN neurons whose peak |activation| is at least FACTOR x their layer's median "
                        "peak (the massive activations of trained decoders); 0: off; default: 20 for decoders, "
                        "off for encoders")
    p.add_argument("--allow-pickle", action="store_true",
                   help="convert a base checkpoint stored as pickle (.bin); refused by default: loading a pickle "
                        "can run code")
    p.add_argument("--slice-lm-head", action="store_true",
                   help="decoders: keep only the verbalizer rows of the LM head in the compact model")
    p.add_argument("--compensate", default="none",
                   help="none | mean: fold each removed FFN neuron's mean activation (measured in the attribution "
                        "pass) times its output weights into the FFN output bias (LLaMA via mlp_bias; BERT, RoBERTa)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(argv: list[str] | None = None) -> Config:
    ns = vars(build_parser().parse_args(argv))
    ns.pop("local_rank", None)  # the deepspeed launcher passes it; LOCAL_RANK in the env is what we use
    if ns["ffn_keep"] is None:  # the schedule's last keep is the final one; the field's default otherwise
        ns["ffn_keep"] = ns["keep_schedule"][-1] if ns["keep_schedule"] else Config.ffn_keep
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in ns.items() if k in known})
