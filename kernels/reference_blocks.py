"""PyTorch references of the block passes that AdaSpa and MOD-DiT share.

* ``attention_lse``: exact attention that also returns every query's natural-log log-sum-exp, over the
  video keys plus an optional always-kept text segment (with an additive bias, e.g. a padding mask).
* ``block_statistics``: given q, k and a cached LSE, per (query block, key block) the attention mass
  (sum of exp(q.k * scale - lse) over the block) and the fraction of its probabilities below a threshold.

Both work chunk by chunk over the queries, so no N x N matrix is ever materialised; arithmetic is fp32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .reference import CHUNK_ELEMENTS, additive_mask, merge_partials, partial_attention


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_k: Optional[torch.Tensor] = None,
                  text_v: Optional[torch.Tensor] = None, text_bias: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None):
    """softmax over [k, text_k] of q (B, H, N, d); returns (out (B, H, N, d) in q's dtype, lse (B, H, N) fp32).

    text_bias: additive or bool, broadcastable to (B, H, N, Nt)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if (text_k is None) != (text_v is None):
        raise ValueError("text_k and text_v must be given together")
    parts = [partial_attention(q, k, v, scale=scale)]
    if text_k is not None:
        parts.append(partial_attention(q, text_k, text_v, bias=additive_mask(text_bias), scale=scale))
    out, lse = merge_partials(parts) if len(parts) > 1 else parts[0]
    return out.to(q.dtype), lse


def block_count(tokens: int, block: int) -> int:
    return -(-tokens // block)


def block_statistics(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_q: int, block_k: int,
                     threshold: float, blocks: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """Per (query block, key block) statistics of the probabilities p = exp(q.k * scale - lse).

    q (B, H, Nq, d), k (B, H, Nk, d), lse (B, H, Nq) fp32 (natural log; typically the full softmax's, so
    the masses are shares of each row's total). Blocks are fixed runs of ``block_q`` / ``block_k`` tokens in
    original order (the last ones may be shorter). Returns (mass, below), each (B, H, nq, nk) fp32:
    mass = sum of p over the block; below = fraction of the block's entries with p < threshold.
    ``blocks`` (B, H, nq, nk) bool, optional: only those blocks are computed, the others come back NaN."""
    _check_blocks(block_q, block_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    lead, n_q, n_k = q.shape[:-2], q.shape[-2], k.shape[-2]
    nk = block_count(n_k, block_k)
    pad_k = nk * block_k - n_k
    kf = k.float()
    key_real = torch.arange(nk * block_k, device=q.device) < n_k
    groups = max(1, math.prod(lead))
    rows_per_chunk = max(block_q, (CHUNK_ELEMENTS // max(1, groups * n_k)) // block_q * block_q)
    masses, belows = [], []
    for start in range(0, n_q, rows_per_chunk):
        rows = slice(start, min(n_q, start + rows_per_chunk))
        logits = (q[..., rows, :].float() @ kf.transpose(-1, -2)) * scale
        p = torch.exp(logits - lse[..., rows].float().unsqueeze(-1))
        p = torch.nn.functional.pad(p, (0, pad_k))
        small = torch.nn.functional.pad((p[..., :n_k] < threshold).float(), (0, pad_k)) * key_real
        n_rows = p.shape[-2]
        pad_q = block_count(n_rows, block_q) * block_q - n_rows
        p = torch.nn.functional.pad(p, (0, 0, 0, pad_q))
        small = torch.nn.functional.pad(small, (0, 0, 0, pad_q))
        shape = (*lead, -1, block_q, nk, block_k)
        masses.append(p.reshape(shape).sum((-3, -1)))
        belows.append(small.reshape(shape).sum((-3, -1)))
    mass = torch.cat(masses, dim=-2)
    below = torch.cat(belows, dim=-2) / block_areas(n_q, n_k, block_q, block_k, q.device)
    if blocks is not None:
        mass = mass.masked_fill(~blocks, float("nan"))
        below = below.masked_fill(~blocks, float("nan"))
    return mass, below


def block_sizes(tokens: int, block: int, device=None) -> torch.Tensor:
    """(n,) fp32 token count of every block (the last one may be shorter)."""
    n = block_count(tokens, block)
    sizes = torch.full((n,), float(block), device=device)
    sizes[-1] = tokens - (n - 1) * block
    return sizes


def block_areas(n_q: int, n_k: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """(nq, nk) fp32 number of (query, key) pairs in every block."""
    return block_sizes(n_q, block_q, device).unsqueeze(-1) * block_sizes(n_k, block_k, device).unsqueeze(0)


def _check_blocks(block_q: int, block_k: int) -> None:
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r} is out of range: expected a positive integer")
