"""Kernels: the one dispatch point between the PyTorch reference and the Triton implementations.

Callers use the functions of this module only. Each picks the Triton implementation when the tensors
live on CUDA and Triton is importable, and the PyTorch reference otherwise. ``ADACLUSTER_KERNELS=reference``
forces the reference everywhere (for debugging and A/B checks).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import reference, reference_blocks

try:  # flash-attn is optional; torch SDPA is the default dense backend
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None

_triton_module = None
_triton_checked = False


def _triton():
    """The Triton implementation module, or None where it cannot run."""
    global _triton_module, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        if torch.cuda.is_available():
            try:
                from . import triton_ops
                _triton_module = triton_ops
            except ImportError:
                _triton_module = None
    return _triton_module


def backend_for(x: torch.Tensor):
    """The module that implements an operation for tensors like ``x``."""
    if x.is_cuda and os.environ.get("ADACLUSTER_KERNELS", "auto") != "reference":
        fast = _triton()
        if fast is not None:
            return fast
    return reference


def backend_name(x: torch.Tensor) -> str:
    return "triton" if backend_for(x) is not reference else "reference"


def _dispatch(name, oracle=reference):
    def call(x, *args, **kwargs):
        impl = getattr(backend_for(x), name, None) or getattr(oracle, name)
        return impl(x, *args, **kwargs)
    call.__name__ = name
    call.__doc__ = getattr(oracle, name).__doc__
    return call


normalize_rows = _dispatch("normalize_rows")
kmeans = _dispatch("kmeans")
kmeans_step = _dispatch("kmeans_step")
kmeans_assign = _dispatch("kmeans_assign")
segments_from_labels = _dispatch("segments_from_labels")
cluster_minmax = _dispatch("cluster_minmax")
quest_scores = _dispatch("quest_scores")
execute_layout = _dispatch("execute_layout")
segment_means = _dispatch("segment_means")
segment_labels = reference.segment_labels


def fused_selection(x: torch.Tensor):
    """The fused selection of the default recipe (kernels.triton_select.select_and_count) for tensors like x,
    or None where it cannot run: its PyTorch statement is adacluster_core.selection.reference_layout."""
    return getattr(backend_for(x), "select_and_count", None)


# the block passes of AdaSpa and MOD-DiT (dense attention with LSE, block mass / sparsity statistics)
attention_lse = _dispatch("attention_lse", reference_blocks)
block_statistics = _dispatch("block_statistics", reference_blocks)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Exact attention for (B, H, N, d) tensors through the fastest available backend.

    flash-attn (if installed) for unmasked fp16/bf16 CUDA calls, else torch SDPA, which itself picks
    cuDNN / flash / memory-efficient kernels and never materialises N x N on the CPU."""
    if (_flash_attn_func is not None and mask is None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256):
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def dense_backend_name(q: torch.Tensor) -> str:
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return "flash-attn"
    return "torch-sdpa"
