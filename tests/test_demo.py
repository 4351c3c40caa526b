import json
import math

import pytest
import torch

from comfyui_adacluster.adacluster_core.tools import demo
from comfyui_adacluster.adacluster_core.tools.workload import VideoAttentionWorkload, WorkloadConfig


def test_quick_demo_end_to_end(tmp_path, capsys):
    assert demo.main(["--quick", "--no-progress", "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "rel L2" in printed and "svg2 rule" in printed
    text = (tmp_path / "adacluster_demo.json").read_text()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))  # strict JSON
    png = tmp_path / "adacluster_demo.png"
    assert png.stat().st_size > 1000
    methods = data["methods"]
    assert methods["dense"]["summary"]["rel_l2"] == 0.0
    for name, entry in methods.items():
        s = entry["summary"]
        if not s.get("available", True) or "kept_fraction" not in s:
            continue
        assert 0 < s["kept_fraction"] <= 1, name
        assert math.isfinite(s["rel_l2"]) and 0 <= s["rel_l2"] < 1, name
        assert 0 < s["kept_mass"] <= 1 + 1e-6, name
    for name in ("adaspa (s 0.8)", "mod-dit"):  # every method of the pack is a row, and runs sparse
        assert methods[name]["summary"]["sparse_calls"] > 0 and methods[name]["summary"]["kept_fraction"] < 1, name
    sparse = [e["summary"] for n, e in methods.items() if n != "dense" and e["summary"].get("sparse_calls")]
    assert sparse and any(s["kept_fraction_sparse_calls"] < 1 for s in sparse)
    assert any(s["rel_l2_sparse_calls"] > 0 for s in sparse)  # sparse calls really were approximate


@pytest.mark.parametrize("argv, fragment", [
    (["--samples", "0"], "--samples 0: expected an integer >= 1"),
    (["--samples", "-5"], "--samples -5: expected an integer >= 1"),
    (["--sol-steps", "bogus"], "argument --sol-steps: invalid choice: 'bogus'"),
    (["--sol-tau", "-1"], "--sol-tau -1.0: expected a finite number > 0"),
    (["--sol-tau", "nan"], "--sol-tau nan"),
    (["--text", "5000"], "--text = 5000 is out of range"),
    (["--frames", "0"], "--frames = 0 is out of range"),
    (["--threads", "-1"], "--threads -1"),
    (["--steps", "1"], "--steps 1: expected at least 2"),
    (["--steps", "3", "--warmup", "3"], "--warmup 3: expected at most 2"),
])
def test_flags_are_checked_before_any_work_naming_the_flag(argv, fragment, capsys, monkeypatch):
    monkeypatch.setattr(demo, "run_methods", lambda *a, **k: pytest.fail("work started before the flags were checked"))
    with pytest.raises(SystemExit) as info:
        demo.main(argv + ["--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "WorkloadConfig" not in err, err
    if argv[:2] == ["--steps", "1"]:
        assert "--warmup" not in err.split("error:")[1].split("(")[0]  # the user never typed --warmup


def test_out_dir_that_is_a_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "run_methods", lambda *a, **k: pytest.fail("work started"))
    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--out-dir", str(target)])
    err = capsys.readouterr().err
    assert f"--out-dir {target}: {target} exists and is not a folder" in err


def test_json_values_are_finite_or_null():
    assert demo.finite_json({"a": [float("nan"), 1.5, float("inf")], "b": torch.tensor([2.0])}) == \
        {"a": [None, 1.5, None], "b": [2.0]}


def test_dense_layer_calls_are_charged_the_dense_time(monkeypatch):
    config = WorkloadConfig(frames=2, height=8, width=8, heads=2, head_dim=64, layers=2, steps=2)
    workload = VideoAttentionWorkload(config)
    methods = [demo.Method("dense", "dense"),
               demo.Method("all dense", "runner", demo.runner_config(None, warmup_steps=1, dense_layer_fraction=1.0))]
    results = demo.run_methods(workload, methods, 1, 32, progress=False)
    dense_ms = [c.time_ms for c in results["dense"].calls]
    runner_calls = results["all dense"].calls
    assert runner_calls and not any(c.sparse for c in runner_calls)
    for call, dense in zip(runner_calls, dense_ms):
        assert call.time_ms >= dense  # the dense attention it returned, plus the runner's own time


def test_sol_row_only_when_it_ran():
    ran = demo.MethodResult("sol-attn (tau 1)", "comfy-kitchen eager reference")
    ran.calls.append(demo.CallResult(0, 1, True, 0.2, 0.1, 0.8, 3.0))
    missing = demo.MethodResult("sol-attn (tau 1)", "comfy-kitchen is not installed", available=False)
    dense = demo.MethodResult("dense", "torch SDPA", calls=[demo.CallResult(0, 1, False, 1.0, 0.0, 1.0, 2.0)])
    table = demo.format_table({"dense": dense, "sol": missing})
    rows = table.splitlines()[2:]
    assert rows[0].startswith("dense") and rows[1] == "sol-attn (tau 1): not run (comfy-kitchen is not installed)"
    assert "sol-attn (tau 1)  20.0%" in demo.format_table({"dense": dense, "sol": ran}).replace("   ", "  ")


def test_tools_set_one_thread_and_the_library_keeps_torchs_default():
    import subprocess
    import sys

    code = ("import torch; before = torch.get_num_threads(); torch.set_num_threads(2); "
            "import comfyui_adacluster.nodes.common, comfyui_adacluster.adacluster_core.attention; "
            "assert torch.get_num_threads() == 2; "
            "from comfyui_adacluster.adacluster_core.tools import demo; args, _ = demo.parse_args(['--quick']); "
            "assert torch.get_num_threads() == 2 and args.threads == 1; demo.set_threads(args.threads); "
            "assert torch.get_num_threads() == 1; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_layout_attended_matches_kept_fraction():
    """The attended-key mask used for the kept mass agrees with the layout's own kept fraction."""
    from comfyui_adacluster.adacluster_core import clustering, selection
    from comfyui_adacluster.adacluster_core.config import SelectionConfig

    wl = VideoAttentionWorkload(WorkloadConfig(frames=2, height=9, width=11, heads=2, head_dim=64, layers=2, steps=2))
    q, k, _ = wl.qkv(1, 1)
    n = q.shape[-2]
    qc = clustering.cluster_queries(q, 7, 2, generator=torch.Generator().manual_seed(0))
    calib = clustering.calibrate_keys(k, 9, 1.5, True, 3, 1 / 3, 2, torch.Generator().manual_seed(1))
    for sel in (SelectionConfig(local_block=0, own_clusters=False, top_p=0.5), SelectionConfig(local_block=16)):
        layout = selection.build_layout(q, k, qc, calib.clusters, sel)
        attended = demo.layout_attended(layout, torch.arange(n), n)
        assert float(attended.float().mean()) == pytest.approx(demo.layout_kept_fraction(layout, n), abs=1e-6)


def test_sol_routing_kept_pairs():
    exact = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    exact[..., 0, 0] = True
    # 150 tokens: blocks of 64, 64, 22.
    assert demo._kept_pairs_fraction(exact, 150) == pytest.approx(64 * 64 / 150 ** 2)
    q = torch.randn(1, 2, 150, 16)
    routed = demo.sol_routing(q, torch.randn(1, 2, 150, 16), tau=100.0)
    assert routed.shape == (1, 2, 3, 3)
    band = (torch.arange(3).view(-1, 1) - torch.arange(3).view(1, -1)).abs() <= 1
    assert torch.equal(routed[0, 0], band)  # a huge tau keeps the diagonal band only


@pytest.mark.skipif(demo.sol_attn_function()[0] is None, reason="comfy-kitchen (optional bench dependency) not installed")
def test_sol_routing_reproduces_sol_attn_exact_branch():
    wl = VideoAttentionWorkload(WorkloadConfig(frames=2, height=10, width=13, heads=2, layers=2, steps=2))
    q, k, v = wl.qkv(1, 1)
    n = q.shape[-2]
    exact = demo.sol_routing(q, k, 1.0)
    blocks = torch.arange(n) // demo.SOL_BLOCK
    keep = exact[:, :, blocks][..., blocks]
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mine = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v
    sol, _ = demo.sol_attn_function()
    theirs = sol(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
                 tau=1.0, tail=False).transpose(1, 2)
    assert float((mine - theirs).norm() / theirs.norm()) < 1e-4


def test_readme_shows_the_table_and_notes_as_printed():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    dense = demo.MethodResult("dense", "torch SDPA", calls=[demo.CallResult(0, 1, False, 1.0, 0.0, 1.0, 2.0)])
    header = demo.format_table({"dense": dense}).splitlines()[0]
    shown = [line for line in readme.splitlines() if line.startswith("method  ")]
    assert shown and shown[0].split("  ") and shown[0].split() == header.split()
    assert demo.TIMING_NOTE.format(threads=1) in readme
    missing = demo.MethodResult("sol-attn (tau 1)", demo.default_methods(1)[-1].note, available=False)
    if demo.sol_attn_function()[0] is None:
        assert demo.format_table({"sol": missing}).splitlines()[-1] in readme


def test_paper_rows_run_adacluster_as_published():
    """The demo's and the video benchmark's "paper" rows keep the published recipe, dense-layer rule and cluster
    counts, whatever the defaults are."""
    from comfyui_adacluster.adacluster_core.config import load_preset
    from comfyui_adacluster.adacluster_core.tools.video_bench import method_overrides
    paper = next(m for m in demo.default_methods(1) if m.short == "paper").config
    bench = load_preset("wan", **method_overrides()["paper"])
    for config in (paper, bench):
        assert (config.recipe, config.dense_layers_by, config.query_clusters, config.initial_key_clusters) == (
            "paper", "clusters", 65, 100)


def test_sol_attn_lookup_says_what_to_install(monkeypatch):
    """Missing, or too old to have sol_attn: the reason names the release to install."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "comfy_kitchen", None)  # import fails as if not installed
    assert demo.sol_attn_function() == (None, 'comfy-kitchen is not installed: pip install "comfy-kitchen>=0.2.40"')
    monkeypatch.setitem(sys.modules, "comfy_kitchen", types.ModuleType("comfy_kitchen"))  # a release without it
    sol, why_not = demo.sol_attn_function()
    assert sol is None and why_not.endswith('has no sol_attn: pip install "comfy-kitchen>=0.2.40"')
