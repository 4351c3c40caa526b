"""Shared test inputs: q, k, v with cluster structure, fresh per seed."""
import torch


def structured_qkv(batch=2, heads=2, n=1500, d=32, groups=12, seed=0):
    """q, k, v with cluster structure (tokens drawn around a few directions with varied norms)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, heads, groups, d, generator=gen) * 2
    labels = torch.randint(0, groups, (batch, heads, n), generator=gen)
    base = centres.gather(2, labels.unsqueeze(-1).expand(batch, heads, n, d))
    q = base + 0.4 * torch.randn(batch, heads, n, d, generator=gen)
    k = base + 0.4 * torch.randn(batch, heads, n, d, generator=gen)
    v = torch.randn(batch, heads, n, d, generator=gen)
    return q, k, v


