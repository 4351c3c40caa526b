"""Critical-cluster selection: from query and key clusters to a Layout.

Selection is made of parts, chosen by SelectionConfig:
* score of key cluster j for query cluster i: the TensorQuest bound ("quest"), the size-weighted
  centroid estimate ("centroid", SVG2's rule) or a blend of the two;
* count: a fixed Top-K, or the smallest set whose estimated attention mass reaches top_p ("mass");
* guard rails: a minimum fraction of key tokens, the key clusters that hold the query cluster's own
  tokens, and each query's own block in original order (layout.local_block);
* a pooled tail for what is skipped (layout.tail).
Everything stays on the device and avoids host synchronisation. On CUDA the default recipe (centroid score,
Top-K count) and its kept fraction run as fused Triton kernels (kernels.triton_select), tested against the
PyTorch statement here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import kernels
from .clustering import Clusters
from .config import SelectionConfig
from .layout import Layout

# A key cluster counts as holding a query cluster's "own" tokens when it holds at least this share of them.
OWN_CLUSTER_MIN_SHARE = 0.1


def cluster_logits(q: torch.Tensor, k: torch.Tensor, qc: Clusters, kc: Clusters, score: str,
                   blend_weight: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (query cluster, key cluster) ranking score and estimated log attention mass, (B, H, Cq, Ck).

    The query representative is the unit centroid for the bound (ranking does not depend on |q|) scaled by
    the members' mean norm to become a logit; the centroid estimate uses the mean raw query. Both mass
    estimates add log |K_j|, since a cluster's share of the softmax grows with its size."""
    n_q, n_k = qc.centroids.shape[-2], kc.centroids.shape[-2]
    k_sizes = kc.sizes.float()
    log_size = torch.log(k_sizes).unsqueeze(-2)  # -inf for empty clusters
    if score in ("quest", "blend"):
        if kc.step is not None and kc.step.high is not None:
            high, low = kc.step.high, kc.step.low
        else:
            high, low = kernels.cluster_minmax(k, kc.labels, n_k)
        unit = kernels.normalize_rows(qc.centroids)
        bound = kernels.quest_scores(unit, high, low)  # (B, H, Cq, Ck), -inf for empty key clusters
        if qc.step is not None:
            q_norm = qc.step.mean_norm
        else:  # mean query length per cluster
            q_norm = kernels.segment_means(q.float().norm(dim=-1, keepdim=True), qc.labels, n_q)[0].squeeze(-1)
        quest_logit = bound * q_norm.unsqueeze(-1) * scale
    if score in ("centroid", "blend"):
        q_mean = qc.step.mean if qc.step is not None else kernels.segment_means(q, qc.labels, n_q)[0]
        centroid_logit = (q_mean @ kc.centroids.float().transpose(-1, -2)) * scale
        centroid_logit = centroid_logit.masked_fill(k_sizes.unsqueeze(-2) == 0, float("-inf"))
    if score == "quest":
        return bound, quest_logit + log_size
    if score == "centroid":
        logit = centroid_logit + log_size
        return logit, logit
    blended = blend_weight * quest_logit + (1.0 - blend_weight) * centroid_logit + log_size
    return blended, blended


def choose_clusters(rank: torch.Tensor, log_mass: torch.Tensor, k_sizes: torch.Tensor, tokens: int,
                    config: SelectionConfig, top_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, H, Cq, Ck) bool selection from scores: Top-K or cumulative mass, then the minimum-fraction guard.

    ``top_k`` (B, H), if given, is a per-head Top-K in place of ``config.top_k``."""
    n_k = rank.shape[-1]
    order = rank.argsort(dim=-1, descending=True)
    position = torch.empty_like(order)
    position.scatter_(-1, order, torch.arange(n_k, device=rank.device).expand_as(order))
    valid = torch.isfinite(rank) & (k_sizes.unsqueeze(-2) > 0)
    if config.count == "topk":
        keep = position < (config.top_k if top_k is None else top_k[..., None, None])
    else:
        mass = torch.softmax(log_mass, dim=-1).nan_to_num(0.0)
        mass_sorted = mass.gather(-1, order)
        before = torch.cumsum(mass_sorted, dim=-1) - mass_sorted  # mass of the clusters ranked higher
        keep = (before < config.top_p).gather(-1, position)
    if config.min_kept_fraction > 0:
        sizes_sorted = k_sizes.unsqueeze(-2).expand_as(rank).gather(-1, order).float()
        tokens_before = torch.cumsum(sizes_sorted, dim=-1) - sizes_sorted
        needed = (tokens_before < config.min_kept_fraction * tokens).gather(-1, position)
        keep = keep | needed
    return keep & valid


def own_clusters(qc: Clusters, kc: Clusters) -> torch.Tensor:
    """(B, H, Cq, Ck) bool: key clusters holding at least OWN_CLUSTER_MIN_SHARE of a query cluster's tokens."""
    n_q, n_k = qc.centroids.shape[-2], kc.centroids.shape[-2]
    pair = qc.labels * n_k + kc.labels
    overlap = torch.zeros(*pair.shape[:-1], n_q * n_k, device=pair.device)
    overlap.scatter_add_(-1, pair, torch.ones_like(pair, dtype=torch.float32))
    overlap = overlap.reshape(*pair.shape[:-1], n_q, n_k)
    return overlap >= OWN_CLUSTER_MIN_SHARE * qc.sizes.unsqueeze(-1).clamp_min(1)


def build_layout(q: torch.Tensor, k: torch.Tensor, qc: Clusters, kc: Clusters, config: SelectionConfig,
                 scale: float | None = None, top_k: Optional[torch.Tensor] = None) -> Layout:
    """The Layout for video tokens q, k (B, H, N, d) clustered into qc and kc (``top_k``: per-head Top-K
    (B, H) in place of the config's)."""
    return plan_layout(q, k, qc, kc, config, scale, top_k)[0]


def plan_layout(q: torch.Tensor, k: torch.Tensor, qc: Clusters, kc: Clusters, config: SelectionConfig,
                scale: float | None = None, top_k: Optional[torch.Tensor] = None) -> tuple[Layout, torch.Tensor]:
    """build_layout's Layout and its kept fraction (B, H). On CUDA the default recipe runs as three Triton
    launches (kernels.triton_select); everything else, and the CPU, take the PyTorch statement below."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if fused_selection_applies(q, qc, kc, config):
        return _fused_plan(qc, kc, config, scale, top_k)
    layout = reference_layout(q, k, qc, kc, config, scale, top_k)
    return layout, kept_fraction(layout, qc.labels, kc.labels)


def reference_layout(q: torch.Tensor, k: torch.Tensor, qc: Clusters, kc: Clusters, config: SelectionConfig,
                     scale: float, top_k: Optional[torch.Tensor] = None) -> Layout:
    """The selection in PyTorch: scores, count, guard rails (the statement the fused kernels are tested on)."""
    rank, log_mass = cluster_logits(q, k, qc, kc, config.score, config.blend_weight, scale)
    selected = choose_clusters(rank, log_mass, kc.sizes, q.shape[-2], config, top_k)
    if config.own_clusters:
        selected = selected | own_clusters(qc, kc)
    return _layout(qc, kc, selected, config)


def fused_selection_applies(q: torch.Tensor, qc: Clusters, kc: Clusters, config: SelectionConfig) -> bool:
    """True where the fused selection kernels run: the centroid score with a Top-K count, on the clustering's
    own statistics, for tensors on CUDA with Triton available."""
    return (config.score == "centroid" and config.count == "topk" and qc.step is not None and kc.step is not None
            and kernels.fused_selection(q) is not None
            and kc.centroids.shape[-2] <= kernels.fused_selection(q).max_key_clusters)


def _fused_plan(qc: Clusters, kc: Clusters, config: SelectionConfig, scale: float,
                top_k: Optional[torch.Tensor]) -> tuple[Layout, torch.Tensor]:
    dot = qc.step.mean @ kc.centroids.float().transpose(-1, -2)  # (B, H, Cq, Ck)
    n = qc.labels.shape[-1]
    selected, kept = kernels.fused_selection(qc.labels)(
        dot, kc.sizes, qc.sizes, qc.labels, kc.labels, scale, config.top_k if top_k is None else top_k,
        config.min_kept_fraction * n, OWN_CLUSTER_MIN_SHARE if config.own_clusters else 0.0, config.local_block)
    return _layout(qc, kc, selected, config), kept


def _layout(qc: Clusters, kc: Clusters, selected: torch.Tensor, config: SelectionConfig) -> Layout:
    q_perm, q_offsets = _segments(qc)
    k_perm, k_offsets = _segments(kc)
    layout = Layout(q_offsets=q_offsets, k_offsets=k_offsets, selected=selected, q_perm=q_perm, k_perm=k_perm,
                    local_block=config.local_block, tail=config.tail, q_labels=qc.labels, k_labels=kc.labels)
    if config.tail and kc.step is not None and kc.step.spread is not None:
        # the clustering's statistics pass already walked these segments: the executor need not again
        layout.tail_key_means, layout.tail_key_spread = kc.step.mean, kc.step.spread
    if config.tail and qc.step is not None:
        layout.query_squares = qc.step.row_squares
    return layout


def _segments(c: Clusters):
    if c.step is not None:
        return c.step.perm, c.step.offsets
    return kernels.segments_from_labels(c.labels, c.centroids.shape[-2])


def kept_fraction(layout: Layout, q_labels: torch.Tensor, k_labels: torch.Tensor) -> torch.Tensor:
    """(B, H) fraction of query-key pairs attended exactly, counting the local blocks without overlap."""
    base = layout.kept_fraction()
    if not layout.local_block:
        return base
    n = q_labels.shape[-1]
    block = layout.local_block
    n_blocks = -(-n // block)
    block_of = torch.arange(n, device=q_labels.device) // block
    q_hist = _block_histogram(q_labels, block_of, n_blocks, layout.num_query_segments)  # (B,H,nb,Sq)
    k_hist = _block_histogram(k_labels, block_of, n_blocks, layout.num_key_segments)  # (B,H,nb,Sk)
    last = n - (n_blocks - 1) * block
    block_pairs = (n_blocks - 1) * block * block + last * last
    already = ((q_hist @ layout.selected.float()) * k_hist).sum((-1, -2))  # selected pairs inside blocks
    extra = block_pairs - already
    return base + extra / float(n * n)


def _block_histogram(labels, block_of, n_blocks, n_segments):
    index = block_of * n_segments + labels
    hist = torch.zeros(*labels.shape[:-1], n_blocks * n_segments, device=labels.device)
    hist.scatter_add_(-1, index, torch.ones_like(labels, dtype=torch.float32))
    return hist.reshape(*labels.shape[:-1], n_blocks, n_segments)
