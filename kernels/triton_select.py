"""Selection of the default recipe (centroid score, Top-K count) and its kept fraction, in three launches.

``adacluster_core.selection`` states the selection in PyTorch: rank key clusters by the size-weighted centroid
estimate, keep the Top-K, extend them in rank order until a minimum share of the keys is kept, add the key
clusters holding a share of the query cluster's own tokens. Those are a sort, a few scatters and cumulative
sums per call, some fifteen small launches, and the kept fraction another forty. Here:

* ``_overlap_kernel``: how many of query cluster i's tokens sit in key cluster j (atomic histogram);
* ``_select_kernel``: one program per (group, query cluster) row finds the Top-K threshold and the
  minimum-kept threshold by bisection on order-preserving integer keys of the ranks (no sort), writes the
  row of ``selected`` and adds the row's kept (query, key) pairs to its group's count;
* ``_local_pairs_kernel``: adds the pairs of each local block (original token order) that no selected
  cluster already covers.

Ties at a threshold are all kept (the sort keeps an arbitrary subset of them); ranks are continuous, so
this shows only on inputs built with repeated rows. tests/test_gpu_select.py compares with the PyTorch path.
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

MAX_KEY_CLUSTERS = 8192  # one program holds a row of key clusters; wider rows take the PyTorch path
_LOCAL_TILE = 64


@triton.jit
def _overlap_kernel(q_labels_ptr, k_labels_ptr, overlap_ptr, N, Sq, Sk, BLOCK: tl.constexpr):
    g = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = t < N
    ql = tl.load(q_labels_ptr + g * N + t, mask=inside, other=0)
    kl = tl.load(k_labels_ptr + g * N + t, mask=inside, other=0)
    tl.atomic_add(overlap_ptr + (g * Sq + ql) * Sk + kl, 1, mask=inside, sem="relaxed")


@triton.jit
def _order_key(x):
    """int32 with the order of the float32 x (for finite values and -inf)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _select_kernel(dot_ptr, k_sizes_ptr, q_sizes_ptr, top_k_ptr, overlap_ptr, sel_ptr, kept_ptr, Sq, Sk,
                   scale, top_k, min_tokens, own_share,
                   SKP: tl.constexpr, PER_HEAD: tl.constexpr, MIN_KEPT: tl.constexpr, OWN: tl.constexpr):
    i = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    row = g * Sq + i
    j = tl.arange(0, SKP)
    in_row = j < Sk
    size = tl.load(k_sizes_ptr + g * Sk + j, mask=in_row, other=0)
    valid = in_row & (size > 0)
    # rank of key cluster j: its estimated log attention mass, centroid logit + log |K_j|
    dot = tl.load(dot_ptr + row * Sk + j, mask=valid, other=0.0)
    rank = dot * scale + tl.log(tl.where(valid, size, 1).to(tl.float32))
    key = tl.where(valid, _order_key(rank), 0)
    low = tl.min(tl.where(valid, key, 1 << 40), axis=0)
    high = tl.max(tl.where(valid, key, -(1 << 40)), axis=0) + 1
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    if PER_HEAD:
        want = tl.load(top_k_ptr + g)
    else:
        want = top_k
    want = tl.minimum(want, n_valid)
    # threshold = the largest c with count(key >= c) >= want: bisection keeps count(>= lo) >= want > count(>= hi)
    lo = low
    hi = high
    for _ in tl.static_range(33):
        mid = lo + (hi - lo) // 2
        ok = tl.sum((valid & (key >= mid)).to(tl.int32), axis=0) >= want
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    threshold = lo
    if MIN_KEPT:  # also every cluster ranked before the keys kept in rank order reach min_tokens
        lo = low
        hi = high
        for _ in tl.static_range(33):
            mid = lo + (hi - lo) // 2
            kept_tokens = tl.sum(tl.where(valid & (key >= mid), size, 0), axis=0)
            ok = kept_tokens.to(tl.float32) >= min_tokens
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        threshold = tl.minimum(threshold, lo)
    chosen = valid & (key >= threshold)
    q_size = tl.load(q_sizes_ptr + row)
    if OWN:
        overlap = tl.load(overlap_ptr + row * Sk + j, mask=in_row, other=0)
        chosen = chosen | (overlap.to(tl.float32) >= own_share * tl.maximum(q_size, 1).to(tl.float32))
    tl.store(sel_ptr + row * Sk + j, chosen.to(tl.int8), mask=in_row)
    kept_keys = tl.sum(tl.where(chosen, size, 0), axis=0)
    tl.atomic_add(kept_ptr + g, kept_keys * q_size, sem="relaxed")


@triton.jit
def _local_pairs_kernel(q_labels_ptr, k_labels_ptr, sel_ptr, kept_ptr, N, Sq, Sk, local_block,
                        TILE: tl.constexpr):
    """Program (block, query tile, group): the (query, key) pairs of one local block whose query cluster does
    not select the key's cluster, added to the group's kept count."""
    g = tl.program_id(2).to(tl.int64)
    start = tl.program_id(0) * local_block
    end = tl.minimum(start + local_block, N)
    t = start + tl.program_id(1) * TILE + tl.arange(0, TILE)
    q_in = t < end
    ql = tl.load(q_labels_ptr + g * N + t, mask=q_in, other=0)
    sel_rows = sel_ptr + (g * Sq + ql) * Sk
    extra = tl.zeros([TILE], tl.int64)
    for s0 in range(start, end, TILE):
        s = s0 + tl.arange(0, TILE)
        k_in = s < end
        kl = tl.load(k_labels_ptr + g * N + s, mask=k_in, other=0)
        pair = q_in[:, None] & k_in[None, :]
        covered = tl.load(sel_rows[:, None] + kl[None, :], mask=pair, other=1)
        extra += tl.sum((pair & (covered == 0)).to(tl.int64), axis=1)
    tl.atomic_add(kept_ptr + g, tl.sum(extra, axis=0), sem="relaxed")


def select_and_count(dot: torch.Tensor, k_sizes: torch.Tensor, q_sizes: torch.Tensor, q_labels: torch.Tensor,
                     k_labels: torch.Tensor, scale: float, top_k, min_tokens: float, own_share: float,
                     local_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected (B, H, Cq, Ck) bool, kept fraction (B, H) float64) of the default recipe.

    dot: (B, H, Cq, Ck) fp32 query-cluster mean x key centroid; k_sizes / q_sizes: cluster sizes (B, H, C);
    labels (B, H, N); top_k: an int or a (B, H) integer tensor; min_tokens: keys to keep at least per query
    cluster (0: no minimum); own_share: keep key clusters holding this share of the query cluster's tokens
    (0: off); local_block: size of each query's own block in original order (0: none)."""
    batch, heads, sq, sk = dot.shape
    n = q_labels.shape[-1]
    if sk > MAX_KEY_CLUSTERS:
        raise ValueError(f"{sk} key clusters exceed the selection kernel's {MAX_KEY_CLUSTERS}")
    groups = batch * heads
    dot = dot.contiguous()
    q_labels, k_labels = q_labels.contiguous(), k_labels.contiguous()
    own = own_share > 0
    # one zeroed buffer for the overlap histogram and the per-group kept count
    counts = torch.zeros(groups * (1 + (sq * sk if own else 0)), dtype=torch.int64, device=dot.device)
    kept = counts[:groups]
    overlap = counts[groups:] if own else counts
    if own:
        block = 1024
        _overlap_kernel[(triton.cdiv(n, block), groups)](q_labels, k_labels, overlap, n, sq, sk, BLOCK=block)
    selected = torch.empty(batch, heads, sq, sk, dtype=torch.bool, device=dot.device)
    per_head = isinstance(top_k, torch.Tensor)
    top_k_arg = top_k.to(torch.int64).contiguous() if per_head else counts
    skp = triton.next_power_of_2(max(sk, 16))
    _select_kernel[(sq, groups)](
        dot, k_sizes.contiguous(), q_sizes.contiguous(), top_k_arg, overlap, selected.view(torch.int8), kept,
        sq, sk, float(scale), 0 if per_head else int(top_k), float(min_tokens), float(own_share),
        SKP=skp, PER_HEAD=per_head, MIN_KEPT=min_tokens > 0, OWN=own, num_warps=4 if skp <= 1024 else 8)
    if local_block:
        n_blocks = triton.cdiv(n, local_block)
        grid = (n_blocks, triton.cdiv(min(local_block, n), _LOCAL_TILE), groups)
        _local_pairs_kernel[grid](q_labels, k_labels, selected.view(torch.int8), kept, n, sq, sk, local_block,
                                  TILE=_LOCAL_TILE)
    return selected, kept.view(batch, heads).double() / float(n * n)


select_and_count.max_key_clusters = MAX_KEY_CLUSTERS
