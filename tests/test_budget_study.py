"""The budget and schedule study on a tiny grid: both parts run through the runner and report what they
measured; bad flags fail before any work."""
import json

import pytest

from comfyui_adacluster.adacluster_core.config import SelectionConfig
from comfyui_adacluster.adacluster_core.tools import budget_study as bs

TINY = bs.VideoShape(4, 16, 20, 2, 64, "cogvideox", 20, True)


def test_both_parts_on_a_tiny_grid(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(bs.SHAPES, "tiny", TINY)
    # a budget keeping every cluster must give the dense output; a small one must not
    monkeypatch.setattr(bs, "selection_settings", lambda: {
        "everything": SelectionConfig(top_k=4096, min_kept_fraction=1.0),
        "top-k 2": SelectionConfig(top_k=2, min_kept_fraction=0.0)})
    monkeypatch.setattr(bs, "schedule_variants", lambda preset, steps=50: {
        "warm-up 3": {"warmup_steps": 3}, "warm-up 3, no dense layers": {"warmup_steps": 3, "dense_layer_fraction": 0.0}})
    out = tmp_path / "study.json"
    assert bs.main(["--shape", "tiny", "--layers", "2", "--steps", "10", "--device", "cpu", "--calibrate-at", "2",
                    "--set", "query_clusters=5", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["settings"] == {"query_clusters": 5}
    rows = {(r["setting"], r["noise"]): r for r in data["selection"]}
    assert {r["calibrated_at_step"] for r in data["selection"]} == {2}
    assert {noise for _, noise in rows} == {"middle", "low"}  # high noise (step 1) comes before the calibration
    for noise in ("middle", "low"):
        assert rows[("everything", noise)]["kept"] == pytest.approx(1.0)
        assert rows[("everything", noise)]["rel_l2"] < 1e-5
        assert 0 < rows[("top-k 2", noise)]["kept"] < 1 and rows[("top-k 2", noise)]["rel_l2"] > 1e-3
    schedule = {r["variant"]: r for r in data["schedule"]}
    for row in schedule.values():
        assert row["warmup_steps"] == 3 and 0 < row["attention_work"] < 1 and row["sparse_rel_l2"] > 0
        assert set(row["calibration_errors"]) == {"0", "1"}  # measured at calibration for both layers
    assert schedule["warm-up 3, no dense layers"]["dense_layers"] == []
    assert "| warm-up 3 |" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--layers", "0"], "--layers must be in [1, 64]"), (["--steps", "5"], "--steps must be in [10, 200]"),
    (["--calibrate-at", "60"], "--calibrate-at steps must be in [0, 48]"), (["--threads", "0"], "--threads"),
    (["--variants", "no-such-row"], "--variants no-such-row matches none of: preset as shipped"),
    (["--set", "query_clusters=0"], "query_clusters = 0 is out of range"), (["--set", "top_k"], "expected KEY=VALUE")])
def test_bad_flags_are_named_before_any_work(flags, message, capsys):
    with pytest.raises(SystemExit):
        bs.main(["--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert message in err and "workload:" not in err


def test_calibration_steps_are_checked_only_for_the_selection_part(capsys):
    """The selection part's calibration steps (default 2 and 9) do not stop a short schedule-only study."""
    with pytest.raises(SystemExit):
        bs.main(["--device", "cpu", "--steps", "10", "--parts", "schedule", "--variants", "no-such-row"])
    error_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--variants no-such-row" in error_line and "--calibrate-at" not in error_line
