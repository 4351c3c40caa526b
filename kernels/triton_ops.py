"""Triton implementations of the kernel operations, for CUDA tensors.

Same names, signatures and return conventions as ``kernels/reference.py`` (the oracle); the dispatch in
``kernels/__init__.py`` imports this module only where Triton is importable and falls back to the
reference for any name missing here. Nothing in the steady state synchronises with the host, so a
whole call can be captured in a CUDA graph. The layout execution is registered as the custom op
``adacluster::execute_layout``, which torch.compile treats as opaque.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton  # noqa: F401  (ImportError here tells the dispatch that Triton is unavailable)

from . import reference
from .triton_attention import run_layout
from .triton_blocks import attention_lse, block_statistics
from .triton_select import select_and_count
from .triton_cluster import (cluster_minmax, kmeans, kmeans_assign, kmeans_step, normalize_rows, quest_scores,
                             segment_means, segments_from_labels)

__all__ = ["normalize_rows", "kmeans", "kmeans_assign", "kmeans_step", "segments_from_labels", "cluster_minmax",
           "quest_scores", "segment_means", "execute_layout", "layout_op_supported", "attention_lse",
           "block_statistics", "select_and_count"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def _execute_layout_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: torch.Tensor,
                         k_offsets: torch.Tensor, selected: torch.Tensor, q_perm: Optional[torch.Tensor],
                         k_perm: Optional[torch.Tensor], local_block: int, tail: bool,
                         text_k: Optional[torch.Tensor], text_v: Optional[torch.Tensor],
                         text_bias: Optional[torch.Tensor], scale: float, q_labels: Optional[torch.Tensor],
                         k_labels: Optional[torch.Tensor], tail_spread_weight: Optional[torch.Tensor],
                         tail_key_means: Optional[torch.Tensor], tail_key_spread: Optional[torch.Tensor],
                         query_squares: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return run_layout(q, k, v, q_offsets, k_offsets, selected, q_perm, k_perm, local_block, tail,
                      text_k, text_v, text_bias, scale, q_labels, k_labels, tail_spread_weight, tail_key_means,
                      tail_key_spread, query_squares)


def _execute_layout_fake(q, k, v, q_offsets, k_offsets, selected, q_perm, k_perm, local_block, tail,
                         text_k, text_v, text_bias, scale, q_labels, k_labels, tail_spread_weight, tail_key_means,
                         tail_key_spread, query_squares):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _register_layout_op():
    try:
        op = torch.library.custom_op("adacluster::execute_layout", mutates_args=())(_execute_layout_impl)
        op.register_fake(_execute_layout_fake)
    except RuntimeError:  # already registered (the module was imported under a second package name)
        pass
    return torch.ops.adacluster.execute_layout


_layout_op = _register_layout_op()


def layout_op_supported(q: torch.Tensor) -> bool:
    """True when the Triton layout kernel handles tensors like q (else the reference runs)."""
    return q.is_cuda and q.dtype in SUPPORTED_DTYPES and q.shape[-1] in SUPPORTED_HEAD_DIMS


def execute_layout(q, k, v, layout, text_k=None, text_v=None, text_bias=None, scale=None, return_lse=False):
    if not layout_op_supported(q):
        return reference.execute_layout(q, k, v, layout, text_k, text_v, text_bias, scale, return_lse)
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must have one shape (B, H, N, d); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if (text_k is None) != (text_v is None):
        raise ValueError("text_k and text_v must be given together")
    if layout.local_block < 0:
        raise ValueError(f"Layout.local_block must be >= 0, got {layout.local_block}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _layout_op(q, k, v, layout.q_offsets, layout.k_offsets, layout.selected, layout.q_perm,
                          layout.k_perm, int(layout.local_block), bool(layout.tail), text_k, text_v, text_bias,
                          scale, layout.q_labels, layout.k_labels, layout.tail_spread_weight,
                          layout.tail_key_means, layout.tail_key_spread, layout.query_squares)
    return (out, lse) if return_lse else out
