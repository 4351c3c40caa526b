"""The selection study runs end to end on a tiny workload and measures every family, default included."""
import json
import math
import tomllib
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("argv, fragment", [
    (["--measure", "abc"], "--measure abc: expected 'last' or comma-separated step numbers"),
    (["--measure", "0"], "--measure 0: steps [0] are outside [1, 5]"),
    (["--steps", "0"], "--steps 0: expected an integer in [2, 1000]"),
    (["--layers", "0"], "--layers 0: expected an integer in [1, 256]"),
    (["--warmup", "6"], "--warmup 6: expected an integer in [1, 5]"),
    (["--samples", "0"], "--samples 0"),
])
def test_study_flags_are_checked_naming_the_flag(argv, fragment, capsys, monkeypatch):
    monkeypatch.setattr(study, "run_study", lambda *a, **k: pytest.fail("work started before the flags were checked"))
    with pytest.raises(SystemExit) as info:
        study.main(argv)
    assert info.value.code == 2 and fragment in capsys.readouterr().err


def test_console_scripts_match_the_programs_names():
    from comfyui_adacluster.adacluster_core.tools import demo, kernel_bench

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    parsers = {"adacluster-demo": demo.build_parser(), "adacluster-study": study.build_parser(),
               "adacluster-bench": kernel_bench.build_parser()}
    for name, parser in parsers.items():
        assert parser.prog == name and name in scripts
        module, function = scripts[name].split(":")
        assert module.endswith(parser_module(name)) and function == "main"


def parser_module(name: str) -> str:
    return {"adacluster-demo": "tools.demo", "adacluster-study": "tools.study", "adacluster-bench": "tools.kernel_bench"}[name]


def test_kernel_bench_help_is_whole_sentences():
    from comfyui_adacluster.adacluster_core.tools import kernel_bench

    description = kernel_bench.build_parser().description
    assert description.rstrip().endswith(".") and "PERFORMANCE.md" not in description
    assert "whole steady-state AdaCluster calls" in description


def test_kernel_bench_tile_configs_parse_and_name_bad_items():
    from comfyui_adacluster.adacluster_core.tools.kernel_bench import parse_tile_configs

    assert parse_tile_configs(["128=64,64,8,3", "64=128,64,4,2"]) == {128: (64, 64, 8, 3), 64: (128, 64, 4, 2)}
    assert parse_tile_configs([]) == {}
    for item, fragment in [("128=64,64,8", "D=BM,BN,WARPS,STAGES"), ("96=64,64,4,3", "head dim 64 or 128"),
                           ("128=48,64,4,3", "tile rows"), ("128=64,64,3,3", "warps"), ("128=64,64,4,9", "stages")]:
        with pytest.raises(ValueError, match=fragment):
            parse_tile_configs([item])


def test_compared_tilings_are_checked_before_any_work(capsys):
    from comfyui_adacluster.adacluster_core.tools import kernel_bench

    for argv, fragment in [(["--compare-tilings", "128=64,64,4"], "--compare-tilings '128=64,64,4': expected"),
                           (["--compare-tilings", "128=64,64,4,3"], "--compare-tilings needs --workload video"),
                           (["--workload", "video", "--methods", "paper", "--compare-tilings", "128=64,32,4,3"],
                            "keep default in --methods")]:
        with pytest.raises(SystemExit) as info:
            kernel_bench.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and fragment in err, (argv, err)


def test_layout_tiling_restores_the_run_tiling():
    pytest.importorskip("triton")
    from comfyui_adacluster.adacluster_core.tools.kernel_bench import layout_tiling
    from comfyui_adacluster.kernels import triton_attention

    overrides = triton_attention.CONFIG_OVERRIDE
    assert 128 not in overrides
    with layout_tiling(128, (64, 32, 4, 3)):
        assert triton_attention._config(128, 250.0, 100.0, True) == (64, 32, 4, 3)
    assert 128 not in overrides
    overrides[128] = (128, 128, 8, 3)  # a --tile-config of the run comes back after a compared tiling
    try:
        with pytest.raises(RuntimeError):
            with layout_tiling(128, (64, 64, 8, 3)):
                raise RuntimeError("a failed launch")
        assert overrides[128] == (128, 128, 8, 3)
    finally:
        overrides.pop(128)


def test_compared_tilings_are_summarised_against_the_run_tiling():
    from comfyui_adacluster.adacluster_core.tools import video_bench

    def case(run_ms, other_ms, difference):
        row = {"rel_l2": 0.05, "kept": 0.1, "call_ms": 4.0, "kernel_hybrid_ms": run_ms,
               "kernel_by_tiling": {"128=64,32,4,3": {"ms": other_ms, "rel_diff": difference, "run_tiling_ms": run_ms}}}
        return {"dense_ms": 11.0, "rows": {"default": row}}

    failed = case(4.0, 0.1, 0.0)
    failed["rows"]["default"]["kernel_by_tiling"]["128=64,32,4,3"] = {"error": "OutOfResources: shared memory"}
    cases = [case(3.0, 2.4, 1e-3), case(5.0, 4.6, 4e-3), failed]
    summary = video_bench.summarize(cases)
    timing = summary["default"]["kernel_by_tiling"]["128=64,32,4,3"]
    assert timing == pytest.approx({"ms": 3.5, "run_tiling_ms": 4.0, "max_rel_diff": 4e-3})
    lines = []
    video_bench.print_video_table([{"shape": "wan1.3b-480p", "cases": cases, "summary": summary}], "GPU",
                                  print_fn=lines.append)
    assert "wan1.3b-480p | 128=64,32,4,3 | 3.50 | 4.00 | 0.88x | 4.0e-03" in lines


def test_compared_tilings_run_through_the_video_benchmark_on_the_cpu(monkeypatch):
    """The wiring of --compare-tilings through a whole case, on the PyTorch executors with the GPU timers replaced
    (the tiling changes nothing there, so its difference from the run's tiling is zero)."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from comfyui_adacluster.adacluster_core.tools import kernel_bench, video_bench

    def one_run(fn, **_):
        fn()
        return 1.0

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the key path is chosen without asking a GPU
    monkeypatch.setitem(video_bench.VIDEO_SHAPES, "tiny", video_bench.VideoShape(2, 8, 12, 2, 64, "wan"))
    monkeypatch.setattr(video_bench, "time_ms", one_run)
    monkeypatch.setattr(kernel_bench, "time_ms", one_run)
    monkeypatch.setattr(video_bench, "fastest_dense", lambda q, k, v: ("math", 2.0, {}))
    monkeypatch.setattr(video_bench, "_graph", lambda fn: SimpleNamespace(replay=fn))
    monkeypatch.setattr(video_bench.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(video_bench.VideoAttentionWorkload, "to", lambda self, device: self)
    result = video_bench.bench_video_shape("tiny", 0, methods=("default",), sol_taus=(), log=lambda line: None,
                                           settings={"query_clusters": 6, "initial_key_clusters": 10},
                                           steps=(25,), tilings=[(64, (64, 32, 4, 3)), (128, (128, 64, 8, 3))])
    rows = [case["rows"]["default"] for case in result["cases"]]
    assert rows and all("error" not in row for row in rows), rows
    for row in rows:  # only the shape's head dim is compared
        assert set(row["kernel_by_tiling"]) == {"64=64,32,4,3"}
        assert row["kernel_by_tiling"]["64=64,32,4,3"] == {"rel_diff": 0.0, "ms": 1.0, "run_tiling_ms": 1.0}
    assert result["summary"]["default"]["kernel_by_tiling"] == {
        "64=64,32,4,3": {"ms": 1.0, "run_tiling_ms": 1.0, "max_rel_diff": 0.0}}


def test_the_methods_benchmark_compares_tilings(capsys):
    """--compare-tilings of the methods benchmark: checked before any work, and each method's tiling printed
    against the pack's choice (a tiling that failed, with its error)."""
    from comfyui_adacluster.adacluster_core.tools.kernel_bench import methods_main, print_method_tilings

    with pytest.raises(SystemExit):
        methods_main(["--compare-tilings", "128=64,48,4,3"])
    assert "--compare-tilings '128=64,48,4,3': head dim 64 or 128, tile rows one of" in capsys.readouterr().err
    rows = [{"shape": "wan1.3b-480p",
             "adaspa": {"kernel_by_tiling": {"128=64,32,4,3": {"rel_diff": 2e-3, "ms": 3.0, "run_tiling_ms": 4.0}}},
             "moddit": {"kernel_by_tiling": {"128=64,32,4,3": {"error": "OutOfResources: shared memory"}}}}]
    lines = []
    print_method_tilings(rows, lines.append)
    assert lines[2] == "wan1.3b-480p | adaspa | 128=64,32,4,3 | 3.00 | 4.00 | 0.75x | 2.0e-03"
    assert lines[3] == "wan1.3b-480p | moddit | 128=64,32,4,3 | OutOfResources: shared memory | - | - | -"


def test_the_video_benchmark_says_why_sol_attn_rows_are_missing(monkeypatch):
    """--sol-tau without a usable comfy-kitchen, or at head dim 64: no rows, and the reason."""
    from comfyui_adacluster.adacluster_core.tools import video_bench

    assert video_bench.sol_attention(64) == (None, "Sol-Attn runs at head dim 128 only (this shape: 64)")
    monkeypatch.setattr(video_bench, "sol_attn_function", lambda: (None, "comfy-kitchen 0.2.31 has no sol_attn"))
    assert video_bench.sol_attention(128) == (None, "comfy-kitchen 0.2.31 has no sol_attn")
