"""PNG figures people would rather look at than JSON: replay and PR curves, a margin-gain heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cachelora.records import atomic_path


def _save(fig: plt.Figure, path: Path) -> plt.Figure:
    """Write ``fig`` as a PNG (atomically) and close it; the closed figure is returned for inspection."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return fig


def pr_curves(curves: dict[str, dict[str, list[float]]], recall_grid: np.ndarray, path: Path) -> plt.Figure:
    """One panel per domain, one line per model (each panel's own adapter named as such), with a
    legend in every panel: interpolated precision against recall on the generated test split."""
    domains = list(curves)
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 4.2), squeeze=False, layout="constrained")
    for ax, domain in zip(axes[0], domains, strict=True):
        for model, precision in curves[domain].items():
            label = f"{model} adapter" if model == domain else model
            ax.plot(recall_grid, precision, label=label, linewidth=1.6)
        ax.set(title=domain, xlabel="recall", ylabel="precision", ylim=(0.45, 1.01))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle("Precision against recall per domain (generated test split)")
    return _save(fig, path)


def gain_heatmap(metrics: dict[str, dict[str, Any]], domains: list[str], models: list[str], path: Path) -> plt.Figure:
    """Model x domain margin over the baseline's (mean cos(a, p) - cos(a, n), generated test split), as
    a difference: a percentage of a baseline margin near 0 would say nothing."""
    values = np.array([[metrics[m]["test"][d]["margin_delta"] for d in domains] for m in models])
    fig, ax = plt.subplots(figsize=(1.4 * len(domains) + 2, 0.55 * len(models) + 1.5), layout="constrained")
    limit = max(1e-3, float(np.abs(values).max()))
    image = ax.imshow(values, cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(models)), models)
    for i in range(len(models)):
        for j in range(len(domains)):
            ax.text(j, i, f"{values[i, j]:+.3f}", ha="center", va="center", fontsize=9)
    ax.set_title("Margin minus the baseline's margin (generated test split)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="margin difference (cosine)")
    return _save(fig, path)


SET_TITLES = {"test": "generated test", "natural_test": "natural test"}


def replay_curves(
    curves: dict[str, dict[str, dict[str, list[dict[str, float]]]]], operating: dict[str, Any], path: Path
) -> plt.Figure:
    """Cache replay, one row per set and one panel per domain (and all): hit precision against hit
    rate as the threshold falls, one line per model, a dot at its val-chosen operating point."""
    sets = list(curves)
    groups = list(next(iter(curves[sets[0]].values())))
    fig, axes = plt.subplots(
        len(sets), len(groups), figsize=(3.6 * len(groups), 3.6 * len(sets)), squeeze=False, layout="constrained"
    )
    for row, set_name in enumerate(sets):
        for ax, group in zip(axes[row], groups, strict=True):
            for model, by_group in curves[set_name].items():
                points = by_group[group]
                line = ax.plot([p["hit_rate"] for p in points], [p["hit_precision"] for p in points], label=model)
                chosen = operating[model][set_name][group]["replay"]
                ax.plot(chosen["hit_rate"], chosen["hit_precision"], "o", color=line[0].get_color())
            ax.set(title=f"{group} ({SET_TITLES.get(set_name, set_name)})", xlabel="hit rate", ylabel="hit precision")
            ax.set(xlim=(0, 1.01), ylim=(0.3, 1.01))
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncols=len(labels), title="model (dot: val-chosen threshold)"
    )
    fig.suptitle("Cache replay: hit precision against hit rate as the threshold falls")
    return _save(fig, path)


def cost_quality(cost: dict[str, Any], metrics: dict[str, Any], path: Path) -> plt.Figure:
    """CPU ms/query (batch 32, log scale) against natural-test AP, one labelled point per model
    (labels on the side of the point that faces the middle, so none leaves the axes)."""
    fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
    points = {
        name: (figures["ms_per_query_batch_32"], metrics[name]["natural_test"]["all"]["average_precision"])
        for name, figures in cost["models"].items()
    }
    middle = float(np.exp(np.mean([np.log(x) for x, _ in points.values()])))
    for name, (x, y) in points.items():
        size = cost["models"][name]["parameters"] / 1e6
        ax.scatter(x, y, s=max(20.0, size))
        right = x <= middle
        ax.annotate(
            f"{name} ({size:.0f} M)",
            (x, y),
            textcoords="offset points",
            xytext=(6 if right else -6, 6),
            ha="left" if right else "right",
            annotation_clip=True,
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # log-scale minor labels collide
    ax.margins(x=0.3, y=0.15)
    ax.set_xlabel("CPU ms per query, batch 32 (this run)")
    ax.set_ylabel("natural test AP (all domains)")
    ax.set_title("Cost against quality")
    ax.grid(alpha=0.3)
    return _save(fig, path)
