"""GPU kernels against the PyTorch reference, on fresh random inputs (odd sizes, tiny and empty clusters,
per-head segment counts, both half-precision dtypes). Needs CUDA and Triton."""
from __future__ import annotations


import pytest
import torch

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

if not torch.cuda.is_available():
    pytest.skip("GPU kernel tests need CUDA (torch.cuda.is_available() is False)", allow_module_level=True)
if not HAVE_TRITON:
    pytest.skip("GPU kernel tests need Triton (import triton failed)", allow_module_level=True)

from comfyui_adacluster import kernels  # noqa: E402
from comfyui_adacluster.adacluster_core.layout import Layout, block_offsets  # noqa: E402
from comfyui_adacluster.kernels import reference, triton_ops  # noqa: E402

DEVICE = "cuda"
HALF_DTYPES = [torch.bfloat16, torch.float16]


def random_labels(groups_shape, tokens, n_segments, generator, empty_every=0, tiny=False):
    """Labels with skewed cluster sizes; every ``empty_every``-th segment left empty; ``tiny`` makes most
    clusters hold 1-3 tokens."""
    weights = torch.rand(*groups_shape, n_segments, generator=generator) ** 3 + 1e-3
    if tiny:
        weights[..., : n_segments // 2] = 1e-4
    if empty_every:
        weights[..., ::empty_every] = 0.0
    flat = weights.reshape(-1, n_segments)
    labels = torch.multinomial(flat, tokens, replacement=True, generator=generator)
    return labels.reshape(*groups_shape, tokens)


def random_layout(batch, heads, tokens, sq, sk, density, generator, local_block=0, tail=False,
                  empty_every=0, tiny=False, ragged_heads=False, original_order_queries=False):
    """A layout from random cluster labels; with ``ragged_heads`` later heads use fewer key segments
    (the rest are padding: empty and never selected)."""
    k_labels = random_labels((batch, heads), tokens, sk, generator, empty_every, tiny)
    if ragged_heads:
        for h in range(heads):
            used = max(2, sk - 3 * h)
            k_labels[:, h] = k_labels[:, h] % used
    k_perm, k_offsets = reference.segments_from_labels(k_labels, sk)
    if original_order_queries:
        block = -(-tokens // sq)
        q_offsets = block_offsets(batch, heads, tokens, block)
        q_perm = None
        sq = q_offsets.shape[-1] - 1
    else:
        q_labels = random_labels((batch, heads), tokens, sq, generator, empty_every)
        q_perm, q_offsets = reference.segments_from_labels(q_labels, sq)
    selected = torch.rand(batch, heads, sq, sk, generator=generator) < density
    k_sizes = k_offsets[..., 1:] - k_offsets[..., :-1]
    if ragged_heads:  # padding segments are never selected
        selected &= (k_sizes > 0).unsqueeze(-2)
    layout = Layout(q_offsets=q_offsets.to(DEVICE), k_offsets=k_offsets.to(DEVICE), selected=selected.to(DEVICE),
                    q_perm=None if q_perm is None else q_perm.to(DEVICE), k_perm=k_perm.to(DEVICE),
                    local_block=local_block, tail=tail)
    return layout


def qkv(batch, heads, tokens, d, dtype, generator, spread=1.0):
    shape = (batch, heads, tokens, d)
    return [(torch.randn(shape, generator=generator) * spread).to(DEVICE, dtype) for _ in range(3)]


def assert_close_attention(out, expected, dtype):
    """Within a few units of the output dtype's rounding (outputs are rounded once, at the end)."""
    rel = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -9
    expected = expected.float()
    excess = (out.float() - expected).abs() - (rel * expected.abs() + 4 * rel)
    assert excess.max().item() <= 0, f"error exceeds tolerance by {excess.max().item():.3g}"


# ---------------------------------------------------------------------------------------- clustering
@pytest.mark.parametrize("spherical", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,n_clusters", [(64, 37), (64, 203), (128, 37), (128, 331)])
def test_kmeans_assign_picks_a_best_centroid(spherical, dtype, d, n_clusters):
    gen = torch.Generator().manual_seed(1 + n_clusters)
    x = torch.randn(2, 3, 1001, d, generator=gen)
    cent = torch.randn(2, 3, n_clusters, d, generator=gen)
    counts = torch.tensor([[n_clusters, 20, 5], [1, n_clusters - 1, n_clusters]])
    if spherical:
        x, cent = reference.normalize_rows(x), reference.normalize_rows(cent)
    x_dev = x.to(DEVICE, dtype)
    labels, fit = triton_ops.kmeans_assign(x_dev, cent.to(DEVICE), spherical, counts.to(DEVICE))
    ref_labels, ref_fit = reference.kmeans_assign(x_dev.float(), cent.to(DEVICE), spherical, counts.to(DEVICE))
    assert labels.dtype == torch.int64 and labels.shape == ref_labels.shape
    assert bool((labels < counts.to(DEVICE).unsqueeze(-1)).all()), "a label points at an unused slot"
    # the chosen centroid must be (within half-precision rounding) as good as the reference's best
    tol = 5e-2 if dtype == torch.bfloat16 else 2e-2
    chosen_fit = _fit_of(x_dev.float(), cent.to(DEVICE), labels, spherical)
    if spherical:
        assert bool((chosen_fit >= ref_fit - tol).all())
    else:
        assert bool((chosen_fit <= ref_fit + tol * (1 + ref_fit)).all())
    agree = (labels == ref_labels).float().mean().item()
    assert agree > (0.999 if dtype == torch.float32 else 0.95), f"label agreement {agree:.4f}"
    torch.testing.assert_close(fit, _fit_of(x_dev.float(), cent.to(DEVICE), labels, spherical), atol=tol, rtol=tol)


def _fit_of(x, cent, labels, spherical):
    chosen = cent.gather(-2, labels.unsqueeze(-1).expand(*labels.shape, x.shape[-1]))
    if spherical:
        return (x * chosen).sum(-1)
    return ((x - chosen) ** 2).sum(-1)


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_matches_reference_with_empty_clusters_and_counts(spherical):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 777, 128, generator=gen).abs()
    init = torch.randn(2, 2, 50, 128, generator=gen)
    # centroids far away in the opposite orthant stay empty (both geometries) and must keep their value
    init[..., 40:, :] = -init[..., 40:, :].abs() - 100.0
    counts = torch.tensor([[50, 33], [17, 50]])
    if spherical:
        x, init = reference.normalize_rows(x), reference.normalize_rows(init)
    x, init, counts = x.to(DEVICE), init.to(DEVICE), counts.to(DEVICE)
    got = triton_ops.kmeans(x, init, 2, spherical, counts)
    want = reference.kmeans(x, init, 2, spherical, counts)
    centroids, labels, sizes, fit = got
    assert bool((labels == want[1]).float().mean() > 0.999)
    torch.testing.assert_close(centroids, want[0], atol=1e-3, rtol=1e-3)
    assert torch.equal(sizes, torch.nn.functional.one_hot(labels, 50).sum(-2))
    assert bool((sizes[..., 40:] == 0).all())
    torch.testing.assert_close(centroids[..., 45, :], init[..., 45, :])
    torch.testing.assert_close(fit, want[3], atol=1e-3, rtol=1e-3)


def test_normalize_rows():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 333, 64, generator=gen).to(DEVICE, torch.bfloat16)
    x[0, 0, 0] = 0.0
    torch.testing.assert_close(triton_ops.normalize_rows(x), reference.normalize_rows(x))


@pytest.mark.parametrize("n_segments", [1, 7, 300])
def test_segments_from_labels_is_the_stable_sort(n_segments):
    gen = torch.Generator().manual_seed(4)
    labels = random_labels((2, 3), 1234, n_segments, gen, empty_every=5 if n_segments > 5 else 0).to(DEVICE)
    perm, offsets = triton_ops.segments_from_labels(labels, n_segments)
    want_perm, want_offsets = reference.segments_from_labels(labels.cpu(), n_segments)
    assert torch.equal(perm.cpu(), want_perm) and torch.equal(offsets.cpu(), want_offsets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cluster_minmax_and_quest_scores(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 999, 128, generator=gen).to(DEVICE, dtype)
    labels = random_labels((2, 3), 999, 301, gen, empty_every=7, tiny=True).to(DEVICE)
    high, low = triton_ops.cluster_minmax(x, labels, 301)
    want_high, want_low = reference.cluster_minmax(x, labels, 301)
    assert torch.equal(high, want_high) and torch.equal(low, want_low)
    r = reference.normalize_rows(torch.randn(2, 3, 65, 128, generator=gen)).to(DEVICE)
    scores = triton_ops.quest_scores(r, high, low)
    want = reference.quest_scores(r, high, low)
    assert torch.equal(torch.isinf(scores), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(scores[finite], want[finite], atol=1e-3, rtol=1e-4)


def test_segment_means():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 501, 64, generator=gen).to(DEVICE, torch.bfloat16)
    labels = random_labels((2, 3), 501, 41, gen, empty_every=3, tiny=True).to(DEVICE)
    means, sizes = triton_ops.segment_means(x, labels, 41)
    want_means, want_sizes = reference.segment_means(x, labels, 41)
    assert torch.equal(sizes, want_sizes)
    torch.testing.assert_close(means, want_means, atol=1e-5, rtol=1e-5)


def test_dispatch_uses_triton_on_cuda():
    x = torch.randn(1, 1, 64, 64, device=DEVICE)
    assert kernels.backend_name(x) == "triton"


# ----------------------------------------------------------------------------------------- attention
LAYOUT_CASES = {
    "clusters": dict(),
    "tiny-and-empty-clusters": dict(tiny=True, empty_every=4),
    "ragged-heads": dict(ragged_heads=True, empty_every=5),
    "local-block": dict(local_block=64),
    "tail": dict(tail=True, empty_every=6),
    "hybrid": dict(local_block=48, tail=True, tiny=True),
    "original-order-queries": dict(original_order_queries=True, local_block=32),
}


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_execute_layout_matches_reference(case, dtype, head_dim):
    gen = torch.Generator().manual_seed(sum(map(ord, case)) + head_dim)
    batch, heads, tokens = 2, 3, 1237
    layout = random_layout(batch, heads, tokens, sq=13, sk=57, density=0.2, generator=gen, **LAYOUT_CASES[case])
    q, k, v = qkv(batch, heads, tokens, head_dim, dtype, gen, spread=2.0)
    out, lse = triton_ops.execute_layout(q, k, v, layout, return_lse=True)
    want, want_lse = reference.execute_layout(q, k, v, layout, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_attention(out, want, dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=2e-2, rtol=1e-3)



@pytest.fixture
def key_path():
    """Forces one key path of the layout kernel for a test, restoring the automatic choice after it."""
    from comfyui_adacluster.kernels import triton_attention

    def force(path):
        triton_attention.KEY_PATH_OVERRIDE = path
    yield force
    triton_attention.KEY_PATH_OVERRIDE = None


# (tokens, query segments, key segments) and, at head dim 128, the tiles (BLOCK_M, BLOCK_N) they must take
KEY_PATH_SHAPES = {"long-clusters": (4099, 5, 7, (128, 128))}
SHORT_TILES = (64, 64, 4, 3)  # the tiling of original-order 64-token blocks, forced on clusters in "64-row-tiles"


@pytest.mark.parametrize("path", ["stream", "hybrid"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", ["clusters", "hybrid", "adjacent-runs", "long-clusters", "64-row-tiles"])
def test_every_key_path_matches_reference(key_path, path, case, dtype, head_dim, monkeypatch):
    """Both key paths; "adjacent-runs" selects runs of neighbouring key segments (merged ranges longer
    than a chunk, whole chunks plus remainders) and leaves one query segment with no keys;
    "long-clusters" has key segments long enough for 128-row key chunks, and "64-row-tiles" runs the clusters in
    the 64-row query tiles that original-order blocks take at head dim 128."""
    from comfyui_adacluster.kernels import triton_attention
    key_path(path)
    gen = torch.Generator().manual_seed(sum(map(ord, case + path)) + head_dim)
    tokens, sq, sk, tiles = KEY_PATH_SHAPES.get(case, (2011, 11, 29, (128, 64)))
    batch, heads = 1, 3
    if case == "64-row-tiles":
        monkeypatch.setitem(triton_attention.CONFIG_OVERRIDE, 128, SHORT_TILES)
        tiles = SHORT_TILES[:2]
    if head_dim == 128:  # every tiling of head dim 128 is covered
        assert triton_attention._config(head_dim, tokens / sq, tokens / sk, True)[:2] == tiles
    options = LAYOUT_CASES.get(case, dict(empty_every=7))
    layout = random_layout(batch, heads, tokens, sq=sq, sk=sk, density=0.2, generator=gen, **options)
    if case == "adjacent-runs":
        run_start = torch.randint(0, sk, (batch, heads, sq, 1), generator=gen)
        run_length = torch.randint(1, 12, (batch, heads, sq, 1), generator=gen)
        j = torch.arange(sk)
        layout.selected = ((j >= run_start) & (j < run_start + run_length)).to(DEVICE)
        layout.selected[:, :, 4] = False
    q, k, v = qkv(batch, heads, tokens, head_dim, dtype, gen, spread=2.0)
    out, lse = triton_ops.execute_layout(q, k, v, layout, return_lse=True)
    want, want_lse = reference.execute_layout(q, k, v, layout, return_lse=True)
    assert_close_attention(out, want, dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=2e-2, rtol=1e-3)


def test_table_kernels_match_the_oracle():
    """The device-built tile and key tables equal the PyTorch statement of them (tests/table_oracle.py)."""
    from table_oracle import assert_tables_match
    from comfyui_adacluster.kernels import triton_tables
    assert_tables_match(triton_tables.key_tables, triton_tables.tile_table, DEVICE, seed=100)


def test_hybrid_plan_covers_exactly_the_selected_keys():
    """Whole chunks plus remainder pieces of the merged ranges list every selected key row once."""
    from comfyui_adacluster.kernels import triton_tables
    gen = torch.Generator().manual_seed(21)
    layout = random_layout(1, 2, 3001, sq=6, sk=41, density=0.4, generator=gen, tiny=True, empty_every=5)
    groups, n, block = 2, 3001, 64
    selected = layout.selected.reshape(groups, 6, 41)
    k_off = layout.k_offsets.reshape(groups, 42)
    full_start, n_full, (cum, delta, bounds, bound_seg, n_chunks) = triton_tables.key_tables(
        selected, k_off, n, block, merge=True)
    for g in range(groups):
        for i in range(6):
            rows = [torch.arange(s, s + block) for s in full_start[g, i, : int(n_full[g, i])].tolist()]
            total = int(cum[g, i, -1])
            positions = torch.arange(total, device=DEVICE)
            piece = torch.searchsorted(cum[g, i, 1:].contiguous(), positions, right=True)
            rows.append((positions + delta[g, i].gather(0, piece)).cpu())
            got = torch.sort(torch.cat(rows)).values
            segment = torch.searchsorted(k_off[g, 1:].cpu(), torch.arange(n), right=True)
            want = torch.nonzero(selected[g, i].cpu()[segment]).flatten()
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_execute_layout_with_text_sink_and_mask(dtype):
    gen = torch.Generator().manual_seed(11)
    batch, heads, tokens, n_text, d = 2, 2, 611, 77, 64
    layout = random_layout(batch, heads, tokens, sq=9, sk=31, density=0.15, generator=gen, local_block=40, tail=True)
    q, k, v = qkv(batch, heads, tokens, d, dtype, gen)
    text_k, text_v, _ = qkv(batch, heads, n_text, d, dtype, gen)
    bias = torch.zeros(batch, 1, 1, n_text, device=DEVICE)
    bias[0, ..., 50:] = float("-inf")  # padded text tokens of the first batch element
    bias[1, ..., :5] = -2.0
    out = triton_ops.execute_layout(q, k, v, layout, text_k, text_v, bias)
    want = reference.execute_layout(q, k, v, layout, text_k, text_v, bias)
    assert_close_attention(out, want, dtype)
    bool_mask = torch.rand(batch, heads, tokens, n_text, generator=gen).to(DEVICE) > 0.3
    out = triton_ops.execute_layout(q, k, v, layout, text_k, text_v, bool_mask)
    want = reference.execute_layout(q, k, v, layout, text_k, text_v,
                                    torch.zeros(bool_mask.shape, device=DEVICE).masked_fill(~bool_mask, float("-inf")))
    assert_close_attention(out, want, dtype)


def test_selecting_everything_is_dense_attention():
    gen = torch.Generator().manual_seed(12)
    batch, heads, tokens, d = 1, 4, 2000, 128
    layout = random_layout(batch, heads, tokens, sq=21, sk=140, density=1.0, generator=gen, tiny=True)
    q, k, v = qkv(batch, heads, tokens, d, torch.bfloat16, gen)
    out = triton_ops.execute_layout(q, k, v, layout)
    dense = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert_close_attention(out, dense, torch.bfloat16)


def test_queries_without_keys_get_zero_output():
    gen = torch.Generator().manual_seed(13)
    layout = random_layout(1, 2, 300, sq=5, sk=11, density=0.5, generator=gen)
    layout.selected[:, :, 2] = False
    q, k, v = qkv(1, 2, 300, 64, torch.float16, gen)
    out, lse = triton_ops.execute_layout(q, k, v, layout, return_lse=True)
    want, want_lse = reference.execute_layout(q, k, v, layout, return_lse=True)
    assert_close_attention(out, want, torch.float16)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)) and bool(torch.isinf(lse).any())


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(14)
    batch, heads, tokens, d = 2, 3, 517, 64
    layout = random_layout(batch, heads, tokens, sq=7, sk=23, density=0.3, generator=gen, local_block=64, tail=True)
    # (B, N, H, d) storage seen as (B, H, N, d), as attention callers usually hold it
    q, k, v = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(batch, heads, tokens, d, torch.bfloat16, gen)]
    assert not q.is_contiguous()
    out = triton_ops.execute_layout(q, k, v, layout)
    assert_close_attention(out, reference.execute_layout(q, k, v, layout), torch.bfloat16)


def test_execute_layout_captures_in_cuda_graph_and_compiles():
    gen = torch.Generator().manual_seed(15)
    batch, heads, tokens, d = 1, 2, 1000, 64
    layout = random_layout(batch, heads, tokens, sq=8, sk=40, density=0.25, generator=gen, local_block=64, tail=True)
    q, k, v = qkv(batch, heads, tokens, d, torch.bfloat16, gen)
    want = reference.execute_layout(q, k, v, layout)
    triton_ops.execute_layout(q, k, v, layout)  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_ops.execute_layout(q, k, v, layout)
    q.copy_(q.flip(-2))  # new inputs in place, then replay
    want = reference.execute_layout(q, k, v, layout)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_attention(captured, want, torch.bfloat16)

    def block(x, kk, vv):
        return triton_ops.execute_layout(x * 1.5, kk, vv, layout) + x

    compiled = torch.compile(block, fullgraph=True)
    assert_close_attention(compiled(q, k, v), reference.execute_layout(q * 1.5, k, v, layout).float() + q.float(),
                           torch.bfloat16)


def test_unsupported_inputs_fall_back_to_the_reference():
    gen = torch.Generator().manual_seed(16)
    layout = random_layout(1, 1, 200, sq=3, sk=9, density=0.5, generator=gen)
    q, k, v = qkv(1, 1, 200, 48, torch.float32, gen)
    torch.testing.assert_close(triton_ops.execute_layout(q, k, v, layout), reference.execute_layout(q, k, v, layout))


@pytest.mark.parametrize("spherical", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kmeans_step_statistics_follow_its_labels(spherical, dtype):
    gen = torch.Generator().manual_seed(17)
    x = (torch.randn(2, 3, 1501, 128, generator=gen) * (0.5 + torch.rand(2, 3, 1501, 1, generator=gen) * 3))
    init = torch.randn(2, 3, 61, 128, generator=gen)
    init[..., 50:, :] = -1000.0  # far away: these clusters stay empty and keep init
    counts = torch.tensor([[61, 40, 7], [1, 61, 33]])
    if spherical:
        init = reference.normalize_rows(init)
    x, init, counts = x.to(DEVICE, dtype), init.to(DEVICE), counts.to(DEVICE)
    step = triton_ops.kmeans_step(x, init, spherical, counts, minmax=True, spread=True, row_squares=True)
    want = reference.kmeans_step(x, init, spherical, counts, minmax=True)
    agree = (step.labels == want.labels).float().mean().item()
    assert agree > (0.999 if dtype == torch.float32 else 0.95), f"label agreement {agree:.4f}"
    assert bool((step.labels < counts.unsqueeze(-1)).all())
    # everything else is a function of the labels: compare with the reference on the same labels
    xf = x.float()
    unit = reference.normalize_rows(xf) if spherical else xf
    centroids, sizes = reference.kmeans_update(unit, step.labels, init, spherical)
    perm, offsets = reference.segments_from_labels(step.labels, 61)
    assert torch.equal(step.sizes, sizes) and torch.equal(step.perm, perm) and torch.equal(step.offsets, offsets)
    torch.testing.assert_close(step.centroids, centroids, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step.centroids[..., 55, :], init[..., 55, :])
    torch.testing.assert_close(step.mean, reference.segment_means(xf, step.labels, 61)[0], atol=1e-4, rtol=1e-4)
    norms = torch.zeros(2, 3, 61, device=DEVICE).scatter_add_(-1, step.labels, xf.norm(dim=-1))
    torch.testing.assert_close(step.mean_norm, norms / sizes.clamp_min(1), atol=1e-4, rtol=1e-4)
    high, low = reference.cluster_minmax(xf, step.labels, 61)
    assert torch.equal(step.high, high) and torch.equal(step.low, low)
    # the pooled tail's inputs (empty clusters: spread 0)
    spread = reference.segment_spread(xf, step.labels, 61)
    torch.testing.assert_close(step.spread, spread, atol=1e-3, rtol=1e-4)
    assert bool((step.spread[sizes == 0] == 0).all())
    torch.testing.assert_close(step.row_squares, xf.square().sum(-1), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_tail_takes_its_inputs_from_the_layout(dtype, head_dim):
    """A layout that carries the pooled tail's inputs (the clustering's statistics) runs as one without them."""
    gen = torch.Generator().manual_seed(head_dim + 5)
    batch, heads, tokens, sk = 2, 3, 1237, 57
    layout = random_layout(batch, heads, tokens, sq=13, sk=sk, density=0.2, generator=gen, local_block=64, tail=True)
    q, k, v = qkv(batch, heads, tokens, head_dim, dtype, gen, spread=2.0)
    want = triton_ops.execute_layout(q, k, v, layout)
    k_labels = reference.segment_labels(layout.k_perm, layout.k_offsets, tokens)
    layout.tail_key_means = reference.segment_means(k.float(), k_labels, sk)[0]
    layout.tail_key_spread = reference.segment_spread(k.float(), k_labels, sk)
    layout.query_squares = q.float().square().sum(-1)
    layout.validate(batch, heads, tokens)
    assert_close_attention(triton_ops.execute_layout(q, k, v, layout), want, dtype)
    assert_close_attention(reference.execute_layout(q, k, v, layout), want, dtype)
