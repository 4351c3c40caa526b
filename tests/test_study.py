"""The selection study runs end to end on a tiny workload and measures every family, default included."""
import json
import math

from comfyui_adacluster.adacluster_core.tools import study


def test_quick_study_measures_every_family(tmp_path):
    assert study.main(["--quick", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "selection_study.json").read_text())
    families = {p["family"] for p in data["points"]}
    expected = {name for name, _, _ in study.selection_families()}
    assert expected <= families
    assert {name for name, _ in study.method_families(1, 3, 512)} <= families  # AdaSpa and MOD-DiT rows
    for point in data["points"]:
        assert 0 < point["kept"] <= 1 and 0 <= point["kept_mass"] <= 1 + 1e-6
        assert math.isfinite(point["rel_l2"]) and point["rel_l2"] >= 0
    # more clusters kept never loses attention mass along a Top-K curve
    curve = sorted((p for p in data["points"] if p["family"] == "centroid top-k + tail + local"),
                   key=lambda p: int(p["setting"].split("=")[1]))
    assert all(a["kept_mass"] <= b["kept_mass"] + 1e-6 for a, b in zip(curve, curve[1:]))
    assert "centroid top-k + tail + local" in (tmp_path / "selection_study.md").read_text()
