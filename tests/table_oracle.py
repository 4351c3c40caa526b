"""The layout kernel's work tables in plain PyTorch: the statement that kernels/triton_tables.py is checked
against, entry by entry (tests only)."""
import torch

WINDOW = 16


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_table(q_off: torch.Tensor, n_tokens: int, block_m: int):
    """(segment, first permuted row) of every query tile (G, TMAX), and the tile count per group (G,)."""
    groups, sq = q_off.shape[0], q_off.shape[1] - 1
    sizes = q_off[:, 1:] - q_off[:, :-1]
    tiles = (sizes + block_m - 1) // block_m
    ends = tiles.cumsum(-1)
    tmax = cdiv(n_tokens, block_m) + sq
    index = torch.arange(tmax, device=q_off.device).expand(groups, tmax).contiguous()
    seg = torch.searchsorted(ends, index, right=True).clamp_max(sq - 1)
    first_tile = ends.gather(1, seg) - tiles.gather(1, seg)
    m0 = q_off.gather(1, seg) + (index - first_tile) * block_m
    return seg.int(), m0.int(), ends[:, -1].int(), tmax


def stream_over_pieces(starts: torch.Tensor, sizes: torch.Tensor, n_tokens: int, block_n: int):
    """Stream tables (cum, delta, bounds, bound_seg, n_chunks) of listed pieces (G, Sq, P) of key rows."""
    groups, sq, pieces = sizes.shape
    device = sizes.device
    cum = torch.zeros(groups, sq, pieces + 1, device=device, dtype=torch.int32)
    cum[..., 1:] = sizes.cumsum(-1)
    total = cum[..., -1:]
    delta = starts - cum[..., :-1]
    grid = (torch.arange(cdiv(n_tokens, block_n), device=device, dtype=torch.int32) * block_n).expand(groups, sq, -1)
    starts_all = torch.cat([grid, cum[..., WINDOW:pieces:WINDOW]], dim=-1)
    starts_all = torch.where(starts_all < total, starts_all, total)
    bounds = torch.sort(starts_all, dim=-1).values
    n_chunks = (bounds < total).sum(-1).int()
    bounds = torch.cat([bounds, total], dim=-1)
    bound_seg = torch.searchsorted(cum[..., 1:].contiguous(), bounds.contiguous(), right=True).int()
    return cum, delta.int(), bounds, bound_seg, n_chunks


def stream_plan(selected: torch.Tensor, k_off: torch.Tensor, n_tokens: int, block_n: int):
    """Every selected key segment as a piece of its own."""
    groups, sq, sk = selected.shape
    slot = selected.int().cumsum(-1) - 1
    scatter_at = torch.where(selected, slot, torch.full_like(slot, sk)).long()
    seg_ids = torch.arange(sk, device=selected.device, dtype=torch.int32).expand(groups, sq, sk)
    listed = torch.zeros(groups, sq, sk + 1, device=selected.device, dtype=torch.int32)
    listed = listed.scatter(-1, scatter_at, seg_ids)[..., :sk].long()
    in_list = torch.arange(sk, device=selected.device) < selected.sum(-1, keepdim=True)
    k_sizes = (k_off[:, 1:] - k_off[:, :-1]).int().unsqueeze(1).expand(groups, sq, sk)
    sizes = torch.where(in_list, k_sizes.gather(-1, listed), 0)
    starts = k_off[:, :-1].int().unsqueeze(1).expand(groups, sq, sk).gather(-1, listed)
    return stream_over_pieces(starts, sizes, n_tokens, block_n)


def merged_ranges(selected: torch.Tensor, k_off: torch.Tensor):
    """Selected key segments (and empty segments between them) merged into ranges, listed in order."""
    groups, sq, sk = selected.shape
    k_off = k_off.int()
    joined = selected | (k_off[:, 1:] == k_off[:, :-1]).unsqueeze(1)
    opens = joined & ~torch.nn.functional.pad(joined[..., :-1], (1, 0), value=False)
    closes = joined & ~torch.nn.functional.pad(joined[..., 1:], (0, 1), value=False)
    slot_open = torch.where(opens, opens.int().cumsum(-1) - 1, sk).long()
    slot_close = torch.where(closes, closes.int().cumsum(-1) - 1, sk).long()
    zeros = torch.zeros(groups, sq, sk + 1, device=selected.device, dtype=torch.int32)
    start = zeros.scatter(-1, slot_open, k_off[:, :-1].unsqueeze(1).expand(groups, sq, sk).contiguous())
    end = zeros.scatter(-1, slot_close, k_off[:, 1:].unsqueeze(1).expand(groups, sq, sk).contiguous())
    return start[..., :sk], end[..., :sk]


def hybrid_plan(selected: torch.Tensor, k_off: torch.Tensor, n_tokens: int, block_n: int):
    """Whole block_n chunks of the merged ranges (starts, count) and the remainders as stream pieces."""
    start, end = merged_ranges(selected, k_off)
    full = (end - start) // block_n
    chunk_starts = []
    for g in range(selected.shape[0]):
        for i in range(selected.shape[1]):
            chunk_starts.append([int(s) + c * block_n for s, f in zip(start[g, i].tolist(), full[g, i].tolist())
                                 for c in range(f)])
    rest_start = start + full * block_n
    stream = stream_over_pieces(rest_start, end - start - full * block_n, n_tokens, block_n)
    return chunk_starts, full.sum(-1).int(), stream


def random_offsets(groups: int, segments: int, tokens: int, generator, empty_every: int = 0) -> torch.Tensor:
    """(G, S + 1) int64 segment offsets over ``tokens`` rows: ragged sizes, some segments empty."""
    weights = torch.rand(groups, segments, generator=generator) ** 3 + 0.02
    if empty_every:
        weights[:, ::empty_every] = 0.0
    cuts = (weights.cumsum(-1) / weights.sum(-1, keepdim=True) * tokens).round().long()
    return torch.cat([torch.zeros(groups, 1, dtype=torch.long), cuts], dim=-1).clamp_max(tokens)


TABLE_CASES = (  # (groups, query segments, key segments, tokens, selected share, block_n, block_m, empty_every)
    (2, 5, 29, 2011, 0.3, 64, 128, 7),
    (3, 7, 1, 517, 1.0, 64, 64, 0),
    (1, 11, 97, 4099, 0.6, 128, 128, 5),
    (2, 3, 40, 300, 0.05, 32, 32, 3),
    (1, 4, 300, 9001, 0.15, 64, 128, 11),
    (1, 2, 1500, 30011, 0.05, 64, 128, 0),  # rows of more than 1,024 key segments (more warps on the GPU)
)


def assert_tables_match(key_tables, tile_table_fn, device, seed: int = 0) -> None:
    """The device tables equal the oracle's on every entry the layout kernel reads, for TABLE_CASES, with
    and without merged ranges, plus a row selecting nothing and a row selecting everything."""
    for index, (groups, sq, sk, n, share, block_n, block_m, empty_every) in enumerate(TABLE_CASES):
        gen = torch.Generator().manual_seed(seed + index)
        k_off = random_offsets(groups, sk, n, gen, empty_every)
        q_off = random_offsets(groups, sq, n, gen, 0)
        selected = torch.rand(groups, sq, sk, generator=gen) < share
        selected[0, 0] = False
        selected[-1, -1] = True
        got_tiles = tile_table_fn(q_off.to(device), n, block_m)
        want_tiles = tile_table(q_off, n, block_m)
        assert got_tiles[3] == want_tiles[3]
        for g in range(groups):
            count = int(want_tiles[2][g])
            assert int(got_tiles[2][g]) == count
            for a, b in zip(got_tiles[:2], want_tiles[:2]):
                assert torch.equal(a[g, :count].cpu(), b[g, :count]), (index, g)
        for merge in (True, False):
            full_start, n_full, stream = key_tables(selected.to(device), k_off.to(device), n, block_n, merge)
            if merge:
                want_full, want_n_full, want_stream = hybrid_plan(selected, k_off, n, block_n)
                assert torch.equal(n_full.cpu(), want_n_full), (index, merge)
                for row, chunks in enumerate(want_full):
                    assert full_start.reshape(groups * sq, -1)[row, :len(chunks)].tolist() == chunks, (index, row)
            else:
                want_stream = stream_plan(selected, k_off, n, block_n)
            cum, delta, bounds, bound_seg, n_chunks = (t.cpu() for t in stream)
            w_cum, w_delta, w_bounds, w_bound_seg, w_n_chunks = want_stream
            assert torch.equal(cum, w_cum), (index, merge)
            assert torch.equal(n_chunks, w_n_chunks), (index, merge)
            assert torch.equal(bounds, w_bounds), (index, merge)
            assert torch.equal(bound_seg, w_bound_seg), (index, merge)
            pieces = (w_cum[..., 1:] > w_cum[..., :-1])  # the shift matters only inside non-empty pieces
            assert torch.equal(delta[pieces], w_delta[pieces]), (index, merge)
