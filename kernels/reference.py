"""PyTorch reference implementations: they run on any device and are the oracle for the fast kernels.

Every function here works on tensors batched over leading dimensions (usually (B, H)); nothing mixes
heads or batch elements. Arithmetic is fp32 whatever the input dtype; outputs come back in the input
dtype where they are activations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# Score matrices are built in chunks of at most this many elements, so no N x N (or N x C for large
# batches) matrix is ever materialised.
CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------- clustering
def normalize_rows(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / max(||x||, eps) in fp32 (the angular geometry of the query path)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, spherical: bool,
                  num_clusters: Optional[torch.Tensor] = None):
    """Nearest centroid of every row.

    x: (..., N, d); centroids: (..., C, d); num_clusters: (...) int, slots >= count are unused.
    Spherical: max dot product (x and centroids are expected unit-norm). Euclidean: min squared distance.
    Returns labels (..., N) int64 and the squared distance (Euclidean) or cosine (spherical), fp32.
    """
    x = x.float()
    c = centroids.float()
    n, n_clusters = x.shape[-2], c.shape[-2]
    lead = x.shape[:-2]
    groups = max(1, math.prod(lead))
    chunk = max(1, CHUNK_ELEMENTS // max(1, groups * n_clusters))
    invalid = None
    if num_clusters is not None:
        slot = torch.arange(n_clusters, device=x.device)
        invalid = (slot >= num_clusters.unsqueeze(-1)).unsqueeze(-2)  # (..., 1, C)
    c_sq = (c * c).sum(-1).unsqueeze(-2)  # (..., 1, C)
    labels, best = [], []
    for start in range(0, n, chunk):
        xs = x[..., start:start + chunk, :]
        dots = xs @ c.transpose(-1, -2)
        if spherical:
            score = dots
        else:  # argmin ||x - c||^2 == argmax (2 x.c - ||c||^2)
            score = 2.0 * dots - c_sq
        if invalid is not None:
            score = score.masked_fill(invalid, float("-inf"))
        value, label = score.max(dim=-1)
        labels.append(label)
        if spherical:
            best.append(value)
        else:
            best.append(((xs * xs).sum(-1) - value).clamp_min(0.0))
    return torch.cat(labels, dim=-1), torch.cat(best, dim=-1)


def kmeans_update(x: torch.Tensor, labels: torch.Tensor, previous: torch.Tensor, spherical: bool):
    """New centroids as the (normalised, if spherical) member means; empty clusters keep ``previous``.

    Returns centroids (..., C, d) fp32 and sizes (..., C) int64."""
    x = x.float()
    sums = torch.zeros(*previous.shape, device=x.device, dtype=torch.float32)
    sums.scatter_add_(-2, labels.unsqueeze(-1).expand(*labels.shape, x.shape[-1]), x)
    sizes = label_counts(labels, previous.shape[-2])
    means = sums / sizes.clamp_min(1).unsqueeze(-1).float()
    if spherical:
        means = normalize_rows(means)
    centroids = torch.where((sizes > 0).unsqueeze(-1), means, previous.float())
    return centroids, sizes


def kmeans(x: torch.Tensor, init: torch.Tensor, iters: int, spherical: bool,
           num_clusters: Optional[torch.Tensor] = None):
    """Lloyd iterations from ``init``: ``iters`` rounds of (assign, update), then a final assignment.

    x: (..., N, d) (already normalised for spherical use), init: (..., C, d).
    Returns centroids (..., C, d) fp32, labels (..., N) int64, sizes (..., C) int64, and the per-row
    squared distance to its centroid (Euclidean) or cosine (spherical)."""
    centroids = init.float()
    for _ in range(iters):
        labels, _ = kmeans_assign(x, centroids, spherical, num_clusters)
        centroids, _ = kmeans_update(x, labels, centroids, spherical)
    labels, fit = kmeans_assign(x, centroids, spherical, num_clusters)
    sizes = label_counts(labels, centroids.shape[-2])
    return centroids, labels, sizes, fit


@dataclass
class ClusterStep:
    """Result of kmeans_step: one warm-started Lloyd step and the per-cluster statistics of its labels."""

    centroids: torch.Tensor  # (..., C, d) fp32: member means of ``labels`` (unit if spherical); empty -> init
    labels: torch.Tensor  # (..., N) int64: nearest centroid of init
    sizes: torch.Tensor  # (..., C) int64
    perm: torch.Tensor  # (..., N) int64: stable sort of labels (segments_from_labels)
    offsets: torch.Tensor  # (..., C + 1) int64
    mean: torch.Tensor  # (..., C, d) fp32: mean of the raw member rows, 0 for empty clusters
    mean_norm: torch.Tensor  # (..., C) fp32: mean row length of the members, 0 for empty clusters
    high: Optional[torch.Tensor] = None  # (..., C, d) fp32 element-wise max (-inf empty), with minmax
    low: Optional[torch.Tensor] = None  # (..., C, d) fp32 element-wise min (+inf empty), with minmax
    spread: Optional[torch.Tensor] = None  # (..., C) fp32 segment_spread of the members (0 empty), with spread
    row_squares: Optional[torch.Tensor] = None  # (..., N) fp32 |x_i|^2 of every row in original order, with row_squares


def kmeans_step(x: torch.Tensor, init: torch.Tensor, spherical: bool, num_clusters: Optional[torch.Tensor] = None,
                minmax: bool = False, spread: bool = False, row_squares: bool = False) -> ClusterStep:
    """One warm-started Lloyd step: assign every row of x to its nearest centroid of ``init``, then move
    each centroid to the mean of its members (of the unit rows, normalised, if spherical). The labels are
    those of the assignment, so the returned centroids are exactly the member means of the returned labels.

    Spherical rows need not be unit: the nearest centroid by cosine does not depend on a row's length.
    Also returns, from the same labels, the segments (stable sort), raw member means, mean row lengths and
    optionally the element-wise max/min of every cluster (``minmax``: TensorQuest inputs), their spreads and
    every row's squared length (``spread``, ``row_squares``: the pooled tail's inputs)."""
    xf = x.float()
    unit = normalize_rows(xf) if spherical else xf
    n_clusters = init.shape[-2]
    labels, _ = kmeans_assign(unit, init, spherical, num_clusters)
    centroids, sizes = kmeans_update(unit, labels, init, spherical)
    perm, offsets = segments_from_labels(labels, n_clusters)
    mean = segment_means(xf, labels, n_clusters)[0]
    mean_norm = segment_means(xf.norm(dim=-1, keepdim=True), labels, n_clusters)[0].squeeze(-1)
    high = low = None
    if minmax:
        high, low = cluster_minmax(xf, labels, n_clusters)
    return ClusterStep(centroids, labels, sizes, perm, offsets, mean, mean_norm, high, low,
                       segment_spread(xf, labels, n_clusters, means=mean) if spread else None,
                       xf.square().sum(-1) if row_squares else None)


def label_counts(labels: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Counts of each label along the last dimension (scatter, so CUDA needs no host synchronisation)."""
    counts = torch.zeros(*labels.shape[:-1], n_bins, dtype=torch.int64, device=labels.device)
    return counts.scatter_add_(-1, labels, torch.ones_like(labels))


def segments_from_labels(labels: torch.Tensor, n_segments: int):
    """Permutation that sorts tokens by label (stable) and the segment offsets in that order.

    labels: (..., N) int64 in [0, n_segments). Returns perm (..., N) int64, offsets (..., S + 1) int64."""
    perm = torch.sort(labels, dim=-1, stable=True).indices
    sizes = label_counts(labels, n_segments)
    offsets = torch.zeros(*sizes.shape[:-1], n_segments + 1, dtype=torch.int64, device=labels.device)
    offsets[..., 1:] = sizes.cumsum(-1)
    return perm, offsets


def cluster_minmax(x: torch.Tensor, labels: torch.Tensor, n_clusters: int):
    """Element-wise max and min of the members of every cluster (TensorQuest inputs).

    x: (..., N, d), labels: (..., N). Returns (max, min), each (..., C, d) fp32; empty clusters get
    max = -inf and min = +inf, so their bound is -inf and they are never selected."""
    x = x.float()
    lead, n, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    index = labels.unsqueeze(-1).expand(*lead, n, d)
    high = torch.full((*lead, n_clusters, d), float("-inf"), device=x.device)
    low = torch.full((*lead, n_clusters, d), float("inf"), device=x.device)
    high = high.scatter_reduce(-2, index, x, reduce="amax", include_self=True)
    low = low.scatter_reduce(-2, index, x, reduce="amin", include_self=True)
    return high, low


def quest_scores(r: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """TensorQuest bound of r.k over each key cluster: r+ . max + r- . min, as two matrix products.

    r: (..., Cq, d) query representatives, high/low: (..., Ck, d). Returns (..., Cq, Ck) fp32.
    Empty clusters (max = -inf) come out as -inf."""
    r = r.float()
    empty = torch.isinf(high).all(-1)
    high = torch.nan_to_num(high.float(), neginf=0.0)
    low = torch.nan_to_num(low.float(), posinf=0.0)
    scores = r.clamp_min(0) @ high.transpose(-1, -2) + r.clamp_max(0) @ low.transpose(-1, -2)
    return scores.masked_fill(empty.unsqueeze(-2), float("-inf"))


# ---------------------------------------------------------------------------------------- attention
def dense_attention(q, k, v, bias: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """Exact softmax(q k^T * scale + bias) v for (B, H, N, d) tensors, in fp32, chunked over queries.

    Returns (out in q's dtype, lse fp32 (B, H, N)). Used as the oracle and for the small dense pieces."""
    out, lse = partial_attention(q, k, v, bias=bias, scale=scale)
    return out.to(q.dtype), lse


def partial_attention(q, k, v, bias=None, scale=None, key_mask=None):
    """Attention of q over a key set, returning the normalised output (fp32) and its log-sum-exp.

    bias: additive, broadcastable to (..., Nq, Nk); key_mask: bool, broadcastable, True = attend.
    Rows with no key attended give output 0 and lse -inf (so they vanish when merged)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    n_q, n_k = q.shape[-2], k.shape[-2]
    groups = max(1, math.prod(q.shape[:-2]))
    chunk = max(1, CHUNK_ELEMENTS // max(1, groups * n_k))
    outs, lses = [], []
    for start in range(0, n_q, chunk):
        rows = slice(start, start + chunk)
        logits = (qf[..., rows, :] @ kf.transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + _rows(bias, rows, n_q).float()
        if key_mask is not None:
            logits = logits.masked_fill(~_rows(key_mask, rows, n_q), float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        weights = torch.exp(logits - lse.unsqueeze(-1).clamp_min(-1e30))
        weights = torch.nan_to_num(weights, nan=0.0)
        outs.append(weights @ vf)
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def _rows(t: torch.Tensor, rows: slice, n_q: int) -> torch.Tensor:
    """Rows of a broadcastable (..., Nq or 1, Nk) tensor."""
    return t if t.shape[-2] == 1 and n_q != 1 else t[..., rows, :]


def merge_partials(parts):
    """Combines partial attentions over disjoint key sets: [(out fp32, lse), ...] -> (out, lse)."""
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    safe_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    out = torch.zeros_like(parts[0][0])
    for part_out, part_lse in parts:
        weight = torch.exp(part_lse - safe_total)
        out = out + part_out * torch.nan_to_num(weight, nan=0.0).unsqueeze(-1)
    return out, total


def additive_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An attention mask as an additive bias: bool masks (True = attend, as in SDPA) become 0 / -inf."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


def gather_tokens(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """x[..., perm, :] for x (B, H, N, d) and perm (B, H, N); identity when perm is None."""
    if perm is None:
        return x
    return x.gather(-2, perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of gather_tokens: puts row p of x back at original position perm[p]."""
    if perm is None:
        return x
    out = torch.empty_like(x)
    out.scatter_(-2, perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1]), x)
    return out


def selected_for_tokens(layout, q_labels: torch.Tensor) -> torch.Tensor:
    """(B, H, N, Sk) bool: the key segments selected for the segment of every query (original order)."""
    sk = layout.num_key_segments
    return layout.selected.gather(-2, q_labels.unsqueeze(-1).expand(*q_labels.shape, sk))


def local_block_partial(q, k, v, layout, q_labels, k_labels, scale):
    """Each query over the keys of its own original-order block that its segment did not select."""
    batch, heads, n, d = q.shape
    block = layout.local_block
    n_blocks = -(-n // block)
    pad = n_blocks * block - n

    def blocks(x):
        return torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(batch, heads, n_blocks, block, -1)

    sk = layout.num_key_segments
    q_lab = torch.nn.functional.pad(q_labels, (0, pad)).reshape(batch, heads, n_blocks, block, 1)
    k_lab = torch.nn.functional.pad(k_labels, (0, pad)).reshape(batch, heads, n_blocks, 1, block)
    flat_selected = layout.selected.reshape(batch, heads, -1)
    pair = (q_lab * sk + k_lab).reshape(batch, heads, -1)
    already = flat_selected.gather(-1, pair).reshape(batch, heads, n_blocks, block, block)
    key_real = (torch.arange(n_blocks * block, device=q.device) < n).reshape(n_blocks, 1, block)
    out, lse = partial_attention(blocks(q), blocks(k), blocks(v), scale=scale, key_mask=~already & key_real)
    out = out.reshape(batch, heads, n_blocks * block, d)[..., :n, :]
    lse = lse.reshape(batch, heads, n_blocks * block)[..., :n]
    return out, lse


def segment_means(x: torch.Tensor, labels: torch.Tensor, n_segments: int):
    """Mean of x over each segment (fp32) and segment sizes, from original-order labels."""
    zeros = torch.zeros(*x.shape[:-2], n_segments, x.shape[-1], device=x.device)
    means, sizes = kmeans_update(x, labels, zeros, spherical=False)
    return means, sizes


def segment_spread(x: torch.Tensor, labels: torch.Tensor, n_segments: int,
                   means: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., S) fp32: the variance of each segment's rows per channel, averaged over the channels
    (mean squared distance of the members from their mean, divided by d); 0 for empty segments.
    ``means``: the segments' means (segment_means), where the caller has them."""
    xf = x.float()
    if means is None:
        means, _ = segment_means(xf, labels, n_segments)
    square_norms, _ = segment_means(xf.square().sum(-1, keepdim=True), labels, n_segments)
    return (square_norms.squeeze(-1) - means.square().sum(-1)).clamp_min(0) / x.shape[-1]


def tail_log_weights(q_square: torch.Tensor, log_size: torch.Tensor, spread: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """(..., Nq, S) additive logits of the pooled tail's pseudo-keys: log |K_j| + scale^2 |q|^2 spread_j / 2, from
    |q|^2 of every query (..., Nq) fp32.

    A skipped segment's true weight is sum_i exp(scale q.k_i) = |K_j| exp(scale q.mean_j) mean_i exp(scale q.dev_i).
    The last factor is at least 1 (Jensen); for member deviations of per-channel variance spread_j it is
    exp(scale^2 |q|^2 spread_j / 2) to second order. Without it the tail undercounts every skipped segment."""
    return log_size.unsqueeze(-2) + 0.5 * scale * scale * q_square.float().unsqueeze(-1) * spread.unsqueeze(-2)


def tail_partial(q, k, v, layout, q_labels, k_labels, scale):
    """Pooled tail: every skipped key segment j enters as one key, its mean, weighted by its size |K_j| and
    by the second-order term of its spread (``tail_log_weights``), times the layout's per-head weight of it.
    The mean keys, their spreads and |q|^2 are the layout's where it carries them (the clustering's statistics)."""
    sk = layout.num_key_segments
    v_mean, sizes = segment_means(v, k_labels, sk)
    log_size = torch.log(sizes.float())  # (B, H, Sk); empty -> -inf
    if layout.tail_key_means is not None and layout.tail_key_spread is not None:
        k_mean, spread = layout.tail_key_means.float(), layout.tail_key_spread
    else:
        k_mean, _ = segment_means(k, k_labels, sk)
        spread = segment_spread(k, k_labels, sk, means=k_mean)
    if layout.tail_spread_weight is not None:
        spread = spread * layout.tail_spread_weight.float().unsqueeze(-1)
    q_square = layout.query_squares if layout.query_squares is not None else q.float().square().sum(-1)
    bias = tail_log_weights(q_square, log_size, spread, scale)
    skipped = ~selected_for_tokens(layout, q_labels)
    return partial_attention(q, k_mean, v_mean, bias=bias, scale=scale, key_mask=skipped)


def clustered_partial(q, k, v, layout, scale):
    """Exact attention of every query segment over the union of its selected key segments.

    Loops over (batch, head, query segment) on the host: this is the readable oracle, not the fast path."""
    batch, heads, n, d = q.shape
    qp, kp, vp = gather_tokens(q, layout.q_perm), gather_tokens(k, layout.k_perm), gather_tokens(v, layout.k_perm)
    q_off, k_off, selected = layout.q_offsets.cpu(), layout.k_offsets.cpu(), layout.selected.cpu()
    out = torch.zeros(batch, heads, n, d, device=q.device)
    lse = torch.full((batch, heads, n), float("-inf"), device=q.device)
    for b in range(batch):
        for h in range(heads):
            starts, ends = k_off[b, h, :-1], k_off[b, h, 1:]
            for i in range(layout.num_query_segments):
                q0, q1 = int(q_off[b, h, i]), int(q_off[b, h, i + 1])
                chosen = selected[b, h, i].nonzero().flatten()
                if q1 == q0 or chosen.numel() == 0:
                    continue
                keys = torch.cat([torch.arange(int(starts[j]), int(ends[j])) for j in chosen]).to(q.device)
                if keys.numel() == 0:
                    continue
                o, l = partial_attention(qp[b, h, q0:q1], kp[b, h, keys], vp[b, h, keys], scale=scale)
                out[b, h, q0:q1], lse[b, h, q0:q1] = o, l
    return scatter_tokens(out, layout.q_perm), scatter_tokens(lse.unsqueeze(-1), layout.q_perm).squeeze(-1)


def execute_layout(q, k, v, layout, text_k=None, text_v=None, text_bias=None, scale=None, return_lse=False):
    """Runs a Layout: q, k, v (B, H, N, d) video tokens; text_k/text_v (B, H, Nt, d) always-kept keys
    with an optional additive text_bias broadcastable to (B, H, N, Nt). Returns (B, H, N, d) in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n = q.shape[-2]
    parts = [clustered_partial(q, k, v, layout, scale)]
    if layout.local_block or layout.tail:
        q_labels = segment_labels(layout.q_perm, layout.q_offsets, n)
        k_labels = segment_labels(layout.k_perm, layout.k_offsets, n)
        if layout.local_block:
            parts.append(local_block_partial(q, k, v, layout, q_labels, k_labels, scale))
        if layout.tail:
            parts.append(tail_partial(q, k, v, layout, q_labels, k_labels, scale))
    if text_k is not None:
        parts.append(partial_attention(q, text_k, text_v, bias=additive_mask(text_bias), scale=scale))
    out, lse = merge_partials(parts)
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)


def segment_labels(perm: Optional[torch.Tensor], offsets: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, H, N) int64: the segment of every token, in original token order."""
    positions = torch.arange(tokens, device=offsets.device).expand(*offsets.shape[:-1], tokens).contiguous()
    seg_at_position = torch.searchsorted(offsets[..., 1:].contiguous(), positions, right=True)
    if perm is None:
        return seg_at_position
    labels = torch.empty_like(seg_at_position)
    labels.scatter_(-1, perm, seg_at_position)
    return labels
