"""Triton layout attention (forward): one varlen block-sparse kernel for any Layout.

Work decomposition
* Query side: every query segment is cut into BLOCK_M tiles of its permuted rows. The tile table is built
  on the device; the grid is sized by the bound ceil(N / BLOCK_M) + Sq per (batch, head) and surplus
  programs exit at once, so nothing waits for the host.
* Key side ("hybrid" path, clustered keys on GPUs with TMA): K and V are gathered once into clustered
  order (a bandwidth-bound copy), so a selected key segment is a contiguous row range. Per query
  segment, neighbouring selected segments merge into ranges; every whole BLOCK_N chunk of a range is
  loaded by TMA with no masking, and the ranges' remainders (< BLOCK_N rows each) are packed into one
  "stream" walked in gathered chunks of at most BLOCK_N rows, so ragged clusters cost no padding.
  Stream chunk boundaries are every BLOCK_N stream positions plus every WINDOW-th piece boundary; hence
  one chunk touches at most WINDOW pieces and a lane finds its piece with a WINDOW-wide comparison
  instead of a search. The "stream" path (keys in original order, or no TMA) streams all selected
  segments that way, gathering rows through k_perm.
* Extras: the text sink (with optional additive bias) and the pooled tail are further key passes of the
  same online softmax. The local block (original order, minus keys already selected) runs first as a
  small kernel whose (output, log-sum-exp) the main kernel merges in its epilogue.
* Q rows are gathered through q_perm on load and the output is written straight to the original token
  positions, so no permuted copies of Q or O are made.
"""
from __future__ import annotations

import os


import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import reference
from .triton_cluster import segment_reduce
from .triton_tables import WINDOW, key_tables, tile_table

LOG2E = 1.4426950408889634


@triton.jit
def _online_update(q, k, v, bias, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr = True):
    """One step of the online softmax in the log2 domain; bias is already in log2 units. MASKED=False: a chunk of
    real keys without bias (bias is ignored); every row then has a finite maximum, so no -inf guard is needed."""
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = qk * qk_scale + bias
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_safe = m_new
        p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    # Measured on an H100: a separate add is faster in the gathered loops, accumulating inside the dot is
    # faster in the TMA loop.
    if MASKED:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _finish(m_i, l_i, acc):
    """Normalised output and natural-log LSE of an online softmax (rows without any key: 0 and -inf)."""
    has_mass = l_i > 0.0
    l_safe = tl.where(has_mass, l_i, 1.0)
    lse = tl.where(has_mass, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    return acc / l_safe[:, None], lse


@triton.jit
def _stream_rows(c, chunk_count, base, MAXB, Sk, bounds, bound_seg, cum, delta, lanes, wins,
                 WINDOWED: tl.constexpr):
    """Key rows (positions in the key tensor) of stream chunk c and which lanes are real. WINDOWED: the row
    offsets of the chunk's segments are loaded with its window (one dependent load less)."""
    live = c < chunk_count
    p0 = tl.load(bounds + base * MAXB + c, mask=live, other=0)
    p1 = tl.load(bounds + base * MAXB + c + 1, mask=live, other=0)
    s0 = tl.load(bound_seg + base * MAXB + c, mask=live, other=0)
    p = p0 + lanes
    ok = p < p1
    ends = tl.load(cum + base * (Sk + 1) + s0 + 1 + wins, mask=s0 + 1 + wins <= Sk, other=2147483647)
    step = tl.sum((p[:, None] >= ends[None, :]).to(tl.int32), 1)
    if WINDOWED:
        shifts = tl.load(delta + base * Sk + s0 + wins, mask=s0 + wins < Sk, other=0)
        shift = tl.sum(tl.where(step[:, None] == wins[None, :], shifts[None, :], 0), 1)
    else:
        shift = tl.load(delta + base * Sk + s0 + step, mask=ok, other=0)
    return p + shift, ok


@triton.jit
def _stream_keys(c, chunk_count, base, g, N, MAXB, Sk, bounds, bound_seg, cum, delta, k_perm, lanes, wins,
                 KEY_MODE: tl.constexpr, HAS_KPERM: tl.constexpr):
    """Rows of K/V (int64) that stream chunk c reads, and which lanes are real (none once c >= chunk_count)."""
    pos, ok = _stream_rows(c, chunk_count, base, MAXB, Sk, bounds, bound_seg, cum, delta, lanes, wins, KEY_MODE == 1)
    if HAS_KPERM:
        return tl.load(k_perm + g * N + pos, mask=ok, other=0).to(tl.int64), ok
    return pos.to(tl.int64), ok


@triton.jit
def _layout_kernel(Q, K, V, Out, Lse,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                   H, N, Sq, Sk, TMAX, MAXB,
                   q_perm, k_perm, tile_seg, tile_m0, n_tiles, q_off,
                   cum, delta, bounds, bound_seg, n_chunks,
                   TK, TV, stkb, stkh, stkn, stvb, stvh, stvn, Nt,
                   TB, stbb, stbh, stbn, stbt,
                   KM, VM, QSQ, tail_bias, tail_spread, selected,
                   LO, LL, KD, VD, full_start, n_full, MAXC,
                   qk_scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIN: tl.constexpr,
                   HAS_QPERM: tl.constexpr, HAS_KPERM: tl.constexpr, HAS_TEXT: tl.constexpr,
                   HAS_TBIAS: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_LOCAL: tl.constexpr,
                   STORE_LSE: tl.constexpr, KEY_MODE: tl.constexpr):
    t = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    if t >= tl.load(n_tiles + g):
        return
    b = g // H
    h = g % H
    seg = tl.load(tile_seg + g * TMAX + t)
    m0 = tl.load(tile_m0 + g * TMAX + t)
    q_end = tl.load(q_off + g * (Sq + 1) + seg + 1).to(tl.int32)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < q_end
    if HAS_QPERM:
        qpos = tl.load(q_perm + g * N + rows, mask=row_ok, other=0).to(tl.int32)
    else:
        qpos = rows
    dims = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + qpos[:, None].to(tl.int64) * sqn + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    dtype = q.dtype
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    lanes = tl.arange(0, BLOCK_N)

    # selected key segments
    base = g * Sq + seg
    chunk_count = tl.load(n_chunks + base)
    wins = tl.arange(0, WIN)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    # The TMA chunk table is read one iteration ahead (row_next): a TMA load whose coordinate waits on a
    # table read in the same iteration stalls the pipeline (measured: ~12% of the loop's speed). The
    # gathered stream loop was measured slower with its rows read ahead (more live registers), so it is not.
    if KEY_MODE == 1:  # whole BLOCK_N chunks of the merged ranges, contiguous rows of the permuted K/V, by TMA
        full_count = tl.load(n_full + base)
        row_next = (g * N + tl.load(full_start + base * MAXC)).to(tl.int32)
        for c in range(0, full_count):
            row0 = row_next
            row_next = (g * N + tl.load(full_start + base * MAXC + c + 1, mask=c + 1 < full_count, other=0)).to(tl.int32)
            k = KD.load([row0, 0])
            v = VD.load([row0, 0])
            m_i, l_i, acc = _online_update(q, k, v, 0.0, m_i, l_i, acc, qk_scale, MASKED=False)
    # the stream: all selected segments (KEY_MODE 0) or the ranges' remainders (KEY_MODE 1), gathered rows
    for c in range(0, chunk_count):
        kpos, ok = _stream_keys(c, chunk_count, base, g, N, MAXB, Sk, bounds, bound_seg, cum, delta, k_perm, lanes,
                                wins, KEY_MODE, HAS_KPERM)
        k = tl.load(k_base + kpos[:, None] * skn + dims[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_base + kpos[:, None] * svn + dims[None, :], mask=ok[:, None], other=0.0)
        bias = tl.where(ok, 0.0, float("-inf"))[None, :]
        m_i, l_i, acc = _online_update(q, k, v, bias, m_i, l_i, acc, qk_scale)

    if HAS_TEXT:
        for t0 in range(0, Nt, BLOCK_N):
            tpos = t0 + lanes
            ok = tpos < Nt
            k = tl.load(TK + b * stkb + h * stkh + tpos[:, None] * stkn + dims[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(TV + b * stvb + h * stvh + tpos[:, None] * stvn + dims[None, :], mask=ok[:, None], other=0.0)
            bias = tl.where(ok, 0.0, float("-inf"))[None, :]
            if HAS_TBIAS:
                tb = tl.load(TB + b * stbb + h * stbh + qpos[:, None].to(tl.int64) * stbn + tpos[None, :] * stbt,
                             mask=row_ok[:, None] & ok[None, :], other=0.0)
                bias = bias + tb.to(tl.float32) * 1.4426950408889634
            m_i, l_i, acc = _online_update(q, k.to(dtype), v.to(dtype), bias, m_i, l_i, acc, qk_scale)

    if HAS_TAIL:
        # second-order weight of a pooled segment (reference.tail_log_weights): log |K_j| + |q|^2 tail_spread_j,
        # in base 2. |q|^2 comes precomputed per token: an fp32 copy of the query tile here would raise the
        # kernel's register count, and with it slow every loop above.
        q_square = tl.load(QSQ + g * N + qpos, mask=row_ok, other=0.0)
        for j0 in range(0, Sk, BLOCK_N):
            j = j0 + lanes
            ok = j < Sk
            k = tl.load(KM + (g * Sk + j[:, None]) * D + dims[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(VM + (g * Sk + j[:, None]) * D + dims[None, :], mask=ok[:, None], other=0.0)
            chosen = tl.load(selected + base * Sk + j, mask=ok, other=1)
            log_size = tl.load(tail_bias + g * Sk + j, mask=ok, other=float("-inf"))
            spread = tl.load(tail_spread + g * Sk + j, mask=ok, other=0.0)
            skipped_bias = tl.where(chosen == 0, log_size, float("-inf")) * 1.4426950408889634
            bias = skipped_bias[None, :] + q_square[:, None] * (spread * 1.4426950408889634)[None, :]
            m_i, l_i, acc = _online_update(q, k, v, bias, m_i, l_i, acc, qk_scale)

    if HAS_LOCAL:  # merge the local-block partial (normalised output + natural-log lse)
        lo = tl.load(LO + (g * N + qpos[:, None].to(tl.int64)) * D + dims[None, :], mask=row_ok[:, None],
                     other=0.0).to(tl.float32)
        ll = tl.load(LL + g * N + qpos, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        m_new = tl.maximum(m_i, ll)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        beta = tl.math.exp2(ll - m_safe)
        acc = acc * alpha[:, None] + lo * beta[:, None]
        l_i = l_i * alpha + beta
        m_i = m_new

    out, lse = _finish(m_i, l_i, acc)
    o_rows = (g * N + qpos[:, None].to(tl.int64)) * D
    tl.store(Out + o_rows + dims[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    if STORE_LSE:
        tl.store(Lse + g * N + qpos, lse, mask=row_ok)


@triton.jit
def _local_kernel(Q, K, V, LO, LL, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                  H, N, Sq, Sk, q_labels, k_labels, selected, block, qk_scale,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Each query (original order) over the keys of its own block of ``block`` tokens whose key
    segment its query segment did not select."""
    g = tl.program_id(1).to(tl.int64)
    b = g // H
    h = g % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dims = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqn + dims[None, :], mask=row_ok[:, None], other=0.0)
    q_block = rows // block
    q_lab = tl.load(q_labels + g * N + rows, mask=row_ok, other=0).to(tl.int32)
    first = (tl.program_id(0) * BLOCK_M // block) * block
    last = tl.minimum(N, ((tl.program_id(0) * BLOCK_M + BLOCK_M - 1) // block + 1) * block)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for k0 in range(first, last, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)
        col_ok = cols < last
        k = tl.load(K + b * skb + h * skh + cols[:, None].to(tl.int64) * skn + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None].to(tl.int64) * svn + dims[None, :], mask=col_ok[:, None], other=0.0)
        k_lab = tl.load(k_labels + g * N + cols, mask=col_ok, other=0).to(tl.int32)
        pair_ok = row_ok[:, None] & col_ok[None, :] & (q_block[:, None] == (cols // block)[None, :])
        already = tl.load(selected + (g * Sq + q_lab[:, None]) * Sk + k_lab[None, :], mask=pair_ok, other=1)
        bias = tl.where(pair_ok & (already == 0), 0.0, float("-inf"))
        m_i, l_i, acc = _online_update(q, k, v, bias, m_i, l_i, acc, qk_scale)
    out, lse = _finish(m_i, l_i, acc)
    tl.store(LO + (g * N + rows[:, None].to(tl.int64)) * D + dims[None, :], out.to(LO.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LL + g * N + rows, lse, mask=row_ok)


@triton.jit
def _permute_kv_kernel(K, V, KP, VP, perm, skb, skh, skn, svb, svh, svn, H, N,
                       D: tl.constexpr, BLOCK: tl.constexpr):
    """KP[g, p] = K[b, h, perm[g, p]] (and V likewise): K/V in clustered order, (G, N, D) contiguous."""
    g = tl.program_id(1).to(tl.int64)
    b = g // H
    h = g % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    dims = tl.arange(0, D)
    src = tl.load(perm + g * N + rows, mask=ok, other=0).to(tl.int64)
    dst = (g * N + rows[:, None].to(tl.int64)) * D + dims[None, :]
    k = tl.load(K + b * skb + h * skh + src[:, None] * skn + dims[None, :], mask=ok[:, None], other=0.0)
    tl.store(KP + dst, k, mask=ok[:, None])
    v = tl.load(V + b * svb + h * svh + src[:, None] * svn + dims[None, :], mask=ok[:, None], other=0.0)
    tl.store(VP + dst, v, mask=ok[:, None])


def permute_kv(k: torch.Tensor, v: torch.Tensor, k_perm: torch.Tensor):
    """K and V gathered into clustered order once: (B, H, N, d) contiguous copies."""
    batch, heads, n, d = k.shape
    kp = torch.empty(batch, heads, n, d, device=k.device, dtype=k.dtype)
    vp = torch.empty_like(kp)
    perm = k_perm.reshape(batch * heads, n).contiguous()
    block = 64
    _permute_kv_kernel[(triton.cdiv(n, block), batch * heads)](
        k, v, kp, vp, perm, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        heads, n, D=d, BLOCK=block, num_warps=4)
    return kp, vp


# ------------------------------------------------------------------------------------------ planning
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim, set by measurement tools to compare tilings
CONFIG_OVERRIDE: dict = {}
KEY_PATH_OVERRIDE = None  # "stream" or "hybrid": forces a key path (tests and measurements)


def _key_path(q: torch.Tensor, k_perm) -> str:
    """"hybrid" (K/V permuted once, whole chunks by TMA, remainders gathered) for clustered keys on GPUs with
    TMA (compute capability 9+); else "stream" (every key row gathered through k_perm)."""
    if k_perm is None:
        return "stream"
    if KEY_PATH_OVERRIDE is not None:
        return KEY_PATH_OVERRIDE
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "hybrid"
    # Measured on an H200 with the runner's own layouts on video-like inputs (default recipe, ~17% kept):
    # the hybrid path is faster at every shape, 480p included (Wan 1.3B 480p 5.2 against 6.8 ms, Wan 14B
    # 480p 12.2 against 19.4 ms, CogVideoX 2B 480p (head dim 64) 3.7 against 3.9 ms).
    if torch.cuda.get_device_capability(q.device)[0] >= 9:
        return "hybrid"
    return "stream"


def _query_tile_rows(mean_query_segment: float, clustered_queries: bool) -> int:
    """Query tile height (64 or 128) at head dim 128. Query clusters take 128-row tiles on 8 warps: measured on an
    H100 (Wan 1.3B 480p, video workload, default layouts, clusters of ~250 queries), the layout kernel took 23% less
    time than in 64-row tiles on 4 warps at step 25 (15.4 against 20.1 ms summed over five layer kinds) and 24% less
    at step 10 (33.5 against 44.1 ms), although a cluster's ragged last tile pads more. 64-row tiles on 4 warps
    spill 488-504 bytes of registers per thread (compiled for sm_90 by Triton 3.6; 128-row tiles on 8 warps
    176-192), and on 8 warps they ran slower still. Original-order blocks all have one size, so their padding is
    known: AdaSpa's 64-token blocks ran 1.76x faster in 64-row tiles, MOD-DiT's 128-token blocks 9% faster in
    128-row tiles."""
    if clustered_queries:
        return 128
    size = max(1, round(mean_query_segment))
    return 64 if triton.cdiv(size, 64) * 64 < triton.cdiv(size, 128) * 128 else 128


def _config(d: int, mean_query_segment: float, mean_key_segment: float, clustered_queries: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the main kernel per head dim, mean query and key segment
    sizes (tokens per segment) and whether query segments are clusters (else original-order blocks)."""
    if d in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE[d]
    if os.environ.get("TRITON_INTERPRET") == "1":  # CPU interpreter (debugging): small tiles run faster
        return 32, 16, 4, 1
    if d <= 64:
        return 128, 64, 4, 3
    if d <= 128:
        if _query_tile_rows(mean_query_segment, clustered_queries) == 64:
            return 64, 64, 4, 3
        # Measured on an H100 (wan14b-720p, 10% kept): 128-row key chunks are ~3% faster on ~100 key clusters
        # per head (~750 tokens each); 64-row chunks are 12% faster on ~750 small clusters (~100 tokens each),
        # because more of every key range then goes by whole chunks instead of the gathered remainder stream.
        # Re-measured with the default's layouts (video workload, step 25): 128-row chunks 4% faster at
        # HunyuanVideo 720p (~590 tokens per key cluster) despite their register spill, 11% slower at Wan 14B
        # 720p (~380).
        return (128, 128, 8, 3) if mean_key_segment >= 512 else (128, 64, 8, 3)
    return 64, 32, 4, 2


def _unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def run_layout(q, k, v, q_off, k_off, selected, q_perm, k_perm, local_block: int, tail: bool,
               text_k, text_v, text_bias, scale: float, q_labels=None, k_labels=None, tail_spread_weight=None,
               tail_key_means=None, tail_key_spread=None, query_squares=None):
    """Executes a layout; returns (out (B, H, N, d) in q's dtype, lse (B, H, N) fp32). ``q_labels`` /
    ``k_labels`` (B, H, N): the segment of every token, where the caller has them (else derived).
    ``tail_spread_weight`` (B, H): the weight of the pooled tail's spread term per head (None: 1).
    ``tail_key_means`` (B, H, Sk, d), ``tail_key_spread`` (B, H, Sk), ``query_squares`` (B, H, N): the pooled
    tail's inputs where the caller has them (Layout), else computed here."""
    batch, heads, n, d = q.shape
    groups = batch * heads
    q, k, v = _unit_stride_rows(q), _unit_stride_rows(k), _unit_stride_rows(v)
    sq, sk = q_off.shape[-1] - 1, k_off.shape[-1] - 1
    q_off2 = q_off.reshape(groups, sq + 1)
    k_off2 = k_off.reshape(groups, sk + 1)
    sel = selected.reshape(groups, sq, sk)
    block_m, block_n, warps, stages = _config(d, n / max(sq, 1), n / max(sk, 1), q_perm is not None)
    seg, m0, n_tiles, tmax = tile_table(q_off2, n, block_m)
    qp = q_perm.reshape(groups, n).contiguous() if q_perm is not None else None
    kp = k_perm.reshape(groups, n).contiguous() if k_perm is not None else None
    key_path = _key_path(q, kp)
    k_rows, v_rows = k, v
    kd = vd = None
    maxc = 0
    full_start, n_full, (cum, delta, bounds, bound_seg, n_chunks) = key_tables(sel, k_off2, n, block_n,
                                                                               merge=key_path == "hybrid")
    if key_path == "hybrid":
        k_rows, v_rows = permute_kv(k, v, k_perm)
        maxc = full_start.shape[-1]
        kd = TensorDescriptor.from_tensor(k_rows.view(groups * n, d), [block_n, d])
        vd = TensorDescriptor.from_tensor(v_rows.view(groups * n, d), [block_n, d])
    maxb = bounds.shape[-1]  # row length of the chunk-start table
    sel_bytes = sel.contiguous().view(torch.int8)
    out = torch.empty(batch, heads, n, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, n, device=q.device, dtype=torch.float32)
    qk_scale = scale * LOG2E
    placeholder = n_chunks

    local_out = local_lse = None
    if local_block:
        if q_labels is None:
            q_labels = reference.segment_labels(q_perm, q_off, n).to(torch.int32)
        if k_labels is None:
            k_labels = reference.segment_labels(k_perm, k_off, n).to(torch.int32)
        q_labels, k_labels = q_labels.reshape(groups, n).contiguous(), k_labels.reshape(groups, n).contiguous()
        # the local partial is normalised, so q's dtype holds it as well as the final output (half the memory)
        local_out = torch.empty(groups, n, d, device=q.device, dtype=q.dtype)
        local_lse = torch.empty(groups, n, device=q.device, dtype=torch.float32)
        lm, ln = (64, 64) if d <= 128 else (32, 32)
        _local_kernel[(triton.cdiv(n, lm), groups)](
            q, k, v, local_out, local_lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), v.stride(0), v.stride(1), v.stride(2), heads, n, sq, sk, q_labels, k_labels, sel_bytes,
            local_block, qk_scale, D=d, BLOCK_M=lm, BLOCK_N=ln, num_warps=4, num_stages=1)

    k_mean = v_mean = q_square = tail_bias = tail_spread = None
    if tail:
        if query_squares is None:
            query_squares = torch.linalg.vector_norm(q, dim=-1, dtype=torch.float32).square_()
        q_square = query_squares.reshape(groups, n).contiguous()
        if tail_key_means is None or tail_key_spread is None:
            k_mean, _, _, k_spread = segment_reduce(k, k_perm, k_off, mean=True, mean_dtype=q.dtype, spread=True)
        else:
            k_mean = tail_key_means.reshape(groups, sk, d).to(q.dtype).contiguous()
            k_spread = tail_key_spread.reshape(groups, sk).float()
        v_mean, _, _, _ = segment_reduce(v, k_perm, k_off, mean=True, mean_dtype=q.dtype)
        tail_bias = torch.log((k_off2[:, 1:] - k_off2[:, :-1]).float()).contiguous()
        tail_spread = (0.5 * scale * scale) * k_spread  # natural-log weight per unit of |q|^2
        if tail_spread_weight is not None:
            tail_spread = tail_spread * tail_spread_weight.reshape(groups, 1).float()

    has_text = text_k is not None
    if has_text:
        text_k, text_v = _unit_stride_rows(text_k.to(q.dtype)), _unit_stride_rows(text_v.to(q.dtype))
        n_text = text_k.shape[-2]
        tk_strides = (text_k.stride(0), text_k.stride(1), text_k.stride(2))
        tv_strides = (text_v.stride(0), text_v.stride(1), text_v.stride(2))
    else:
        n_text, tk_strides, tv_strides = 0, (0, 0, 0), (0, 0, 0)
    has_bias = has_text and text_bias is not None
    if has_bias:
        if text_bias.dtype == torch.bool:
            text_bias = torch.zeros(text_bias.shape, device=q.device).masked_fill(~text_bias, float("-inf"))
        tb = text_bias.expand(batch, heads, n, n_text)
        tb_strides = tuple(tb.stride())
    else:
        tb, tb_strides = placeholder, (0, 0, 0, 0)

    _layout_kernel[(tmax, groups)](
        q, k_rows, v_rows, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k_rows.stride(0), k_rows.stride(1), k_rows.stride(2),
        v_rows.stride(0), v_rows.stride(1), v_rows.stride(2),
        heads, n, sq, sk, tmax, maxb,
        qp if qp is not None else placeholder, kp if (kp is not None and key_path == "stream") else placeholder,
        seg, m0, n_tiles, q_off2.contiguous(),
        cum, delta, bounds, bound_seg, n_chunks,
        text_k if has_text else placeholder, text_v if has_text else placeholder, *tk_strides, *tv_strides, n_text,
        tb, *tb_strides,
        k_mean if tail else placeholder, v_mean if tail else placeholder, q_square if tail else placeholder,
        tail_bias if tail else placeholder, tail_spread if tail else placeholder, sel_bytes,
        local_out if local_block else placeholder, local_lse if local_block else placeholder,
        kd if kd is not None else placeholder, vd if vd is not None else placeholder,
        full_start if full_start is not None else placeholder, n_full if n_full is not None else placeholder, maxc,
        qk_scale,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, WIN=WINDOW,
        HAS_QPERM=qp is not None, HAS_KPERM=kp is not None and key_path == "stream", HAS_TEXT=has_text,
        HAS_TBIAS=has_bias, HAS_TAIL=tail, HAS_LOCAL=bool(local_block), STORE_LSE=True,
        KEY_MODE=int(key_path == "hybrid"),
        num_warps=warps, num_stages=stages)
    return out, lse
