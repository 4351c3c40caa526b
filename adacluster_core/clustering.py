"""Query and key clustering.

Queries: spherical k-means on unit-normalised queries with a fixed count. Keys: Euclidean k-means whose
count is chosen per (layer, head) at calibration by the threshold-wise multi-stage procedure; later steps
warm-start from the cached centroids with the count fixed. All tensors are batched over (B, H); per-head
key counts are padded to the largest count with unused centroid slots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import kernels
from ..kernels.reference import ClusterStep


@dataclass
class Clusters:
    centroids: torch.Tensor  # (B, H, C, d) fp32 (unit rows for spherical query clusters)
    labels: torch.Tensor  # (B, H, N) int64
    sizes: torch.Tensor  # (B, H, C) int64
    counts: torch.Tensor  # (B, H) int64 number of usable centroid slots per head
    # statistics of ``labels`` computed with the clustering (segments, means, max/min), so selection
    # does not recompute them; None where the clustering did not produce them
    step: Optional[ClusterStep] = None


@dataclass
class KeyCalibration:
    clusters: Clusters
    hard: torch.Tensor  # (B, H) bool: count above the cap, or keys left beyond the threshold
    threshold: torch.Tensor  # (B, H) fp32 distance threshold tau (Euclidean, not squared)
    stages: torch.Tensor  # (B, H) int64 stages used


def sample_rows(x: torch.Tensor, count: int, generator) -> torch.Tensor:
    """``count`` distinct rows of x (..., N, d) per leading index, as initial centroids (fp32).

    ``generator``: None, one torch.Generator, or a list with one generator per head (dim -3 of x), so that
    a head's draw does not depend on the other heads of the call (head_generators)."""
    n = x.shape[-2]
    if isinstance(generator, list):
        if len(generator) != x.shape[-3]:
            raise ValueError(f"{len(generator)} generators for {x.shape[-3]} heads; give one per head")
        noise = torch.stack([torch.rand(*x.shape[:-3], n, generator=g) for g in generator], dim=-2)
    else:
        noise = torch.rand(*x.shape[:-2], n, generator=generator, device="cpu")
    noise = noise.to(x.device)
    index = noise.topk(min(count, n), dim=-1).indices
    if count > n:  # more clusters than rows: repeat rows; duplicates simply stay empty
        index = index.repeat_interleave(-(-count // n), dim=-1)[..., :count]
    return x.float().gather(-2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


# Calibration works on fp32 copies of q and k; it takes the heads a few at a time so that those copies stay
# below this size (a whole Wan 14B 720p layer would need 1.5 GB for each).
CALIBRATION_CHUNK_BYTES = 256 << 20


def head_chunks(x: torch.Tensor) -> list:
    """Slices of dim -3 (heads) of x (B, H, N, d) whose fp32 copy fits in CALIBRATION_CHUNK_BYTES (at least
    one head each)."""
    batch, heads, n, d = x.shape
    per_chunk = max(1, CALIBRATION_CHUNK_BYTES // max(1, batch * n * d * 4))
    return [slice(h, min(heads, h + per_chunk)) for h in range(0, heads, per_chunk)]


def _generator_part(generator, heads: slice):
    """The generators of a slice of the heads (a list has one per head; a single generator is shared)."""
    return generator[heads] if isinstance(generator, list) else generator


def generator_for(seed: int, layer: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)


def head_generators(seed: int, layer: int, heads) -> list:
    """One generator per head, seeded by (seed, layer, model-wide head index): a head clusters the same
    whichever heads share its call, so a sequence-parallel rank reproduces the single-GPU result."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + layer) * 4099 + int(h)) for h in heads]


def cluster_queries(q: torch.Tensor, n_clusters: int, iters: int, init: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> Clusters:
    """Spherical k-means of the normalised queries (B, H, N, d); warm-started when ``init`` is given.
    Heads are clustered a few at a time (head_chunks), each from its own generator when given a list."""
    parts = []
    for heads in head_chunks(q):
        unit = kernels.normalize_rows(q[:, heads])
        start = init[:, heads] if init is not None else sample_rows(unit, n_clusters, _generator_part(generator, heads))
        parts.append(kernels.kmeans(unit, start, iters, True)[:3])
        del unit
    centroids, labels, sizes = (torch.cat(tensors, dim=1) for tensors in zip(*parts))
    counts = torch.full(q.shape[:2], centroids.shape[-2], dtype=torch.int64, device=q.device)
    return Clusters(centroids, labels, sizes, counts)


def cluster_keys_fixed(k: torch.Tensor, init: torch.Tensor, counts: torch.Tensor, iters: int) -> Clusters:
    """Euclidean k-means of keys with a fixed per-head count (warm start or profile start)."""
    centroids, labels, sizes, _ = kernels.kmeans(k, init, iters, False, counts)
    return Clusters(centroids, labels, sizes, counts)


def warm_step(x: torch.Tensor, init: torch.Tensor, iters: int, spherical: bool,
              counts: Optional[torch.Tensor] = None, minmax: bool = False, spread: bool = False,
              row_squares: bool = False) -> Clusters:
    """Warm-started k-means for a sparse step: ``iters`` Lloyd rounds (assign, update) from ``init``.

    The labels are the last round's assignment and the centroids the member means of exactly those labels
    (no extra assignment pass), so the statistics selection uses (segments, means, max/min) come from the
    same pass as the update. Spherical: x is the raw queries (normalised inside). ``iters`` = 0 assigns to
    ``init`` and keeps it. ``counts`` (B, H): usable centroid slots per head (all when None). ``minmax``,
    ``spread``, ``row_squares``: the optional statistics of kernels.kmeans_step."""
    if iters > 1:
        start = kernels.normalize_rows(x) if spherical else x
        init = kernels.kmeans(start, init, iters - 1, spherical, counts)[0]
    step = kernels.kmeans_step(x, init, spherical, counts, minmax, spread, row_squares)
    centroids = step.centroids if iters > 0 else init.float()
    if counts is None:
        counts = torch.full(x.shape[:2], init.shape[-2], dtype=torch.int64, device=x.device)
    return Clusters(centroids, step.labels, step.sizes, counts, step)


def calibrate_keys(k: torch.Tensor, initial_clusters: int, alpha: float, relative: bool, max_stages: int,
                   cap_fraction: float, iters: int, generator: Optional[torch.Generator] = None) -> KeyCalibration:
    """Threshold-wise multi-stage clustering: picks the number of key clusters per (batch, head).

    Stage 1 clusters every key into ``initial_clusters``; tau = alpha * mean distance (relative) or alpha
    (absolute). Keys farther than tau from their centroid are re-clustered alone into at most
    ``initial_clusters`` new clusters; keys that now lie within tau are accepted. This repeats for at most
    ``max_stages`` stages. A head is hard to compress when it needs more
    than ``cap_fraction * N`` clusters or still has keys beyond tau after the last stage.
    Runs once per layer per run; loops over heads on the host, which is fine at that rate, and takes the
    heads a few at a time (head_chunks) so the fp32 copy of the keys stays small."""
    batch, heads, n, d = k.shape
    per_head, taus = {}, []
    for chunk in head_chunks(k):
        kf = k[:, chunk].float()
        first = kernels.kmeans(kf, sample_rows(kf, initial_clusters, _generator_part(generator, chunk)), iters, False)
        first_centroids, first_labels, _, first_fit = first
        distance = first_fit.sqrt()
        tau = alpha * distance.mean(-1) if relative else torch.full(distance.shape[:2], float(alpha), device=k.device)
        taus.append(tau)
        for b in range(batch):
            for i, h in enumerate(range(chunk.start, chunk.stop)):
                head_gen = generator[h] if isinstance(generator, list) else generator
                per_head[b, h] = _refine_head(kf[b, i], first_centroids[b, i], first_labels[b, i], distance[b, i],
                                              float(tau[b, i]), initial_clusters, max_stages, iters, head_gen)
        del kf, first, first_fit, distance
    tau = torch.cat(taus, dim=1)
    per_head = [per_head[b, h] for b in range(batch) for h in range(heads)]
    max_count = max(c.shape[0] for c, _, _, _ in per_head)
    centroids = torch.zeros(batch, heads, max_count, d, device=k.device)
    labels = torch.empty(batch, heads, n, dtype=torch.int64, device=k.device)
    counts = torch.empty(batch, heads, dtype=torch.int64, device=k.device)
    leftover = torch.empty(batch, heads, dtype=torch.bool, device=k.device)
    stages = torch.empty(batch, heads, dtype=torch.int64, device=k.device)
    for index, (c, lab, left, used) in enumerate(per_head):
        b, h = divmod(index, heads)
        centroids[b, h, : c.shape[0]] = c
        labels[b, h], counts[b, h], leftover[b, h], stages[b, h] = lab, c.shape[0], left, used
    sizes = kernels.reference.label_counts(labels, max_count)
    hard = leftover | (counts > cap_fraction * n)
    return KeyCalibration(Clusters(centroids, labels, sizes, counts), hard, tau, stages)


def _refine_head(x, centroids, labels, distance, tau, initial_clusters, max_stages, iters, generator):
    """Stages 2.. of calibrate_keys for one head. Returns (centroids, labels, leftover outliers?, stages)."""
    centroid_list = [centroids]
    labels = labels.clone()
    outliers = distance > tau
    used = 1
    while bool(outliers.any()) and used < max_stages:
        idx = outliers.nonzero().flatten()
        count = min(initial_clusters, idx.numel())
        pts = x[idx]
        new_c, new_lab, _, new_fit = kernels.kmeans(pts, sample_rows(pts, count, generator), iters, False)
        offset = sum(c.shape[0] for c in centroid_list)
        centroid_list.append(new_c)
        labels[idx] = new_lab + offset
        outliers[idx] = new_fit.sqrt() > tau
        used += 1
    all_centroids = torch.cat(centroid_list)
    # Drop empty clusters so the count is the number of clusters actually used.
    sizes = torch.bincount(labels, minlength=all_centroids.shape[0])
    keep = sizes > 0
    remap = torch.cumsum(keep.long(), 0) - 1
    return all_centroids[keep], remap[labels], bool(outliers.any()), used
