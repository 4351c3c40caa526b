import math

import pytest

from comfyui_adacluster.adacluster_core.tools import plot
from comfyui_adacluster.adacluster_core.tools.plot import color_of, render_report, render_reports


def _report(layers=5, heads=3):
    rows = []
    for layer in range(layers):
        dense = layer == 1
        rows.append({"layer": layer, "sparse_calls": 0 if dense else 4, "dense_calls": 5 if dense else 1,
                     "kept_fraction": float("nan") if dense else 0.1 + 0.03 * layer,
                     "kept_per_head": [] if dense else [0.1 + 0.01 * h + 0.03 * layer for h in range(heads)],
                     "key_clusters_per_head": [100 + 7 * h + layer for h in range(heads)],
                     "dense_layer": dense, "hard": False, "time_ms": 100.0 + layer, "clustering_ms": 9.0})
    return {"method": "adacluster", "total_steps": 5, "layers": rows, "steps": [], "dense_reasons": {},
            "total_time_ms": 600.0}


def test_render_report_with_dense_layer_and_extra_series():
    image = render_report(_report(), title="t", layer_values={"error": {0: 0.1, 2: 0.05}})
    assert image.mode == "RGB" and image.width == 1200 and image.height > 500
    assert len(image.getcolors(maxcolors=1 << 16) or []) > 10  # something was drawn


def test_render_reports_stacks_and_handles_many_layers():
    one = render_report(_report())
    both = render_reports([_report(), _report(layers=41, heads=40)])
    assert both.height > 2 * one.height - 10


def test_render_report_accepts_objects_with_to_dict():
    class Report:
        def to_dict(self):
            return _report(layers=2, heads=1)
    assert render_report(Report()).height > 0


def test_bad_input():
    with pytest.raises(ValueError, match="layers"):
        render_report({"method": "x"})
    with pytest.raises(ValueError):
        render_reports([])


def test_color_map_ends_and_missing():
    assert color_of(0.0, 0.0, 1.0) == (68, 1, 84)
    assert color_of(1.0, 0.0, 1.0) == (253, 231, 37)
    assert color_of(math.nan, 0.0, 1.0) != color_of(0.5, 0.0, 1.0)


def test_methods_share_one_scale_per_quantity(monkeypatch):
    low, high = _report(), _report()
    for row in high["layers"]:
        row["kept_per_head"] = [4 * v for v in row["kept_per_head"]]
        row["key_clusters_per_head"] = [3 * v for v in row["key_clusters_per_head"]]
        row["time_ms"] *= 5
    seen = {"heat": [], "bars": []}
    real_heat, real_bars = plot._heatmap, plot._bars
    monkeypatch.setattr(plot, "_heatmap", lambda panel, rows, cols, lo, hi, *a, **k: (
        seen["heat"].append((a[-1], lo, hi)), real_heat(panel, rows, cols, lo, hi, *a, **k))[1])
    monkeypatch.setattr(plot, "_bars", lambda *a, **k: (seen["bars"].append(k.get("top")), real_bars(*a, **k))[1])
    render_reports([low, high], layer_values=[{"err": {0: 0.1}}, {"err": {0: 0.4}}])
    by_legend = {}
    for legend, lo, hi in seen["heat"]:
        by_legend.setdefault(legend, set()).add((lo, hi))
    assert all(len(ranges) == 1 for ranges in by_legend.values()), by_legend  # one scale for both methods
    assert by_legend["kept"] == {(0.0, max(v for r in high["layers"] for v in r["kept_per_head"]))}
    assert len(set(seen["bars"])) == 2 and 0.4 in seen["bars"]  # one time top, one error top


def test_bar_axes_start_at_a_labelled_zero(monkeypatch):
    labels = []
    real_text = plot.ImageDraw.ImageDraw.text
    monkeypatch.setattr(plot.ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *a, **k: (labels.append(text), real_text(self, xy, text, *a, **k))[1])
    render_report(_report(), layer_values={"error": {0: 0.1, 2: 0.05}})
    assert "0" in labels and "0.000" in labels  # time bars and error bars


def test_tradeoff_panel_shows_every_method():
    points = [{"method": "dense", "kept": 1.0, "rel_l2": 0.0, "calls": [(1.0, 0.0)]},
              {"method": "adacluster", "kept": 0.2, "rel_l2": 0.05, "calls": [(0.1, 0.04), (0.3, 0.06)]},
              {"method": "sol-attn", "kept": 0.3, "rel_l2": 0.09, "calls": []}]
    image = plot.render_tradeoff(points)
    colors = {c for _, c in image.getcolors(maxcolors=1 << 16)}
    assert all(plot.METHOD_COLORS[i] in colors for i in range(3))
    with pytest.raises(ValueError):
        plot.render_tradeoff([])
