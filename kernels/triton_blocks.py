"""Triton kernels of the block passes (references: reference_blocks.py).

* ``attention_lse``: a dense flash-style forward over the keys plus an optional text segment with an
  additive bias; writes the output and the natural-log LSE of every query. Without a text bias it first
  tries torch's own flash attention, which returns the LSE too (``TORCH_FLASH_LSE``), and falls back to the
  Triton kernel where that op is missing or refuses the inputs.
* ``block_statistics``: one program per (query block, batch x head); it walks the key blocks, recomputes
  the probabilities exp(q.k * scale - lse) one key chunk at a time in registers and writes the block's
  mass and the fraction below the threshold. Blocks not asked for are skipped (written NaN).

Neither kernel materialises N x N. Tensors are (B, H, N, d) with unit stride along d.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference_blocks
from .reference import additive_mask

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
TORCH_FLASH_LSE = True  # try torch's flash attention (it returns the LSE) before the Triton kernel


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    if FP32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _attention_lse_kernel(Q, K, V, Out, Lse, TK, TV, TB,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                          stkb, stkh, stkn, stvb, stvh, stvn, stbb, stbh, stbn, stbt,
                          H, N, Nk, Nt, qk_scale,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HAS_TEXT: tl.constexpr, HAS_TBIAS: tl.constexpr, FP32: tl.constexpr):
    g = tl.program_id(1).to(tl.int64)
    b = g // H
    h = g % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dims = tl.arange(0, D)
    lanes = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqn + dims[None, :], mask=row_ok[:, None],
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for k0 in range(0, Nk, BLOCK_N):
        cols = k0 + lanes
        ok = cols < Nk
        k = tl.load(K + b * skb + h * skh + cols[:, None].to(tl.int64) * skn + dims[None, :], mask=ok[:, None],
                    other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None].to(tl.int64) * svn + dims[None, :], mask=ok[:, None],
                    other=0.0)
        s = _dot(q, tl.trans(k), FP32) * qk_scale + tl.where(ok, 0.0, float("-inf"))[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32)
        m_i = m_new
    if HAS_TEXT:
        for t0 in range(0, Nt, BLOCK_N):
            cols = t0 + lanes
            ok = cols < Nt
            k = tl.load(TK + b * stkb + h * stkh + cols[:, None] * stkn + dims[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(TV + b * stvb + h * stvh + cols[:, None] * stvn + dims[None, :], mask=ok[:, None], other=0.0)
            s = _dot(q, tl.trans(k.to(q.dtype)), FP32) * qk_scale + tl.where(ok, 0.0, float("-inf"))[None, :]
            if HAS_TBIAS:
                tb = tl.load(TB + b * stbb + h * stbh + rows[:, None].to(tl.int64) * stbn + cols[None, :] * stbt,
                             mask=row_ok[:, None] & ok[None, :], other=0.0)
                s = s + tb.to(tl.float32) * 1.4426950408889634
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v.to(q.dtype), FP32)
            m_i = m_new
    has_mass = l_i > 0.0
    l_safe = tl.where(has_mass, l_i, 1.0)
    lse = tl.where(has_mass, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    out = acc / l_safe[:, None]
    tl.store(Out + b * sob + h * soh + rows[:, None].to(tl.int64) * son + dims[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + g * N + rows, lse, mask=row_ok)


@triton.jit
def _block_stats_kernel(Q, K, Lse, Mass, Below, Blocks,
                        sqb, sqh, sqn, skb, skh, skn, H, Nq, Nk, NQB, NKB, block_k, qk_scale, threshold,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_BLOCKS: tl.constexpr, FP32: tl.constexpr):
    i = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    b = g // H
    h = g % H
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    dims = tl.arange(0, D)
    lanes = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqn + dims[None, :], mask=row_ok[:, None],
                other=0.0)
    lse2 = tl.load(Lse + g * Nq + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    n_rows = tl.minimum(Nq - i * BLOCK_M, BLOCK_M).to(tl.float32)
    out_base = (g * NQB + i) * NKB
    for j in range(0, NKB):
        wanted = True
        if HAS_BLOCKS:
            wanted = tl.load(Blocks + out_base + j) != 0
        if wanted:
            mass = tl.zeros([BLOCK_M], tl.float32)
            small = tl.zeros([BLOCK_M], tl.float32)
            for c0 in range(0, block_k, BLOCK_N):
                cols = j * block_k + c0 + lanes
                ok = cols < Nk
                k = tl.load(K + b * skb + h * skh + cols[:, None].to(tl.int64) * skn + dims[None, :],
                            mask=ok[:, None], other=0.0)
                s = _dot(q, tl.trans(k), FP32) * qk_scale - lse2[:, None]
                valid = row_ok[:, None] & ok[None, :]
                p = tl.where(valid, tl.math.exp2(s), 0.0)
                mass += tl.sum(p, 1)
                small += tl.sum(tl.where(valid & (p < threshold), 1.0, 0.0), 1)
            n_cols = tl.minimum(Nk - j * block_k, block_k).to(tl.float32)
            tl.store(Mass + out_base + j, tl.sum(mass, 0))
            tl.store(Below + out_base + j, tl.sum(small, 0) / (n_rows * n_cols))
        else:
            tl.store(Mass + out_base + j, float("nan"))
            tl.store(Below + out_base + j, float("nan"))


def _supported(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in SUPPORTED_DTYPES and q.shape[-1] in SUPPORTED_HEAD_DIMS


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _torch_flash_lse(q, k, v, scale: float):
    """torch's flash attention forward, which also returns the natural-log LSE; None where it cannot run."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
    if op is None or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        result = op(q, k, v, 0.0, False, False, scale=scale)
    except (RuntimeError, TypeError):
        return None
    out, lse = result[0], result[1]
    if out.shape != q.shape or lse.dim() != 3 or lse.shape[-1] < q.shape[-2]:
        return None
    return out, lse[..., :q.shape[-2]].float()


def attention_lse(q, k, v, text_k=None, text_v=None, text_bias=None, scale=None):
    if not (_supported(q) or _interpreted()) or q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return reference_blocks.attention_lse(q, k, v, text_k, text_v, text_bias, scale)
    if (text_k is None) != (text_v is None):
        raise ValueError("text_k and text_v must be given together")
    if TORCH_FLASH_LSE and q.is_cuda and text_bias is None:
        keys, values = (k, v) if text_k is None else (torch.cat([k, text_k.to(k.dtype)], -2),
                                                      torch.cat([v, text_v.to(v.dtype)], -2))
        fast = _torch_flash_lse(q, keys, values, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))
        if fast is not None:
            return fast
    return triton_attention_lse(q, k, v, text_k, text_v, text_bias, scale)


def triton_attention_lse(q, k, v, text_k=None, text_v=None, text_bias=None, scale=None):
    """The Triton kernel of attention_lse (same arguments and results)."""
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q, k, v must be (B, H, N, d) with one B, H, d; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    batch, heads, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k, v = _rows(q), _rows(k.to(q.dtype)), _rows(v.to(q.dtype))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads, n, device=q.device, dtype=torch.float32)
    has_text = text_k is not None
    if has_text:
        text_k, text_v = _rows(text_k), _rows(text_v)
        n_text = text_k.shape[-2]
        tk_strides, tv_strides = tuple(text_k.stride()[:3]), tuple(text_v.stride()[:3])
    else:
        text_k = text_v = lse
        n_text, tk_strides, tv_strides = 0, (0, 0, 0), (0, 0, 0)
    has_bias = has_text and text_bias is not None
    if has_bias:
        tb = additive_mask(text_bias).expand(batch, heads, n, n_text)
        tb_strides = tuple(tb.stride())
    else:
        tb, tb_strides = lse, (0, 0, 0, 0)
    fp32 = q.dtype == torch.float32
    if _interpreted():
        block_m, block_n, warps, stages = 32, 32, 4, 1
    elif d <= 64:
        block_m, block_n, warps, stages = 128, 64, 4, 3
    else:
        block_m, block_n, warps, stages = (64, 32, 4, 2) if fp32 else (128, 64, 8, 3)
    _attention_lse_kernel[(triton.cdiv(n, block_m), batch * heads)](
        q, k, v, out, lse, text_k, text_v, tb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *tk_strides, *tv_strides, *tb_strides,
        heads, n, k.shape[-2], n_text, scale * LOG2E,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_TEXT=has_text, HAS_TBIAS=has_bias, FP32=fp32,
        num_warps=warps, num_stages=stages)
    return out, lse


def block_statistics(q, k, lse, block_q: int, block_k: int, threshold: float,
                     blocks: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    reference_blocks._check_blocks(block_q, block_k)
    power_of_two = lambda x: x & (x - 1) == 0  # noqa: E731
    if (not (_supported(q) or _interpreted()) or q.shape[-1] not in SUPPORTED_HEAD_DIMS
            or not power_of_two(block_q) or not power_of_two(block_k) or not 16 <= block_q <= 128 or block_k < 16):
        return reference_blocks.block_statistics(q, k, lse, block_q, block_k, threshold, blocks, scale)
    batch, heads, n_q, d = q.shape
    n_k = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k = _rows(q), _rows(k.to(q.dtype))
    lse = lse.float().reshape(batch * heads, n_q).contiguous()
    nq, nk = reference_blocks.block_count(n_q, block_q), reference_blocks.block_count(n_k, block_k)
    mass = torch.empty(batch, heads, nq, nk, device=q.device, dtype=torch.float32)
    below = torch.empty_like(mass)
    if blocks is not None:
        blocks = blocks.expand(batch, heads, nq, nk).to(torch.int8).contiguous()
    block_n = min(block_k, 32 if _interpreted() else 64)
    fp32 = q.dtype == torch.float32
    _block_stats_kernel[(nq, batch * heads)](
        q, k, lse, mass, below, blocks if blocks is not None else mass,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        heads, n_q, n_k, nq, nk, block_k, scale * LOG2E, float(threshold),
        D=d, BLOCK_M=block_q, BLOCK_N=block_n, HAS_BLOCKS=blocks is not None, FP32=fp32,
        num_warps=8 if block_q * d >= 128 * 128 else 4, num_stages=1 if _interpreted() else 2)
    return mass, below
