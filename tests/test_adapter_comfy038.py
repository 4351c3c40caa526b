"""What the attention override meets in ComfyUI 0.38, reproduced with fakes (no ComfyUI needed).

The fakes follow the 0.38.1 sources: ``wrap_attn`` in comfy/ldm/modules/attention.py (preferred_attention
popped before an override runs, AttentionTensorContainer inputs unwrapped unless the override has a
``container_function``, ``_inside_attn_wrapper`` added), Wan's self-attention (``heads`` as a keyword),
Wan's forward_orig (``grid_sizes``, a prepended reference latent, appended context latents) and
comfy/model_prefetch.py (``pause_malloc_graph``)."""
from __future__ import annotations

import logging
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from comfyui_adacluster.adacluster_core import comfy_adapter as adapter
from comfyui_adacluster.adacluster_core import memory
from comfyui_adacluster.adacluster_core.config import from_dict
from qkv_data import structured_qkv

HEADS, DIM = 2, 16
WAN = adapter.ModelFamily("wan", "Wan", 2, 2, False, False, False, (1, 2, 2))


class Container:
    """Single-owner tensor holder, as ComfyUI 0.38's AttentionTensorContainer."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def take(self):
        tensor, self.tensor = self.tensor, None
        if tensor is None:
            raise RuntimeError("attention tensor container has already been consumed")
        return tensor


class Backend:
    """ComfyUI's dense backend: records what reached it."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        self.calls.append({"heads": heads, **kwargs})
        b, n, hd = q.shape
        split = lambda t: t.view(b, -1, heads, hd // heads).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(b, n, hd)


def optimized_attention_038(backend, q, k, v, **kwargs):
    """ComfyUI 0.38's wrapper around a backend, when an override is installed."""
    kwargs.pop("preferred_attention", None)
    kwargs["_inside_attn_wrapper"] = True
    override = kwargs["transformer_options"]["optimized_attention_override"]
    if isinstance(q, Container):
        if hasattr(override, "container_function"):
            return override.container_function(q, k, v, **kwargs)
        q, k, v = q.take(), k.take(), v.take()
    return override(backend, q, k, v, **kwargs)


def _patch(**config):
    values = dict(warmup_steps=0, min_tokens=16, query_clusters=4, initial_key_clusters=6, max_stages=3, **config)
    patch = adapter.AdaClusterPatch(WAN, from_dict(values))
    patch.cache.start_run(2)
    patch._run_sigmas = [1.0, 0.5, 0.0]
    return patch


class Spy:
    """Wraps the runner to see the CallInfo of each call it is given."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, q, k, v, call, dense):
        self.calls.append(call)
        return self.inner(q, k, v, call, dense)

    def decide(self, *args):
        return self.inner.decide(*args)


def _model_call(patch, frames, h, w, extra_before=0, extra_after=0, kwargs=None, dm=None, extra_kwargs=None,
                seed=0, cross=False):
    """One Wan model call through the DIFFUSION_MODEL wrapper; its block makes one self-attention call of
    grid + extra tokens, as 0.38's forward_orig builds the sequence. Returns the backend and the output."""
    backend = Backend()
    grid = frames * (h // 2) * (w // 2)
    n = extra_before + grid + extra_after
    q, k, v = (t.transpose(1, 2).reshape(1, n, HEADS * DIM) for t in structured_qkv(1, HEADS, n, DIM, seed=seed))
    options = {"optimized_attention_override": patch, "sigmas": torch.tensor([1.0]), "cond_or_uncond": [0],
               "uuids": ["u"], "block_index": 0}
    result = {}

    def executor(*args, **kw):
        options["grid_sizes"] = torch.Size([frames, h // 2, w // 2])  # set by forward_orig after patching
        kk = k[:, :7] if cross else k
        vv = v[:, :7] if cross else v
        result["out"] = optimized_attention_038(backend, Container(q), Container(kk), Container(vv), heads=HEADS,
                                                preferred_attention=object(), transformer_options=options,
                                                **(extra_kwargs or {}))
        return result["out"]

    executor.class_obj = dm if dm is not None else SimpleNamespace(ref_conv=None)
    x = torch.randn(1, 16, frames, h, w)
    patch.diffusion_model_wrapper(executor, x, torch.tensor([1.0]), torch.randn(1, 5, 8), None, None, options,
                                  **(kwargs or {}))
    return backend, result["out"], (q, k, v)


def test_override_has_no_container_function_and_gets_tensors():
    patch = _patch()
    assert not hasattr(patch, "container_function")  # so 0.38 unwraps the containers and passes the backend
    patch.sparse = Spy(patch.sparse)
    backend, out, _ = _model_call(patch, 2, 8, 8)
    assert len(patch.sparse.calls) == 1 and patch.cache.records[-1].sparse
    assert out.shape == (1, 2 * 4 * 4, HEADS * DIM) and torch.isfinite(out).all()
    assert backend.calls == []  # ran sparse, the backend was not needed


def test_containers_given_directly_are_unwrapped():
    patch = _patch()
    q, k, v = structured_qkv(1, HEADS, 40, DIM, seed=3)
    flat = [t.transpose(1, 2).reshape(1, 40, HEADS * DIM) for t in (q, k, v)]
    backend = Backend()
    out = patch(backend, *(Container(t) for t in flat), HEADS, transformer_options={})  # no model call: dense
    assert torch.allclose(out, Backend()(*flat, HEADS), atol=1e-5)


def test_unused_keyword_arguments_reach_the_backend_untouched():
    patch = _patch()
    extra = {"scale": DIM ** -0.5, "enable_gqa": False, "low_precision_attention": False}
    backend, _, _ = _model_call(patch, 2, 8, 8, extra_kwargs=extra, cross=True)  # cross-attention: dense
    (call,) = backend.calls
    assert call["heads"] == HEADS and call["_inside_attn_wrapper"] is True
    assert {k: call[k] for k in extra} == extra and "preferred_attention" not in call
    # A custom softmax scale is honoured by staying dense.
    backend, _, _ = _model_call(_patch(), 2, 8, 8, extra_kwargs={"scale": 0.3})
    assert backend.calls and backend.calls[0]["scale"] == 0.3


def test_reference_latent_before_the_video_is_kept_like_a_text_sink():
    patch = _patch()
    patch.sparse = Spy(patch.sparse)
    ref = torch.randn(1, 16, 6, 8)  # ref_conv: 2-D patch (2, 2) -> 3 x 4 = 12 tokens
    dm = SimpleNamespace(ref_conv=object())
    _model_call(patch, 2, 8, 8, extra_before=12, kwargs={"reference_latent": ref}, dm=dm)
    (call,) = patch.sparse.calls
    assert (call.text_len, call.text_first) == (12, True) and patch.cache.records[-1].sparse


def test_context_latents_after_the_video_are_kept_like_a_text_sink():
    patch = _patch()
    patch.sparse = Spy(patch.sparse)
    latents = [torch.randn(1, 16, 1, 6, 6), torch.randn(1, 16, 2, 5, 4)]  # 9 + 2 * 3 * 2 = 21 tokens
    _model_call(patch, 2, 8, 8, extra_after=21, kwargs={"context_latents": latents})
    (call,) = patch.sparse.calls
    assert (call.text_len, call.text_first) == (21, False) and patch.cache.records[-1].sparse


def test_extra_tokens_on_both_sides_or_unexplained_stay_dense_with_one_log_line(caplog):
    caplog.set_level(logging.INFO)
    patch = _patch()
    patch.sparse = Spy(patch.sparse)
    kwargs = {"reference_latent": torch.randn(1, 16, 4, 4), "context_latents": [torch.randn(1, 16, 1, 4, 4)]}
    for seed in range(2):
        backend, _, _ = _model_call(patch, 2, 8, 8, extra_before=4, extra_after=4, kwargs=kwargs,
                                    dm=SimpleNamespace(ref_conv=object()), seed=seed)
        assert len(backend.calls) == 1
    assert patch.sparse.calls == []
    assert sum("reference latent before them" in r.message for r in caplog.records) == 1
    # Extra tokens that nothing explains: never clustered.
    backend, _, _ = _model_call(patch, 2, 8, 8, extra_after=5)
    assert len(backend.calls) == 1 and patch.sparse.calls == []
    assert sum("does not match the 32 video tokens" in r.message for r in caplog.records) == 1


def test_cache_allocations_are_made_with_the_allocation_graph_paused(monkeypatch):
    scope = {"inside": False, "entered": 0}
    inside_pointers = set()

    class Pause:
        def __enter__(self):
            scope["inside"], scope["entered"] = True, scope["entered"] + 1

        def __exit__(self, *exc):
            scope["inside"] = False

    fake = types.ModuleType("comfy.model_prefetch")
    fake.pause_malloc_graph = lambda sync=False: Pause()
    monkeypatch.setitem(sys.modules, "comfy.model_prefetch", fake)
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if scope["inside"]:
            inside_pointers.add(out.data_ptr())
        return out

    monkeypatch.setattr(torch, "empty", empty)
    patch = _patch()
    _model_call(patch, 2, 8, 8, seed=1)
    states = list(patch.cache.states.values())
    assert states and scope["entered"] > 0
    pointers = {t.data_ptr() for s in states for t in s.tensors()}
    pointers |= {t.data_ptr() for r in patch.cache.records for t in (r.kept, r.key_counts) if t is not None}
    assert pointers <= inside_pointers
    # A steady step writes the centroids in place: no new allocation for the cached state.
    before = {id(s): [t.data_ptr() for t in s.tensors()] for s in states}
    entered = scope["entered"]
    patch._run_sigmas = [1.0, 0.5, 0.0]
    _model_call(patch, 2, 8, 8, seed=2)
    assert {id(s): [t.data_ptr() for t in s.tensors()] for s in states} == before
    assert scope["entered"] - entered == 2  # only the call's statistics (kept fraction, key counts)


def test_allocation_scope_is_a_no_op_without_the_compiler(monkeypatch):
    monkeypatch.delitem(sys.modules, "comfy.model_prefetch", raising=False)
    t = torch.randn(3, 5)
    copy = memory.persistent_copy(t)
    assert torch.equal(copy, t) and copy.data_ptr() != t.data_ptr()
    kept = memory.store(copy, t * 2)
    assert kept is copy and torch.equal(copy, t * 2)
    assert memory.store(copy, torch.randn(2, 2)) is not copy


@pytest.mark.parametrize("sampling", [SimpleNamespace(percent_to_sigma=lambda p: 1.0 - p), None])
def test_a_run_over_part_of_the_schedule_reads_its_noise_level(sampling):
    """KSamplerAdvanced over the second half of a schedule (as the low-noise Wan 2.2 expert runs): the step's
    noise level reaches the runner; without a readable model sampling the schedule counts steps."""
    patch = adapter.AdaClusterPatch(WAN, from_dict(dict(warmup_steps=0, min_tokens=16, query_clusters=4,
                                                        initial_key_clusters=6, max_stages=3)))
    patch.sparse = Spy(patch.sparse)
    patcher = SimpleNamespace(get_model_object=lambda name: {"model_sampling": sampling}[name])

    def outer_sample(noise, latent, sampler, sigmas):
        _model_call(patch, 2, 8, 8)

    outer_sample.class_obj = SimpleNamespace(model_patcher=patcher)
    patch.outer_sample_wrapper(outer_sample, None, None, None, torch.tensor([0.5, 0.25, 0.0]))
    (call,) = patch.sparse.calls
    if sampling is None:
        assert call.progress is None
        high = patch.config.selection.high_noise_top_k_scale
        assert high > 1 and patch.config.selection.top_k_scale(call.step, call.total_steps, call.progress) == high
    else:
        assert call.step == 0 and call.progress == pytest.approx(0.5)
        assert patch.config.selection.top_k_scale(call.step, call.total_steps, call.progress) == 1.0
