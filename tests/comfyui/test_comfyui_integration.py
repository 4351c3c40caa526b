"""End-to-end tests against a real ComfyUI server on the CPU (tiny random-weight checkpoints)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from graphs import ALL_CLUSTERS, TINY_SETTINGS, probe_graph, t2v_graph, wan22_two_experts_graph
from workflow_convert import ui_to_api, validate_api

pytestmark = pytest.mark.comfyui

WIDGETS = ("preset", "sparsity_threshold", "query_clusters", "initial_top_k", "top_k_clusters", "warmup_steps",
           "dense_layer_fraction", "dense_layers_by", "selection", "min_tokens", "verbose", "calibration_profile")


def _node_inputs(info: dict) -> dict:
    spec = info["input"]
    return {**spec.get("required", {}), **spec.get("optional", {})}


def _report(entry: dict, node_id: str = "8") -> dict:
    outputs = entry["outputs"][node_id]
    return {"text": outputs["text"][0], **json.loads(outputs["adacluster_report"][0])}


def _latent(server, entry: dict, node_id: str = "7") -> torch.Tensor:
    item = entry["outputs"][node_id]["latents"][0]
    path = server.base / "output" / item.get("subfolder", "") / item["filename"]
    return load_file(str(path))["latent_tensor"]


def _status(entry) -> str:
    return entry.get("status", {}).get("status_str", "?")


def _assert_ok(server, entry):
    assert _status(entry) == "success", f"{json.dumps(entry.get('status'), indent=1)[:3000]}\n{server.log()[-3000:]}"


def _families(server):
    return server.families


# ---------------------------------------------------------------------------------------------- loading
def test_nodes_listed_with_widgets(comfy):
    info = comfy.object_info()
    assert "AdaClusterSparseAttention" in info, comfy.log()[-3000:]
    node = info["AdaClusterSparseAttention"]
    inputs = _node_inputs(node)
    assert set(WIDGETS) <= set(inputs)
    assert node["category"] == "model/patch"
    for name in WIDGETS:
        assert inputs[name][1].get("tooltip"), name
    assert inputs["query_clusters"][1]["min"] == 1 and inputs["query_clusters"][1]["max"] == 4096
    assert inputs["dense_layer_fraction"][1]["max"] == 1.0
    assert node["output"] == ["MODEL"]
    report = info["AdaClusterReport"]
    assert report["output"] == ["STRING", "IMAGE"] and report["output_node"] is True
    assert "Import failed" not in comfy.log() and "IMPORT FAILED" not in comfy.log()


def test_v1_node_classes_load(comfy_v1):
    info = comfy_v1.object_info()
    assert set(WIDGETS) <= set(_node_inputs(info["AdaClusterSparseAttention"]))
    entry = comfy_v1.run(t2v_graph("wan", TINY_SETTINGS, "v1_wan", steps=3))
    _assert_ok(comfy_v1, entry)
    assert _report(entry)["report"]["layers"]


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "cogvideox"])
def test_patched_run_reports_sparse_layers_and_steps(comfy, family):
    if family not in _families(comfy):
        pytest.skip(f"{family} is not in {comfy.tree.label}")
    entry = comfy.run(t2v_graph(family, TINY_SETTINGS, f"sparse_{family}"))
    _assert_ok(comfy, entry)
    report = _report(entry)
    data = report["report"]
    steps = {row["step"]: row for row in data["steps"]}
    assert sorted(steps) == [0, 1, 2, 3]
    assert steps[0]["sparse_calls"] == 0  # warm-up (calibration) step
    assert all(steps[s]["sparse_calls"] > 0 for s in (1, 2, 3)), report["text"]
    layers = {row["layer"]: row for row in data["layers"]}
    expected_layers = {"wan": 3, "hunyuan_video": 4, "cogvideox": 3}[family]
    assert sorted(layers) == list(range(expected_layers)), report["text"]
    dense = [row for row in layers.values() if row["dense_layer"]]
    assert len(dense) >= 1 and all(row["sparse_calls"] == 0 for row in dense)
    sparse = [row for row in layers.values() if row["sparse_calls"]]
    assert sparse and all(0.0 < row["kept_fraction"] <= 1.0 for row in sparse)
    assert "sparse steps: 1-3" in report["text"]
    assert report["status"]["cache_bytes"] == 0 and report["status"]["active"] is False
    plot = entry["outputs"]["8"]
    assert plot  # the image output is wired to nothing here; the node still ran as an output node


def test_report_saves_a_profile_that_a_later_run_loads(comfy):
    graph = t2v_graph("wan", TINY_SETTINGS, "profile_save")
    graph["8"]["inputs"]["save_profile"] = "tiny_wan"
    entry = comfy.run(graph)
    _assert_ok(comfy, entry)
    path = comfy.base / "models" / "adacluster_profiles" / "tiny_wan.safetensors"
    assert path.is_file(), _report(entry)["text"]
    assert "calibration profile saved" in _report(entry)["text"]
    saved = load_file(str(path))

    info = comfy.object_info()["AdaClusterSparseAttention"]
    assert _combo_options(_node_inputs(info)["calibration_profile"])[:1] == [""]
    assert "tiny_wan.safetensors" in _combo_options(_node_inputs(info)["calibration_profile"])
    settings = {**TINY_SETTINGS, "calibration_profile": "tiny_wan.safetensors"}
    entry = comfy.run(t2v_graph("wan", settings, "profile_load"))
    _assert_ok(comfy, entry)
    data = _report(entry)["report"]
    for row in data["layers"]:
        index = saved["layers"].tolist().index(row["layer"])
        assert row["key_clusters_per_head"] == saved["counts"][index].float().tolist()
        assert row["dense_layer"] == bool(saved["dense"][index])


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "cogvideox"])
def test_every_cluster_selected_equals_dense(comfy, family):
    if family not in _families(comfy):
        pytest.skip(f"{family} is not in {comfy.tree.label}")
    dense = comfy.run(t2v_graph(family, None, f"dense_{family}"))
    _assert_ok(comfy, dense)
    sparse = comfy.run(t2v_graph(family, ALL_CLUSTERS, f"all_{family}"))
    _assert_ok(comfy, sparse)
    report = _report(sparse)["report"]
    assert sum(row["sparse_calls"] for row in report["layers"]) > 0
    a, b = _latent(comfy, dense), _latent(comfy, sparse)
    assert a.shape == b.shape and a.abs().mean() > 0
    tolerance = 2e-2 if a.dtype in (torch.bfloat16, torch.float16) else 2e-3
    assert torch.allclose(a.float(), b.float(), atol=tolerance * float(a.abs().max()), rtol=tolerance), \
        float((a.float() - b.float()).abs().max())


def test_heun_counts_steps_from_sigmas(comfy):
    """heun evaluates the model twice per step; steps must still be 0..3, not 0..6."""
    entry = comfy.run(t2v_graph("wan", TINY_SETTINGS, "heun_wan", sampler="heun"))
    _assert_ok(comfy, entry)
    steps = [row["step"] for row in _report(entry)["report"]["steps"]]
    assert steps == [0, 1, 2, 3]


def test_wan22_experts_keep_separate_caches(comfy):
    entry = comfy.run(wan22_two_experts_graph(TINY_SETTINGS, "wan22"))
    _assert_ok(comfy, entry)
    high, low = _report(entry, "8"), _report(entry, "18")
    for report in (high, low):
        assert report["report"]["total_steps"] == 2
        assert [row["step"] for row in report["report"]["steps"]] == [0, 1]
        assert any(row["sparse_calls"] for row in report["report"]["layers"]), report["text"]
        assert report["status"]["cache_bytes"] == 0


def test_chains_to_a_previous_attention_override(comfy):
    graph = t2v_graph("wan", TINY_SETTINGS, "chained", steps=3)
    graph["10"] = {"class_type": "AdaClusterTestOverride", "inputs": {"model": ["1", 0]}}
    graph["5"]["inputs"]["model"] = ["10", 0]
    entry = comfy.run(graph)
    _assert_ok(comfy, entry)
    assert "adacluster-test-override: called" in comfy.log()
    assert any(row["sparse_calls"] for row in _report(entry)["report"]["layers"])


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, value, expected", [
    ("query_clusters", 0, "0"),
    ("sparsity_threshold", -1.0, "-1"),
    ("selection", "best", "best"),
    ("top_k_clusters", 5000, "5000"),
    ("initial_top_k", 0, "0"),
    ("calibration_profile", "missing_profile.safetensors", "missing_profile.safetensors"),
    ("calibration_profile", "../../../../etc/passwd", "passwd"),
])
def test_bad_widget_value_gives_one_error_on_that_input(comfy, name, value, expected):
    status, body = comfy.queue(t2v_graph("wan", {**TINY_SETTINGS, name: value}, "bad"))
    if status == 200 and name == "selection" and comfy.tree.version == "0.3.64":
        # ComfyUI 0.3.64 does not check the options of V3 combos when queuing: the node refuses the value.
        entry = comfy.wait(body["prompt_id"])
        messages = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert len(messages) == 1 and messages[0][1]["node_id"] == "5", entry["status"]
        assert "selection = 'best' is not one of 'hybrid', 'paper', 'svg2'" in messages[0][1]["exception_message"]
        return
    assert status == 400, body
    errors = body["node_errors"]["5"]["errors"]
    assert len(errors) == 1, json.dumps(errors, indent=1)
    assert errors[0]["extra_info"]["input_name"] == name
    text = json.dumps(errors)
    assert name in text and expected in text, text


def test_widget_values_are_accepted_whatever_the_other_widgets(comfy):
    # initial_top_k 1 with the selection's own Top-K (16 > the 10 clusters a layer can have) keeps every cluster.
    entry = comfy.run(t2v_graph("wan", {**TINY_SETTINGS, "initial_top_k": 1, "top_k_clusters": 0}, "k1", steps=2))
    _assert_ok(comfy, entry)


@pytest.mark.parametrize("name", ["/tmp/adacluster_abs_profile", "../escaped_profile", "sub/dir_profile", "..",
                                  "..\\win_profile"])
def test_profile_names_outside_the_folder_are_refused_and_nothing_is_written(comfy, name, tmp_path):
    before = {p for p in comfy.base.rglob("*") if p.is_file()}
    graph = t2v_graph("wan", TINY_SETTINGS, "bad_profile", steps=2)
    graph["8"]["inputs"]["save_profile"] = name
    del graph["7"]  # the report is the only output: a prompt whose every output is invalid is refused (400)
    status, body = comfy.queue(graph)
    assert status == 400, body
    errors = body["node_errors"]["8"]["errors"]
    assert len(errors) == 1 and errors[0]["extra_info"]["input_name"] == "save_profile", errors
    from comfyui_adacluster.adacluster_core.profiles import check_profile_name

    assert errors[0]["details"] == f"save_profile - {check_profile_name(name)}"  # the README shows this message
    assert not Path("/tmp/adacluster_abs_profile.safetensors").exists()
    after = {p for p in comfy.base.rglob("*") if p.is_file()}
    assert not [p for p in after - before if p.suffix == ".safetensors"], after - before


def test_saving_never_overwrites_a_file_that_is_not_a_profile(comfy):
    folder = comfy.base / "models" / "adacluster_profiles"
    folder.mkdir(parents=True, exist_ok=True)
    victim = folder / "user_weights.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.randn(3, 3)}, str(victim))
    content = victim.read_bytes()
    graph = t2v_graph("wan", TINY_SETTINGS, "no_overwrite", steps=2)
    graph["8"]["inputs"]["save_profile"] = "user_weights"
    entry = comfy.run(graph)
    _assert_ok(comfy, entry)
    assert "calibration profile not saved" in _report(entry)["text"] and victim.read_bytes() == content


def _combo_options(spec) -> list:
    """The options of a combo input in /object_info ([options, info] or ["COMBO", {"options": ...}])."""
    if isinstance(spec[0], list):
        return spec[0]
    return list(spec[1].get("options", [])) if spec[0] == "COMBO" else []


def test_object_info_lists_every_combo_default_first(comfy):
    info = comfy.object_info()
    checked = 0
    for node in ("AdaClusterSparseAttention", "AdaClusterReport"):
        for name, spec in _node_inputs(info[node]).items():
            options = _combo_options(spec)
            if options:
                default = spec[1].get("default", options[0]) if len(spec) > 1 else options[0]
                assert options[0] == default, (node, name, options, default)
                checked += 1
    assert checked == 6  # preset, dense layers by, selection, calibration profile, budget schedule, head budgets
    assert _combo_options(_node_inputs(info["AdaClusterSparseAttention"])["selection"]) == ["hybrid", "paper", "svg2"]


def test_interrupted_run_leaves_no_cache(comfy):
    entry = comfy.run(t2v_graph("wan", TINY_SETTINGS, "interrupted", steps=6, interrupt_after=4))
    assert "execution_interrupted" in json.dumps(entry["status"]), entry["status"]
    assert "the run ended with InterruptProcessingException; its cache" in comfy.log(), comfy.log()[-3000:]
    probe = comfy.run(probe_graph(1))
    patches = json.loads(probe["outputs"]["1"]["adacluster_status"][0])
    # Trees that keep the interrupted graph's outputs still hold the patch: its cache must be empty.
    for status in patches:
        assert status["active"] is False and status["cache_bytes"] == 0 and status["cached_states"] == 0, status


# ---------------------------------------------------------------------------------------------- workflows
WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
WORKFLOW_NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def test_every_family_has_a_ui_and_an_api_workflow():
    assert len(WORKFLOW_NAMES) == 7  # AdaCluster per family, the A/B example, AdaSpa (HunyuanVideo), MOD-DiT (Wan 2.1)
    for family in ("wan2.1_t2v_adacluster", "wan2.1_t2v_ab", "wan2.2_a14b", "hunyuan_video", "cogvideox"):
        assert any(name.startswith(family) for name in WORKFLOW_NAMES), family
    for name in WORKFLOW_NAMES:
        assert (WORKFLOWS / "api" / f"{name}.json").is_file(), name


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_validates_and_ui_converts_to_api(comfy, name):
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    if name.startswith("cogvideox") and "cogvideox" not in comfy.families:
        pytest.skip(f"CogVideoX is not in {comfy.tree.label}")
    info = comfy.object_info()
    assert validate_api(api, info) == []
    assert ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    apply_nodes = ("AdaClusterSparseAttention", "AdaSpaSparseAttention", "ModDiTSparseAttention")
    nodes = [n for n in api.values() if n["class_type"] in apply_nodes]
    assert nodes and all(n["inputs"]["model"] for n in nodes)


def test_workflows_show_in_the_template_browser(comfy):
    templates = comfy.get("/workflow_templates")
    assert sorted(templates.get("comfyui-adacluster", [])) == WORKFLOW_NAMES


def test_workflow_thumbnails_are_served_next_to_the_templates(comfy):
    import urllib.request

    for name in WORKFLOW_NAMES:
        with urllib.request.urlopen(comfy.url(f"/api/workflow_templates/comfyui-adacluster/{name}.png"),
                                    timeout=30) as response:
            assert response.status == 200 and response.read(8) == b"\x89PNG\r\n\x1a\n", name
