"""adacluster-model-bench: the --tiny benchmark and the VRAM/state check through a real ComfyUI tree on the
CPU, its errors, and the core sparse node emulation against comfy-kitchen's sol_attn."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from comfyui_adacluster.adacluster_core.config import SelectionConfig
from comfyui_adacluster.adacluster_core.tools import model_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_server import PACK_ROOT, find_trees  # noqa: E402

TREES = find_trees()
needs_comfyui = pytest.mark.skipif(not TREES, reason="no ComfyUI checkout: set COMFYUI_PATH (and COMFYUI_PYTHON)")


def _run_bench(tree, out: Path, *args: str, timeout: float = 300):
    """Runs the benchmark with ComfyUI's python; the pack is importable as comfyui_adacluster."""
    shim = Path(tempfile.mkdtemp(prefix="adacluster-pk-"))
    (shim / "comfyui_adacluster").symlink_to(PACK_ROOT, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(shim), "COMFYUI_PATH": str(tree.path)}
    cmd = [tree.python, "-m", "comfyui_adacluster.adacluster_core.tools.model_bench", "--tiny", "--no-progress",
           "--out", str(out), *args]
    return subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=timeout)


@needs_comfyui
def test_tiny_benchmark_runs_every_family(tmp_path):
    tree = TREES[0]
    # 20 steps: the budget schedule's first quarter (steps 3 and 4 after the warm-up) runs the high-noise Top-K
    result = _run_bench(tree, tmp_path, "--steps", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(next(tmp_path.glob("model_bench-*.json")).read_text())
    assert next(tmp_path.glob("model_bench-*.png")).stat().st_size > 1000
    families = {"WanModel", "HunyuanVideo"} | ({"CogVideoXTransformer3DModel"} if tree.has_cogvideox else set())
    assert {row["model_class"] for row in data["cases"]} == families
    for row in data["cases"]:
        dense, ada, whole = row["dense"], row["adacluster"], row["whole_run"]
        assert dense["backend"].startswith("comfy attention_")
        # calibration step, the settling steps of CUDA-graph replay, the measured steps
        assert len(dense["step_ms"]) == 1 + 2 + data["measure_steps"] == len(ada["step_ms"])
        assert all(len(ms) == 2 for ms in ada["settling_step_ms_by_top_k_scale"].values())
        assert 0 < dense["self_attention_share"] <= dense["attention_share"] < 1
        assert ada["sparse_calls"] > 0 and 0 < ada["kept_fraction"] < 1
        # dense layers by measured error (at most the preset's share) plus hard layers: never all of them
        assert len(ada["dense_layers"]) < ada["layers"]
        assert all(0 <= layer < ada["layers"] for layer in ada["dense_layers"])
        assert ada["cache_bytes_peak"] > 0 and ada["cache_bytes_after_run"] == 0
        # Same seed, same steps: sparse attention changes the latent a little, not a lot.
        assert 0 < ada["random_weight_fidelity_rel_error"] < 0.5
        assert ada["ceiling_step_ms"] < dense["step_ms_median"]
        assert whole["composed"] and whole["ceiling_speedup"] > 1
        # every Top-K multiplier of the schedule is timed in a slice of its own
        by_scale, kept_by_scale = ada["sparse_step_ms_by_top_k_scale"], ada["kept_fraction_by_top_k_scale"]
        high = f"{SelectionConfig().high_noise_top_k_scale:g}"
        assert set(by_scale) == set(kept_by_scale) == {"1", high} and all(ms > 0 for ms in by_scale.values())
        assert kept_by_scale[high] >= kept_by_scale["1"]
        assert f"15 at Top-K x1, 2 at Top-K x{high}" in whole["note"]
        assert row["core_sparse"]["available"] or "sol_attn" in row["core_sparse"]["note"]
    assert "composed from the preset's schedule" in result.stdout
    assert "random-weight fidelity" in result.stdout and "says little about real quality" in result.stdout


def test_whole_run_counts_each_multiplier_first_steps_at_their_settling_times():
    samples = {1.0: {"settle_ms": [50.0, 40.0], "ms": [10.0, 12.0, 11.0]}, 3.0: {"settle_ms": [90.0, 70.0], "ms": [30.0]}}
    scale_of = {3: 3.0, 4: 3.0, 5: 3.0, 6: 1.0, 7: 1.0, 8: 1.0, 9: 1.0}
    assert model_bench._sparse_steps_ms(scale_of, samples) == 90 + 70 + 30 + 50 + 40 + 11 + 11
    assert model_bench._slice_steps(3) == 1 + 2 + 3


@needs_comfyui
def test_tiny_vram_and_state_check(tmp_path):
    result = _run_bench(TREES[0], tmp_path, "--vram-check")
    assert result.returncode == 0, result.stdout + result.stderr
    check = json.loads(next(tmp_path.glob("vram_check-*.json")).read_text())["vram_checks"][0]
    assert check["passed"] and len(check["runs"]) == 5
    assert all(r["sparse_calls"] > 0 and r["cache_bytes"] == 0 and not r["cache_active"] for r in check["runs"])
    stopped = check["interrupted"]
    assert stopped["stopped"] and stopped["cache_bytes_when_stopped"] > 0
    assert stopped["cache_bytes_after"] == 0 and not stopped["cache_active_after"]
    assert "stopped by the benchmark's callback" in stopped["last_error"]
    assert "PASSED" in result.stdout


def test_errors_name_the_problem(tmp_path):
    missing = tmp_path / "no-comfyui"
    result = subprocess.run([sys.executable, "-m", "comfyui_adacluster.adacluster_core.tools.model_bench", "--tiny",
                             "--comfyui", str(missing), "--out", str(tmp_path)], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{missing}" in result.stderr and "is not a ComfyUI checkout" in result.stderr
    with pytest.raises(SystemExit):
        model_bench.parse_args(["--cases", "wan99b_480p"])
    with pytest.raises(model_bench.BenchError, match="COMFYUI_PATH is not set"):
        model_bench.setup_comfyui(None, cpu=True)


def test_widget_option_sets_node_widgets_and_names_bad_values(capsys):
    args = model_bench.parse_args(["--widget", "head_budgets=one Top-K", "--widget", "query_clusters=65"])
    assert args.widgets == {"head_budgets": "one Top-K", "query_clusters": 65}
    spec = model_bench.MODELS[model_bench.CASES["wan1.3b_480p"].model]
    assert model_bench._widgets(spec, args)["head_budgets"] == "one Top-K"
    for bad, message in ((["--widget", "head_budgets=many"], "head_budgets = 'many' is not one of"),
                         (["--widget", "query_clusters"], "expected NAME=VALUE"),
                         (["--widget", "nope=1"], "unknown widget 'nope'")):
        with pytest.raises(SystemExit):
            model_bench.parse_args(bad)
        assert message in capsys.readouterr().err


def test_case_shapes_match_the_real_token_counts():
    tokens = {name: case.video_tokens for name, case in model_bench.CASES.items()}
    assert tokens["wan14b_720p"] == 75_600 and tokens["wan1.3b_480p"] == 32_760
    assert tokens["hunyuan_720p"] == 118_800 and tokens["cogvideox2b_480p"] == 17_550


# ------------------------------------------------------------------------------- core node emulation
def _sol():
    sol, _ = model_bench.sol_attn_function()
    return sol


@pytest.mark.skipif(_sol() is None, reason="comfy-kitchen with sol_attn (0.2.40+) not installed")
@pytest.mark.parametrize("skip_reshape", [False, True])
def test_core_emulation_runs_sol_attn_only_where_the_core_node_would(skip_reshape):
    sol = _sol()
    gen = torch.Generator().manual_seed(11)
    b, h, n, d = 1, 2, 197, 128
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    if not skip_reshape:
        q, k, v = (t.transpose(1, 2).reshape(b, n, h * d) for t in (q, k, v))
    calls = []

    def backend(q_, k_, v_, heads, mask=None, **kwargs):
        calls.append(mask)
        return torch.full((1,), float(len(calls)))

    core = model_bench.CoreSparseEmulation(sol, start_sigma=0.8, min_tokens=128)
    late = {"transformer_options": {"sigmas": torch.tensor([0.5])}}
    early = {"transformer_options": {"sigmas": torch.tensor([0.9])}}
    kw = {"skip_reshape": skip_reshape, "skip_output_reshape": skip_reshape}
    out = core(backend, q, k, v, h, **kw, **late)
    q4, k4, v4 = ((t if skip_reshape else t.view(b, n, h, d).transpose(1, 2)) for t in (q, k, v))
    expected = sol(*(t.transpose(1, 2) for t in (q4, k4, v4)), tau=model_bench.CORE_TAU)
    expected = expected.transpose(1, 2) if skip_reshape else expected.reshape(b, n, h * d)
    assert torch.allclose(out, expected.to(out.dtype), atol=1e-5) and core.sparse_calls == 1 and not calls
    core(backend, q, k, v, h, **kw, **early)
    core(backend, q, k, v, h, mask=torch.zeros(n, n), **kw, **late)
    cross_k = k[..., :64, :] if skip_reshape else k[:, :64]
    core(backend, q, cross_k, cross_k, h, **kw, **late)
    short = q[..., :100, :] if skip_reshape else q[:, :100]
    core(backend, short, short, short, h, **kw, **late)
    core(backend, q, k, v, 2 * h, **late) if not skip_reshape else None
    expected_reasons = {"before start_percent": 1, "mask": 1, "cross-attention": 1, "fewer than 128 tokens": 1}
    if not skip_reshape:
        expected_reasons["head dim 64 is not 128"] = 1
    assert core.dense_reasons == expected_reasons and core.sparse_calls == 1
