"""Cases for the fused selection kernels (kernels/triton_select.py) against the PyTorch selection
(selection.reference_layout and selection.kept_fraction), shared by the GPU tests and the interpreter run."""
from __future__ import annotations

import math

import torch

from comfyui_adacluster.adacluster_core import clustering, selection
from comfyui_adacluster.adacluster_core.config import SelectionConfig
from comfyui_adacluster.adacluster_core.layout import Layout

# batch, heads, tokens, query clusters, key slots, per-head key counts, per-head Top-K, local block, settings
CASES = [
    dict(batch=1, heads=2, n=300, cq=7, ck=23, ragged=False, per_head=False, config={}),
    dict(batch=2, heads=3, n=517, cq=13, ck=41, ragged=True, per_head=True, config={}),
    dict(batch=1, heads=2, n=211, cq=5, ck=37, ragged=True, per_head=False,
         config=dict(local_block=48, min_kept_fraction=0.3, top_k=3)),
    dict(batch=1, heads=1, n=129, cq=9, ck=17, ragged=False, per_head=False,
         config=dict(local_block=0, own_clusters=False, min_kept_fraction=0.0, top_k=40)),
    dict(batch=1, heads=2, n=400, cq=11, ck=300, ragged=True, per_head=True, config=dict(local_block=100)),
]


def clusters_for(case: dict, device, dtype, seed: int):
    """q, k and their warm-started clusters, with structured tokens (a few directions plus noise) so that
    clusters differ in size, some key slots stay empty and, with ``ragged``, heads use fewer key slots."""
    gen = torch.Generator().manual_seed(seed)
    b, h, n, d = case["batch"], case["heads"], case["n"], 16
    centres = torch.randn(b, h, 6, d, generator=gen) * 2
    pick = torch.randint(0, 6, (b, h, n), generator=gen)
    q = (centres.gather(-2, pick.unsqueeze(-1).expand(b, h, n, d)) + torch.randn(b, h, n, d, generator=gen))
    k = (centres.gather(-2, pick.roll(7, -1).unsqueeze(-1).expand(b, h, n, d))
         + torch.randn(b, h, n, d, generator=gen) * 0.7)
    q, k = q.to(device, dtype), k.to(device, dtype)
    cq, ck = case["cq"], case["ck"]
    counts = torch.full((b, h), ck, dtype=torch.int64)
    if case["ragged"]:
        counts = torch.randint(max(2, ck // 3), ck + 1, (b, h), generator=gen)
    counts = counts.to(device)
    q_init = torch.randn(b, h, cq, d, generator=gen).to(device)
    k_init = k.float()[..., torch.randperm(n, generator=gen)[:ck].to(device), :]
    qc = clustering.warm_step(q, q_init, 1, True)
    kc = clustering.warm_step(k, k_init, 1, False, counts)
    top_k = None
    if case["per_head"]:
        top_k = torch.randint(1, ck + 2, (b, h), generator=gen).to(device)
    return q, k, qc, kc, top_k


def near_tie(rank: torch.Tensor, want: torch.Tensor, got: torch.Tensor, eps: float = 1e-4) -> bool:
    """True when every entry where got and want differ has a rank within eps of a cluster the reference
    decided the other way in the same row (the kernel's log and fused multiply-add round differently)."""
    for idx in (got != want).nonzero().tolist():
        *row, j = idx
        r = rank[tuple(row)]
        other = want[tuple(row)] != want[tuple(idx)]
        finite = torch.isfinite(r)
        if not bool(((r[other & finite] - r[j]).abs() < eps * max(1.0, abs(float(r[j])))).any()):
            return False
    return True


def check_case(case: dict, select_and_count, device, dtype=torch.float32, seed: int = 0) -> None:
    """The fused selection's layout equals the PyTorch one (up to near ties) and its kept fraction equals the
    PyTorch kept fraction of the layout it built."""
    q, k, qc, kc, top_k = clusters_for(case, device, dtype, seed)
    config = SelectionConfig(**case["config"])
    scale = 1.0 / math.sqrt(q.shape[-1])
    want = selection.reference_layout(q, k, qc, kc, config, scale, top_k)
    n = q.shape[-2]
    own = selection.OWN_CLUSTER_MIN_SHARE if config.own_clusters else 0.0
    dot = qc.step.mean @ kc.centroids.float().transpose(-1, -2)
    got, kept = select_and_count(dot, kc.sizes, qc.sizes, qc.labels, kc.labels, scale,
                                 config.top_k if top_k is None else top_k, config.min_kept_fraction * n, own,
                                 config.local_block)
    assert got.dtype == torch.bool and got.shape == want.selected.shape
    rank = selection.cluster_logits(q, k, qc, kc, "centroid", 0.5, scale)[0]
    assert near_tie(rank.cpu(), want.selected.cpu(), got.cpu()), f"selection differs in {case}"
    layout = Layout(want.q_offsets, want.k_offsets, got, want.q_perm, want.k_perm, config.local_block, config.tail)
    expected = selection.kept_fraction(layout, qc.labels, kc.labels)
    torch.testing.assert_close(kept.cpu(), expected.double().cpu(), rtol=1e-6, atol=1e-8)  # the PyTorch local part counts in fp32
    assert int(got.sum()) > 0
