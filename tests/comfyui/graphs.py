"""API-format graphs for the integration tests (tiny checkpoints, random conditioning)."""
from __future__ import annotations

CHECKPOINTS = {
    "wan": "tiny_wan21_t2v.safetensors",
    "hunyuan_video": "tiny_hunyuan_video_t2v.safetensors",
    "cogvideox": "tiny_cogvideox_t2v.safetensors",
}

# Odd latent sizes: 144 x 112 pixels, 61 frames -> 16 x 14 x 18 latent -> 16 * 7 * 9 = 1008 video tokens.
VIDEO = {"width": 144, "height": 112, "length": 61, "batch_size": 1}

# Small clusterings so sparse attention runs on a tiny model and a short sequence.
TINY_SETTINGS = {
    "preset": "auto", "sparsity_threshold": 1.5, "query_clusters": 8, "initial_top_k": 8, "top_k_clusters": 4,
    "warmup_steps": 1, "dense_layer_fraction": 0.34, "dense_layers_by": "clusters", "selection": "hybrid",
    "min_tokens": 256, "verbose": True,
    "calibration_profile": "",
}
# Every key cluster selected: 'paper' keeps the Top-K clusters and a layer never has more than
# initial_top_k x 10 stages of them.
ALL_CLUSTERS = {**TINY_SETTINGS, "selection": "paper", "top_k_clusters": 80}


def conditioning(seed: int, family: str) -> dict:
    # HunyuanVideo: the positive prompt carries a text padding mask. ComfyUI then runs cond and uncond as
    # separate model calls (their conditionings differ), which is the other way branches arrive.
    inputs = {"seed": seed, "tokens": 24, "width": 4096, "pooled": family == "hunyuan_video",
              "padded_tokens": 5 if family == "hunyuan_video" and seed == 1 else 0}
    return {"class_type": "AdaClusterTestConditioning", "inputs": inputs}


def t2v_graph(family: str, settings: dict | None, prefix: str, steps: int = 4, cfg: float = 2.0,
              sampler: str = "euler", seed: int = 7, interrupt_after: int = 0) -> dict:
    """Loader -> (AdaCluster) -> KSampler -> SaveLatent (+ report). Node ids are fixed for the tests."""
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": CHECKPOINTS[family], "weight_dtype": "default"}},
        "2": conditioning(1, family),
        "3": conditioning(2, family),
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": dict(VIDEO)},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
            "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
    }
    model = ["1", 0]
    if interrupt_after:
        graph["9"] = {"class_type": "AdaClusterTestInterrupt", "inputs": {"model": model, "after_calls": interrupt_after}}
        model = ["9", 0]
    if settings is not None:
        graph["5"] = {"class_type": "AdaClusterSparseAttention", "inputs": {"model": model, **settings}}
        model = ["5", 0]
        graph["8"] = {"class_type": "AdaClusterReport", "inputs": {"model": model, "samples": ["6", 0]}}
    graph["6"]["inputs"]["model"] = model
    return graph


def wan22_two_experts_graph(settings: dict, prefix: str, steps: int = 4, switch: int = 2) -> dict:
    """Wan 2.2 A14B style: a high-noise expert for the first steps, a low-noise expert for the rest."""
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan22_high_noise.safetensors",
                                                     "weight_dtype": "default"}},
        "11": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan22_low_noise.safetensors",
                                                      "weight_dtype": "default"}},
        "2": conditioning(1, "wan"),
        "3": conditioning(2, "wan"),
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": dict(VIDEO)},
        "5": {"class_type": "AdaClusterSparseAttention", "inputs": {"model": ["1", 0], **settings}},
        "15": {"class_type": "AdaClusterSparseAttention", "inputs": {"model": ["11", 0], **settings}},
        "6": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["5", 0], "add_noise": "enable", "noise_seed": 7, "steps": steps, "cfg": 2.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": switch,
            "return_with_leftover_noise": "enable"}},
        "16": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["15", 0], "add_noise": "disable", "noise_seed": 7, "steps": steps, "cfg": 2.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["6", 0], "start_at_step": switch, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["16", 0], "filename_prefix": prefix}},
        "8": {"class_type": "AdaClusterReport", "inputs": {"model": ["5", 0], "samples": ["6", 0]}},
        "18": {"class_type": "AdaClusterReport", "inputs": {"model": ["15", 0], "samples": ["16", 0]}},
    }
    return graph


def probe_graph(nonce: int) -> dict:
    return {"1": {"class_type": "AdaClusterTestProbe", "inputs": {"nonce": nonce}}}
