"""Sparse calls replayed as CUDA graphs against the same calls run eagerly, on fresh random inputs every step
(odd sizes, both guidance branches, joint text, every phase of the budget schedule). Needs CUDA and Triton."""
from __future__ import annotations

import logging

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA-graph tests need CUDA (torch.cuda.is_available() is False)", allow_module_level=True)
pytest.importorskip("triton", reason="CUDA-graph tests need Triton")

from comfyui_adacluster.adacluster_core.attention import CallInfo, SparseAttention  # noqa: E402
from comfyui_adacluster.adacluster_core.cache import RunCache  # noqa: E402
from comfyui_adacluster.adacluster_core.config import load_preset  # noqa: E402
from comfyui_adacluster.adacluster_core.methods.adacluster import AdaCluster  # noqa: E402
from comfyui_adacluster.kernels import dense_attention  # noqa: E402
from qkv_data import structured_qkv  # noqa: E402

STEPS = 12  # warm-up 1 (calibration); the default's 3x Top-K on steps 1-2, 1x on steps 3-11


def config(graphs: bool, recipe: str = "hybrid"):
    return load_preset("wan", recipe=recipe, warmup_steps=1, dense_layer_fraction=0.0, min_tokens=256,
                       initial_key_clusters=24, query_clusters=17, cuda_graphs=graphs)


def fresh_inputs(step, batch, heads, n, d, dtype, seed):
    q, k, v = structured_qkv(batch, heads, n, d, groups=9, seed=seed * 100 + step)
    return [t.to("cuda", dtype) for t in (q, k, v)]


def run(graphs, batch, heads, n, d, dtype, text_len=0, text_first=False, layers=2, seed=0, recipe="hybrid"):
    """Outputs of every call of a run, and the runner."""
    cache = RunCache()
    cache.start_run(STEPS)
    runner = SparseAttention(config(graphs, recipe), cache)
    branches = tuple(range(batch))
    outputs = []
    for step in range(STEPS):
        for layer in range(layers):
            q, k, v = fresh_inputs(step * layers + layer, batch, heads, n, d, dtype, seed)
            call = CallInfo(layer, step, STEPS, branches, text_len=text_len, text_first=text_first)
            outputs.append(runner(q, k, v, call, dense=lambda: dense_attention(q, k, v)).float())
    return outputs, runner


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("batch,heads,n,d,dtype,text_len,text_first,recipe", [
    (1, 3, 1531, 128, torch.bfloat16, 0, False, "hybrid"),
    (2, 2, 2049, 64, torch.float16, 0, False, "hybrid"),
    (2, 3, 1207, 64, torch.bfloat16, 37, True, "hybrid"),  # CogVideoX-like: text first
    (1, 2, 1777, 128, torch.bfloat16, 29, False, "hybrid"),  # HunyuanVideo-like: text last
    (2, 2, 1301, 128, torch.bfloat16, 0, False, "svg2"),
])
def test_replayed_calls_match_eager_calls(batch, heads, n, d, dtype, text_len, text_first, recipe):
    eager, eager_runner = run(False, batch, heads, n, d, dtype, text_len, text_first, recipe=recipe)
    replayed, runner = run(True, batch, heads, n, d, dtype, text_len, text_first, recipe=recipe)
    graphs = runner.cache.graphs
    # per layer and Top-K multiplier: the first call runs eagerly, the second is captured (and replayed)
    scales = [runner.config.selection.top_k_scale(step, STEPS) for step in range(1, STEPS)]
    layers = 2
    assert graphs.captures == layers * len(set(scales)), graphs.captures
    assert graphs.replays == layers * (len(scales) - len(set(scales))), graphs.replays
    for index, (a, b) in enumerate(zip(replayed, eager)):
        assert rel_l2(a, b) < 2e-3, f"call {index}: rel L2 {rel_l2(a, b):.2e}"
    for key, state in eager_runner.cache.states.items():
        other = runner.cache.states[key]
        assert torch.allclose(other.q_centroids.float(), state.q_centroids.float(), atol=2e-2)
        assert torch.allclose(other.k_centroids.float(), state.k_centroids.float(), atol=2e-2)
    report, eager_report = runner.cache.report(), eager_runner.cache.report()
    assert (report.captured_graphs, report.replayed_calls) == (graphs.captures, graphs.replays)
    assert f"CUDA graphs: {graphs.captures} captured" in report.to_text() and eager_report.captured_graphs == 0
    for layer, eager_layer in zip(report.layers, eager_report.layers):
        assert layer.sparse_calls == eager_layer.sparse_calls == STEPS - 1
        assert abs(layer.kept_fraction - eager_layer.kept_fraction) < 1e-3


def test_graph_memory_is_released_with_the_run():
    run(True, 1, 2, 1409, 128, torch.bfloat16)  # first use: the capture stream's cuBLAS workspace (kept)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    outputs, runner = run(True, 2, 3, 2311, 128, torch.bfloat16)
    del outputs
    assert runner.cache.graphs.memory_bytes() > 0
    runner.cache.end_run()
    torch.cuda.synchronize()
    assert runner.cache.graphs.memory_bytes() == 0
    assert torch.cuda.memory_allocated() == baseline


def test_a_call_that_cannot_be_captured_runs_eagerly(monkeypatch, caplog):
    plan = AdaCluster.plan

    def plan_with_host_sync(self, q, k, call):
        result = plan(self, q, k, call)
        float(result.kept.sum())  # a host synchronisation: not allowed while capturing
        return result

    eager, _ = run(False, 1, 2, 1409, 128, torch.bfloat16)
    monkeypatch.setattr(AdaCluster, "plan", plan_with_host_sync)
    with caplog.at_level(logging.WARNING):
        out, runner = run(True, 1, 2, 1409, 128, torch.bfloat16)
    assert "capture failed" in caplog.text
    assert runner.cache.graphs.replays == 0
    for a, b in zip(out, eager):
        assert rel_l2(a, b) < 2e-3


def test_calls_inside_an_outer_capture_are_not_captured_again():
    """ComfyUI may capture a whole block: the runner then runs eagerly inside that capture."""
    q, k, v = fresh_inputs(0, 1, 2, 1601, 128, torch.bfloat16, seed=3)
    cache = RunCache()
    cache.start_run(STEPS)
    runner = SparseAttention(config(True), cache)
    dense = lambda: dense_attention(q, k, v)  # noqa: E731
    runner(q, k, v, CallInfo(0, 0, STEPS, (0,)), dense=dense)  # calibration
    runner(q, k, v, CallInfo(0, 3, STEPS, (0,)), dense=dense)  # eager: compiles the kernels
    expected = runner(q, k, v, CallInfo(0, 3, STEPS, (0,)), dense=dense).float()  # captured by the runner
    outer = torch.cuda.CUDAGraph()
    with torch.cuda.graph(outer):
        inside = runner(q, k, v, CallInfo(0, 4, STEPS, (0,)), dense=dense)
    outer.replay()
    assert rel_l2(inside.float(), expected) < 2e-2  # one more warm-started round: close, not equal
    assert cache.graphs.captures == 1
