"""AdaSpa and MOD-DiT nodes end to end in a real ComfyUI server (tiny Wan and HunyuanVideo checkpoints)."""
from __future__ import annotations

import json

import pytest
import torch

from graphs import t2v_graph
from test_comfyui_integration import _assert_ok, _latent, _node_inputs, _report

pytestmark = pytest.mark.comfyui

# 4 steps: AdaSpa's search steps 10, 30 of 50 become 1, 2 (step 0 dense, 1 full search, 2 cached search + sparse)
ADASPA = {"sparsity": 0.5, "search_steps": "10, 30", "search_reference_steps": 50, "head_adaptive": True,
          "min_tokens": 256, "verbose": True}
# 4 steps: warm-up 2 fits at steps 0 and 1; a refresh every step after step 2
MODDIT = {"pattern_top_k": 6, "warmup_steps": 2, "refresh_interval": 1, "frame_threshold": 0.1, "min_tokens": 256,
          "verbose": True}
NODES = {"AdaSpaSparseAttention": (ADASPA, "search step", [0], [1]),
         "ModDiTSparseAttention": (MODDIT, "fit step", [], [0, 1])}


def method_graph(family: str, node: str, settings: dict, prefix: str) -> dict:
    graph = t2v_graph(family, {}, prefix)
    graph["5"] = {"class_type": node, "inputs": {"model": graph["5"]["inputs"]["model"], **settings}}
    return graph


def test_method_nodes_listed_with_tooltips(comfy):
    info = comfy.object_info()
    for node, (settings, _, _, _) in NODES.items():
        assert node in info, comfy.log()[-3000:]
        assert info[node]["category"] == "model/patch" and info[node]["output"] == ["MODEL"]
        inputs = _node_inputs(info[node])
        assert set(settings) <= set(inputs)
        assert all(inputs[name][1].get("tooltip") for name in settings)
    assert info["AdaSpaSparseAttention"]["display_name"] == "AdaSpa Sparse Attention"
    assert info["ModDiTSparseAttention"]["display_name"] == "MOD-DiT Sparse Attention"


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
@pytest.mark.parametrize("node", list(NODES))
def test_method_node_runs_and_reports(comfy, family, node):
    settings, pass_reason, warmup, passes = NODES[node]
    entry = comfy.run(method_graph(family, node, settings, f"{node}_{family}"))
    _assert_ok(comfy, entry)
    report = _report(entry)
    data = report["report"]
    steps = {row["step"]: row for row in data["steps"]}
    assert sorted(steps) == [0, 1, 2, 3]
    for step in warmup + passes:
        assert steps[step]["sparse_calls"] == 0, report["text"]
    for step in (2, 3):
        assert steps[step]["sparse_calls"] > 0 and steps[step]["dense_calls"] == 0, report["text"]
    assert data["dense_reasons"].get(pass_reason, 0) > 0, report["text"]
    sparse = [row for row in data["layers"] if row["sparse_calls"]]
    assert sparse and all(0.0 < row["kept_fraction"] < 1.0 for row in sparse), report["text"]
    assert report["status"]["cache_bytes"] == 0 and report["status"]["active"] is False
    assert data["method"] == {"AdaSpaSparseAttention": "adaspa", "ModDiTSparseAttention": "moddit"}[node]


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_dense_settings_reproduce_dense(comfy, family):
    dense = comfy.run(t2v_graph(family, None, f"mdense_{family}"))
    _assert_ok(comfy, dense)
    a = _latent(comfy, dense)
    tolerance = 2e-2 if a.dtype in (torch.bfloat16, torch.float16) else 2e-3
    for node, settings in (("AdaSpaSparseAttention", {**ADASPA, "sparsity": 0.0}),
                           ("ModDiTSparseAttention", {**MODDIT, "pattern_top_k": 100000})):
        entry = comfy.run(method_graph(family, node, settings, f"mall_{node}_{family}"))
        _assert_ok(comfy, entry)
        assert sum(row["sparse_calls"] for row in _report(entry)["report"]["layers"]) > 0
        b = _latent(comfy, entry)
        assert torch.allclose(a.float(), b.float(), atol=tolerance * float(a.abs().max()), rtol=tolerance), node


@pytest.mark.parametrize("node, name, value, expected", [
    ("AdaSpaSparseAttention", "search_steps", "ten, 30", "ten, 30"),
    ("AdaSpaSparseAttention", "search_steps", "10, 60", "[0, 49]"),
    ("AdaSpaSparseAttention", "sparsity", 1.5, "1.5"),
    ("ModDiTSparseAttention", "warmup_steps", 0, "0"),
])
def test_bad_method_widget_is_rejected_naming_it(comfy, node, name, value, expected):
    settings = {**NODES[node][0], name: value}
    status, body = comfy.queue(method_graph("wan", node, settings, "bad"))
    assert status == 400, body
    text = json.dumps(body["node_errors"]["5"]["errors"])
    assert name in text and expected in text, text


def test_v1_method_nodes_run(comfy_v1):
    for node, (settings, *_rest) in NODES.items():
        entry = comfy_v1.run(method_graph("wan", node, settings, f"v1_{node}"))
        _assert_ok(comfy_v1, entry)
        assert any(row["sparse_calls"] for row in _report(entry)["report"]["layers"])
