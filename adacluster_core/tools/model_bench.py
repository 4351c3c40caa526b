"""Model-level benchmark through ComfyUI's own model code: how much sooner a video arrives with the pack.

    COMFYUI_PATH=/path/to/ComfyUI adacluster-model-bench [--cases wan1.3b_480p,wan14b_720p] [--tiny]

For every case it builds a random-weight diffusion model at the real configuration of the model (Wan 2.1
1.3B / 14B, HunyuanVideo, CogVideoX 2B / 5B) from the ComfyUI tree's own model classes, so the state
dict has the real checkpoint key names. It is made directly on the target device in bf16 (no file) and
loaded with ``comfy.sd.load_diffusion_model_state_dict``, the path the "Load Diffusion Model" node takes,
ModelPatcher included. The pack is applied with ``nodes.common.apply_patch``, the function the AdaCluster
node calls, and every run samples through ``comfy.sample.sample`` (the KSampler path) at the real latent
size with random conditioning of the right shapes.

Only a slice of the schedule is sampled; the whole run is composed from the preset's schedule:

* the dense run samples steps [s0, s0 + 1 + 2 + M) of the full schedule with the unpatched model;
* the sparse run samples the same steps through the patched model with ``warmup_steps`` 1, so its first
  step is the calibration step (dense output, clustering computed) and the others run sparse; s0 is the
  preset's calibration step (or the first step the core node runs sparse, when that is later). The first
  two sparse steps are the settling steps of CUDA-graph replay (each layer's call runs eagerly, then is
  captured); the M after them are the steady steps;
* the whole run is then (W - 1) dense steps + 1 calibration step + (S - W) sparse steps, W the preset's
  warm-up steps and S the schedule's steps; each Top-K multiplier's first sparse steps count at the
  settling steps' times, the others at the steady steps' median.

It reports dense, calibration and sparse step times (medians), the share of attention in a dense step, the
Amdahl ceiling for the dense layers and steps the pack chose, peak VRAM, the run cache's bytes and the
latent's relative error against dense from the same seed, which is a *random-weight* fidelity that says
little about real quality. A comparison row emulates ComfyUI core's "Model Sparse Attention" node with
its defaults (comfy-kitchen ``sol_attn``, tau 1.3, first 20% of the run dense, at least 12,288 tokens,
head dim 128 only, masks and cross-attention dense) through the benchmark's own attention override,
where comfy-kitchen provides ``sol_attn``.

``--vram-check`` runs five sampling runs in a row through one patched model (720p by default) and checks
that allocated VRAM is back at its baseline after each, that a run stopped by an exception raised from
the sampler callback leaves no cache behind, and that sparse peak VRAM stays within 5% of dense.

``--tiny`` runs the same path with tiny configurations on the CPU (for tests).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import graphs
from ..config import ConfigError, parse_assignments
from ..jsonable import finite_json
from .demo import relative_l2, sol_attn_function
from ...nodes.widgets import BUDGET_CONSTANT, WIDGETS, check_widget_values, config_from_widgets

PACK_ROOT = Path(__file__).resolve().parents[2]
WAN_TEXT_TOKENS = 512
HUNYUAN_TEXT_TOKENS = 256
COGVIDEOX_TEXT_TOKENS = 226
TEXT_WIDTH = 4096
VRAM_TOLERANCE_BYTES = 1 << 20
PEAK_VRAM_TARGET = 1.05
SPARSE_STEP_TARGET = 1.15  # sparse step / attention-free ceiling
WHOLE_RUN_TARGETS = {"wan14b_720p": 2.0, "wan1.3b_480p": 1.5}  # whole-run speedup with the default preset
TIMING_WRAPPER_KEY = "adacluster_model_bench"

# ComfyUI core's "Model Sparse Attention" defaults, emulated by CoreSparseEmulation.
CORE_TAU = 1.3
CORE_START_PERCENT = 0.2
CORE_MIN_TOKENS = 12288
CORE_HEAD_DIM = 128
CORE_EXTRA_TOKENS = 256


class BenchError(Exception):
    """A problem the user can fix (paths, names, values); printed without a traceback."""


# --------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # preset name
    builder: str  # "wan", "hunyuan_video", "cogvideox"
    config: dict
    text_tokens: int
    cfg: float  # guidance of a real workflow; the benchmark defaults to 1 (one branch per step)
    extra: dict = field(default_factory=dict)  # extra conditioning (pooled vector, guidance)


_WAN = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, freq_dim=256, text_dim=TEXT_WIDTH,
            out_dim=16)
_HUNYUAN = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=TEXT_WIDTH, mlp_ratio=4.0,
                axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True,
                byt5=False, meanflow=False, use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)
_COGVIDEOX = dict(attention_head_dim=64, in_channels=16, out_channels=16, text_embed_dim=TEXT_WIDTH, patch_size=2)

MODELS = {
    "wan1.3b": ModelSpec("Wan 2.1 T2V 1.3B", "wan", "wan",
                         dict(_WAN, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30), WAN_TEXT_TOKENS, 6.0),
    "wan14b": ModelSpec("Wan 2.1 T2V 14B", "wan", "wan",
                        dict(_WAN, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40), WAN_TEXT_TOKENS, 6.0),
    "hunyuan": ModelSpec("HunyuanVideo T2V", "hunyuan_video", "hunyuan_video",
                         dict(_HUNYUAN, hidden_size=3072, num_heads=24, depth=20, depth_single_blocks=40),
                         HUNYUAN_TEXT_TOKENS, 1.0, {"pooled": 768, "guidance": 6.0}),
    "cogvideox2b": ModelSpec("CogVideoX 2B", "cogvideox", "cogvideox",
                             dict(_COGVIDEOX, num_attention_heads=30, time_embed_dim=512, num_layers=30),
                             COGVIDEOX_TEXT_TOKENS, 6.0),
    "cogvideox5b": ModelSpec("CogVideoX 5B", "cogvideox", "cogvideox",
                             dict(_COGVIDEOX, num_attention_heads=48, time_embed_dim=512, num_layers=42,
                                  use_rotary_positional_embeddings=True), COGVIDEOX_TEXT_TOKENS, 6.0),
    # Tiny configurations for --tiny (the detector fixes head dim and text width; the rest is small).
    "wan_tiny": ModelSpec("Wan 2.1 (tiny)", "wan", "wan",
                          dict(_WAN, dim=256, ffn_dim=384, num_heads=2, num_layers=3), 24, 1.0),
    "hunyuan_tiny": ModelSpec("HunyuanVideo (tiny)", "hunyuan_video", "hunyuan_video",
                              dict(_HUNYUAN, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2),
                              24, 1.0, {"pooled": 768, "guidance": 6.0}),
    "cogvideox_tiny": ModelSpec("CogVideoX (tiny)", "cogvideox", "cogvideox",
                                dict(_COGVIDEOX, num_attention_heads=2, time_embed_dim=64, num_layers=3,
                                     use_rotary_positional_embeddings=True), 24, 1.0),
}


@dataclass(frozen=True)
class Case:
    model: str
    frames: int
    width: int
    height: int
    label: str

    @property
    def latent_shape(self) -> tuple:
        """(B, C, T, H, W): 16 channels, 4x temporal and 8x spatial compression for all three families."""
        return (1, 16, (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8)

    @property
    def video_tokens(self) -> int:
        _, _, t, h, w = self.latent_shape
        return t * (h // 2) * (w // 2)


CASES = {
    "wan1.3b_480p": Case("wan1.3b", 81, 832, 480, "Wan 2.1 1.3B, 81 frames 832x480"),
    "wan1.3b_720p": Case("wan1.3b", 81, 1280, 720, "Wan 2.1 1.3B, 81 frames 1280x720"),
    "wan14b_480p": Case("wan14b", 81, 832, 480, "Wan 2.1 14B, 81 frames 832x480"),
    "wan14b_720p": Case("wan14b", 81, 1280, 720, "Wan 2.1 14B, 81 frames 1280x720"),
    "hunyuan_720p": Case("hunyuan", 129, 1280, 720, "HunyuanVideo, 129 frames 1280x720"),
    "cogvideox2b_480p": Case("cogvideox2b", 49, 720, 480, "CogVideoX 2B, 49 frames 720x480"),
    "cogvideox5b_480p": Case("cogvideox5b", 49, 720, 480, "CogVideoX 5B, 49 frames 720x480"),
}
TINY_CASES = {  # 5 x 6 x 7 = 210 video tokens (odd sizes)
    "wan_tiny": Case("wan_tiny", 17, 112, 96, "Wan 2.1 (tiny), 17 frames 112x96"),
    "hunyuan_tiny": Case("hunyuan_tiny", 17, 112, 96, "HunyuanVideo (tiny), 17 frames 112x96"),
    "cogvideox_tiny": Case("cogvideox_tiny", 17, 112, 96, "CogVideoX (tiny), 17 frames 112x96"),
}
DEFAULT_CASES = ("wan1.3b_480p", "wan14b_720p", "hunyuan_720p", "cogvideox2b_480p")
VRAM_CHECK_CASE = "wan1.3b_720p"
# Widget values for --tiny: clusterings small enough for 210 video tokens and three or four layers.
TINY_WIDGETS = {"query_clusters": 8, "initial_top_k": 8, "top_k_clusters": 4, "dense_layer_fraction": 0.34,
                "min_tokens": 128}


# -------------------------------------------------------------------------------------------- ComfyUI
def setup_comfyui(path: Optional[str], cpu: bool):
    """Puts the ComfyUI checkout at ``path`` on sys.path and imports what the benchmark needs."""
    if not path:
        raise BenchError("COMFYUI_PATH is not set: point it at a ComfyUI checkout (the folder with main.py and "
                         "comfy/), or pass --comfyui PATH")
    root = Path(path).expanduser().resolve()
    if not (root / "comfy" / "sd.py").is_file() or not (root / "folder_paths.py").is_file():
        raise BenchError(f"COMFYUI_PATH = {path!r} is not a ComfyUI checkout: {root}/comfy/sd.py or "
                         f"{root}/folder_paths.py is missing")
    # The pack folder itself must not be importable by its name: its nodes/ would shadow ComfyUI's nodes.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != PACK_ROOT]
    sys.path.insert(0, str(root))
    argv, sys.argv = sys.argv, sys.argv[:1] + (["--cpu"] if cpu else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401
        import comfy.ops  # noqa: F401
        import comfy.patcher_extension  # noqa: F401
        import comfy.sample  # noqa: F401
        import comfy.samplers  # noqa: F401
        import comfy.sd  # noqa: F401
    except ImportError as exc:
        raise BenchError(f"ComfyUI at {root} does not import: {exc}. Install its requirements (the model code "
                         "needs at least comfy-aimdo, comfy-kitchen, einops and torchsde)") from exc
    finally:
        sys.argv = argv
    return root


def enable_dynamic_vram() -> None:
    """Switches ComfyUI to its DynamicVRAM model patcher (comfy-aimdo), as its main.py does by default on
    NVIDIA GPUs in trees that have it."""
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        raise BenchError("--dynamic-vram: this ComfyUI tree has no DynamicVRAM model patcher")
    try:
        import comfy_aimdo.control
    except ImportError as exc:
        raise BenchError(f"--dynamic-vram needs comfy-aimdo: {exc}") from exc
    from comfy.cli_args import args as comfy_args

    devices = comfy.model_management.get_all_torch_devices()
    headroom = int(getattr(comfy_args, "vram_headroom", 0) * 1024 ** 3)
    try:
        ready = comfy_aimdo.control.init_devices((d.index, headroom) for d in devices)
    except TypeError:  # older comfy-aimdo takes device indices only
        ready = comfy_aimdo.control.init_devices(d.index for d in devices)
    if not ready:
        raise BenchError("--dynamic-vram: comfy-aimdo did not initialise on this machine")
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True


def comfyui_version(root: Path) -> str:
    text = (root / "comfyui_version.py").read_text() if (root / "comfyui_version.py").exists() else ""
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def _model_class(spec: ModelSpec, root_config: dict):
    import dataclasses

    if spec.builder == "wan":
        from comfy.ldm.wan.model import WanModel

        return WanModel, dict(root_config)
    if spec.builder == "hunyuan_video":
        from comfy.ldm.hunyuan_video import model as hv

        names = {f.name for f in dataclasses.fields(hv.HunyuanVideoParams)}
        return hv.HunyuanVideo, {k: v for k, v in root_config.items() if k in names}
    try:
        from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel
    except ImportError as exc:
        raise BenchError("this ComfyUI tree has no CogVideoX model code (comfy/ldm/cogvideo); use a newer tree "
                         "or leave the CogVideoX cases out") from exc
    return CogVideoXTransformer3DModel, dict(root_config)


def random_state_dict(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Random weights with the real key names: the model class is built on the meta device for its
    state dict's names and shapes, then every tensor is drawn on ``device``. Norm scales are near 1,
    biases small, matrices scaled by 1/sqrt(fan-in), so activations keep a sane range over depth."""
    import comfy.ops

    cls, kwargs = _model_class(spec, spec.config)
    meta = cls(operations=comfy.ops.disable_weight_init, device="meta", dtype=dtype, **kwargs)
    buffers = {name for name, _ in meta.named_buffers()}
    shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items() if name not in buffers}
    del meta
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        value = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if device.type == "cpu" else dtype)
        if len(shape) == 1 and ("norm" in name or leaf == "scale") and leaf in ("weight", "scale"):
            value.mul_(0.1).add_(1.0)
        elif len(shape) == 1:
            value.mul_(0.02)
        else:
            fan_in = max(1, math.prod(shape[1:]))
            value.mul_(fan_in ** -0.5)
        state[name] = value.to(dtype)
    return state


def load_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int):
    """(ModelPatcher, detected config): the state dict goes through ComfyUI's own detection and loader."""
    import comfy.sd

    state = random_state_dict(spec, device, dtype, seed)
    params = sum(t.numel() for t in state.values())
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={})
    del state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if model is None:
        raise BenchError(f"ComfyUI's model detection did not recognise the {spec.name} state dict")
    unet_config = dict(getattr(model.model.model_config, "unet_config", {}) or {})
    return model, {"parameters": params, "model_class": type(model.model.diffusion_model).__name__,
                   "patcher_class": type(model).__name__, "detected_config": finite_json(unet_config)}


def conditioning(spec: ModelSpec, seed: int):
    """(positive, negative) in the form comfy.sample takes: [[embeddings, extras]]."""
    gen = torch.Generator().manual_seed(seed)

    def one():
        extras = {}
        if "pooled" in spec.extra:
            extras["pooled_output"] = torch.randn(1, spec.extra["pooled"], generator=gen)
        if "guidance" in spec.extra:
            extras["guidance"] = spec.extra["guidance"]
        return [[torch.randn(1, spec.text_tokens, TEXT_WIDTH, generator=gen), extras]]

    return one(), one()


# ----------------------------------------------------------------------------------------------- hooks
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """DIFFUSION_MODEL wrapper: wall time of every model call (device synchronised), grouped by step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.calls = []  # (sigma, ms)
        self.current = -1  # index of the model call in progress (attention calls are tagged with it)

    def __call__(self, executor, *args, **kwargs):
        options = kwargs.get("transformer_options")
        if options is None and args and isinstance(args[-1], dict):
            options = args[-1]
        sigmas = (options or {}).get("sigmas")
        sigma = float(sigmas.reshape(-1)[0]) if sigmas is not None else float("nan")
        self.current = len(self.calls)
        _sync(self.device)
        start = time.perf_counter()
        out = executor(*args, **kwargs)
        _sync(self.device)
        self.calls.append((sigma, 1000.0 * (time.perf_counter() - start)))
        return out

    def step_of_call(self) -> list:
        """Step index of every model call (calls of one sigma belong to one step)."""
        steps, last = [], None
        for sigma, _ in self.calls:
            if last is None or sigma != last:
                steps.append(len(set(steps)))
                last = sigma
            else:
                steps.append(steps[-1])
        return steps

    def step_times(self) -> list:
        """Milliseconds per sampler step (calls of one sigma summed, in order)."""
        times = {}
        for step, (_, ms) in zip(self.step_of_call(), self.calls):
            times[step] = times.get(step, 0.0) + ms
        return [times[s] for s in sorted(times)]


class AttentionTimer:
    """Attention override for the dense run: times every call with CUDA events (no host synchronisation),
    tags it with the model call in progress, and passes it to the backend ComfyUI chose, whose name it
    remembers."""

    def __init__(self, device: torch.device):
        self.device = device
        self.step_timer: Optional[StepTimer] = None  # set by Sampler.run
        self.records = []  # (model call index, self-attention?, start event, end event)
        self.backend = None
        self.self_attention_shape = None

    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        self.backend = getattr(func, "__name__", repr(func))
        n_q, n_k = (q.shape[-2], k.shape[-2]) if skip_reshape else (q.shape[1], k.shape[1])
        is_self = n_q == n_k
        if is_self and self.self_attention_shape is None:
            dim = q.shape[-1] if skip_reshape else q.shape[-1] // heads
            self.self_attention_shape = (q.shape[0], heads, n_q, dim)
        start = _event(self.device)
        out = func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                   skip_output_reshape=skip_output_reshape, **kwargs)
        call = self.step_timer.current if self.step_timer is not None else 0
        self.records.append((call, is_self, start, _event(self.device)))
        return out

    def per_step(self) -> list:
        """[(self-attention ms, other attention ms)] per step, in order."""
        _sync(self.device)
        step_of_call = self.step_timer.step_of_call() if self.step_timer is not None else []
        steps = {}
        for call, is_self, start, end in self.records:
            step = step_of_call[call] if call < len(step_of_call) else 0
            entry = steps.setdefault(step, [0.0, 0.0])
            entry[0 if is_self else 1] += start.elapsed_time(end)
        return [tuple(steps[s]) for s in sorted(steps)]


def _event(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return _CpuEvent()


class _CpuEvent(float):
    def __new__(cls):
        return float.__new__(cls, time.perf_counter())

    def elapsed_time(self, end) -> float:
        return 1000.0 * (float(end) - float(self))


class CoreSparseEmulation:
    """ComfyUI core's "Model Sparse Attention" with its defaults, as an attention override: comfy-kitchen
    ``sol_attn`` (tau 1.3, 256 extra tokens) for self-attention of at least 12,288 tokens with head dim
    128, once the run's sigma is at or below ``start_sigma`` (the first 20% of the run dense); masks,
    cross-attention and everything else go to the backend."""

    def __init__(self, sol_attn: Callable, start_sigma: float, tau: float = CORE_TAU,
                 min_tokens: int = CORE_MIN_TOKENS, extra_tokens: int = CORE_EXTRA_TOKENS):
        self.sol_attn = sol_attn
        self.start_sigma = start_sigma
        self.tau = tau
        self.min_tokens = min_tokens
        self.extra_tokens = extra_tokens
        self.sparse_calls = 0
        self.dense_reasons: dict = {}

    def decline(self, q, k, heads, mask, skip_reshape, options) -> Optional[str]:
        if mask is not None:
            return "mask"
        sigmas = options.get("sigmas")
        if sigmas is not None and float(sigmas.reshape(-1)[0]) > self.start_sigma:
            return "before start_percent"
        tokens = q.shape[-2] if skip_reshape else q.shape[1]
        if tokens < self.min_tokens:
            return f"fewer than {self.min_tokens} tokens"
        head_dim = q.shape[-1] if skip_reshape else q.shape[-1] // heads
        if head_dim != CORE_HEAD_DIM:
            return f"head dim {head_dim} is not {CORE_HEAD_DIM}"
        if q.shape != k.shape:
            return "cross-attention"
        return None

    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        reason = self.decline(q, k, heads, mask, skip_reshape, kwargs.get("transformer_options") or {})
        if reason is not None:
            self.dense_reasons[reason] = self.dense_reasons.get(reason, 0) + 1
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        if skip_reshape:  # (B, H, N, D) -> (B, N, H, D)
            b, _, _, d = q.shape
            qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
        else:  # (B, N, H*D)
            b, n, hd = q.shape
            d = hd // heads
            qs, ks, vs = (t.view(b, n, heads, d) for t in (q, k, v))
        out = self.sol_attn(qs, ks, vs, tau=self.tau, scale=kwargs.get("scale"), token_aug=self.extra_tokens)
        self.sparse_calls += 1
        out = out.to(q.dtype)
        if skip_output_reshape:
            return out.transpose(1, 2)
        return out.reshape(b, -1, heads * d)


def sdpa_kernel(shape: tuple, device: torch.device, dtype: torch.dtype) -> str:
    """Name of the CUDA kernel torch SDPA runs for a (B, H, N, D) call (what ComfyUI's pytorch backend
    calls), read with the profiler; 'cpu' on the CPU."""
    if device.type != "cuda" or shape is None:
        return device.type
    b, h, n, d = shape
    q = torch.randn(b, h, n, d, device=device, dtype=dtype)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
            torch.cuda.synchronize(device)
        names = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    except Exception as exc:  # noqa: BLE001 - the profiler is optional information
        return f"unknown (profiler: {type(exc).__name__})"
    finally:
        del q
    for key in ("cudnn", "flash", "fmha", "efficient", "attention"):
        for name in names:
            if key in name.lower():
                return name[:80]
    return ", ".join(names)[:80] or "unknown"


# ------------------------------------------------------------------------------------------- sampling
@dataclass
class Sampler:
    """One case's model, conditioning, latent and schedule; ``run`` samples a slice of the schedule."""

    base: object  # ModelPatcher
    spec: ModelSpec
    case: Case
    device: torch.device
    steps: int
    cfg: float
    seed: int
    sampler_name: str = "euler"
    scheduler: str = "simple"
    progress: Optional[object] = None

    def __post_init__(self):
        import comfy.sample
        import comfy.samplers

        self.positive, self.negative = conditioning(self.spec, self.seed)
        latent = torch.zeros(self.case.latent_shape)
        self.latent = comfy.sample.fix_empty_latent_channels(self.base, latent)
        self.noise = comfy.sample.prepare_noise(self.latent, self.seed)
        sampling = self.base.get_model_object("model_sampling")
        self.sigmas = comfy.samplers.calculate_sigmas(sampling, self.scheduler, self.steps).tolist()
        self.core_start_sigma = float(sampling.percent_to_sigma(CORE_START_PERCENT))

    def core_dense_steps(self) -> int:
        """Steps of the full schedule the core node keeps dense (sigma above its start sigma)."""
        return sum(1 for s in self.sigmas[:-1] if s > self.core_start_sigma)

    def run(self, model, start: int, count: int, callback: Optional[Callable] = None,
            attention: Optional[AttentionTimer] = None) -> dict:
        """Samples steps [start, start + count) of the schedule; returns times, latent and peak VRAM.

        With ``attention``, that timer becomes the model's attention override for this run."""
        import comfy.patcher_extension as ext
        import comfy.sample

        timer = StepTimer(self.device)
        model = model.clone()
        model.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, TIMING_WRAPPER_KEY, timer)
        if attention is not None:
            attention.step_timer = timer
            model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = attention

        def on_step(step, x0, x, total):
            if self.progress is not None:
                self.progress.update(1)
            if callback is not None:
                callback(step)

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        samples = comfy.sample.sample(model, self.noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                      self.positive, self.negative, self.latent, denoise=1.0, start_step=start,
                                      last_step=start + count, force_full_denoise=False, callback=on_step,
                                      disable_pbar=True, seed=self.seed)
        wall = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return {"step_ms": timer.step_times(), "latent": samples.float(), "peak_bytes": peak, "wall_s": wall}


def _median(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _widgets(spec: ModelSpec, args, **changes) -> dict:
    """The AdaCluster node's widget values: the preset's defaults, the tiny clusterings with --tiny, the
    "CUDA graphs" widget on with --cuda-graphs, the --widget values."""
    return {"preset": spec.family, **(TINY_WIDGETS if args.tiny else {}),
            **({"cuda_graphs": True} if args.cuda_graphs else {}), **args.widgets, **changes}


def benchmark_case(name: str, case: Case, args, device: torch.device, dtype: torch.dtype, progress) -> dict:
    """Every measurement of one case; see the module docstring for the plan."""
    from ...adacluster_core import comfy_adapter
    from ...adacluster_core.config import load_preset
    from ...nodes.common import apply_patch

    spec = MODELS[case.model]
    progress.set_description(f"{name}: building the model")
    base, info = load_model(spec, device, dtype, args.seed)
    warmup = load_preset(spec.family).warmup_steps
    bench = Sampler(base, spec, case, device, args.steps, args.cfg, args.seed, progress=progress)
    core_dense = bench.core_dense_steps()
    s0 = max(warmup - 1, core_dense)
    measured = args.measure_steps
    count = _slice_steps(measured)
    if s0 + count > args.steps:
        raise BenchError(f"--steps {args.steps} is too short: the measured slice needs steps {s0} to "
                         f"{s0 + count - 1} (warm-up {warmup}, core node dense steps {core_dense})")
    row = {"case": name, "label": case.label, "model": spec.name, **info, "latent_shape": list(case.latent_shape),
           "video_tokens": case.video_tokens, "text_tokens": spec.text_tokens if spec.family != "wan" else 0,
           "steps": args.steps, "cfg": args.cfg, "sampler": f"{bench.sampler_name} / {bench.scheduler}",
           "preset_warmup_steps": warmup, "measured_slice": [s0, s0 + count], "measured_sparse_steps": measured}

    # Dense, through the backend ComfyUI picks, with the attention calls timed. First calls pay for lazy
    # initialisation (kernel loading, library handles, autotuning): each timed run on the GPU follows an
    # untimed warm-up at the same shape.
    warm = args.warmup_run and device.type == "cuda"
    if warm:
        progress.set_description(f"{name}: dense warm-up step")
        bench.run(base, s0, 1)
    progress.set_description(f"{name}: dense")
    timer = AttentionTimer(device)
    dense = bench.run(base, s0, count, attention=timer)
    attention = timer.per_step()
    t_dense = _median(dense["step_ms"])
    self_ms = _median([s for s, _ in attention])
    other_ms = _median([o for _, o in attention])
    row["dense"] = {"backend": f"comfy {timer.backend}", "sdpa_kernel": sdpa_kernel(timer.self_attention_shape,
                                                                                   device, dtype),
                    "step_ms": dense["step_ms"], "step_ms_median": t_dense, "self_attention_ms": self_ms,
                    "other_attention_ms": other_ms, "self_attention_share": self_ms / t_dense,
                    "attention_share": (self_ms + other_ms) / t_dense, "peak_vram_bytes": dense["peak_bytes"]}
    del timer

    # AdaCluster through the node's own code path, warm-up 1: the first sampled step calibrates.
    # A sampled slice is a run of its own to the node (its steps count from 0), so each slice runs one Top-K
    # on every step, and the budget schedule's multipliers are timed one slice each (base Top-K x multiplier).
    widgets = _widgets(spec, args, warmup_steps=1, budget_schedule=BUDGET_CONSTANT)
    patched = apply_patch(base, **widgets)
    patch = comfy_adapter.find_patch(patched)
    if patch is None:
        raise BenchError(f"the AdaCluster node did not patch the {spec.name} model")
    if warm:
        progress.set_description(f"{name}: sparse warm-up run (kernel compilation)")
        bench.run(patched, s0, 2)
    cache_peak = [0]

    def watch_cache():
        cache_peak[0] = max(cache_peak[0], patch.cache.memory_bytes())

    progress.set_description(f"{name}: AdaCluster")
    sparse = _run_watching(bench, patched, s0, count, watch_cache)
    report = patch.cache.report()
    layers = report.layers if report else []
    dense_layers = sorted(r.layer for r in layers if r.dense_layer)
    num_layers = comfy_adapter.detect_family(base).num_layers
    t_cal = sparse["step_ms"][0]
    # The slice above timed Top-K multiplier 1; one more slice times each other multiplier the run uses.
    scale_of = _budget_phases(spec, args)
    base_top_k = patch.config.selection.top_k
    samples = {1.0: _sample(sparse["step_ms"], layers)}
    for scale in sorted(set(scale_of.values()) - set(samples)):
        progress.set_description(f"{name}: AdaCluster, Top-K x{scale:g} steps")
        top_k = max(1, round(base_top_k * scale))
        scaled = apply_patch(base, **{**widgets, "top_k_clusters": top_k})
        extra = bench.run(scaled, s0, count)
        extra_report = comfy_adapter.find_patch(scaled).cache.report()
        samples[scale] = _sample(extra["step_ms"], extra_report.layers if extra_report else [])
        del scaled
    step_ms_by_scale = {scale: _median(v["ms"]) for scale, v in samples.items()}
    sparse_steps = list(scale_of)
    t_sparse = sum(step_ms_by_scale[scale_of[step]] for step in sparse_steps) / max(1, len(sparse_steps))
    rho = sum(samples[scale_of[step]]["kept"] for step in sparse_steps) / max(1, len(sparse_steps))
    sparse_layer_share = (num_layers - len(dense_layers)) / num_layers
    ceiling_step = t_dense - self_ms * sparse_layer_share  # attention free in every sparse layer
    floor_step = t_dense - self_ms * sparse_layer_share * (1.0 - rho)  # sparse layers at their kept fraction
    row["adacluster"] = {
        "widgets": widgets, "step_ms": sparse["step_ms"], "calibration_step_ms": t_cal, "sparse_step_ms": t_sparse,
        "sparse_step_ms_by_top_k_scale": {f"{scale:g}": ms for scale, ms in sorted(step_ms_by_scale.items())},
        "settling_step_ms_by_top_k_scale": {f"{scale:g}": v["settle_ms"] for scale, v in sorted(samples.items())},
        "kept_fraction_by_top_k_scale": {f"{scale:g}": v["kept"] for scale, v in sorted(samples.items())},
        "dense_layers": dense_layers, "layers": num_layers, "kept_fraction": rho,
        "sparse_calls": sum(r.sparse_calls for r in layers), "dense_reasons": report.dense_reasons if report else {},
        "peak_vram_bytes": sparse["peak_bytes"], "cache_bytes_peak": cache_peak[0],
        "cache_bytes_after_run": patch.cache.memory_bytes(),
        "random_weight_fidelity_rel_error": relative_l2(sparse["latent"], dense["latent"]),
        "ceiling_step_ms": ceiling_step, "floor_step_ms_at_kept_fraction": floor_step,
        "sparse_step_vs_ceiling": t_sparse / ceiling_step if ceiling_step > 0 else float("nan"),
        "sparse_step_vs_floor": t_sparse / floor_step if floor_step > 0 else float("nan"),
    }
    s = args.steps
    whole_dense = s * t_dense
    whole_ada = (warmup - 1) * t_dense + t_cal + _sparse_steps_ms(scale_of, samples)
    whole_ceiling = warmup * t_dense + (s - warmup) * ceiling_step
    phases = ", ".join(f"{sum(1 for v in scale_of.values() if v == scale)} at Top-K x{scale:g}"
                       for scale in sorted(step_ms_by_scale))
    row["whole_run"] = {"composed": True, "dense_s": whole_dense / 1000, "adacluster_s": whole_ada / 1000,
                        "adacluster_speedup": whole_dense / whole_ada, "ceiling_s": whole_ceiling / 1000,
                        "ceiling_speedup": whole_dense / whole_ceiling,
                        "note": f"composed from the preset's schedule: {warmup - 1} dense steps + 1 calibration "
                                f"step + {s - warmup} sparse steps ({phases}) of {s}, from medians of sampled "
                                "slices"}
    row["targets"] = targets(name, row)
    del patched, patch
    gc.collect()

    # ComfyUI core's sparse node, emulated with its defaults.
    sol, why_not = sol_attn_function() if args.core else (None, "not run (--no-core)")
    if sol is None:
        row["core_sparse"] = {"available": False, "note": why_not}
    else:
        progress.set_description(f"{name}: core sparse node (sol_attn)")
        core = CoreSparseEmulation(sol, bench.core_start_sigma)
        core_model = base.clone()
        core_model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = core
        if warm:
            bench.run(core_model, s0, 1)
            core.sparse_calls, core.dense_reasons = 0, {}
        result = bench.run(core_model, s0, count)
        t_core = _median(result["step_ms"])
        whole_core = core_dense * t_dense + (s - core_dense) * t_core
        row["core_sparse"] = {
            "available": True, "tau": CORE_TAU, "dense_steps": core_dense, "step_ms": result["step_ms"],
            "step_ms_median": t_core, "sparse_calls": core.sparse_calls, "dense_reasons": core.dense_reasons,
            "peak_vram_bytes": result["peak_bytes"], "whole_run_s": whole_core / 1000,
            "whole_run_speedup": whole_dense / whole_core,
            "random_weight_fidelity_rel_error": relative_l2(result["latent"], dense["latent"]),
            "note": "runs dense everywhere" if core.sparse_calls == 0 else ""}
        del core_model
    _release(base, device)
    return row


def targets(name: str, row: dict) -> list:
    """The measured targets of one case: value, target and whether it is met."""
    a, d = row["adacluster"], row["dense"]
    out = [{"name": "sparse step / ceiling", "value": a["sparse_step_vs_ceiling"], "target": SPARSE_STEP_TARGET,
            "met": a["sparse_step_vs_ceiling"] <= SPARSE_STEP_TARGET}]
    if d["peak_vram_bytes"] and a["peak_vram_bytes"]:
        ratio = a["peak_vram_bytes"] / d["peak_vram_bytes"]
        out.append({"name": "sparse peak VRAM / dense", "value": ratio, "target": PEAK_VRAM_TARGET,
                    "met": ratio <= PEAK_VRAM_TARGET})
    if name in WHOLE_RUN_TARGETS:
        speedup = row["whole_run"]["adacluster_speedup"]
        out.append({"name": "whole-run speedup", "value": speedup, "target": WHOLE_RUN_TARGETS[name],
                    "met": speedup >= WHOLE_RUN_TARGETS[name], "higher_is_better": True})
    return out


def _budget_phases(spec: ModelSpec, args) -> dict:
    """{step: Top-K multiplier} for every sparse step of a full run with the benchmark's widgets."""
    steps = args.steps
    config = config_from_widgets(spec.family, **{k: v for k, v in _widgets(spec, args).items() if k != "preset"})
    return {step: config.selection.top_k_scale(step, steps) for step in range(config.warmup_steps, steps)}


def _slice_steps(measured: int) -> int:
    """Steps of a sampled slice: the calibration step, the settling steps of CUDA-graph replay, the measured."""
    return 1 + graphs.SETTLE_CALLS + measured


def _sample(step_ms: list, layers) -> dict:
    """A sparse slice's settling step times, steady step times and kept fraction."""
    settle = 1 + graphs.SETTLE_CALLS
    return {"settle_ms": step_ms[1:settle], "ms": step_ms[settle:], "kept": _kept(layers)}


def _sparse_steps_ms(scale_of: dict, samples: dict) -> float:
    """Total time of a run's sparse steps ({step: Top-K multiplier}): the first steps of each multiplier at
    the settling times measured for its slice, the others at the slice's steady median."""
    total, steps_before = 0.0, Counter()  # sparse steps already counted at each multiplier
    for step in sorted(scale_of):
        scale = scale_of[step]
        settle, index = samples[scale]["settle_ms"], steps_before[scale]
        total += settle[index] if index < len(settle) else _median(samples[scale]["ms"])
        steps_before[scale] += 1
    return total


def _extra_slices(case: Case, args) -> int:
    """Slices beyond the first that benchmark_case samples: one per Top-K multiplier other than 1."""
    return len(set(_budget_phases(MODELS[case.model], args).values()) - {1.0})


def _kept(layers) -> float:
    """Mean kept fraction over the layers of a run report that ran sparse (1.0 when none did)."""
    kept = [r.kept_fraction for r in layers if r.sparse_calls and r.kept_fraction == r.kept_fraction]
    return sum(kept) / len(kept) if kept else 1.0


def _run_watching(bench: Sampler, model, start: int, count: int, watch: Callable) -> dict:
    """bench.run with ``watch`` called after every model call (inside the run, while the cache lives)."""
    import comfy.patcher_extension as ext

    model = model.clone()

    def wrapper(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        watch()
        return out

    model.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, TIMING_WRAPPER_KEY + "_watch", wrapper)
    return bench.run(model, start, count)


def _release(model, device: torch.device) -> None:
    import comfy.model_management

    comfy.model_management.unload_all_models()
    del model
    gc.collect()
    comfy.model_management.soft_empty_cache()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ VRAM check
class _StopRun(Exception):
    """Raised from the sampler callback to stop a run in the middle."""


def vram_check(name: str, case: Case, args, device: torch.device, dtype: torch.dtype, progress) -> dict:
    """Five runs through one patched model, then one stopped by a callback exception."""
    from ...adacluster_core import comfy_adapter
    from ...nodes.common import apply_patch

    spec = MODELS[case.model]
    progress.set_description(f"VRAM check {name}: building the model")
    base, info = load_model(spec, device, dtype, args.seed)
    bench = Sampler(base, spec, case, device, args.steps, args.cfg, args.seed, progress=progress)
    cuda = device.type == "cuda"

    def allocated() -> Optional[int]:
        gc.collect()
        return torch.cuda.memory_allocated(device) if cuda else None

    progress.set_description(f"VRAM check {name}: dense run")
    dense = bench.run(base, 0, 2)  # also settles the model on the device and the library workspaces
    baseline = allocated()
    patched = apply_patch(base, **_widgets(spec, args, warmup_steps=1))
    patch = comfy_adapter.find_patch(patched)
    runs, failures = [], []
    for i in range(5):
        progress.set_description(f"VRAM check {name}: patched run {i + 1} of 5")
        result = bench.run(patched, 0, 2)  # calibration step, then one sparse step
        after = allocated()
        entry = {"run": i + 1, "peak_vram_bytes": result["peak_bytes"], "allocated_after": after,
                 "delta_bytes": None if after is None else after - baseline, "cache_bytes": patch.cache.memory_bytes(),
                 "cache_active": patch.cache.active,
                 "sparse_calls": sum(r.sparse_calls for r in (patch.cache.report().layers if patch.cache.report() else []))}
        runs.append(entry)
        if entry["delta_bytes"] is not None and abs(entry["delta_bytes"]) > VRAM_TOLERANCE_BYTES:
            failures.append(f"run {i + 1}: allocated VRAM {entry['delta_bytes']:+d} bytes from the baseline")
        if entry["cache_bytes"] or entry["cache_active"]:
            failures.append(f"run {i + 1}: the cache still holds {entry['cache_bytes']} bytes after the run")
        if entry["sparse_calls"] == 0:
            failures.append(f"run {i + 1}: no attention call ran sparse, so the check proves nothing")

    progress.set_description(f"VRAM check {name}: run stopped by a callback exception")
    held = {}

    def stop(step):
        if step == 1:  # after the calibration step and one sparse step of three: the cache is populated
            held["cache_bytes"] = patch.cache.memory_bytes()
            raise _StopRun("stopped by the benchmark's callback")

    stopped = False
    try:
        bench.run(patched, 0, 3, callback=stop)
    except _StopRun:
        stopped = True
    after = allocated()
    interrupted = {"stopped": stopped, "cache_bytes_when_stopped": held.get("cache_bytes"),
                   "cache_bytes_after": patch.cache.memory_bytes(), "cache_active_after": patch.cache.active,
                   "last_error": patch.last_error, "allocated_after": after,
                   "delta_bytes": None if after is None else after - baseline}
    if not stopped:
        failures.append("the callback exception did not stop the run")
    if not held.get("cache_bytes"):
        failures.append("the cache was empty when the run was stopped, so the check proves nothing")
    if interrupted["cache_bytes_after"] or interrupted["cache_active_after"]:
        failures.append(f"the stopped run left {interrupted['cache_bytes_after']} cache bytes behind")
    if interrupted["delta_bytes"] is not None and abs(interrupted["delta_bytes"]) > VRAM_TOLERANCE_BYTES:
        failures.append(f"after the stopped run allocated VRAM is {interrupted['delta_bytes']:+d} bytes from the "
                        "baseline")
    peak_ratio = None
    if cuda:
        peak_ratio = max(r["peak_vram_bytes"] for r in runs) / dense["peak_bytes"]
        if peak_ratio > PEAK_VRAM_TARGET:
            failures.append(f"sparse peak VRAM is {peak_ratio:.3f}x dense (target <= {PEAK_VRAM_TARGET})")
    del patched, patch
    _release(base, device)
    return {"case": name, "label": case.label, **info, "baseline_allocated_bytes": baseline,
            "dense_peak_vram_bytes": dense["peak_bytes"], "runs": runs, "interrupted": interrupted,
            "sparse_peak_over_dense": peak_ratio, "tolerance_bytes": VRAM_TOLERANCE_BYTES,
            "passed": not failures, "failures": failures}


# -------------------------------------------------------------------------------------------- output
def _mib(value) -> str:
    return "-" if value is None else f"{value / 2 ** 20:,.0f} MiB"


def format_table(rows: list) -> str:
    lines = []
    for r in rows:
        d, a, w, c = r["dense"], r["adacluster"], r["whole_run"], r["core_sparse"]
        lines.append(f"{r['label']} ({r['model_class']}, {r['parameters'] / 1e9:.2f}B parameters, "
                     f"{r['video_tokens']} video tokens, cfg {r['cfg']:g}, {r['patcher_class']})")
        lines.append(f"  dense step          {d['step_ms_median']:10.1f} ms   backend {d['backend']} "
                     f"(kernel {d['sdpa_kernel']}); self-attention {100 * d['self_attention_share']:.0f}% of the "
                     f"step, all attention {100 * d['attention_share']:.0f}%")
        lines.append(f"  calibration step    {a['calibration_step_ms']:10.1f} ms")
        lines.append(f"  sparse step         {a['sparse_step_ms']:10.1f} ms   kept {100 * a['kept_fraction']:.1f}%, "
                     f"{len(a['dense_layers'])} of {a['layers']} layers dense")
        if len(a.get("sparse_step_ms_by_top_k_scale", {})) > 1:
            lines.append("  sparse steps by Top-K multiplier: " + ", ".join(
                f"x{scale} {ms:.1f} ms (kept {100 * a['kept_fraction_by_top_k_scale'][scale]:.1f}%)"
                for scale, ms in a["sparse_step_ms_by_top_k_scale"].items()) + "; sparse step = their mean over the run")
        lines.append(f"  ceiling step        {a['ceiling_step_ms']:10.1f} ms   (attention free in the sparse layers; "
                     f"sparse step = {a['sparse_step_vs_ceiling']:.2f}x ceiling); at the kept fraction "
                     f"{a['floor_step_ms_at_kept_fraction']:.1f} ms ({a['sparse_step_vs_floor']:.2f}x)")
        lines.append(f"  whole run (composed) dense {w['dense_s']:.1f} s, AdaCluster {w['adacluster_s']:.1f} s "
                     f"({w['adacluster_speedup']:.2f}x), ceiling {w['ceiling_s']:.1f} s ({w['ceiling_speedup']:.2f}x)")
        if c.get("available"):
            lines.append(f"  core sparse node    {c['step_ms_median']:10.1f} ms per step ({c['dense_steps']} dense "
                         f"steps); whole run {c['whole_run_s']:.1f} s ({c['whole_run_speedup']:.2f}x); "
                         f"random-weight fidelity {c['random_weight_fidelity_rel_error']:.4f}"
                         + (f"; {c['note']}" if c["note"] else ""))
        else:
            lines.append(f"  core sparse node    not run: {c['note']}")
        lines.append(f"  peak VRAM           dense {_mib(d['peak_vram_bytes'])}, AdaCluster {_mib(a['peak_vram_bytes'])}"
                     f"; run cache {a['cache_bytes_peak']:,} bytes at most, {a['cache_bytes_after_run']} after the run")
        lines.append(f"  random-weight fidelity (latent rel. error vs dense, same seed; says little about real "
                     f"quality): {a['random_weight_fidelity_rel_error']:.4f}")
        lines.append(f"  {w['note']}")
        for t in r.get("targets", []):
            better = "at least" if t.get("higher_is_better") else "at most"
            verdict = "met" if t["met"] else f"MISSED by {abs(t['value'] - t['target']) / t['target']:.0%}"
            lines.append(f"  target {t['name']}: {t['value']:.3f} ({better} {t['target']:g}): {verdict}")
    return "\n".join(lines)


def format_vram(check: dict) -> str:
    lines = [f"VRAM check, {check['label']} ({check['patcher_class']}): baseline "
             f"{_mib(check['baseline_allocated_bytes'])} allocated, dense peak {_mib(check['dense_peak_vram_bytes'])}"]
    for r in check["runs"]:
        delta = "-" if r["delta_bytes"] is None else f"{r['delta_bytes']:+,d} bytes"
        lines.append(f"  run {r['run']}: peak {_mib(r['peak_vram_bytes'])}, after the run {delta} from the baseline, "
                     f"cache {r['cache_bytes']} bytes, {r['sparse_calls']} sparse calls")
    i = check["interrupted"]
    delta = "-" if i["delta_bytes"] is None else f"{i['delta_bytes']:+,d} bytes"
    lines.append(f"  stopped run: cache {i['cache_bytes_when_stopped']} bytes when stopped, "
                 f"{i['cache_bytes_after']} after; VRAM {delta} from the baseline; last error {i['last_error']}")
    if check["sparse_peak_over_dense"] is not None:
        lines.append(f"  sparse peak / dense peak: {check['sparse_peak_over_dense']:.3f} (target <= {PEAK_VRAM_TARGET})")
    lines.append("  PASSED" if check["passed"] else "  FAILED: " + "; ".join(check["failures"]))
    return "\n".join(lines)


def render_steps(rows: list):
    """PIL image: per case, the measured step times of each run with the dense line and the ceiling."""
    from PIL import Image, ImageDraw

    from .plot import _font

    width, panel_h, margin = 900, 260, 50
    image = Image.new("RGB", (width, max(1, len(rows)) * (panel_h + 30) + 30), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(13)
    colors = {"dense": (90, 90, 90), "adacluster": (40, 100, 190), "core sparse": (220, 120, 30),
              "dense median": (0, 0, 0), "ceiling": (40, 160, 60)}
    for p, r in enumerate(rows):
        top = 20 + p * (panel_h + 30)
        series = {"dense": r["dense"]["step_ms"], "adacluster": r["adacluster"]["step_ms"]}
        if r["core_sparse"].get("available"):
            series["core sparse"] = r["core_sparse"]["step_ms"]
        lines = {"dense median": r["dense"]["step_ms_median"], "ceiling": r["adacluster"]["ceiling_step_ms"]}
        high = max([max(v) for v in series.values()] + list(lines.values())) * 1.1
        steps = max(len(v) for v in series.values())
        x0, x1, y0, y1 = margin, width - 180, top + 20, top + panel_h - 20
        draw.text((x0, top), f"{r['label']}: ms per sampler step (slice {r['measured_slice']})", fill=(20, 20, 20),
                  font=font)
        draw.rectangle((x0, y0, x1, y1), outline=(180, 180, 180))

        def xy(i, value):
            x = x0 + (x1 - x0) * (i + 0.5) / steps
            return x, y1 - (y1 - y0) * max(0.0, value) / high

        for frac in (0.25, 0.5, 0.75, 1.0):
            y = y1 - (y1 - y0) * frac
            draw.text((4, y - 7), f"{high * frac:.0f}", fill=(120, 120, 120), font=font)
        for name, value in lines.items():
            y = xy(0, value)[1]
            for x in range(x0, x1, 8):
                draw.line((x, y, min(x + 4, x1), y), fill=colors[name], width=2)
        for name, values in series.items():
            points = [xy(i, v) for i, v in enumerate(values)]
            if len(points) > 1:
                draw.line(points, fill=colors[name], width=2)
            for x, y in points:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colors[name])
        for j, name in enumerate(list(series) + list(lines)):
            draw.line((x1 + 15, y0 + 10 + 18 * j, x1 + 35, y0 + 10 + 18 * j), fill=colors[name], width=3)
            draw.text((x1 + 40, y0 + 3 + 18 * j), name, fill=(20, 20, 20), font=font)
        first = r["measured_slice"][0]
        for i in range(steps):
            x = xy(i, 0)[0]
            draw.text((x - 8, y1 + 3), str(first + i), fill=(90, 90, 90), font=font)
        draw.text((x0, y1 + 20), f"sampler step of the {r['steps']}-step schedule; the first AdaCluster step is its "
                  "calibration step", fill=(90, 90, 90), font=font)
    return image




class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.bar = None
        self.enabled = enabled

    def update(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def set_description(self, text):
        if self.bar is not None:
            self.bar.set_description(text)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="adacluster-model-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"),
                   help="ComfyUI checkout (default: $COMFYUI_PATH)")
    p.add_argument("--cases", default=None, help="comma list of cases: " + ", ".join(CASES) +
                   f" (default: {', '.join(DEFAULT_CASES)}); with --tiny: " + ", ".join(TINY_CASES))
    p.add_argument("--tiny", action="store_true", help="tiny configurations on the CPU (tests)")
    p.add_argument("--steps", type=int, default=None, help="steps of the schedule (default 50; 12 with --tiny)")
    p.add_argument("--measure-steps", type=int, default=None,
                   help="sparse steps sampled per run; medians are over these (default 3; 2 with --tiny)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance; 1 runs one branch per step (default). A cfg "
                   "above 1 doubles the work of every step, dense and sparse alike")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--no-warmup-run", dest="warmup_run", action="store_false",
                   help="on the GPU, skip the untimed warm-up runs (1 dense step, 2 sparse steps, 1 core-node "
                   "step) that load and compile the kernels before the timed runs")
    p.add_argument("--vram-check", action="store_true",
                   help=f"run the VRAM and state check instead (case {VRAM_CHECK_CASE} unless --cases names one)")
    p.add_argument("--dynamic-vram", action="store_true",
                   help="load through ComfyUI's DynamicVRAM model patcher (comfy-aimdo), which ComfyUI's main.py "
                   "turns on by default on NVIDIA GPUs; without it the classic ModelPatcher loads the model")
    p.add_argument("--no-core", dest="core", action="store_false", help="skip the core sparse node's row")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="turn the node's 'CUDA graphs' widget on (steady sparse calls replayed as CUDA graphs)")
    p.add_argument("--widget", dest="widget_items", action="append", default=[], metavar="NAME=VALUE",
                   help="an AdaCluster node widget value for the sparse runs, read as YAML, e.g. "
                   "'head_budgets=one Top-K' (repeatable)")
    p.add_argument("--out", default="output/model_bench", help="folder for the JSON and PNG files")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    try:
        args.widgets = parse_assignments(args.widget_items, "--widget", "NAME=VALUE")
    except ConfigError as error:
        p.error(str(error))
    try:
        check_widget_values(WIDGETS, args.widgets)
    except ConfigError as error:
        p.error(f"--widget: {error}")
    args.steps = args.steps or (12 if args.tiny else 50)
    args.measure_steps = args.measure_steps or (2 if args.tiny else 3)
    if args.measure_steps < 1:
        p.error(f"--measure-steps {args.measure_steps} is out of range: expected at least 1")
    if args.cfg < 1.0:
        p.error(f"--cfg {args.cfg} is out of range: expected at least 1")
    table = TINY_CASES if args.tiny else CASES
    default = (VRAM_CHECK_CASE,) if args.vram_check else DEFAULT_CASES
    if args.tiny:
        default = ("hunyuan_tiny",) if args.vram_check else tuple(TINY_CASES)
    names = [c.strip() for c in (args.cases or ",".join(default)).split(",") if c.strip()]
    unknown = [c for c in names if c not in table]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; expected one of: {', '.join(table)}")
    args.case_names = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except BenchError as exc:
        print(f"adacluster-model-bench: error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:
    cuda = torch.cuda.is_available() and not args.tiny
    root = setup_comfyui(args.comfyui, cpu=not cuda)
    import comfy.model_management

    if args.dynamic_vram:
        if not cuda:
            raise BenchError("--dynamic-vram needs a CUDA GPU (and not --tiny)")
        enable_dynamic_vram()

    device = comfy.model_management.get_torch_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    table = TINY_CASES if args.tiny else CASES
    cases = []
    for name in args.case_names:
        case = table[name]
        if MODELS[case.model].builder == "cogvideox" and not (root / "comfy" / "ldm" / "cogvideo").is_dir():
            print(f"skipping {name}: this ComfyUI tree has no CogVideoX model code", file=sys.stderr)
            continue
        cases.append((name, case))
    count = _slice_steps(args.measure_steps)
    # dense, AdaCluster, core node, warm-ups
    per_case = (3 if args.core else 2) * count + ((4 if args.core else 3) if args.warmup_run and cuda else 0)
    total = (len(cases) * (2 + 5 * 2 + 2) if args.vram_check else
             sum(per_case + _extra_slices(c, args) * count for _, c in cases))
    progress = _Progress(total, args.progress)
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "comfyui": comfyui_version(root), "comfyui_path": str(root),
              "dtype": str(dtype).replace("torch.", ""), "tiny": args.tiny, "cuda_graphs": args.cuda_graphs}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        if args.vram_check:
            checks = [vram_check(n, c, args, device, dtype, progress) for n, c in cases]
            progress.close()
            result = {**header, "vram_checks": checks}
            print("\n".join(format_vram(c) for c in checks))
            path = out_dir / f"vram_check-{stamp}.json"
            path.write_text(json.dumps(finite_json(result), indent=1))
            print(f"wrote {path}")
            return 0 if all(c["passed"] for c in checks) else 1
        rows = [benchmark_case(n, c, args, device, dtype, progress) for n, c in cases]
    finally:
        progress.close()
    result = {**header, "steps": args.steps, "measure_steps": args.measure_steps, "cases": rows,
              "notes": ["Whole-run times are composed from the preset's schedule and the medians of a sampled "
                        "slice of it; only that slice is sampled.",
                        "Random-weight fidelity is the latent's relative error against dense from the same seed "
                        "with random weights: it says little about the quality with real weights.",
                        f"cfg {args.cfg:g}: " + ("one branch per step." if args.cfg == 1 else
                                                 "cond and uncond per step."),
                        "CUDA graphs: " + ("on (steady sparse calls replayed as CUDA graphs)." if args.cuda_graphs
                                           else "off (the node's default).")]}
    print(f"{header['device']}, torch {header['torch']}, ComfyUI {header['comfyui']}, {header['dtype']}")
    print(format_table(rows))
    for note in result["notes"]:
        print(f"note: {note}")
    path = out_dir / f"model_bench-{stamp}.json"
    path.write_text(json.dumps(finite_json(result), indent=1))
    png = out_dir / f"model_bench-{stamp}.png"
    render_steps(rows).save(png)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
