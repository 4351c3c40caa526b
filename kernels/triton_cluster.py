"""Triton kernels for the clustering side: k-means assignment, segment reductions, TensorQuest scores.

All kernels work on tensors flattened to groups G = prod(leading dims), one group per (batch, head).
Nothing here synchronises with the host: grids depend on shapes only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import ClusterStep


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _normalize_kernel(x_ptr, out_ptr, rows, stride_x, eps, D: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D)
    mask = row < rows
    x = tl.load(x_ptr + row[:, None] * stride_x + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, 1))
    y = x / tl.maximum(norm, eps)[:, None]
    tl.store(out_ptr + row[:, None] * D + cols[None, :], y, mask=mask[:, None])


@triton.jit
def _assign_kernel(x_ptr, c_ptr, csq_ptr, count_ptr, labels_ptr, fit_ptr, sizes_ptr,
                   N, C, stride_xg, stride_xn, eps,
                   D: tl.constexpr, SPHERICAL: tl.constexpr, HAS_COUNT: tl.constexpr, ROW_NORM: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, SIZES: tl.constexpr):
    """Nearest centroid of BLOCK_N rows: the N x C score matrix lives only in registers, one
    BLOCK_N x BLOCK_C tile at a time. SIZES: also counts cluster sizes (one atomic per row). With ROW_NORM the
    rows are raw (not unit): the spherical argmax does not depend on row length, and the cosine fit is
    divided by the row norm here, so no normalised copy of x is needed."""
    g = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dims = tl.arange(0, D)
    x = tl.load(x_ptr + g * stride_xg + rows[:, None] * stride_xn + dims[None, :], mask=row_ok[:, None], other=0.0)
    if HAS_COUNT:
        usable = tl.minimum(tl.load(count_ptr + g).to(tl.int32), C)
    else:
        usable = C
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    # only this group's own centroids: groups with fewer clusters than the widest skip the padding slots
    for c0 in range(0, usable, BLOCK_C):
        slots = c0 + tl.arange(0, BLOCK_C)
        slot_ok = slots < C
        cen = tl.load(c_ptr + (g * C + slots[:, None]) * D + dims[None, :], mask=slot_ok[:, None], other=0.0)
        if x.dtype == tl.float32:  # fp32 inputs (normalised queries) keep ~fp32 accuracy
            score = tl.dot(x, tl.trans(cen), input_precision="tf32x3")
        else:
            score = tl.dot(x, tl.trans(cen))
        if not SPHERICAL:  # argmin |x - c|^2 == argmax 2 x.c - |c|^2
            csq = tl.load(csq_ptr + g * C + slots, mask=slot_ok, other=0.0)
            score = 2.0 * score - csq[None, :]
        score = tl.where((slots < usable)[None, :], score, float("-inf"))
        tile_best = tl.max(score, 1)
        tile_idx = tl.argmax(score, 1).to(tl.int32) + c0
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    if SPHERICAL:
        fit = best
        if ROW_NORM:
            xf = x.to(tl.float32)
            fit = best / tl.maximum(tl.sqrt(tl.sum(xf * xf, 1)), eps)
    else:
        xf = x.to(tl.float32)
        fit = tl.maximum(tl.sum(xf * xf, 1) - best, 0.0)
    tl.store(labels_ptr + g * N + rows, best_idx.to(labels_ptr.dtype.element_ty), mask=row_ok)
    tl.store(fit_ptr + g * N + rows, fit, mask=row_ok)
    if SIZES:
        tl.atomic_add(sizes_ptr + g * C + best_idx, tl.full([BLOCK_N], 1, tl.int32), mask=row_ok)


@triton.jit
def _segment_rows(perm_row_ptr, r0, end, BLOCK_R: tl.constexpr, HAS_PERM: tl.constexpr):
    """Row ids of the BLOCK_R sorted positions from r0 (masked rows read row 0)."""
    pos = r0 + tl.arange(0, BLOCK_R)
    if HAS_PERM:
        return tl.load(perm_row_ptr + pos, mask=pos < end, other=0).to(tl.int64)
    return tl.where(pos < end, pos, 0).to(tl.int64)


@triton.jit
def _segment_reduce_kernel(x_ptr, perm_ptr, off_ptr, prev_ptr, mean_ptr, high_ptr, low_ptr, spread_ptr,
                           H, N, S, stride_xb, stride_xh, stride_xn, eps,
                           D: tl.constexpr, HAS_PERM: tl.constexpr, MEAN: tl.constexpr,
                           SPHERICAL: tl.constexpr, KEEP_PREVIOUS: tl.constexpr, MINMAX: tl.constexpr,
                           SPREAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per (segment, group): walks the segment's rows (gathered through the permutation)
    and writes their mean (optionally unit-normalised; empty -> previous or 0), element-wise max/min
    (empty -> -inf/+inf) and/or spread (per-channel variance averaged over channels; empty -> 0).
    No atomics, so results are deterministic."""
    s = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    b = g // H
    h = g % H
    start = tl.load(off_ptr + g * (S + 1) + s).to(tl.int32)
    end = tl.load(off_ptr + g * (S + 1) + s + 1).to(tl.int32)
    dims = tl.arange(0, D)
    base = x_ptr + b * stride_xb + h * stride_xh
    # Element-wise accumulators, reduced over rows once after the loop (a reduction per iteration would
    # cost a cross-warp exchange every BLOCK_R rows); permuted row ids are read one iteration ahead.
    total_rows = tl.zeros([BLOCK_R, D], tl.float32)
    high_rows = tl.full([BLOCK_R, D], float("-inf"), tl.float32)
    low_rows = tl.full([BLOCK_R, D], float("inf"), tl.float32)
    square_rows = tl.zeros([BLOCK_R, D], tl.float32)
    row_next = _segment_rows(perm_ptr + g * N, start, end, BLOCK_R, HAS_PERM)
    for r0 in range(start, end, BLOCK_R):
        ok = r0 + tl.arange(0, BLOCK_R) < end
        row = row_next
        row_next = _segment_rows(perm_ptr + g * N, r0 + BLOCK_R, end, BLOCK_R, HAS_PERM)
        x = tl.load(base + row[:, None] * stride_xn + dims[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        if MEAN or SPREAD:
            total_rows += x
        if SPREAD:
            square_rows += x * x
        if MINMAX:
            high_rows = tl.maximum(high_rows, tl.where(ok[:, None], x, float("-inf")))
            low_rows = tl.minimum(low_rows, tl.where(ok[:, None], x, float("inf")))
    total = tl.sum(total_rows, 0)
    high = tl.max(high_rows, 0)
    low = tl.min(low_rows, 0)
    out = (g * S + s) * D + dims
    size = end - start
    raw_mean = total / tl.maximum(size, 1).to(tl.float32)
    if SPREAD:
        mean_square = tl.sum(tl.sum(square_rows, 0), 0) / tl.maximum(size, 1).to(tl.float32)
        spread = tl.maximum(mean_square - tl.sum(raw_mean * raw_mean, 0), 0.0) / D
        tl.store(spread_ptr + g * S + s, spread)
    if MEAN:
        mean = raw_mean
        if SPHERICAL:
            mean = mean / tl.maximum(tl.sqrt(tl.sum(mean * mean, 0)), eps)
        if KEEP_PREVIOUS:
            previous = tl.load(prev_ptr + out)
            mean = tl.where(size > 0, mean, previous)
        tl.store(mean_ptr + out, mean.to(mean_ptr.dtype.element_ty))
    if MINMAX:
        tl.store(high_ptr + out, high)
        tl.store(low_ptr + out, low)


@triton.jit
def _step_stats_kernel(x_ptr, perm_ptr, off_ptr, init_ptr, cent_ptr, mean_ptr, norm_ptr, high_ptr, low_ptr,
                       spread_ptr, square_ptr, N, S, stride_xg, stride_xn, eps,
                       D: tl.constexpr, SPHERICAL: tl.constexpr, MINMAX: tl.constexpr, SPREAD: tl.constexpr,
                       ROW_SQUARES: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per (cluster, group), walking the cluster's rows in sorted order once: the new centroid
    (mean of the unit rows, normalised, if spherical; else the mean; empty -> init), the raw mean, the mean
    row length and optionally the element-wise max/min, the spread (segment_reduce's) and every member row's
    squared length (stored at the row's original position). Each option is a flag: the accumulators already
    fill the registers at head dim 128, and every one more spills."""
    s = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    start = tl.load(off_ptr + g * (S + 1) + s).to(tl.int32)
    end = tl.load(off_ptr + g * (S + 1) + s + 1).to(tl.int32)
    dims = tl.arange(0, D)
    # element-wise accumulators, reduced once after the loop; row ids read one iteration ahead
    raw = tl.zeros([BLOCK_R, D], tl.float32)
    unit = tl.zeros([BLOCK_R, D], tl.float32)
    norm_sum = tl.zeros([BLOCK_R], tl.float32)
    square_sum = tl.zeros([BLOCK_R], tl.float32)
    high = tl.full([BLOCK_R, D], float("-inf"), tl.float32)
    low = tl.full([BLOCK_R, D], float("inf"), tl.float32)
    base = x_ptr + g * stride_xg
    row_next = _segment_rows(perm_ptr + g * N, start, end, BLOCK_R, True)
    for r0 in range(start, end, BLOCK_R):
        ok = r0 + tl.arange(0, BLOCK_R) < end
        row = row_next
        row_next = _segment_rows(perm_ptr + g * N, r0 + BLOCK_R, end, BLOCK_R, True)
        x = tl.load(base + row[:, None] * stride_xn + dims[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        square = tl.sum(x * x, 1)
        if ROW_SQUARES:
            tl.store(square_ptr + g * N + row, square, mask=ok)
        norm = tl.sqrt(square)
        raw += x
        norm_sum += norm
        if SPREAD:
            square_sum += square
        if SPHERICAL:
            unit += x / tl.maximum(norm, eps)[:, None]
        if MINMAX:
            high = tl.maximum(high, tl.where(ok[:, None], x, float("-inf")))
            low = tl.minimum(low, tl.where(ok[:, None], x, float("inf")))
    raw = tl.sum(raw, 0)
    unit = tl.sum(unit, 0)
    high = tl.max(high, 0)
    low = tl.min(low, 0)
    size = end - start
    inv = 1.0 / tl.maximum(size, 1).to(tl.float32)
    out = (g * S + s) * D + dims
    mean = raw * inv
    if SPHERICAL:
        centroid = unit * inv
        centroid = centroid / tl.maximum(tl.sqrt(tl.sum(centroid * centroid, 0)), eps)
    else:
        centroid = mean
    centroid = tl.where(size > 0, centroid, tl.load(init_ptr + out))
    tl.store(cent_ptr + out, centroid)
    tl.store(mean_ptr + out, mean)
    tl.store(norm_ptr + g * S + s, tl.sum(norm_sum, 0) * inv)
    if SPREAD:
        tl.store(spread_ptr + g * S + s, tl.maximum(tl.sum(square_sum, 0) * inv - tl.sum(mean * mean, 0), 0.0) / D)
    if MINMAX:
        tl.store(high_ptr + out, high)
        tl.store(low_ptr + out, low)


@triton.jit
def _quest_kernel(r_ptr, high_ptr, low_ptr, out_ptr, CQ, CK,
                  D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """S = r+ . max^T + r- . min^T on tensor cores; empty key clusters (max all -inf) get -inf."""
    g = tl.program_id(2)
    qi = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    kj = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, D)
    r = tl.load(r_ptr + (g * CQ + qi[:, None]) * D + dims[None, :], mask=(qi < CQ)[:, None], other=0.0)
    high = tl.load(high_ptr + (g * CK + kj[:, None]) * D + dims[None, :], mask=(kj < CK)[:, None],
                   other=float("-inf"))
    low = tl.load(low_ptr + (g * CK + kj[:, None]) * D + dims[None, :], mask=(kj < CK)[:, None],
                  other=float("inf"))
    empty = tl.max(high, 1) == float("-inf")
    high = tl.where(high == float("-inf"), 0.0, high)
    low = tl.where(low == float("inf"), 0.0, low)
    scores = tl.dot(tl.maximum(r, 0.0), tl.trans(high), input_precision="tf32x3")
    scores += tl.dot(tl.minimum(r, 0.0), tl.trans(low), input_precision="tf32x3")
    scores = tl.where(empty[None, :], float("-inf"), scores)
    tl.store(out_ptr + (g * CQ + qi[:, None]) * CK + kj[None, :], scores,
             mask=(qi < CQ)[:, None] & (kj < CK)[None, :])


# ---------------------------------------------------------------------------------------- wrappers
def check_head_dim(d: int) -> None:
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {d}")


def _groups(x: torch.Tensor) -> torch.Tensor:
    """(..., N, d) -> (G, N, d) with unit stride on d (a view where possible)."""
    x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def normalize_rows(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    d = x.shape[-1]
    check_head_dim(d)
    flat = x.reshape(-1, d)
    if flat.stride(-1) != 1 or (flat.shape[0] > 1 and flat.stride(0) != d):
        flat = flat.contiguous()
    out = torch.empty(flat.shape, device=x.device, dtype=torch.float32)
    block = 32
    _normalize_kernel[(triton.cdiv(flat.shape[0], block),)](flat, out, flat.shape[0], flat.stride(0), eps,
                                                            D=d, BLOCK_R=block, num_warps=4)
    return out.reshape(x.shape)


def assign(x: torch.Tensor, centroids: torch.Tensor, spherical: bool, num_clusters: Optional[torch.Tensor],
           row_norm: bool = False, count_sizes: bool = True, labels_dtype=torch.int32):
    """Fused nearest-centroid search. Returns labels (G, N) (int32, or a narrower ``labels_dtype`` that
    holds every cluster index), fit (G, N) fp32, sizes (G, C) int32 (None unless ``count_sizes``: callers
    that sort the labels anyway get sizes from the sort, which is cheaper than the per-row atomics).
    ``row_norm``: spherical search on raw rows (fit = cosine)."""
    x3 = _groups(x)
    groups, n, d = x3.shape
    check_head_dim(d)
    c = centroids.reshape(groups, -1, d).float().contiguous()
    n_clusters = c.shape[1]
    csq = (c * c).sum(-1).contiguous()
    # 16-bit rows meet centroids rounded to their dtype on the tensor cores; converting once here halves
    # what every program reads
    c_dot = c if x3.dtype == torch.float32 else c.to(x3.dtype)
    labels = torch.empty(groups, n, device=x.device, dtype=labels_dtype)
    fit = torch.empty(groups, n, device=x.device, dtype=torch.float32)
    sizes = torch.zeros(groups, n_clusters, device=x.device, dtype=torch.int32) if count_sizes else None
    counts = None if num_clusters is None else num_clusters.reshape(groups).to(torch.int32).contiguous()
    block_n = 128 if d <= 128 else 64
    # Measured on an H200 (video workload, 130-1071 centroids): at head dim 128, 32-centroid tiles on 4 warps
    # are 5-13% faster than 64 on 8; at head dim 64 the two are even. Wider tiles are slower.
    block_c = 64 if d <= 64 else 32
    warps = 8 if d > 128 else 4
    grid = (triton.cdiv(n, block_n), groups)
    _assign_kernel[grid](x3, c_dot, csq, counts if counts is not None else labels, labels, fit,
                         sizes if count_sizes else labels, n, n_clusters, x3.stride(0), x3.stride(1), 1e-6,
                         D=d, SPHERICAL=spherical, HAS_COUNT=counts is not None, ROW_NORM=row_norm and spherical,
                         BLOCK_N=block_n, BLOCK_C=block_c, SIZES=count_sizes, num_warps=warps,
                         num_stages=2)
    return labels, fit, sizes


def sort_segments(labels: torch.Tensor, sizes: torch.Tensor, stable: bool = False):
    """Permutation grouping tokens by label and the segment offsets. labels (G, N), sizes (G, S)."""
    perm = torch.sort(labels, dim=-1, stable=stable).indices
    offsets = torch.zeros(sizes.shape[0], sizes.shape[1] + 1, device=labels.device, dtype=torch.int64)
    offsets[:, 1:] = sizes.cumsum(-1)
    return perm, offsets


def count_labels(labels: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Histogram per row of (G, N) labels without a host synchronisation (unlike torch.bincount)."""
    sizes = torch.zeros(labels.shape[0], n_bins, device=labels.device, dtype=torch.int64)
    return sizes.scatter_add_(-1, labels.long(), torch.ones_like(labels, dtype=torch.int64))


def segment_reduce(x4: torch.Tensor, perm: Optional[torch.Tensor], offsets: torch.Tensor, mean: bool = False,
                   minmax: bool = False, spherical: bool = False, previous: Optional[torch.Tensor] = None,
                   mean_dtype=torch.float32, spread: bool = False):
    """Means, max/min and/or spreads (reference.segment_spread) of the rows of every segment of x4 (B, H, N, d),
    segments given by ``offsets`` (G, S + 1) over the rows in ``perm`` order (G, N) (identity when None).
    Returns (means (G, S, d), high, low (G, S, d), spread (G, S) fp32), None for what was not asked."""
    batch, heads, n, d = x4.shape
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    groups = batch * heads
    n_segments = offsets.shape[-1] - 1
    offsets = offsets.reshape(groups, n_segments + 1).contiguous()
    dummy = offsets
    means = torch.empty(groups, n_segments, d, device=x4.device, dtype=mean_dtype) if mean else None
    high = torch.empty(groups, n_segments, d, device=x4.device, dtype=torch.float32) if minmax else None
    low = torch.empty_like(high) if minmax else None
    spreads = torch.empty(groups, n_segments, device=x4.device, dtype=torch.float32) if spread else None
    prev = previous.reshape(groups, n_segments, d).float().contiguous() if previous is not None else None
    perm_flat = perm.reshape(groups, n).contiguous() if perm is not None else None
    _segment_reduce_kernel[(n_segments, groups)](
        x4, perm_flat if perm_flat is not None else dummy, offsets, prev if prev is not None else dummy,
        means if mean else dummy, high if minmax else dummy, low if minmax else dummy,
        spreads if spread else dummy, heads, n, n_segments, x4.stride(0), x4.stride(1), x4.stride(2), 1e-6,
        D=d, HAS_PERM=perm is not None, MEAN=mean, SPHERICAL=spherical, KEEP_PREVIOUS=prev is not None,
        MINMAX=minmax, SPREAD=spread, BLOCK_R=32 if d <= 128 else 16, num_warps=4)
    return means, high, low, spreads


def _as4(x3: torch.Tensor) -> torch.Tensor:
    return x3.unsqueeze(1)


def kmeans_update_sorted(x3: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor, previous: torch.Tensor,
                         spherical: bool) -> torch.Tensor:
    """Centroid update from assignment labels (G, N) and sizes (G, C): sort by label, then one
    deterministic pass per cluster."""
    perm, offsets = sort_segments(labels, sizes)
    means, _, _, _ = segment_reduce(_as4(x3), perm, offsets, mean=True, spherical=spherical, previous=previous)
    return means


def kmeans(x: torch.Tensor, init: torch.Tensor, iters: int, spherical: bool,
           num_clusters: Optional[torch.Tensor] = None):
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    lead, n, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    x3 = _groups(x)
    centroids = init.reshape(x3.shape[0], -1, d).float().contiguous()
    for _ in range(iters):
        labels, _, sizes = assign(x3, centroids, spherical, num_clusters)
        centroids = kmeans_update_sorted(x3, labels, sizes, centroids, spherical)
    labels, fit, sizes = assign(x3, centroids, spherical, num_clusters)
    n_clusters = centroids.shape[1]
    return (centroids.reshape(*lead, n_clusters, d), labels.long().reshape(*lead, n),
            sizes.long().reshape(*lead, n_clusters), fit.reshape(*lead, n))


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, spherical: bool,
                  num_clusters: Optional[torch.Tensor] = None):
    lead, n = x.shape[:-2], x.shape[-2]
    labels, fit, _ = assign(x, centroids, spherical, num_clusters)
    return labels.long().reshape(*lead, n), fit.reshape(*lead, n)


def segments_from_labels(labels: torch.Tensor, n_segments: int):
    lead, n = labels.shape[:-1], labels.shape[-1]
    flat = labels.reshape(-1, n)
    sizes = count_labels(flat, n_segments)
    perm, offsets = sort_segments(flat, sizes, stable=True)
    return perm.reshape(*lead, n), offsets.reshape(*lead, n_segments + 1)


def cluster_minmax(x: torch.Tensor, labels: torch.Tensor, n_clusters: int):
    lead, n, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    check_head_dim(d)
    x3 = _groups(x)
    flat = labels.reshape(-1, n)
    perm, offsets = sort_segments(flat, count_labels(flat, n_clusters))
    _, high, low, _ = segment_reduce(_as4(x3), perm, offsets, minmax=True)
    return high.reshape(*lead, n_clusters, d), low.reshape(*lead, n_clusters, d)


def quest_scores(r: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    d = r.shape[-1]
    check_head_dim(d)
    lead, cq, ck = r.shape[:-2], r.shape[-2], high.shape[-2]
    groups = max(1, math.prod(lead))
    r3 = r.reshape(groups, cq, d).float().contiguous()
    h3 = high.reshape(groups, ck, d).float().contiguous()
    l3 = low.reshape(groups, ck, d).float().contiguous()
    out = torch.empty(groups, cq, ck, device=r.device, dtype=torch.float32)
    block_q = 64
    block_k = 64 if d <= 128 else 32
    grid = (triton.cdiv(cq, block_q), triton.cdiv(ck, block_k), groups)
    _quest_kernel[grid](r3, h3, l3, out, cq, ck, D=d, BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=4)
    return out.reshape(*lead, cq, ck)


def segment_means(x: torch.Tensor, labels: torch.Tensor, n_segments: int):
    lead, n, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    check_head_dim(d)
    x3 = _groups(x)
    flat = labels.reshape(-1, n)
    sizes = count_labels(flat, n_segments)
    perm, offsets = sort_segments(flat, sizes)
    means, _, _, _ = segment_reduce(_as4(x3), perm, offsets, mean=True)
    return means.reshape(*lead, n_segments, d), sizes.reshape(*lead, n_segments)


def kmeans_step(x: torch.Tensor, init: torch.Tensor, spherical: bool, num_clusters: Optional[torch.Tensor] = None,
                minmax: bool = False, spread: bool = False, row_squares: bool = False) -> ClusterStep:
    """One assignment pass over raw x, one sort of the labels, one statistics pass in sorted order."""
    lead, n, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    check_head_dim(d)
    x3 = _groups(x)
    groups = x3.shape[0]
    c = init.reshape(groups, -1, d).float().contiguous()
    n_clusters = c.shape[1]
    # 16-bit labels halve the radix sort's passes (cluster counts stay far below 32768 in practice)
    narrow = torch.int16 if n_clusters < torch.iinfo(torch.int16).max else torch.int32  # labels and bound C
    labels, _, _ = assign(x3, c, spherical, num_clusters, row_norm=True, count_sizes=False, labels_dtype=narrow)
    sorted_labels, perm = torch.sort(labels, dim=-1, stable=True)
    bounds = torch.arange(n_clusters + 1, device=x.device, dtype=labels.dtype).expand(groups, -1).contiguous()
    offsets = torch.searchsorted(sorted_labels, bounds)  # first sorted position of each label; N at the end
    sizes = offsets[:, 1:] - offsets[:, :-1]
    centroids = torch.empty_like(c)
    mean = torch.empty_like(c)
    mean_norm = torch.empty(groups, n_clusters, device=x.device, dtype=torch.float32)
    spreads = torch.empty_like(mean_norm) if spread else None
    squares = torch.empty(groups, n, device=x.device, dtype=torch.float32) if row_squares else None
    high = torch.empty_like(c) if minmax else None
    low = torch.empty_like(c) if minmax else None
    _step_stats_kernel[(n_clusters, groups)](
        x3, perm, offsets, c, centroids, mean, mean_norm, high if minmax else mean, low if minmax else mean,
        spreads if spread else mean, squares if row_squares else mean, n, n_clusters, x3.stride(0), x3.stride(1),
        1e-6, D=d, SPHERICAL=spherical, MINMAX=minmax, SPREAD=spread, ROW_SQUARES=row_squares,
        BLOCK_R=64 if d <= 128 else 32, num_warps=8 if d >= 128 else 4)
    shape = (*lead, n_clusters, d)
    return ClusterStep(centroids.reshape(shape), labels.long().reshape(*lead, n), sizes.long().reshape(*lead, n_clusters),
                       perm.reshape(*lead, n), offsets.reshape(*lead, n_clusters + 1), mean.reshape(shape),
                       mean_norm.reshape(*lead, n_clusters), high.reshape(shape) if minmax else None,
                       low.reshape(shape) if minmax else None,
                       spreads.reshape(*lead, n_clusters) if spread else None,
                       squares.reshape(*lead, n) if row_squares else None)
