import math

import pytest

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
