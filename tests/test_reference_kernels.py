"""The reference executor and clustering ops against brute force on fresh random inputs."""
import math

import pytest
import torch

from comfyui_adacluster.adacluster_core.layout import Layout, block_offsets
from comfyui_adacluster.kernels import reference as R


def random_layout(batch, heads, n, n_q, n_k, density, local_block=0, tail=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_labels = torch.randint(0, n_q, (batch, heads, n), generator=gen)
    k_labels = torch.randint(0, n_k, (batch, heads, n), generator=gen)
    q_perm, q_off = R.segments_from_labels(q_labels, n_q)
    k_perm, k_off = R.segments_from_labels(k_labels, n_k)
    selected = torch.rand(batch, heads, n_q, n_k, generator=gen) < density
    layout = Layout(q_off, k_off, selected, q_perm, k_perm, local_block=local_block, tail=tail)
    layout.validate(batch, heads, n)
    return layout, q_labels, k_labels


def allowed_pairs(layout, q_labels, k_labels):
    """(B, H, N, N) bool: which keys every query may attend, built the slow obvious way."""
    n = q_labels.shape[-1]
    sel = layout.selected
    per_query = sel.gather(-2, q_labels.unsqueeze(-1).expand(*q_labels.shape, sel.shape[-1]))
    allowed = per_query.gather(-1, k_labels.unsqueeze(-2).expand(*q_labels.shape, n))
    if layout.local_block:
        block = torch.arange(n) // layout.local_block
        allowed = allowed | (block[:, None] == block[None, :])
    return allowed


@pytest.mark.parametrize("batch,heads,n,d", [(2, 3, 301, 32), (1, 2, 97, 64), (2, 1, 130, 16)])
def test_every_segment_selected_equals_dense(batch, heads, n, d):
    torch.manual_seed(n)
    q, k, v = (torch.randn(batch, heads, n, d) for _ in range(3))
    layout, _, _ = random_layout(batch, heads, n, 7, 11, density=1.1, local_block=16, tail=True, seed=n)
    expected, _ = R.dense_attention(q, k, v)
    torch.testing.assert_close(R.execute_layout(q, k, v, layout), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("local_block", [0, 16, 50])
def test_random_selection_matches_masked_attention(local_block):
    torch.manual_seed(1)
    batch, heads, n, d = 2, 2, 211, 32
    q, k, v = (torch.randn(batch, heads, n, d) for _ in range(3))
    layout, q_labels, k_labels = random_layout(batch, heads, n, 5, 9, density=0.35, local_block=local_block)
    expected, _ = R.partial_attention(q, k, v, key_mask=allowed_pairs(layout, q_labels, k_labels))
    torch.testing.assert_close(R.execute_layout(q, k, v, layout), expected, atol=2e-6, rtol=1e-5)


def test_text_sink_and_mask_join_the_softmax():
    torch.manual_seed(2)
    batch, heads, n, n_text, d = 2, 2, 157, 13, 32
    q, k, v = (torch.randn(batch, heads, n, d) for _ in range(3))
    text_k, text_v = torch.randn(batch, heads, n_text, d), torch.randn(batch, heads, n_text, d)
    bias = torch.zeros(batch, 1, 1, n_text)
    bias[0, ..., 9:] = float("-inf")  # padded text tokens of the first batch element
    bias[1, ..., 3] = -2.5
    layout, q_labels, k_labels = random_layout(batch, heads, n, 6, 8, density=0.4, local_block=32)
    mask = torch.where(allowed_pairs(layout, q_labels, k_labels), 0.0, float("-inf"))
    full_bias = torch.cat([mask, bias.expand(batch, heads, n, n_text)], dim=-1)
    expected, _ = R.partial_attention(q, torch.cat([k, text_k], 2), torch.cat([v, text_v], 2), bias=full_bias)
    got = R.execute_layout(q, k, v, layout, text_k=text_k, text_v=text_v, text_bias=bias)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("spread_weight", [None, (0.0, 1.0)])
def test_pooled_tail_adds_skipped_clusters_as_size_weighted_means_with_their_spread(spread_weight):
    """Each skipped cluster as one pseudo-key; its spread term on every head (no weights) or per head (weight 0:
    by size only)."""
    torch.manual_seed(3)
    batch, heads, n, d = 1, 2, 120, 16
    q, k, v = (torch.randn(batch, heads, n, d) for _ in range(3))
    layout, q_labels, k_labels = random_layout(batch, heads, n, 4, 6, density=0.5, tail=True)
    head_weight = (1.0, 1.0) if spread_weight is None else spread_weight
    if spread_weight is not None:
        layout.tail_spread_weight = torch.tensor([spread_weight])
    scale = 1 / math.sqrt(d)
    out = R.execute_layout(q, k, v, layout)
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                logits, values = [], []
                for j in range(6):
                    members = (k_labels[b, h] == j).nonzero().flatten()
                    if members.numel() == 0:
                        continue
                    if layout.selected[b, h, q_labels[b, h, i], j]:
                        logits.append(k[b, h, members] @ q[b, h, i] * scale)
                        values.append(v[b, h, members])
                    else:  # one pseudo-key: mean key, mean value, log(size) + second-order spread term
                        keys = k[b, h, members]
                        spread = (keys - keys.mean(0)).square().sum(1).mean() / d
                        weight = (math.log(members.numel())
                                  + head_weight[h] * 0.5 * scale ** 2 * q[b, h, i].square().sum() * spread)
                        logits.append((keys.mean(0) @ q[b, h, i] * scale + weight)[None])
                        values.append(v[b, h, members].mean(0, keepdim=True))
                weights = torch.softmax(torch.cat(logits), 0)
                torch.testing.assert_close(out[b, h, i], weights @ torch.cat(values), atol=2e-6, rtol=1e-5)


def test_the_tail_reads_its_inputs_from_the_layout_where_it_carries_them():
    """The layout's mean keys, spreads and |q|^2 (the clustering's statistics) give what the executor computes;
    different ones change the output, so they are read."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 90, 16, generator=gen) for _ in range(3))
    layout, _, k_labels = random_layout(1, 2, 90, 4, 6, density=0.4, tail=True, seed=2)
    want = R.execute_layout(q, k, v, layout)
    layout.tail_key_means = R.segment_means(k, k_labels, 6)[0]
    layout.tail_key_spread = R.segment_spread(k, k_labels, 6)
    layout.query_squares = q.square().sum(-1)
    torch.testing.assert_close(R.execute_layout(q, k, v, layout), want, atol=1e-6, rtol=1e-5)
    layout.query_squares = 4 * layout.query_squares
    assert not torch.allclose(R.execute_layout(q, k, v, layout), want, atol=1e-4)


def test_the_spread_term_brings_the_tail_closer_to_the_skipped_keys():
    """For keys spread around their segment means, the second-order weight estimates the skipped segments'
    attention better than their size alone (it is exact for a Gaussian spread)."""
    torch.manual_seed(5)
    batch, heads, n, d, segments = 1, 2, 512, 32, 8
    centres = torch.randn(batch, heads, segments, d)
    labels = torch.arange(n).remainder(segments).expand(batch, heads, n)
    k = centres.gather(-2, labels.unsqueeze(-1).expand(batch, heads, n, d)) + 0.7 * torch.randn(batch, heads, n, d)
    q, v = torch.randn(batch, heads, n, d) * 1.5, torch.randn(batch, heads, n, d)
    means, sizes = R.segment_means(k, labels, segments)
    log_size = torch.log(sizes.float())
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (B, H, N, N)
    per_segment = torch.stack([torch.logsumexp(logits[..., labels[0, 0] == j], -1) for j in range(segments)], -1)
    centre_logits = (q @ means.transpose(-1, -2)) / math.sqrt(d)
    size_only = centre_logits + log_size.unsqueeze(-2)
    second_order = centre_logits + R.tail_log_weights(q.square().sum(-1), log_size,
                                                      R.segment_spread(k, labels, segments), 1 / math.sqrt(d))
    assert (second_order - per_segment).abs().mean() < 0.25 * (size_only - per_segment).abs().mean()
    assert bool((size_only <= per_segment + 1e-4).all())  # Jensen: the size alone never overcounts


def test_segment_spread_is_the_mean_channel_variance():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 50, 8) * 3 + 1
    labels = torch.randint(0, 5, (2, 3, 50))
    labels[0, 0] = 0  # every row in one segment: the others are empty
    spread = R.segment_spread(x, labels, 5)
    for b in range(2):
        for h in range(3):
            for j in range(5):
                rows = x[b, h, labels[b, h] == j]
                want = rows.var(0, unbiased=False).mean() if rows.shape[0] else torch.tensor(0.0)
                torch.testing.assert_close(spread[b, h, j], want, atol=1e-5, rtol=1e-4)


def test_block_layout_in_original_order():
    torch.manual_seed(4)
    batch, heads, n, d, block = 1, 3, 200, 16, 64
    q, k, v = (torch.randn(batch, heads, n, d) for _ in range(3))
    offsets = block_offsets(batch, heads, n, block)
    n_blocks = offsets.shape[-1] - 1
    selected = torch.eye(n_blocks, dtype=torch.bool).expand(batch, heads, -1, -1).clone()
    selected[..., -1, 0] = True
    layout = Layout(offsets, offsets, selected)
    blocks = torch.arange(n) // block
    allowed = blocks[:, None] == blocks[None, :]
    allowed[blocks == n_blocks - 1, :block] = True
    expected, _ = R.partial_attention(q, k, v, key_mask=allowed)
    torch.testing.assert_close(R.execute_layout(q, k, v, layout), expected, atol=2e-6, rtol=1e-5)


def test_layout_validate_names_the_bad_field():
    layout, _, _ = random_layout(1, 2, 50, 3, 4, density=0.5)
    with pytest.raises(ValueError, match="selected"):
        Layout(layout.q_offsets, layout.k_offsets, layout.selected[..., :2], layout.q_perm, layout.k_perm).validate(1, 2, 50)
    with pytest.raises(ValueError, match="q_perm"):
        layout.validate(1, 2, 51)
    with pytest.raises(ValueError, match="k_offsets"):
        Layout(layout.q_offsets, layout.k_offsets - 1, layout.selected, layout.q_perm, layout.k_perm).validate(1, 2, 50)


def test_kmeans_assign_matches_brute_force_and_respects_per_head_counts():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 333, 8)
    centroids = torch.randn(2, 3, 17, 8)
    counts = torch.tensor([[17, 5, 1], [9, 17, 2]])
    labels, dist = R.kmeans_assign(x, centroids, spherical=False, num_clusters=counts)
    full = torch.cdist(x, centroids) ** 2
    slot = torch.arange(17)
    full = full.masked_fill(slot >= counts[..., None, None], float("inf"))
    torch.testing.assert_close(labels, full.argmin(-1))
    torch.testing.assert_close(dist, full.min(-1).values, atol=1e-4, rtol=1e-4)
    assert bool((labels < counts.unsqueeze(-1)).all())


def test_kmeans_update_keeps_empty_clusters_and_normalises_spherical():
    x = R.normalize_rows(torch.randn(1, 1, 40, 4))
    labels = torch.zeros(1, 1, 40, dtype=torch.int64)
    labels[..., 20:] = 2  # cluster 1 stays empty
    previous = torch.randn(1, 1, 3, 4)
    centroids, sizes = R.kmeans_update(x, labels, previous, spherical=True)
    assert sizes.tolist() == [[[20, 0, 20]]]
    torch.testing.assert_close(centroids[..., 1, :], previous[..., 1, :])
    torch.testing.assert_close(centroids[..., 0, :].norm(dim=-1), torch.ones(1, 1))


def test_quest_scores_equal_brute_force_bound_and_bound_every_key():
    torch.manual_seed(6)
    k = torch.randn(2, 2, 300, 16) * torch.rand(2, 2, 300, 1) * 3
    labels = torch.randint(0, 10, (2, 2, 300))
    labels[..., labels[0, 0] == 7] = 3  # cluster 7 becomes empty
    r = torch.randn(2, 2, 5, 16)
    high, low = R.cluster_minmax(k, labels, 10)
    scores = R.quest_scores(r, high, low)
    for b in range(2):
        for h in range(2):
            for j in range(10):
                members = k[b, h, labels[b, h] == j]
                if members.numel() == 0:
                    assert bool(torch.isinf(scores[b, h, :, j]).all())
                    continue
                brute = torch.maximum(r[b, h, :, None, :] * members.max(0).values,
                                      r[b, h, :, None, :] * members.min(0).values).sum(-1).squeeze(-1)
                torch.testing.assert_close(scores[b, h, :, j], brute, atol=1e-4, rtol=1e-5)
                assert bool(((r[b, h] @ members.T) <= scores[b, h, :, j, None] + 1e-4).all())


def test_segments_from_labels_is_a_stable_sort():
    labels = torch.tensor([[[2, 0, 2, 1, 0, 2]]])
    perm, offsets = R.segments_from_labels(labels, 4)
    assert perm.tolist() == [[[1, 4, 3, 0, 2, 5]]]
    assert offsets.tolist() == [[[0, 2, 3, 6, 6]]]
    assert R.segment_labels(perm, offsets, 6).tolist() == labels.tolist()


def test_kmeans_step_centroids_are_the_means_of_its_labels():
    torch.manual_seed(8)
    x = torch.randn(1, 2, 400, 8) * (0.3 + 3 * torch.rand(1, 2, 400, 1))
    init = R.normalize_rows(torch.randn(1, 2, 9, 8))
    step = R.kmeans_step(x, init, spherical=True, minmax=True)
    # labels are the assignment to init (row length does not matter for the cosine)
    labels, _ = R.kmeans_assign(R.normalize_rows(x), init, spherical=True)
    assert torch.equal(step.labels, labels)
    for j in range(9):
        members = x[0, 0, labels[0, 0] == j]
        if members.numel() == 0:
            torch.testing.assert_close(step.centroids[0, 0, j], init[0, 0, j])
            continue
        direction = R.normalize_rows(members).mean(0)
        torch.testing.assert_close(step.centroids[0, 0, j], direction / direction.norm())
        torch.testing.assert_close(step.mean[0, 0, j], members.mean(0))
        torch.testing.assert_close(step.mean_norm[0, 0, j], members.norm(dim=-1).mean())
        torch.testing.assert_close(step.high[0, 0, j], members.max(0).values)
    perm, offsets = R.segments_from_labels(labels, 9)
    assert torch.equal(step.perm, perm) and torch.equal(step.offsets, offsets)
