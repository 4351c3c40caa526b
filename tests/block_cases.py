"""Brute-force oracles and random cases for the block passes (shared by the CPU, interpreter and GPU tests)."""
from __future__ import annotations

import math

import torch


def case(batch=2, heads=3, n=203, d=32, n_text=13, seed=0, device="cpu", dtype=torch.float32):
    """q, k, v (B, H, n, d), text k/v (B, H, n_text, d) and an additive text bias with padded (-inf) tokens."""
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: (torch.randn(*shape, generator=gen) * 1.5).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = make(batch, heads, n, d), make(batch, heads, n, d), make(batch, heads, n, d)
    text_k, text_v = make(batch, heads, n_text, d), make(batch, heads, n_text, d)
    bias = torch.zeros(batch, 1, 1, n_text)
    bias[0, ..., -3:] = float("-inf")
    bias[-1, ..., 1] = -1.7
    return q, k, v, text_k, text_v, bias.to(device)


def brute_probabilities(q, k, text_k=None, bias=None):
    """(B, H, N, N + Nt) softmax probabilities over [k, text_k], fp64, and the natural-log LSE."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if text_k is not None:
        text = q.double() @ text_k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        if bias is not None:
            text = text + bias.double()
        logits = torch.cat([logits, text], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    return torch.exp(logits - lse.unsqueeze(-1)), lse


def brute_attention(q, k, v, text_k=None, text_v=None, bias=None):
    p, lse = brute_probabilities(q, k, text_k, bias)
    values = v.double() if text_v is None else torch.cat([v.double(), text_v.double()], dim=-2)
    return p @ values, lse


def brute_block_statistics(q, k, lse, block_q, block_k, threshold):
    """Per block mass and below-threshold fraction, one block at a time (fp64)."""
    p = torch.exp(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) - lse.double().unsqueeze(-1))
    n_q, n_k = q.shape[-2], k.shape[-2]
    nq, nk = -(-n_q // block_q), -(-n_k // block_k)
    mass = torch.empty(*q.shape[:2], nq, nk, dtype=torch.float64)
    below = torch.empty_like(mass)
    for i in range(nq):
        for j in range(nk):
            block = p[..., i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k]
            mass[..., i, j] = block.sum((-1, -2)).cpu()
            below[..., i, j] = (block < threshold).double().mean((-1, -2)).cpu()
    return mass, below
