"""The layout kernel's work tables, built on the device in two launches.

The layout kernel (triton_attention) walks tables instead of the layout itself:

* the query tile table: per (batch, head) group, the segment and first permuted row of every BLOCK_M tile;
* the key tables, per (group, query segment): the selected key segments as "pieces" of key rows. With
  ``merge`` (the hybrid key path), neighbouring selected segments and the empty segments between them join one
  range; every whole BLOCK_N chunk of a range is listed in the full-chunk table (loaded by TMA) and the range's
  remainder is a piece. Without it (the gathered key path), each selected segment is a piece. Pieces are
  packed into one stream, cut into chunks at every BLOCK_N stream positions and at every WINDOW-th piece start.

Each table used to take a few dozen small PyTorch operations; one program per (group, query segment) builds
them here, so a sparse call spends fewer launches on them. tests/table_oracle.py is the PyTorch statement of
the same tables, which the tests compare against entry by entry.
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

WINDOW = 16  # max pieces per stream chunk: a lane finds its piece with a WINDOW-wide comparison


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _count_sorted(values_ptr, stride, count, x, LOG: tl.constexpr, STRICT: tl.constexpr):
    """Per lane: how many of values_ptr[m * stride] for m in 1..count (non-decreasing) are < x (STRICT) or <= x;
    a binary search of LOG rounds."""
    lo = tl.zeros_like(x)
    hi = lo + count
    for _ in tl.static_range(LOG):
        active = lo < hi
        mid = (lo + hi + 1) // 2  # >= 1 while active
        value = tl.load(values_ptr + mid * stride, mask=active, other=0)
        if STRICT:
            up = active & (value < x)
        else:
            up = active & (value <= x)
        hi = tl.where(active & ~up, mid - 1, hi)
        lo = tl.where(up, mid, lo)
    return lo


@triton.jit
def _key_tables_kernel(sel_ptr, off_ptr, full_ptr, n_full_ptr, cum_ptr, delta_ptr, bounds_ptr, bseg_ptr,
                       n_chunks_ptr, Sq, Sk, N_GRID, MAXC, MAXB,
                       BLOCK_N: tl.constexpr, WIN: tl.constexpr, SKP: tl.constexpr, WINP: tl.constexpr,
                       LOG: tl.constexpr, GRID_BLOCK: tl.constexpr, MERGE: tl.constexpr):
    i = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    row = g * Sq + i
    j = tl.arange(0, SKP)
    valid = j < Sk
    off = off_ptr + g * (Sk + 1)
    sel_row = sel_ptr + row * Sk
    lo = tl.load(off + j, mask=valid, other=0).to(tl.int32)
    hi = tl.load(off + j + 1, mask=valid, other=0).to(tl.int32)
    sel = valid & (tl.load(sel_row + j, mask=valid, other=0) != 0)
    if MERGE:  # a range: selected segments and the empty segments between them
        joined = sel | (valid & (lo == hi))
        has_prev = valid & (j >= 1)
        prev_lo = tl.load(off + j - 1, mask=has_prev, other=0).to(tl.int32)
        before = has_prev & ((tl.load(sel_row + j - 1, mask=has_prev, other=0) != 0) | (prev_lo == lo))
        has_next = (j + 1) < Sk
        next_hi = tl.load(off + j + 2, mask=has_next, other=0).to(tl.int32)
        after = has_next & ((tl.load(sel_row + j + 1, mask=has_next, other=0) != 0) | (hi == next_hi))
        opens = joined & ~before
        closes = joined & ~after
    else:  # every selected segment is a piece of its own
        opens = sel
        closes = sel
    # offsets never decrease, so a running maximum carries each range's start to the segment closing it
    range_start = tl.associative_scan(tl.where(opens, lo, 0), 0, _max_combine)
    length = tl.where(closes, hi - range_start, 0)
    if MERGE:
        full = length // BLOCK_N
    else:
        full = tl.zeros_like(length)
    rest = length - full * BLOCK_N

    # whole chunks of the ranges, in range order
    full_before = tl.cumsum(full, 0) - full
    tl.store(n_full_ptr + row, tl.sum(full, 0))
    for c in range(0, tl.max(full, 0)):
        tl.store(full_ptr + row * MAXC + full_before + c, range_start + c * BLOCK_N, mask=closes & (c < full))

    # the pieces (range remainders), listed in range order: stream start and row shift of each
    closes32 = closes.to(tl.int32)
    slot = tl.cumsum(closes32, 0) - 1
    n_pieces = tl.sum(closes32, 0)
    rest_end = tl.cumsum(rest, 0)
    total = tl.sum(rest, 0)
    cum_row = cum_ptr + row * (Sk + 1)
    delta_row = delta_ptr + row * Sk
    tl.store(cum_row + 1 + slot, rest_end, mask=closes)
    tl.store(delta_row + slot, range_start + full * BLOCK_N - (rest_end - rest), mask=closes)
    unused = valid & (j >= n_pieces)  # empty pieces at position 0 after the last one
    tl.store(cum_row + 1 + j, total + tl.zeros_like(j), mask=unused)
    tl.store(delta_row + j, tl.zeros_like(j) - total, mask=unused)
    tl.store(cum_row + j, tl.zeros_like(j), mask=j == 0)
    tl.debug_barrier()  # the searches below read the stream starts just stored

    # chunk starts: the grid (every BLOCK_N stream positions) merged with the window starts (every WIN-th
    # piece start); ties put the grid start first, starts at or past the end become the end
    n_win = (Sk - 1) // WIN
    bounds_row = bounds_ptr + row * (MAXB + 1)
    bseg_row = bseg_ptr + row * (MAXB + 1)
    for a0 in range(0, N_GRID, GRID_BLOCK):
        a = a0 + tl.arange(0, GRID_BLOCK)
        a_ok = a < N_GRID
        x = a * BLOCK_N
        position = a + _count_sorted(cum_row, WIN, n_win, x, LOG, STRICT=True)
        value = tl.minimum(x, total)
        tl.store(bounds_row + position, value, mask=a_ok)
        tl.store(bseg_row + position, _count_sorted(cum_row, 1, Sk, value, LOG, STRICT=False), mask=a_ok)
    m = 1 + tl.arange(0, WINP)
    m_ok = m <= n_win
    w = tl.load(cum_row + m * WIN, mask=m_ok, other=0)
    position = (m - 1) + tl.minimum(N_GRID, w // BLOCK_N + 1)
    tl.store(bounds_row + position, w, mask=m_ok)
    tl.store(bseg_row + position, _count_sorted(cum_row, 1, Sk, w, LOG, STRICT=False), mask=m_ok)
    tl.store(bounds_row + MAXB, total)
    tl.store(bseg_row + MAXB, Sk)
    grid_chunks = tl.minimum(N_GRID, (total + BLOCK_N - 1) // BLOCK_N)
    tl.store(n_chunks_ptr + row, grid_chunks + tl.sum((m_ok & (w < total)).to(tl.int32), 0))


def key_tables(selected: torch.Tensor, k_off: torch.Tensor, n_tokens: int, block_n: int, merge: bool):
    """The key tables of every (group, query segment). selected (G, Sq, Sk) bool, k_off (G, Sk + 1).

    Returns (full_start (G, Sq, MAXC) int32, n_full (G, Sq) int32, stream tables), or (None, None, stream
    tables) without ``merge``. Stream tables: cum (G, Sq, Sk + 1) stream start of each listed piece; delta
    (G, Sq, Sk) key row minus stream position inside each piece; bounds (G, Sq, MAXB + 1) chunk starts, padded
    with the stream length; bound_seg (G, Sq, MAXB + 1) the piece holding each chunk start; n_chunks (G, Sq).
    Entries past a count (full chunks past n_full) are left unset: the layout kernel never reads them."""
    groups, sq, sk = selected.shape
    device = selected.device
    n_grid = triton.cdiv(n_tokens, block_n)
    maxc = n_grid + sk
    maxb = n_grid + (sk - 1) // WINDOW
    int32 = dict(device=device, dtype=torch.int32)
    full_start = torch.empty(groups, sq, maxc if merge else 1, **int32)
    n_full = torch.empty(groups, sq, **int32)
    cum = torch.empty(groups, sq, sk + 1, **int32)
    delta = torch.empty(groups, sq, sk, **int32)
    bounds = torch.empty(groups, sq, maxb + 1, **int32)
    bound_seg = torch.empty(groups, sq, maxb + 1, **int32)
    n_chunks = torch.empty(groups, sq, **int32)
    skp = triton.next_power_of_2(sk + 1)
    _key_tables_kernel[(sq, groups)](
        selected.contiguous().view(torch.int8), k_off.contiguous(), full_start, n_full, cum, delta, bounds,
        bound_seg, n_chunks, sq, sk, n_grid, full_start.shape[-1], maxb,
        BLOCK_N=block_n, WIN=WINDOW, SKP=skp, WINP=max(1, skp // WINDOW), LOG=skp.bit_length(),
        GRID_BLOCK=256, MERGE=merge, num_warps=min(16, max(4, skp // 256)))  # a few lanes per thread
    stream = (cum, delta, bounds, bound_seg, n_chunks)
    return (full_start, n_full, stream) if merge else (None, None, stream)


@triton.jit
def _tile_table_kernel(off_ptr, seg_ptr, m0_ptr, n_tiles_ptr, Sq, TMAX,
                       BLOCK_M: tl.constexpr, SQP: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SQP)
    ok = s < Sq
    start = tl.load(off_ptr + g * (Sq + 1) + s, mask=ok, other=0).to(tl.int32)
    end = tl.load(off_ptr + g * (Sq + 1) + s + 1, mask=ok, other=0).to(tl.int32)
    tiles = tl.where(ok, (end - start + BLOCK_M - 1) // BLOCK_M, 0)
    first = tl.cumsum(tiles, 0) - tiles
    tl.store(n_tiles_ptr + g, tl.sum(tiles, 0))
    for c in range(0, tl.max(tiles, 0)):
        here = ok & (c < tiles)
        tl.store(seg_ptr + g * TMAX + first + c, s, mask=here)
        tl.store(m0_ptr + g * TMAX + first + c, start + c * BLOCK_M, mask=here)


def tile_table(q_off: torch.Tensor, n_tokens: int, block_m: int):
    """Query tiles of every (group, segment): segment index and first permuted row per tile (G, TMAX) int32,
    and the number of real tiles per group (G,). TMAX = ceil(N / block_m) + Sq bounds the count; entries past
    a group's count are left unset (the layout kernel's programs past it exit at once)."""
    groups, sq = q_off.shape[0], q_off.shape[1] - 1
    tmax = triton.cdiv(n_tokens, block_m) + sq
    seg = torch.empty(groups, tmax, device=q_off.device, dtype=torch.int32)
    m0 = torch.empty_like(seg)
    n_tiles = torch.empty(groups, device=q_off.device, dtype=torch.int32)
    _tile_table_kernel[(groups,)](q_off.contiguous(), seg, m0, n_tiles, sq, tmax, BLOCK_M=block_m,
                                  SQP=triton.next_power_of_2(sq), num_warps=4)
    return seg, m0, n_tiles, tmax
