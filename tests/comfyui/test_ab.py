"""The "Sparse Attention A/B" node and the adacluster-ab command against a real ComfyUI server (CPU).

The node gets image batches from Load Image + Batch Images; the command drives a tiny Wan 2.1 text-to-video
workflow (tiny random-weight diffusion model and VAE) twice and compares the saved PNG frames."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_server import free_port  # noqa: E402
from graphs import TINY_SETTINGS, conditioning  # noqa: E402

AB_NODE = "AdaClusterSparseAttentionAB"
VAE_NAME = "tiny_wan21_vae.safetensors"
# The Wan 2.1 VAE with the real key names and a base width of 4 (ComfyUI reads the width from the weights).
VAE_BUILDER = """
import os, sys
sys.path.insert(0, os.getcwd()); sys.argv = sys.argv[:1] + ["--cpu"]
import comfy.options; comfy.options.enable_args_parsing()
import torch
from comfy.ldm.wan.vae import WanVAE
from safetensors.torch import save_file
gen = torch.Generator().manual_seed(3)
model = WanVAE(dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
               temperal_downsample=[False, True, True])
state = {k: (torch.randn(v.shape, generator=gen) * (1.0 if v.ndim == 1 else v[0].numel() ** -0.5)).contiguous()
         for k, v in model.state_dict().items()}
save_file(state, sys.argv_out)
"""


# ------------------------------------------------------------------------------------------ the node
def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array, "RGB").save(path)


def _write_frames(server) -> dict:
    """Two frames, the same two with noise, and a frame of another size, as PNGs in the server's input."""
    rng = np.random.default_rng(5)
    inputs = server.base / "input"
    a = [rng.integers(0, 256, (37, 45, 3), dtype=np.uint8) for _ in range(2)]
    b = [np.clip(x.astype(int) + rng.integers(-12, 13, x.shape), 0, 255).astype(np.uint8) for x in a]
    other = rng.integers(0, 256, (40, 45, 3), dtype=np.uint8)
    for name, array in [("ab_a0.png", a[0]), ("ab_a1.png", a[1]), ("ab_b0.png", b[0]), ("ab_b1.png", b[1]),
                        ("ab_other.png", other)]:
        _png(inputs / name, array)
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def frames(comfy):
    return _write_frames(comfy)


def _ab_graph(names_a, names_b, frames_spec="auto") -> dict:
    graph, batches = {}, []
    for side, names in (("a", names_a), ("b", names_b)):
        ids = []
        for i, name in enumerate(names):
            node_id = f"{side}{i}"
            graph[node_id] = {"class_type": "LoadImage", "inputs": {"image": name}}
            ids.append(node_id)
        if len(ids) == 2:
            graph[f"{side}_batch"] = {"class_type": "ImageBatch", "inputs": {"image1": [ids[0], 0],
                                                                           "image2": [ids[1], 0]}}
            batches.append([f"{side}_batch", 0])
        else:
            batches.append([ids[0], 0])
    graph["ab"] = {"class_type": AB_NODE, "inputs": {"image_a": batches[0], "image_b": batches[1],
                                                     "frames": frames_spec, "difference_gain": 4.0,
                                                     "label_a": "dense", "label_b": "sparse"}}
    graph["preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["ab", 1]}}
    return graph


def _ab_output(entry: dict):
    out = entry["outputs"]["ab"]
    return out["text"][0], json.loads(out["adacluster_ab"][0])


def test_node_identical_batches_report_infinite_psnr(comfy, frames):
    entry = comfy.run(_ab_graph(["ab_a0.png", "ab_a1.png"], ["ab_a0.png", "ab_a1.png"]))
    assert entry["status"]["completed"], entry["status"]
    text, data = _ab_output(entry)
    assert "PSNR: inf dB" in text and "identical" in text
    assert data["identical"] and data["psnr"] is None and data["frames"] == 2
    assert entry["outputs"]["preview"]["images"]  # the comparison image reached the preview


def test_node_perturbed_batches_match_numpy(comfy, frames):
    entry = comfy.run(_ab_graph(["ab_a0.png", "ab_a1.png"], ["ab_b0.png", "ab_b1.png"], frames_spec="1, 0"))
    assert entry["status"]["completed"], entry["status"]
    text, data = _ab_output(entry)
    a = np.stack(frames["a"]).astype(np.float64) / 255.0
    b = np.stack(frames["b"]).astype(np.float64) / 255.0
    expected = 10 * np.log10(1.0 / ((a - b) ** 2).mean())
    assert data["psnr"] == pytest.approx(expected, rel=1e-6)
    frame_psnr = [10 * np.log10(1.0 / ((a[i] - b[i]) ** 2).mean()) for i in range(2)]
    assert data["frame_psnr"] == pytest.approx(frame_psnr, rel=1e-6)
    assert data["worst_frame"] == int(np.argmin(frame_psnr)) and data["frames_shown"] == [1, 0]
    assert 0 < data["ssim"] < 1 and f"PSNR: {expected:.2f} dB" in text


@pytest.mark.parametrize("names_b, what", [(["ab_other.png", "ab_other.png"], "sizes differ"),
                                           (["ab_b0.png"], "frame counts differ")])
def test_node_mismatched_batches_fail_with_a_clear_error(comfy, frames, names_b, what):
    entry = comfy.run(_ab_graph(["ab_a0.png", "ab_a1.png"], names_b))
    assert entry["status"]["status_str"] == "error"
    error = next(data for event, data in entry["status"]["messages"] if event == "execution_error")
    assert error["node_id"] == "ab" and what in error["exception_message"]
    assert "Sparse Attention A/B" in error["exception_message"] and "image_a (dense) is 2 frames" in error["exception_message"]


def test_node_v1_classes(comfy_v1):
    _write_frames(comfy_v1)
    entry = comfy_v1.run(_ab_graph(["ab_a0.png"], ["ab_b0.png"]))
    assert entry["status"]["completed"], entry["status"]
    text, data = _ab_output(entry)
    assert data["psnr"] is not None and "PSNR:" in text


# --------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def vae(comfy):
    if 'sd["decoder.head.0.gamma"]' not in (comfy.tree.path / "comfy" / "sd.py").read_text():
        pytest.skip(f"{comfy.tree.label} fixes the Wan 2.1 VAE width at 96: too slow to decode on a CPU test")
    path = comfy.base / "models" / "vae" / VAE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        code = VAE_BUILDER.replace("sys.argv_out", repr(str(path)))
        result = subprocess.run([comfy.tree.python, "-c", code], cwd=comfy.tree.path, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
    return VAE_NAME


SETTINGS = {**TINY_SETTINGS, "query_clusters": 4, "initial_top_k": 4, "top_k_clusters": 2, "min_tokens": 32}


def t2v_workflow(seed: int = 3, sparse: bool = True, output: bool = True, unet: str = "tiny_wan21_t2v.safetensors",
                 profile: str = "", steps: int = 3) -> dict:
    """Tiny Wan 2.1: 9 frames of 96 x 80 -> 3 x 10 x 12 latent -> 90 video tokens."""
    model = ["5", 0] if sparse else ["1", 0]
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": conditioning(1, "wan"),
        "3": conditioning(2, "wan"),
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 96, "height": 80, "length": 9,
                                                                  "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_NAME}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["10", 0]}},
    }
    if sparse:
        graph["5"] = {"class_type": "AdaClusterSparseAttention",
                      "inputs": {"model": ["1", 0], **SETTINGS, "warmup_steps": 1, "calibration_profile": profile}}
    if output:
        graph["12"] = {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "adacluster_ab"}}
    return graph


def _cli(tmp_path: Path, graph: dict, *args: str, server: str = None, timeout: float = 300):
    workflow = tmp_path / "workflow_api.json"
    workflow.write_text(json.dumps(graph))
    cmd = [sys.executable, "-m", "comfyui_adacluster.adacluster_core.tools.ab", str(workflow),
           "--server", server, "--out", str(tmp_path / "out"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _wait_idle(comfy, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = comfy.get("/queue")
        if not queue.get("queue_running") and not queue.get("queue_pending"):
            return
        time.sleep(0.25)


def _server(comfy) -> str:
    return f"http://127.0.0.1:{comfy.port}"


def test_cli_good_run(comfy, vae, tmp_path):
    result = _cli(tmp_path, t2v_workflow(seed=3), server=_server(comfy))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(next((tmp_path / "out").glob("ab-*.json")).read_text())
    comparison = data["comparisons"]["12"]
    assert data["sparse_nodes"] == ["5"] and data["output_nodes"] == ["12"]
    assert comparison["frames"] == 9 and (comparison["width"], comparison["height"]) == (96, 80)
    assert not comparison["identical"] and comparison["psnr"] is not None
    # The metrics match an independent computation from the PNG files the server saved.
    output = comfy.base / "output"
    a = np.stack([np.asarray(Image.open(output / n).convert("RGB")) for n in comparison["files"]["dense"]]) / 255.0
    b = np.stack([np.asarray(Image.open(output / n).convert("RGB")) for n in comparison["files"]["sparse"]]) / 255.0
    assert comparison["psnr"] == pytest.approx(10 * np.log10(1.0 / ((a - b) ** 2).mean()), rel=1e-6)
    assert Path(comparison["image"]).is_file()
    for label in ("dense (sparse node bypassed)", "sparse"):
        assert data["runs"][label]["wall_s"] is not None
    assert "PSNR:" in result.stdout and "peak VRAM in use not exposed by this server" in result.stdout


@pytest.mark.parametrize("case", ["no sparse node", "no output node", "refused", "failed", "unreachable"])
def test_cli_errors_name_the_problem(comfy, vae, tmp_path, case):
    server = _server(comfy)
    if case == "no sparse node":
        graph, expected = t2v_workflow(sparse=False), "no sparse attention node in the workflow"
    elif case == "no output node":
        graph, expected = t2v_workflow(output=False), "the workflow has no output node"
    elif case == "refused":
        graph = t2v_workflow(unet="missing_model.safetensors")
        expected = "ComfyUI refused the dense (sparse node bypassed) prompt (HTTP 400)"
    elif case == "failed":
        profiles = comfy.base / "models" / "adacluster_profiles"
        profiles.mkdir(parents=True, exist_ok=True)
        (profiles / "broken.safetensors").write_bytes(b"not a safetensors file")
        graph = t2v_workflow(profile="broken.safetensors")  # listed, so it passes validation
        expected = "the sparse run failed in node 5 (AdaClusterSparseAttention)"
    else:
        graph, expected = t2v_workflow(), "cannot reach ComfyUI at"
        server = f"http://127.0.0.1:{free_port()}"
    result = _cli(tmp_path, graph, server=server)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    if case == "refused":
        assert "node 1 (UNETLoader)" in result.stderr and "missing_model.safetensors" in result.stderr
    if case == "failed":
        assert "broken" in result.stderr


def test_cli_time_limit(comfy, vae, tmp_path):
    # 400 steps take well over a second even on a fast CPU; the limit is 0.2 s.
    result = _cli(tmp_path, t2v_workflow(seed=99, steps=400), "--timeout", "0.2", server=_server(comfy))
    _wait_idle(comfy)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "did not finish within the time limit of 0.2 s" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------ graph edits (no server)
def test_bypass_rewires_consumers_to_the_model_input(tmp_path):
    from comfyui_adacluster.adacluster_core.tools import ab

    info = {"AdaClusterSparseAttention": {"input": {"required": {"model": ["MODEL", {}], "preset": [["auto"], {}]}},
                                          "output": ["MODEL"]}}
    graph = {"1": {"class_type": "UNETLoader", "inputs": {}},
             "5": {"class_type": "AdaClusterSparseAttention", "inputs": {"model": ["1", 0], "preset": "auto"}},
             "15": {"class_type": "AdaClusterSparseAttention", "inputs": {"model": ["1", 0], "preset": "auto"}},
             "6": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 1}},
             "16": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["15", 0], "noise_seed": 1}},
             "8": {"class_type": "AdaClusterReport", "inputs": {"model": ["5", 0]}}}
    assert ab.find_sparse_nodes(graph, None) == ["5", "15"]
    dense = ab.bypass(graph, ["5", "15"], info)
    assert "5" not in dense and "15" not in dense and graph["6"]["inputs"]["model"] == ["5", 0]
    assert dense["6"]["inputs"]["model"] == ["1", 0] == dense["16"]["inputs"]["model"] == dense["8"]["inputs"]["model"]
    assert ab.set_seed(graph, 42) == ["6", "16"] and graph["16"]["inputs"]["noise_seed"] == 42
    with pytest.raises(ab.ABError, match="--node 99: the workflow has no node with that id"):
        ab.find_sparse_nodes(graph, ["99"])
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(ab.ABError, match="UI format.*Export \\(API\\)"):
        ab.load_workflow(str(ui))
