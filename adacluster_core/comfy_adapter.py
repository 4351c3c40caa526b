"""The ComfyUI model adapter: the only module of the pack that imports ``comfy``.

``patch_model(model, config, ...)`` returns a clone of a ComfyUI ModelPatcher whose self-attention runs
through ``SparseAttention``. The patch is one ``AdaClusterPatch`` object installed in four places:

* ``transformer_options["optimized_attention_override"]``: every attention call of the model comes here.
  Calls this adapter does not handle (cross-attention, the HunyuanVideo text refiner, unknown shapes,
  calls outside a sampling run) go to the previous override, or to ComfyUI's backend when there is none.
* a DIFFUSION_MODEL wrapper: once per model call it works out the sampler step (from the sigma schedule,
  so samplers that call the model twice per step are counted right), the branch of every batch element
  (cond / uncond and the conditioning uuid), the number of text tokens, and resets the call counter that
  gives CogVideoX its layer index.
* an OUTER_SAMPLE wrapper: one per sampling run; it starts the run cache and ends it in ``finally``, so
  an error or an interruption frees the cache as well.
* an ON_PREPARE_STATE callback (trees whose prepare_state passes model_options): puts the override back
  on top every step if a later node replaced it, chaining to that node's override.

Trees that do not tell the attention call its block index (ComfyUI before ``block_index`` existed) get
the layer injected through block-replace patches, which chain to any block patch already there.
"""
from __future__ import annotations

import inspect
import logging
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from .attention import CallInfo, SparseAttention
from .cache import RunCache
from .config import AdaClusterConfig

log = logging.getLogger(__name__)

ATTACHMENT_KEY = "adacluster"
WRAPPER_KEY = "adacluster"
CALL_KEY = "adacluster_call"  # per model call state in transformer_options
LAYER_KEY = "adacluster_layer"  # layer index injected by block-replace patches (older trees)

_live_patches: "weakref.WeakSet[AdaClusterPatch]" = weakref.WeakSet()


@dataclass(frozen=True)
class ModelFamily:
    name: str  # preset name: "wan", "hunyuan_video", "cogvideox"
    display: str
    num_layers: int
    double_blocks: int  # layers before the single-stream blocks (HunyuanVideo); == num_layers otherwise
    text_first: bool  # joint sequences: text tokens before the video tokens
    joint_text: bool  # self-attention sees text tokens too
    layer_by_count: bool  # no block index exists: count self-attention calls per model call (CogVideoX)
    patch_size: tuple  # (t, h, w) patch of the video tokens


def detect_family(model) -> Optional[ModelFamily]:
    """The family of a ComfyUI ModelPatcher's diffusion model, or None when it is not supported."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if dm is None:
        return None
    module = type(dm).__module__
    if module.endswith("ldm.wan.model") and hasattr(dm, "blocks"):
        n = len(dm.blocks)
        return ModelFamily("wan", "Wan", n, n, False, False, False, tuple(getattr(dm, "patch_size", (1, 2, 2))))
    if module.endswith("ldm.hunyuan_video.model") and hasattr(dm, "double_blocks"):
        double, single = len(dm.double_blocks), len(dm.single_blocks)
        # ComfyUI 0.3.x puts image tokens first in HunyuanVideo's joint attention, later trees text first.
        image_first = bool(double and getattr(dm.double_blocks[0], "flipped_img_txt", False))
        patch = tuple(dm.patch_size) if hasattr(dm, "patch_size") else (1, 2, 2)
        return ModelFamily("hunyuan_video", "HunyuanVideo", double + single, double, not image_first, True, False, patch)
    if module.endswith("ldm.cogvideo.model") and hasattr(dm, "blocks"):
        n = len(dm.blocks)
        patch_t = getattr(dm, "patch_size_t", None) or 1
        return ModelFamily("cogvideox", "CogVideoX", n, n, True, True, True, (patch_t, dm.patch_size, dm.patch_size))
    return None


def model_name(model) -> str:
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    return type(dm).__name__ if dm is not None else type(getattr(model, "model", model)).__name__


def video_token_count(x: torch.Tensor, patch: tuple) -> int:
    """Tokens of a (B, C, T, H, W) latent after patching (ComfyUI pads to the patch size)."""
    grid = video_grid(x, patch)
    return -1 if grid is None else grid[0] * grid[1] * grid[2]


def video_grid(x: torch.Tensor, patch: tuple) -> Optional[tuple]:
    """(frames, height, width) of a (B, C, T, H, W) latent's tokens after patching; None for other shapes."""
    if x.ndim != 5:
        return None
    return tuple(-(-size // p) for size, p in zip(x.shape[2:], patch))


def branch_keys(batch: int, cond_or_uncond, uuids, device=None) -> Optional[tuple]:
    """One hashable per batch element: (cond 0 / uncond 1, conditioning uuid, index inside its chunk), and
    the device when given: under MultiGPU CFG Split a branch's cached state stays on the GPU that made it
    (a branch the scheduler moves to another GPU starts a fresh state there)."""
    chunks = list(cond_or_uncond or [])
    if not chunks or batch % len(chunks):
        keys = tuple(("batch", None, b) for b in range(batch)) if not chunks else None
    else:
        per_chunk = batch // len(chunks)
        uuids = list(uuids or [None] * len(chunks))
        if len(uuids) != len(chunks):
            uuids = [None] * len(chunks)
        keys = tuple((int(chunks[b // per_chunk]), str(uuids[b // per_chunk]), b % per_chunk) for b in range(batch))
    if keys is None or device is None:
        return keys
    return tuple(key + (str(device),) for key in keys)


def _reason_key(reason: str, shape) -> tuple:
    return reason, tuple(shape)


class AdaClusterPatch:
    """Everything one AdaCluster node application installs on a model; holds the run cache.

    Clones of the patched model (ComfyUI deep-copies model_options on clone in older trees) share this
    object on purpose: one node application has one cache."""

    def __init__(self, family: ModelFamily, config: AdaClusterConfig, previous=None, profile=None,
                 verbose: bool = False, label: str = "", method=None):
        self.family = family
        self.config = config
        self.previous = previous
        self.verbose = verbose
        self.label = label or family.display
        self.cache = RunCache(method=config.method)
        if profile is not None:
            self.cache.profile = profile
        # method: a callable RunCache -> SparseMethod (AdaSpa, MOD-DiT with their settings); None: config.method
        self.sparse = SparseAttention(config, self.cache, method=method(self.cache) if method is not None else None)
        self._run_sigmas: Optional[list] = None
        self._run_progress: Optional[list] = None  # each step's denoising progress by noise level
        self._logged: set = set()
        self._local = threading.local()
        self.last_error: Optional[str] = None
        _live_patches.add(self)

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    # ------------------------------------------------------------------ logging
    def _log_once(self, key, message: str, level=logging.INFO) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, "[AdaCluster] %s: %s", self.label, message)

    # ------------------------------------------------------------------ attention override
    def _fallback(self, func, q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape, kwargs):
        target = self.previous
        if target is not None:
            return target(func, q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                          skip_output_reshape=skip_output_reshape, **kwargs)
        return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                    skip_output_reshape=skip_output_reshape, **kwargs)

    # No ``container_function`` attribute on purpose: ComfyUI then unwraps AttentionTensorContainer inputs
    # into plain tensors before calling the override, and passes the backend as ``func``.
    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        # Keyword arguments this adapter does not use (scale, enable_gqa, low_precision_attention,
        # _inside_attn_wrapper, ...) reach the backend or the previous override unchanged, in ``kwargs``.
        q, k, v = _tensor(q), _tensor(k), _tensor(v)
        args = (func, q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape, kwargs)
        if getattr(self._local, "busy", False):
            # Re-entered through an override chain that leads back here: run the backend itself.
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        self._local.busy = True
        try:
            call = self._call_info(q, k, v, heads, mask, skip_reshape, kwargs)
            if call is None:
                return self._fallback(*args)
            return self._run_sparse(call, *args)
        finally:
            self._local.busy = False

    def _call_info(self, q, k, v, heads, mask, skip_reshape, kwargs) -> Optional[CallInfo]:
        """CallInfo for a self-attention call this adapter handles, None to pass the call through."""
        options = kwargs.get("transformer_options") or {}
        state = options.get(CALL_KEY)
        if state is None or state.get("patch") is not self:
            return None  # not inside a model call of this patched model (or no run active)
        if not self.cache.active:
            self._log_once("no-run", "attention called outside a sampling run; it stays dense")
            return None
        n_q, n_k = q.shape[-2] if skip_reshape else q.shape[1], k.shape[-2] if skip_reshape else k.shape[1]
        if n_q != n_k:
            return None  # cross-attention: always dense
        if self.family.layer_by_count:
            layer = state["count"]
            state["count"] += 1
        else:
            layer = self._layer(options)
            if layer is None:
                return None  # outside the transformer blocks (HunyuanVideo's text refiner)
        if q.shape != k.shape or q.shape != v.shape or (not skip_reshape and q.shape[-1] % heads):
            self._log_once(_reason_key("shape", q.shape), f"unsupported q/k shapes {tuple(q.shape)} / "
                           f"{tuple(k.shape)}; attention stays dense")
            return None
        scale = kwargs.get("scale")
        head_dim = q.shape[-1] if skip_reshape else q.shape[-1] // heads
        if scale is not None and abs(float(scale) - head_dim ** -0.5) > 1e-6:
            self._log_once(("scale", float(scale)), f"custom softmax scale {scale}; attention stays dense")
            return None
        text_len, text_first = 0, self.family.text_first
        if self.family.name == "wan":
            layout = self._wan_layout(n_q, options, state)
            if layout is None:
                return None
            text_len, text_first = layout
        if self.family.joint_text:
            text_len = state["text_len"] if state["text_len"] is not None else n_q - state["video_tokens"]
            if not 0 <= text_len < n_q or (state["video_tokens"] > 0 and n_q - text_len != state["video_tokens"]):
                self._log_once(_reason_key("tokens", q.shape), f"sequence of {n_q} tokens does not match "
                               f"{state['video_tokens']} video tokens; attention stays dense")
                return None
        branches = state["branches"]
        batch = q.shape[0]
        if branches is None or len(branches) != batch:
            self._log_once(("branches", batch), f"cannot tell the conditioning branch of {batch} batch elements; "
                           "attention stays dense")
            return None
        return CallInfo(layer=layer, step=state["step"], total_steps=state["total_steps"], branches=branches,
                        text_len=text_len, text_first=text_first, mask=_mask_4d(mask),
                        grid=state.get("grid"), progress=state.get("progress"))

    def _wan_layout(self, n: int, options, state) -> Optional[tuple]:
        """(extra tokens, extra tokens first) of a Wan self-attention sequence, None when it must stay dense.

        The video tokens are the grid's (``grid_sizes``, else the patched latent). A prepended reference latent
        or appended in-context latents are extra tokens, kept for every query like a text sink, when they
        are all on one side; a sequence of any other length is not clustered."""
        grid = _grid_tokens(options.get("grid_sizes"))
        video = grid if grid is not None else state["video_tokens"]
        first, last = state.get("extra_first", 0), state.get("extra_last", 0)
        if n == video:
            return 0, False
        if first is None:
            self._log_once(("extra-ref", n), f"sequence of {n} tokens with a reference latent of unknown layout; "
                           "attention stays dense")
            return None
        if n == video + first + last and first and last:
            self._log_once(("extra-both", n), f"sequence of {n} tokens: {video} video tokens with a reference latent "
                           f"before them ({first} tokens) and context latents after them ({last} tokens); "
                           "attention stays dense")
            return None
        if n == video + first + last:
            return first + last, bool(first)
        self._log_once(("extra-unknown", n), f"sequence of {n} tokens does not match the {video} video tokens of "
                       f"the grid; attention stays dense")
        return None

    def _layer(self, options) -> Optional[int]:
        if LAYER_KEY in options:
            return options[LAYER_KEY]
        index = options.get("block_index")
        if index is None:
            return None
        if options.get("block_type") == "single":
            return self.family.double_blocks + int(index)
        return int(index)

    def _run_sparse(self, call: CallInfo, func, q, k, v, heads, mask, attn_precision, skip_reshape,
                    skip_output_reshape, kwargs):
        q4, k4, v4 = (_to_bhnd(t, heads, skip_reshape) for t in (q, k, v))

        def dense():
            out = self._fallback(func, q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape, kwargs)
            return _to_bhnd(out, heads, skip_output_reshape)

        out = self.sparse(q4, k4, v4, call, dense)
        if self.verbose:
            reason = self.sparse.decide(q4.shape, k4.shape, call)
            self._log_once(("verbose", tuple(q4.shape), reason), f"layer {call.layer} step {call.step} "
                           f"shape {tuple(q4.shape)}: {'sparse' if reason is None else 'dense (' + reason + ')'}")
        if skip_output_reshape:
            return out
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)

    # ------------------------------------------------------------------ per model call
    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        options = kwargs.get("transformer_options")
        if options is None and args and isinstance(args[-1], dict):
            options = args[-1]
        x = args[0] if args else kwargs.get("x")
        if options is None or x is None or not self.cache.active or self._run_sigmas is None:
            return executor(*args, **kwargs)
        from .schedule import step_from_sigmas

        sigmas = options.get("sigmas")
        step = step_from_sigmas(float(sigmas.reshape(-1)[0]), self._run_sigmas) if sigmas is not None else 0
        text_len = None
        if self.family.name == "cogvideox":
            context = args[2] if len(args) > 2 else kwargs.get("context")
            text_len = int(context.shape[1]) if context is not None else 0
        video_tokens = video_token_count(x, self.family.patch_size)
        if self.family.name == "hunyuan_video":
            ref = _bound_argument(executor, args, kwargs, "ref_latent")
            if isinstance(ref, torch.Tensor):
                video_tokens += video_token_count(ref, self.family.patch_size)
        extra_first = extra_last = 0
        if self.family.name == "wan":
            extra_first, extra_last = _wan_extra_tokens(getattr(executor, "class_obj", None), kwargs,
                                                        self.family.patch_size)
        options[CALL_KEY] = {
            "patch": self, "count": 0, "step": step, "total_steps": len(self._run_sigmas) - 1,
            "progress": self._run_progress[step] if self._run_progress else None,
            "branches": branch_keys(x.shape[0], options.get("cond_or_uncond"), options.get("uuids"), x.device),
            "text_len": text_len, "video_tokens": video_tokens, "extra_first": extra_first,
            "extra_last": extra_last, "grid": video_grid(x, self.family.patch_size),
        }
        try:
            return executor(*args, **kwargs)
        finally:
            options.pop(CALL_KEY, None)

    # ------------------------------------------------------------------ per sampling run
    def outer_sample_wrapper(self, executor, *args, **kwargs):
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        sigmas = [float(s) for s in sigmas.reshape(-1).tolist()] if sigmas is not None else None
        if not sigmas or len(sigmas) < 2:
            return executor(*args, **kwargs)
        self.cache.start_run(len(sigmas) - 1)
        self._run_sigmas = sigmas
        self._run_progress = _run_noise_progress(executor, sigmas)
        self.last_error = None
        try:
            return executor(*args, **kwargs)
        except BaseException as exc:
            self.last_error = f"{type(exc).__name__}: {exc}".strip()
            raise
        finally:
            self._run_sigmas = self._run_progress = None
            held = self.cache.memory_bytes()
            self.cache.end_run()
            if self.last_error is not None:
                log.info("[AdaCluster] %s: the run ended with %s; its cache (%d bytes) was released", self.label,
                         self.last_error.split(":")[0], held)

    # ------------------------------------------------------------------ keep the override on top
    def on_prepare_state(self, patcher, timestep=None, model_options=None, *args):
        if not isinstance(model_options, dict):
            return
        options = model_options.setdefault("transformer_options", {})
        current = options.get("optimized_attention_override")
        if current is self:
            return
        if current is not None and current is not self.previous:
            self._log_once(("rechain", id(current)), "another attention override was installed after this node; "
                           "AdaCluster runs first and passes what it does not handle to it")
            self.previous = current
        options["optimized_attention_override"] = self

    # ------------------------------------------------------------------ older trees: inject the layer
    def block_patch(self, layer: int, previous=None):
        def patch(args, extra):
            args = dict(args)
            args["transformer_options"] = {**args["transformer_options"], LAYER_KEY: layer}
            if previous is not None:
                return previous(args, extra)
            return extra["original_block"](args)
        return patch

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        return {"label": self.label, "family": self.family.name, "active": self.cache.active,
                "cache_bytes": self.cache.memory_bytes(), "cached_states": len(self.cache.states),
                "last_error": self.last_error}


def _tensor(t):
    """A plain tensor from q/k/v that may arrive as ComfyUI's AttentionTensorContainer (taken: it is single-use)."""
    if isinstance(t, torch.Tensor) or not hasattr(t, "take"):
        return t
    return t.take()


def _grid_tokens(grid) -> Optional[int]:
    """Tokens of Wan's ``grid_sizes`` (frames, height, width after patching), None when absent or unreadable."""
    if grid is None:
        return None
    values = grid.reshape(-1).tolist() if isinstance(grid, torch.Tensor) else list(grid)
    if len(values) < 3 or len(values) % 3:
        return None
    return math.prod(int(x) for x in values[:3])


def _wan_extra_tokens(dm, kwargs, patch) -> tuple:  # (Optional[int], int)
    """(tokens before, tokens after) the video tokens in Wan's self-attention: a reference latent that the
    model's ref_conv prepends, and in-context latents ("Bernini") appended after the video."""
    before = after = 0
    ref = kwargs.get("reference_latent")
    if isinstance(ref, torch.Tensor) and getattr(dm, "ref_conv", None) is not None:
        if ref.ndim == 4:  # 2-D convolution with the spatial patch as kernel and stride
            before = (ref.shape[-2] // patch[1]) * (ref.shape[-1] // patch[2])
        else:
            before = None  # a layout this adapter does not know: such a sequence stays dense
    for latent in kwargs.get("context_latents") or ():
        after += video_token_count(latent, patch) if isinstance(latent, torch.Tensor) else 0
    return before, after


def _run_noise_progress(executor, sigmas: list) -> Optional[list]:
    """Each step's denoising progress by noise level, from the model's sampling (the guider's model, through
    the OUTER_SAMPLE executor); None where it cannot be read (the budget schedule then counts steps)."""
    from .schedule import noise_progress

    patcher = getattr(getattr(executor, "class_obj", None), "model_patcher", None)
    try:
        sampling = patcher.get_model_object("model_sampling")
        return noise_progress(sampling.percent_to_sigma, sigmas)
    except Exception as error:  # noqa: BLE001 - an unknown sampling object: fall back to step counts
        log.debug("[AdaCluster] no noise progress for this run (%s: %s)", type(error).__name__, error)
        return None


def _bound_argument(executor, args, kwargs, name):
    target = getattr(executor, "class_obj", None)
    try:
        bound = inspect.signature(target.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError, AttributeError):
        return None
    return bound.arguments.get(name)


def _to_bhnd(t: torch.Tensor, heads: int, already: bool) -> torch.Tensor:
    if already:
        return t
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2)


def _mask_4d(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """ComfyUI's mask convention: (N, N) and (B, Nq, Nk) gain the missing batch / head dimensions."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask


def _has_block_index(dm) -> bool:
    """True when this ComfyUI tree writes block_index into transformer_options for the model's blocks."""
    for name in ("forward_orig", "_forward", "forward"):
        fn = getattr(type(dm), name, None)
        if fn is None:
            continue
        try:
            if "block_index" in inspect.getsource(fn):
                return True
        except (OSError, TypeError):
            continue
    return False


def _supports_prepare_state_options() -> bool:
    import comfy.model_patcher

    try:
        return "model_options" in inspect.signature(comfy.model_patcher.ModelPatcher.prepare_state).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def patch_model(model, config: AdaClusterConfig, family: Optional[ModelFamily] = None, profile=None,
                verbose: bool = False, method=None):
    """A clone of ``model`` whose self-attention runs AdaCluster. The input model is not changed.

    Unsupported models come back as an unpatched clone, with one log line saying why."""
    import comfy.patcher_extension as ext

    patched = model.clone()
    family = family or detect_family(model)
    if family is None:
        log.warning("[AdaCluster] model %s is not supported (Wan 2.1/2.2, HunyuanVideo, CogVideoX); "
                    "its attention stays dense", model_name(model))
        return patched
    options = patched.model_options.setdefault("transformer_options", {})
    previous = options.get("optimized_attention_override")
    if isinstance(previous, AdaClusterPatch):
        log.info("[AdaCluster] model was already patched by AdaCluster; the new settings replace the old ones")
        previous = previous.previous
    patch = AdaClusterPatch(family, config, previous=previous, profile=profile, verbose=verbose, method=method)
    options["optimized_attention_override"] = patch
    patched.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, patch.outer_sample_wrapper)
    patched.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, patch.diffusion_model_wrapper)
    if _supports_prepare_state_options():
        patched.add_callback_with_key(ext.CallbacksMP.ON_PREPARE_STATE, WRAPPER_KEY, patch.on_prepare_state)
    dm = patched.model.diffusion_model
    if not family.layer_by_count and not _has_block_index(dm):
        replace = options.get("patches_replace", {}).get("dit", {})
        for i in range(family.double_blocks):
            patched.set_model_patch_replace(patch.block_patch(i, replace.get(("double_block", i))), "dit",
                                            "double_block", i)
        for i in range(family.num_layers - family.double_blocks):
            patched.set_model_patch_replace(
                patch.block_patch(family.double_blocks + i, replace.get(("single_block", i))), "dit", "single_block", i)
    patched.set_attachments(ATTACHMENT_KEY, patch)
    log.info("[AdaCluster] patched %s (%s, %d layers): %s", model_name(model), family.display, family.num_layers,
             patch.sparse.method.describe())
    return patched


def find_patch(model) -> Optional[AdaClusterPatch]:
    """The AdaCluster patch of a (patched) ModelPatcher, or None."""
    getter = getattr(model, "get_attachment", None)
    patch = getter(ATTACHMENT_KEY) if getter is not None else None
    if patch is None:
        options = getattr(model, "model_options", {}).get("transformer_options", {})
        candidate = options.get("optimized_attention_override")
        patch = candidate if isinstance(candidate, AdaClusterPatch) else None
    return patch


def live_patches() -> list:
    """Every AdaCluster patch still alive in this process (for status checks)."""
    return list(_live_patches)
