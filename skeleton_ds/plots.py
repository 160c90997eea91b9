"""PNG pictures of a skeleton, the studies, the benchmark and the results table (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import torch

from skeleton_ds.checkpoint import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, png: Path, dpi: int) -> None:
    """Write the figure atomically (fsync-ed temporary file, then rename) and release it."""
    with atomic_file(Path(png)) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def plot_skeleton(scores: dict[str, torch.Tensor], skeleton, geometry, ffn_png: Path, heads_png: Path) -> None:
    """Heatmap of FFN scores per layer (each row sorted, normalised to its maximum) with the kept
    region outlined, and a bar chart of the KV groups kept per layer."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    rows = []
    for i in range(geometry.layers):
        s = scores[f"ffn.{i}"].float().abs()  # |signed| too, so the log scale applies
        rows.append((s.sort(descending=True).values / s.max().clamp(min=1e-12)).clamp(min=1e-4).numpy())
    fig, ax = plt.subplots(figsize=(10, 0.45 * geometry.layers + 1.6))
    # Scores are heavy-tailed: a log scale shows the whole sorted profile, not just the top few.
    image = ax.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest", norm=LogNorm(1e-4, 1))
    for i, size in enumerate(skeleton.ffn_sizes()):
        ax.plot([size - 0.5, size - 0.5], [i - 0.5, i + 0.5], color="red", linewidth=2)
    ax.set_xlabel("FFN neurons, sorted by score (kept: left of the red mark)")
    ax.set_ylabel("layer")
    ax.set_title(f"FFN scores per layer; kept {sum(skeleton.ffn_sizes())}/{geometry.layers * geometry.ffn_size}")
    fig.colorbar(image, ax=ax, label="|score| / layer max (log)")
    fig.tight_layout()
    _save(plt, fig, ffn_png, dpi=110)

    fig, ax = plt.subplots(figsize=(max(6, 0.5 * geometry.layers + 2), 3.4))
    kept = [len(h) for h in skeleton.heads]
    ax.bar(range(geometry.layers), kept, color="tab:blue", label="kept")
    ax.bar(range(geometry.layers), [geometry.kv_heads - k for k in kept], bottom=kept, color="lightgray",
           label="removed")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention KV groups")
    ax.set_title(f"Attention KV groups kept per layer\n({geometry.heads_per_group} query head(s) per group)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(plt, fig, heads_png, dpi=110)


def plot_study(results: list[dict], unpruned: dict[str, float], png: Path, title: str = "") -> None:
    """One subplot per task: dev accuracy against the FFN keep ratio, one line per scorer, and a
    dashed line at the unpruned prompt-tuned accuracy. `results` rows carry task, scorer, ffn_keep,
    accuracy (and optionally ffn_kept, the neurons kept per layer); `unpruned` maps task -> accuracy."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in results))
    scorers = list(dict.fromkeys(r["scorer"] for r in results))
    markers = "osD^vP*X"
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(7.0, 5.6 * len(tasks)), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in results if r["task"] == task]
        for k, scorer in enumerate(scorers):
            points = sorted((r["ffn_keep"], r["accuracy"]) for r in rows if r["scorer"] == scorer)
            if points:
                ax.plot(*zip(*points), marker=markers[k % len(markers)], linewidth=1.8, label=scorer)
        if task in unpruned:
            ax.axhline(unpruned[task], color="black", linestyle="--", linewidth=1.2, label="unpruned prompt-tuned")
            ax.annotate(f"unpruned {unpruned[task]:.3f}", (0.01, unpruned[task]), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize=8)
        ratios = sorted({r["ffn_keep"] for r in rows})
        kept = {r["ffn_keep"]: r.get("ffn_kept") for r in rows}
        ax.set_xticks(ratios)
        ax.set_xticklabels([f"{x:g}" + (f"\n({kept[x]})" if kept.get(x) is not None else "") for x in ratios])
        ax.set_xlabel("FFN keep ratio (neurons kept per layer)")
        ax.set_ylabel("dev accuracy")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.margins(y=0.12)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = len(labels) if len(tasks) > 1 else 3
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.02 + 0.05 * -(-len(labels) // ncol), 1, 1))
    _save(plt, fig, png, dpi=110)


def plot_results(table: list[dict], variants: list[str], png: Path, title: str = "") -> None:
    """One subplot per task: dev accuracy after re-tuning against the FFN keep ratio, one line per skeleton
    variant with its standard deviation over seeds, and the full model and majority class as lines.
    `table` rows carry task, ffn_keep, variant, after_mean, after_std, full_mean, majority."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in table))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in table if r["task"] == task]
        for variant in variants:
            mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["ffn_keep"])
            ax.errorbar([r["ffn_keep"] for r in mine], [r["after_mean"] for r in mine],
                        yerr=[r["after_std"] for r in mine], marker="o", capsize=3, label=variant)
        ax.axhline(rows[0]["full_mean"], color="black", ls="--", lw=1, label="full model, prompt-tuned")
        if rows[0]["majority"] is not None:
            ax.axhline(rows[0]["majority"], color="grey", ls=":", lw=1, label="majority class")
        ax.set_xticks(sorted({r["ffn_keep"] for r in rows}))
        ax.set_title(task)
        ax.set_xlabel("FFN keep ratio")
        ax.set_ylabel("dev accuracy after re-tuning")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = min(len(labels), 2 * len(tasks))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07 * -(-len(labels) // ncol), 1, 1))
    _save(plt, fig, png, dpi=110)


def plot_bench(rows: list[dict], png: Path, title: str = "") -> None:
    """Speed-up of the compact models over the PEFT contender (and over our full-model path) against
    the FFN keep ratio, one panel per input group and batch size, with each FLOP ratio dashed (a
    ratio of work, which a speed-up may pass: see the roofline columns for what bounds the time)."""
    plt = _pyplot()
    panels = list(dict.fromkeys((r.get("lengths", "fixed"), r["batch"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (lengths, batch) in zip(axes[0], panels):
        mine = sorted((r for r in rows if (r.get("lengths", "fixed"), r["batch"]) == (lengths, batch)
                       and r["contender"].startswith("compact") and r["head_keep"] == 1.0 and r["quant"] == "none"),
                      key=lambda r: r["ffn_keep"])
        keeps = [r["ffn_keep"] for r in mine]
        for ref, color in (("peft", "tab:red"), ("peft-full-logits", "tab:orange"), ("full", "tab:blue")):
            if mine and f"speedup_vs_{ref}" in mine[0]:
                ax.plot(keeps, [r[f"speedup_vs_{ref}"] for r in mine], "o-", color=color, label=f"measured vs {ref}")
                ax.plot(keeps, [r[f"flop_ratio_vs_{ref}"] for r in mine], "--", color=color, alpha=0.6,
                        label=f"FLOP ratio vs {ref}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("FFN keep ratio")
        ax.set_ylabel("speed-up (x)")
        ax.set_title(f"{'SST-2 dev lengths' if lengths == 'sst2' else 'fixed length'}, batch {batch}")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(plt, fig, png, dpi=120)


def plot_layers(results: list[dict], png: Path) -> None:
    """One subplot per skeleton: per block of layers, the dev accuracy with only that block pruned and with
    the skeleton's other layers pruned (that block whole again), between the unpruned and whole-skeleton
    lines. `results` rows are skeleton_ds/experiments/study_layers.py's."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        names = [f"{b['layers'][0]}-{b['layers'][-1]}\n({b['ffn_kept'] / b['ffn_total']:.2f})" for b in r["blocks"]]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [b["pruned_alone"] for b in r["blocks"]], width=0.4,
               label="only this block pruned")
        ax.bar([i + 0.2 for i in x], [b["restored"] for b in r["blocks"]], width=0.4,
               label="skeleton, this block whole")
        ax.axhline(r["unpruned"], color="black", ls="--", lw=1, label="unpruned")
        ax.axhline(r["skeleton"], color="grey", ls=":", lw=1.2, label="whole skeleton")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_xlabel("layers (FFN share kept)")
        ax.set_ylabel("dev accuracy, no re-tuning")
        ax.set_ylim(min(0.4, r["skeleton"] - 0.05), 1.0)
        ax.set_title(f"{r['task']}, FFN keep {r['ffn_keep']:g}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(plt, fig, png, dpi=110)
