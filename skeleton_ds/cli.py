"""`skeleton-ds <command>`: one subcommand per launch script, each a plain function of argv.

User mistakes (UserError) become one `error: ...` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

from skeleton_ds.errors import UserError


def _quiet_libraries() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, instead of DeepSpeed warning that it guessed
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def train(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline stages named by --stages (default: all)."""
    from skeleton_ds.config import config_from_args

    cfg = config_from_args(list(argv) if argv is not None else None)
    _quiet_libraries()
    from skeleton_ds.stages.pipeline import run_pipeline

    run_pipeline(cfg)
    return 0


def _one_stage(stage: str) -> Callable[[Sequence[str] | None], int]:
    def command(argv: Sequence[str] | None = None) -> int:
        return train([*(argv or []), "--stages", stage])

    command.__doc__ = f"Run only the {stage} stage (same flags as train)."
    return command


def convert(argv: Sequence[str] | None = None) -> int:
    """Slice a skeleton out of a base checkpoint into a compact Hugging Face model directory."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="skeleton-ds convert", description=convert.__doc__)
    p.add_argument("--base", required=True, help="base model: local directory, Hub id, or 'minilm'")
    p.add_argument("--skeleton", required=True, type=Path, help="skeleton.json from the localize stage")
    p.add_argument("--prompt", type=Path, default=None, help="stage-1 prompt directory to ship with the model")
    p.add_argument("--out", required=True, type=Path, help="output directory (created atomically)")
    p.add_argument("--revision", default=None)
    p.add_argument("--allow-pickle", action="store_true", help="accept a pickle (.bin) base checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--slice-lm-head", action="store_true",
                   help="decoders: keep only the verbalizer rows of the LM head (needs --prompt)")
    args = p.parse_args(list(argv) if argv is not None else None)
    from skeleton_ds.surgery import convert as run_convert

    summary = run_convert(args.base, args.skeleton, args.prompt, args.out, revision=args.revision,
                          allow_pickle=args.allow_pickle, overwrite=args.overwrite, slice_lm_head=args.slice_lm_head)
    print(f"skeleton_ds: compact model ({summary['parameters_compact']:,} of {summary['parameters_full']:,} "
          f"parameters) -> {args.out}")
    return 0


def export_peft(argv: Sequence[str] | None = None) -> int:
    """Write a trained prompt as a PEFT prompt-tuning adapter directory."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="skeleton-ds export-peft", description=export_peft.__doc__)
    p.add_argument("--prompt", required=True, type=Path, help="DIR/prompt (or DIR/retune)")
    p.add_argument("--out", required=True, type=Path, help="adapter directory to create")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(list(argv) if argv is not None else None)
    from skeleton_ds.interop import export_peft as run_export

    print(f"skeleton_ds: PEFT adapter -> {run_export(args.prompt, args.out, overwrite=args.overwrite)}")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "train": train,
    "attribute": _one_stage("attribute"),
    "localize": _one_stage("localize"),
    "retune": _one_stage("retune"),
    "convert": convert,
    "export-peft": export_peft,
}


def run_command(command: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    try:
        return command(argv)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank validates the same input; say it once
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: skeleton-ds {{{names}}} [flags]   (skeleton-ds <command> --help for flags)", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return run_command(COMMANDS[argv[0]], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
