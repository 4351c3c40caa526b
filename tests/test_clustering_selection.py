"""Clustering and selection: the invariants the README describes."""
import torch

from comfyui_adacluster.adacluster_core import clustering, selection
from comfyui_adacluster.adacluster_core.config import SELECTION_RECIPES
from comfyui_adacluster.kernels import reference as R
from qkv_data import structured_qkv


def test_query_normalisation_does_not_change_the_selection():
    q, k, _ = structured_qkv(batch=1, heads=2, n=900, d=16, seed=1)
    scaled = q * (0.2 + 5 * torch.rand(*q.shape[:-1], 1))  # every query gets its own positive length
    gen = clustering.generator_for(0, 0)
    init = clustering.sample_rows(R.normalize_rows(q), 9, gen)
    qc = clustering.cluster_queries(q, 9, 3, init=init)
    qc_scaled = clustering.cluster_queries(scaled, 9, 3, init=init)
    assert torch.equal(qc.labels, qc_scaled.labels)
    kc = clustering.calibrate_keys(k, 20, 1.5, True, 10, 1 / 3, 3, clustering.generator_for(0, 1)).clusters
    paper = SELECTION_RECIPES["paper"]
    config = type(paper)(**{**paper.__dict__, "top_k": 6})
    a = selection.build_layout(q, k, qc, kc, config)
    b = selection.build_layout(scaled, k, qc_scaled, kc, config)
    assert torch.equal(a.selected, b.selected)
    rank_a, _ = selection.cluster_logits(q, k, qc, kc, "quest", 0.5, 0.25)
    rank_b, _ = selection.cluster_logits(scaled, k, qc_scaled, kc, "quest", 0.5, 0.25)
    assert torch.equal(rank_a.argsort(-1), rank_b.argsort(-1))


def test_every_key_within_threshold_or_head_flagged():
    for seed, alpha in [(2, 1.5), (3, 1.0), (4, 0.6)]:
        _, k, _ = structured_qkv(batch=1, heads=3, n=1200, d=16, seed=seed)
        k[..., :40, :] *= 6  # a few far outliers
        calib = clustering.calibrate_keys(k, 16, alpha, True, 10, 1 / 3, 3, clustering.generator_for(seed, 0))
        c = calib.clusters
        assigned = c.centroids.gather(2, c.labels.unsqueeze(-1).expand(*c.labels.shape, k.shape[-1]))
        distance = (k - assigned).norm(dim=-1)
        within = (distance <= calib.threshold.unsqueeze(-1) * (1 + 1e-4)).all(-1)
        assert bool((within | calib.hard).all())
        assert bool((c.sizes.sum(-1) == 1200).all())
        used = (c.sizes > 0).sum(-1)
        assert torch.equal(used, c.counts)  # empty clusters were compacted away


def test_adaptive_count_grows_for_looser_keys():
    def keys(noise, seed):
        gen = torch.Generator().manual_seed(seed)
        centres = torch.randn(8, 16, generator=gen) * 2
        labels = torch.randint(0, 8, (1500,), generator=gen)
        return (centres[labels] + noise * torch.randn(1500, 16, generator=gen))[None, None]

    args = (16, 2.5, False, 10, 1 / 3, 3)  # absolute threshold: the same distance budget for every layer
    tight = clustering.calibrate_keys(keys(0.4, 5), *args, clustering.generator_for(0, 0))
    loose = clustering.calibrate_keys(keys(0.6, 5), *args, clustering.generator_for(0, 0))
    assert not bool(tight.hard.any()) and tight.clusters.counts.item() <= 24
    assert loose.clusters.counts.item() > 3 * tight.clusters.counts.item()
    hopeless = clustering.calibrate_keys(keys(3.0, 5), *args, clustering.generator_for(0, 0))
    assert bool(hopeless.hard.all())  # almost no key fits the budget: flagged, the layer will run dense


def test_absolute_threshold_and_hard_cap():
    _, k, _ = structured_qkv(batch=1, heads=2, n=600, d=16, seed=6)
    calib = clustering.calibrate_keys(k, 10, 0.05, False, 3, 0.05, 2, clustering.generator_for(0, 0))
    torch.testing.assert_close(calib.threshold, torch.full((1, 2), 0.05))
    assert bool(calib.hard.all())  # a tiny absolute threshold cannot be met within 3 stages


def test_topk_and_mass_counts_and_min_fraction_guard():
    rank = torch.tensor([[[[3.0, 1.0, 2.0, 0.0, float("-inf")]]]])
    sizes = torch.tensor([[[10, 10, 10, 70, 0]]])
    base = SELECTION_RECIPES["paper"]
    topk = type(base)(**{**base.__dict__, "top_k": 2, "min_kept_fraction": 0.0})
    assert selection.choose_clusters(rank, rank, sizes, 100, topk).tolist() == [[[[True, False, True, False, False]]]]
    # Top-1 keeps 10 of 100 tokens; the guard adds clusters in score order until 25 tokens are kept.
    guarded = type(base)(**{**base.__dict__, "top_k": 1, "min_kept_fraction": 0.25})
    assert selection.choose_clusters(rank, rank, sizes, 100, guarded).tolist() == [[[[True, True, True, False, False]]]]
    log_mass = torch.log(torch.tensor([[[[0.5, 0.1, 0.3, 0.1, 0.0]]]]))
    mass = type(base)(**{**base.__dict__, "count": "mass", "top_p": 0.75, "min_kept_fraction": 0.0})
    assert selection.choose_clusters(log_mass, log_mass, sizes, 100, mass).tolist() == [[[[True, False, True, False, False]]]]


def test_own_clusters_and_kept_fraction_with_local_blocks():
    q, k, _ = structured_qkv(batch=1, heads=2, n=700, d=16, seed=7)
    qc = clustering.cluster_queries(q, 6, 2, generator=clustering.generator_for(0, 0))
    kc = clustering.calibrate_keys(k, 12, 1.5, True, 10, 1 / 3, 2, clustering.generator_for(0, 1)).clusters
    config = SELECTION_RECIPES["hybrid"]
    layout = selection.build_layout(q, k, qc, kc, config)
    own = selection.own_clusters(qc, kc)
    assert bool((layout.selected | ~own).all())
    kept = selection.kept_fraction(layout, qc.labels, kc.labels)
    # brute force: count attended pairs
    n = 700
    per_query = layout.selected.gather(-2, qc.labels.unsqueeze(-1).expand(1, 2, n, layout.num_key_segments))
    allowed = per_query.gather(-1, kc.labels.unsqueeze(-2).expand(1, 2, n, n))
    block = torch.arange(n) // config.local_block
    allowed = allowed | (block[:, None] == block[None, :])
    torch.testing.assert_close(kept, allowed.double().mean((-1, -2)), atol=1e-7, rtol=1e-6)
    # plan_layout: the same layout with the clusters' labels, which are the segments of perm and offsets
    planned, planned_kept = selection.plan_layout(q, k, qc, kc, config)
    assert torch.equal(planned.selected, layout.selected)
    assert torch.equal(planned.q_labels, R.segment_labels(planned.q_perm, planned.q_offsets, n))
    assert torch.equal(planned.k_labels, R.segment_labels(planned.k_perm, planned.k_offsets, n))
    planned.validate(1, 2, n)
    torch.testing.assert_close(planned_kept, kept)


def test_the_planned_layout_carries_the_pooled_tails_inputs():
    """A sparse step's layout takes the tail's inputs from the clustering's statistics pass: the key segments'
    means and spreads and every query's |q|^2, as the executor would compute them; without the tail, none."""
    q, k, _ = structured_qkv(batch=1, heads=2, n=301, d=16, seed=9)
    gen = torch.Generator().manual_seed(3)
    q_init = R.normalize_rows(torch.randn(1, 2, 7, 16, generator=gen))
    k_init = k[..., torch.randperm(301, generator=gen)[:11], :].float()
    qc = clustering.warm_step(q, q_init, 1, True, row_squares=True)
    kc = clustering.warm_step(k, k_init, 1, False, spread=True)
    layout, _ = selection.plan_layout(q, k, qc, kc, SELECTION_RECIPES["hybrid"])
    layout.validate(1, 2, 301)
    k_labels = R.segment_labels(layout.k_perm, layout.k_offsets, 301)
    torch.testing.assert_close(layout.tail_key_means, R.segment_means(k.float(), k_labels, 11)[0])
    torch.testing.assert_close(layout.tail_key_spread, R.segment_spread(k, k_labels, 11))
    torch.testing.assert_close(layout.query_squares, q.float().square().sum(-1))
    untailed, _ = selection.plan_layout(q, k, qc, kc, SELECTION_RECIPES["svg2"])
    assert untailed.tail_key_means is None and untailed.tail_key_spread is None and untailed.query_squares is None


def test_calibration_in_head_chunks_matches_one_pass(monkeypatch):
    """Calibration takes the heads a few at a time (bounded fp32 copies); with one generator per head the
    clusters are exactly those of one pass over every head, odd head counts included."""
    q, k, _ = structured_qkv(batch=1, heads=5, n=700, d=16, seed=21)
    k[..., :25, :] *= 5  # outliers, so the key clustering takes more than one stage

    def run():
        gens = clustering.head_generators(3, 2, range(5))
        qc = clustering.cluster_queries(q, 7, 3, generator=gens)
        calib = clustering.calibrate_keys(k, 12, 1.2, True, 10, 1 / 3, 3, clustering.head_generators(3, 2, range(5)))
        return qc, calib

    monkeypatch.setattr(clustering, "CALIBRATION_CHUNK_BYTES", 1 << 40)
    assert len(clustering.head_chunks(k)) == 1
    qc_one, calib_one = run()
    monkeypatch.setattr(clustering, "CALIBRATION_CHUNK_BYTES", 2 * 700 * 16 * 4)  # two heads per chunk
    assert [(s.start, s.stop) for s in clustering.head_chunks(k)] == [(0, 2), (2, 4), (4, 5)]
    qc_chunked, calib_chunked = run()
    assert torch.equal(qc_one.labels, qc_chunked.labels) and torch.allclose(qc_one.centroids, qc_chunked.centroids)
    one, chunked = calib_one.clusters, calib_chunked.clusters
    assert torch.equal(one.counts, chunked.counts) and torch.equal(one.labels, chunked.labels)
    assert torch.allclose(one.centroids, chunked.centroids) and torch.equal(calib_one.hard, calib_chunked.hard)
    assert torch.allclose(calib_one.threshold, calib_chunked.threshold)
    assert int(one.counts.max()) > 12  # the outliers did get clusters of their own


def test_squared_norms_per_head_leave_the_input_alone(monkeypatch):
    from comfyui_adacluster.adacluster_core.methods.adacluster import squared_norms

    monkeypatch.setattr(clustering, "CALIBRATION_CHUNK_BYTES", 1)  # one head per chunk
    x, ref = torch.randn(2, 3, 37, 8), torch.randn(2, 3, 37, 8)
    before = x.clone()
    assert torch.allclose(squared_norms(x), x.pow(2).sum((-1, -2)))
    assert torch.allclose(squared_norms(x.bfloat16(), ref), (x.bfloat16().float() - ref).pow(2).sum((-1, -2)))
    assert torch.equal(x, before)
