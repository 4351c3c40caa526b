"""The PyTorch oracle of the layout kernel's tables (tests/table_oracle.py) checked on its own. The table kernels
are compared with it in the Triton interpreter (test_block_kernels.py) and on the GPU (test_gpu_kernels.py)."""
import pytest
import torch

from table_oracle import hybrid_plan, random_offsets, stream_plan, tile_table


def test_oracle_tables_cover_exactly_the_selected_keys():
    """The oracle itself: tiles cover every query row once; whole chunks plus stream pieces cover every selected
    key row once; the stream alone (no merging) covers them too."""
    gen = torch.Generator().manual_seed(3)
    groups, sq, sk, n, block = 2, 4, 23, 1001, 32
    k_off = random_offsets(groups, sk, n, gen, empty_every=4)
    q_off = random_offsets(groups, sq, n, gen)
    selected = torch.rand(groups, sq, sk, generator=gen) < 0.4
    seg, m0, n_tiles, _ = tile_table(q_off, n, block)
    for g in range(groups):
        rows = torch.cat([torch.arange(int(m), min(int(m) + block, int(q_off[g, int(s) + 1])))
                          for s, m in zip(seg[g, :int(n_tiles[g])], m0[g, :int(n_tiles[g])])])
        assert torch.equal(torch.sort(rows).values, torch.arange(n))
    chunks, n_full, (cum, delta, *_) = hybrid_plan(selected, k_off, n, block)
    s_cum, s_delta, *_ = stream_plan(selected, k_off, n, block)
    for g in range(groups):
        segment = torch.searchsorted(k_off[g, 1:], torch.arange(n), right=True)
        for i in range(sq):
            want = torch.nonzero(selected[g, i][segment]).flatten()
            full_rows = [torch.arange(s, s + block) for s in chunks[g * sq + i]]
            assert len(full_rows) == int(n_full[g, i])
            for c, d, extra in ((cum, delta, full_rows), (s_cum, s_delta, [])):
                positions = torch.arange(int(c[g, i, -1]))
                piece = torch.searchsorted(c[g, i, 1:], positions, right=True)
                got = torch.cat(extra + [positions + d[g, i].gather(0, piece)])
                assert torch.equal(torch.sort(got).values, want)


def test_query_tile_height_pads_least():
    """Head dim 128: query clusters take 128-row tiles whatever their size; original-order blocks take the height
    that pads them least, 128 rows on a tie."""
    pytest.importorskip("triton")
    from comfyui_adacluster.kernels.triton_attention import _query_tile_rows
    assert [_query_tile_rows(size, True) for size in (40.0, 252.0, 401.0, 2000.0)] == [128] * 4
    assert [_query_tile_rows(size, False) for size in (64, 128, 96, 192, 320, 512)] == [64, 128, 128, 64, 64, 128]
