"""Why does a skeleton lose the task on a trained decoder, and what keeps it? Candidates, measured before re-tuning.

    python -m skeleton_ds.experiments.study_decoder --data-dir ../shared/data --output runs/study-decoder
    python -m skeleton_ds.experiments.study_decoder --data-dir ../shared/data --output runs/study-decoder \\
        --keeps 0.7,0.5,0.3 \\
        --factors 20,100

Prompt-tunes once (OUTPUT/prompt, reused when its recorded settings match), scores the training
examples with each scorer once, then evaluates the prompted model on the dev examples with the
unkept FFN neurons masked (attention kept; no re-tuning: the cheap signal that ranks candidates) for
every candidate at every keep ratio:

- the scorers (attribution abs-sum and mean-abs, activation-magnitude, weight-magnitude, random),
  uniform count per layer;
- attribution with the massive-activation neurons protected (--protect-outliers F for each F);
- allocation across layers: one global threshold (per-layer widths), with and without protection, and
  with a floor per layer (each layer keeps at least --floors F of its FFN; the threshold shares the rest);
- bias compensation (removed neurons output their mean instead of zero), on the protected skeleton;
- per layer: the peak |activation| outliers found and whether each candidate keeps them.

Writes OUTPUT/study.json (provenance, settings, every result), OUTPUT/study.md and OUTPUT/study.png;
with --docs also docs/results/study_decoder.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from skeleton_ds.tables import markdown_table
from skeleton_ds.cli import run_command
from skeleton_ds.errors import UserError
from skeleton_ds.experiments import command_line, publish
from skeleton_ds.provenance import provenance

SCORERS = ("attribution", "attribution-mean-abs", "activation-magnitude", "weight-magnitude", "random")
"""In this order: the baselines without data reuse the activation-magnitude pass."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Decoder localization study: masked dev accuracy per candidate method.")
    p.add_argument("--data-dir", type=Path, default=None, help="read GLUE/SuperGLUE files from DIR/<TASK>/")
    p.add_argument("--output", type=Path, default=Path("runs/study-decoder"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="sst2")
    p.add_argument("--keeps", default="0.5,0.3", help="comma list of FFN keep ratios")
    p.add_argument("--factors", default="20,100", help="comma list of --protect-outliers factors to try")
    p.add_argument("--floors", default="0.05,0.1",
                   help="comma list of per-layer FFN floors for global allocation (with the first factor)")
    p.add_argument("--max-train-examples", type=int, default=1600)
    p.add_argument("--max-eval-examples", type=int, default=300)
    p.add_argument("--attr-examples", type=int, default=300)
    p.add_argument("--align", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--config", dest="ds_config", type=Path, default=Path("ds_configs/zero2.json"))
    p.add_argument("--docs", action="store_true", help="also write docs/results/study_decoder.{json,md,png}")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _numbers(value: str, flag: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes a comma list of numbers, got {value!r}") from None
    if not out:
        raise UserError(f"{flag} needs at least one number")
    return out


def study(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    keeps = sorted(set(_numbers(args.keeps, "--keeps")), reverse=True)
    factors = _numbers(args.factors, "--factors")
    floors = _numbers(args.floors, "--floors")
    if any(not 0 < k <= 1 for k in keeps) or any(f <= 1 for f in factors) or any(not 0 < f < 1 for f in floors):
        raise UserError("--keeps must lie in (0, 1], --factors above 1 and --floors in (0, 1)")

    from skeleton_ds.config import Config

    cfg = Config(model=args.model, task=args.task, ds_config=args.ds_config, data_dir=args.data_dir,
                 output=args.output, stages=("prompt",), max_train_examples=args.max_train_examples,
                 max_eval_examples=args.max_eval_examples, attr_examples=args.attr_examples, seed=args.seed,
                 align=args.align)

    from skeleton_ds.cli import quiet_libraries

    quiet_libraries()
    from skeleton_ds.attribution import random_scores, weight_magnitude
    from skeleton_ds.localization import masked, outliers, select
    from skeleton_ds.plots import plot_study
    from skeleton_ds.stages.attribute import AttributionRecipe
    from skeleton_ds.stages.pipeline import run_pipeline

    t_start = time.perf_counter()
    run_pipeline(cfg)  # stage 1, reused when OUTPUT/prompt was made with these settings
    rec = AttributionRecipe(cfg)
    rec.setup()
    geometry, backbone, adapter = rec.geometry, rec.model.backbone, rec.backbone.adapter
    unpruned = rec.evaluate()
    rec.report.note(f"unpruned prompt-tuned dev accuracy {unpruned['accuracy']:.4f} ({len(rec.dev_set)} examples)")

    scores, seconds = {}, {}
    for scorer in SCORERS:
        t0 = time.perf_counter()
        if scorer == "attribution-mean-abs":
            rec.cfg.attr_reduce = "mean-abs"
            scores[scorer], _ = rec.score("attribution")
            rec.cfg.attr_reduce = "abs-sum"
        elif scorer in ("weight-magnitude", "random"):  # no data needed: reuse the activation pass's means
            baseline = weight_magnitude(backbone, adapter, geometry) if scorer == "weight-magnitude" \
                else random_scores(geometry, args.seed)
            scores[scorer] = scores["activation-magnitude"] | baseline
        else:
            scores[scorer], _ = rec.score(scorer)
        seconds[scorer] = round(time.perf_counter() - t0, 1)
        rec.report.note(f"scored with {scorer} in {seconds[scorer]:.0f} s")
    attribution = scores["attribution"]
    means = [attribution[f"ffn_mean.{i}"] for i in range(geometry.layers)]

    found = {f: [outliers(attribution[f"ffn_peak.{i}"], f).tolist() for i in range(geometry.layers)] for f in factors}
    layer_outliers = {f"{f:g}": [{"layer": i, "neurons": n} for i, n in enumerate(found[f]) if n] for f in factors}
    peaks = [{"layer": i, "neuron": int(attribution[f"ffn_peak.{i}"].argmax()),
              "peak": float(attribution[f"ffn_peak.{i}"].max()),
              "median_peak": float(attribution[f"ffn_peak.{i}"].median())} for i in range(geometry.layers)]

    candidates = [(s, s, dict(mode="uniform"), False) for s in SCORERS]
    candidates += [(f"attribution + protect {f:g}", "attribution", dict(mode="uniform", protect=f), False)
                   for f in factors]
    candidates += [("attribution, global", "attribution", dict(mode="global"), False),
                   (f"attribution, global + protect {factors[0]:g}", "attribution",
                    dict(mode="global", protect=factors[0]), False),
                   *((f"attribution, global + protect {factors[0]:g} + floor {f:g}", "attribution",
                      dict(mode="global", protect=factors[0], ffn_floor=f), False) for f in floors),
                   (f"activation-magnitude + protect {factors[0]:g}", "activation-magnitude",
                    dict(mode="uniform", protect=factors[0]), False),
                   (f"attribution + protect {factors[0]:g} + compensation", "attribution",
                    dict(mode="uniform", protect=factors[0]), True)]
    results = []
    for keep in keeps:
        for name, scorer, options, compensate in candidates:
            skeleton = select(scores[scorer], geometry, ffn_keep=keep, head_keep=1.0, align=args.align, **options)
            with masked(backbone, adapter, geometry, skeleton, fill=means if compensate else None):
                metrics = rec.evaluate()
            kept = sum(n in set(skeleton.ffn[i]) for i, neurons in enumerate(found[factors[0]]) for n in neurons)
            sizes = skeleton.ffn_sizes()
            results.append({"candidate": name, "ffn_keep": keep, "accuracy": metrics["accuracy"],
                            "loss": metrics["loss"], "ffn_sizes": sizes, "ffn_kept_total": sum(sizes),
                            "ffn_total": geometry.layers * geometry.ffn_size,
                            "padded_width": max(sizes), "outliers_kept": kept,
                            "outliers": sum(map(len, found[factors[0]]))})
            rec.report.note(f"keep {keep:g} {name}: accuracy {metrics['accuracy']:.4f} "
                            f"(outliers kept {results[-1]['outliers_kept']}/{results[-1]['outliers']})")

    if os.environ.get("RANK", "0") != "0":
        return 0
    command = command_line("study_decoder", argv)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "local_rank"}
    settings |= {"keeps": keeps, "factors": factors, "floors": floors, "head_keep": 1.0, "retuned": False,
                 "geometry": {"layers": geometry.layers, "ffn_size": geometry.ffn_size, "kv_heads": geometry.kv_heads}}
    record = {"provenance": provenance(command), "settings": settings,
              "unpruned": {"accuracy": unpruned["accuracy"], "loss": unpruned["loss"],
                           "dev_examples": len(rec.dev_set)},
              "score_seconds": seconds, "outliers": {"by_factor": layer_outliers, "largest_per_layer": peaks},
              "results": results, "seconds": round(time.perf_counter() - t_start, 1)}
    args.output.mkdir(parents=True, exist_ok=True)
    plot_study([{"task": args.task, "scorer": r["candidate"], "ffn_keep": r["ffn_keep"], "accuracy": r["accuracy"]}
                for r in results], {args.task: unpruned["accuracy"]}, args.output / "study.png",
               title=f"{args.model} {args.task}: dev accuracy with FFN neurons masked (no re-tuning); "
                     f"unpruned {unpruned['accuracy']:.3f}")
    publish(args.output, "study_decoder", record, markdown(record), docs=args.docs, figure=True)
    print(f"skeleton_ds: decoder study -> {args.output / 'study.json'} ({record['seconds']:.0f} s)")
    return 0


def markdown(record: dict) -> str:
    """Masked dev accuracy per candidate (rows) and keep ratio (columns), best per column in bold."""
    keeps = record["settings"]["keeps"]
    results = record["results"]
    best = {k: max(r["accuracy"] for r in results if r["ffn_keep"] == k) for k in keeps}
    names = list(dict.fromkeys(r["candidate"] for r in results))
    lines = [f"Unpruned prompt-tuned: {record['unpruned']['accuracy']:.3f} on {record['unpruned']['dev_examples']} "
             f"dev examples. FFN neurons masked, attention kept, no re-tuning.", "",
             *markdown_table(["candidate", *(f"keep {k:g}" for k in keeps), f"outliers kept (keep {keeps[-1]:g})"])]
    for name in names:
        row = {r["ffn_keep"]: r for r in results if r["candidate"] == name}
        cells = [f"**{row[k]['accuracy']:.3f}**" if row[k]["accuracy"] == best[k] else f"{row[k]['accuracy']:.3f}"
                 for k in keeps]
        last = row[keeps[-1]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {last['outliers_kept']}/{last['outliers']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(run_command(study, sys.argv[1:]))
