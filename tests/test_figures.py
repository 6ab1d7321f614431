"""The PNG figures hold the models and labels they claim, and no text overlaps or leaves the figure."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from cachelora import figures
from cachelora.replay import GRID

DOMAINS = ["medical", "law"]
MODELS = ["baseline", "multi", "merged", "all-mpnet-base-v2"]


def drawn(fig):
    """The closed figure drawn again, as savefig drew it (layout included)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return fig


def extents(fig, artists):
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists if a.get_text()]


def test_pr_curves_name_each_panels_own_adapter_and_every_model(png):
    curves = {d: {m: list(np.linspace(1, 0.5, len(GRID))) for m in ["baseline", d, "multi", "merged"]} for d in DOMAINS}
    fig = figures.pr_curves(curves, GRID, png)
    for ax, domain in zip(fig.axes, DOMAINS, strict=True):
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["baseline", f"{domain} adapter", "multi", "merged"]
        assert ax.get_title() == domain and ax.get_xlabel() == "recall" and ax.get_ylabel() == "precision"
    assert "generated test" in fig.get_suptitle()


@pytest.fixture
def png(tmp_path):
    return tmp_path / "figure.png"


def test_replay_names_every_model_and_row_titles_clear_the_axes_above(png):
    groups = [*DOMAINS, "all"]
    curve = [{"hit_rate": float(t), "hit_precision": 1 - float(t) / 2} for t in GRID]
    curves = {s: {m: {g: curve for g in groups} for m in MODELS} for s in ("test", "natural_test")}
    point = {"replay": {"hit_rate": 0.5, "hit_precision": 0.75}}
    operating = {m: {s: {g: point for g in groups} for s in curves} for m in MODELS}
    fig = figures.replay_curves(curves, operating, png)
    assert png.stat().st_size > 1000
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == MODELS
    drawn(fig)
    top, bottom = fig.axes[: len(groups)], fig.axes[len(groups) :]
    xlabels = extents(fig, [ax.xaxis.label for ax in top]) + extents(
        fig, [t for ax in top for t in ax.get_xticklabels()]
    )
    titles = extents(fig, [ax.title for ax in bottom])
    assert not any(t.overlaps(x) for t in titles for x in xlabels)
    assert all(ax.get_xlabel() == "hit rate" and ax.get_ylabel() == "hit precision" for ax in fig.axes)


def test_cost_quality_labels_every_model_inside_the_figure(png):
    cost = {
        "models": {
            "baseline": {"ms_per_query_batch_32": 3.0, "parameters": 22_713_216},
            "multi": {"ms_per_query_batch_32": 3.1, "parameters": 22_713_216},
            "all-mpnet-base-v2": {"ms_per_query_batch_32": 25.0, "parameters": 109_486_464},
        }
    }
    metrics = {
        name: {"natural_test": {"all": {"average_precision": ap}}}
        for name, ap in zip(cost["models"], [0.75, 0.76, 0.83], strict=True)
    }
    fig = figures.cost_quality(cost, metrics, png)
    drawn(fig)
    (ax,) = fig.axes
    labels = [t for t in ax.texts]
    assert [t.get_text().split(" (")[0] for t in labels] == list(cost["models"])
    for box in extents(fig, labels):
        assert ax.bbox.x0 <= box.x0 and box.x1 <= ax.bbox.x1 and box.y1 <= ax.bbox.y1, box
    assert not any(t.get_text() for t in ax.get_xticklabels(minor=True))  # log-scale minor labels collided


def test_the_margin_heatmap_shows_differences_not_percentages_of_a_margin_near_zero(png):
    metrics = {m: {"test": {d: {"margin_delta": 0.01 * i, "margin_gain_pct": 900.0} for d in DOMAINS}} for i, m in
               enumerate(["multi", "merged"])}  # fmt: skip
    fig = figures.gain_heatmap(metrics, DOMAINS, ["multi", "merged"], png)
    (ax, _) = fig.axes
    assert sorted({t.get_text() for t in ax.texts}) == ["+0.000", "+0.010"]
    assert "baseline" in ax.get_title()
