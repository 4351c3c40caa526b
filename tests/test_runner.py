"""The sparse attention runner end to end: exactness, warm starts, branches, cache lifecycle, profiles."""
import pytest
import torch

from comfyui_adacluster import kernels
from comfyui_adacluster.adacluster_core import clustering
from comfyui_adacluster.adacluster_core.attention import CallInfo, SparseAttention
from comfyui_adacluster.adacluster_core.cache import RunCache
from comfyui_adacluster.adacluster_core.config import ConfigError, from_dict
from comfyui_adacluster.adacluster_core.profiles import load_profile, save_profile
from comfyui_adacluster.kernels import reference as R
from qkv_data import structured_qkv

SMALL = dict(warmup_steps=1, min_tokens=64, initial_key_clusters=12, query_clusters=5, max_stages=4)


def dense_reference(q, k, v, mask=None):
    return R.dense_attention(q, k, v, bias=mask)[0]


def run_steps(runner, q, k, v, steps, layers=1, text_len=0, text_first=False, mask=None, branches=(1, 0)):
    outputs = []
    for step in range(steps):
        for layer in range(layers):
            call = CallInfo(layer, step, steps, branches, text_len=text_len, text_first=text_first, mask=mask)
            outputs.append(runner(q, k, v, call, dense=lambda: dense_reference(q, k, v, mask)))
    return outputs


@pytest.mark.parametrize("recipe,text_len,text_first", [
    ("paper", 0, False), ("paper", 17, False), ("paper", 17, True), ("hybrid", 0, False), ("hybrid", 23, True),
    ("svg2", 11, False)])
def test_selecting_every_cluster_reproduces_dense(recipe, text_len, text_first):
    q, k, v = structured_qkv(batch=2, heads=3, n=601 + text_len, d=16, seed=text_len)
    mask = None
    if text_len:  # additive mask on padded text tokens, different per batch element
        mask = torch.zeros(2, 1, 1, q.shape[-2])
        text = slice(0, text_len) if text_first else slice(q.shape[-2] - text_len, q.shape[-2])
        mask[0, ..., text] = torch.where(torch.arange(text_len) >= text_len - 4, float("-inf"), 0.0)
        mask[1, ..., text] = -0.7
    everything = {"selection.min_kept_fraction": 1.0} if recipe != "paper" else {"selection.top_k": 48}
    config = from_dict({**SMALL, "recipe": recipe, "method": "svg2" if recipe == "svg2" else "adacluster",
                        **everything})
    cache = RunCache()
    cache.start_run(3)
    runner = SparseAttention(config, cache)
    outputs = run_steps(runner, q, k, v, 3, text_len=text_len, text_first=text_first, mask=mask)
    expected = dense_reference(q, k, v, mask)
    assert all(r.sparse for r in cache.records[1:])
    for out in outputs[1:]:
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_sparse_output_is_close_but_not_dense_at_low_density():
    q, k, v = structured_qkv(batch=1, heads=2, n=1500, d=32, seed=3)
    cache = RunCache()
    cache.start_run(3)
    runner = SparseAttention(from_dict(SMALL), cache)
    out = run_steps(runner, q, k, v, 3, branches=(0,))[-1]
    expected = dense_reference(q, k, v)
    error = ((out - expected).norm() / expected.norm()).item()
    kept = cache.report().layers[0].kept_fraction
    assert 0 < kept < 0.9
    assert 0 < error < 0.25


def test_warm_started_steps_use_cached_centroids_per_branch(monkeypatch):
    q, k, v = structured_qkv(batch=2, heads=2, n=800, d=16, seed=4)
    cache = RunCache()
    cache.start_run(4)
    runner = SparseAttention(from_dict(SMALL), cache)
    run_steps(runner, q, k, v, 1, branches=("uncond", "cond"))  # calibration step
    uncond, cond = cache.state(0, "uncond"), cache.state(0, "cond")
    assert uncond is not cond and not torch.equal(uncond.k_centroids, cond.k_centroids)
    cached = {name: (s.q_centroids.clone(), s.k_centroids.clone()) for name, s in (("uncond", uncond), ("cond", cond))}

    seen = []
    real_step = kernels.kmeans_step

    def spy(x, init, spherical, num_clusters=None, minmax=False, spread=False, row_squares=False):
        seen.append((init.clone(), spherical, spread, row_squares))
        return real_step(x, init, spherical, num_clusters, minmax, spread, row_squares)

    monkeypatch.setattr(kernels, "kmeans_step", spy)  # one Lloyd round: assign to init, then update
    monkeypatch.setattr(kernels, "kmeans", lambda *a, **k: pytest.fail("one iteration needs no extra k-means rounds"))
    monkeypatch.setattr(clustering, "calibrate_keys", lambda *a, **k: pytest.fail("sparse steps must not recalibrate"))
    runner(q, k, v, CallInfo(0, 1, 4, ("uncond", "cond")), dense=lambda: dense_reference(q, k, v))
    assert len(seen) == 2  # queries, then keys, each for both branches at once
    for (init, spherical, spread, row_squares), which in zip(seen, (0, 1)):
        assert spherical == (which == 0)
        # the pooled tail's inputs from the same pass: |q|^2 of the queries, the key clusters' spreads
        assert (row_squares, spread) == ((True, False) if which == 0 else (False, True))
        for b, name in enumerate(("uncond", "cond")):  # batch slot b starts from its own branch's centroids
            cached_centroids = cached[name][which]
            torch.testing.assert_close(init[b, :, :cached_centroids.shape[-2]].float(), cached_centroids.float())
    # the state moved on, per branch
    assert not torch.equal(cache.state(0, "cond").k_centroids, cached["cond"][1])


def test_policy_reasons():
    cache = RunCache()
    cache.start_run(10)
    runner = SparseAttention(from_dict({**SMALL, "warmup_steps": 3, "min_tokens": 100}), cache)
    call = CallInfo(0, 5, 10, (0,))
    assert runner.decide((1, 2, 500, 16), (1, 2, 77, 16), call) == "cross-attention"
    assert runner.decide((1, 2, 120, 16), (1, 2, 120, 16), CallInfo(0, 5, 10, (0,), text_len=30)).startswith("short")
    assert runner.decide((1, 2, 500, 16), (1, 2, 500, 16), CallInfo(0, 1, 10, (0,))) == "warm-up step"
    assert runner.decide((1, 2, 500, 16), (1, 2, 500, 16), CallInfo(0, 2, 10, (0,))) == "calibration step"


def test_dense_layer_set_is_the_layers_with_most_clusters():
    torch.manual_seed(5)
    loose = torch.randn(1, 2, 900, 16)
    tight_q, tight_k, v = structured_qkv(batch=1, heads=2, n=900, d=16, groups=4, seed=5)
    cache = RunCache()
    cache.start_run(3)
    config = {**SMALL, "dense_layer_fraction": 0.5, "threshold_mode": "absolute", "sparsity_threshold": 2.5,
              "dense_layers_by": "clusters"}
    runner = SparseAttention(from_dict(config), cache)
    for step in range(2):
        for layer in range(4):
            k = loose if layer == 2 else tight_k
            runner(tight_q, k, v, CallInfo(layer, step, 3, (0,)), dense=lambda: dense_reference(tight_q, k, v))
    assert 2 in cache.dense_layers and len(cache.dense_layers) == 2  # 0.5 * 4 layers
    assert runner.decide(tight_q.shape, tight_q.shape, CallInfo(2, 2, 3, (0,))) == "dense layer"


def test_dense_layers_are_those_whose_sparse_output_errs_above_the_threshold():
    """Layers rank by the error of their sparse output measured at calibration; of the dense-layer share,
    only those above the threshold run dense."""
    torch.manual_seed(7)
    tight_q, tight_k, v = structured_qkv(batch=1, heads=2, n=900, d=16, groups=4, seed=7)
    flat_q, flat_k = torch.randn(1, 2, 900, 16), torch.randn(1, 2, 900, 16)  # no structure for clusters to find
    cache = RunCache()
    cache.start_run(3)
    config = {**SMALL, "dense_layer_fraction": 0.5, "dense_error_threshold": 0.2, "selection": {"top_k": 4}}
    runner = SparseAttention(from_dict(config), cache)
    for step in range(2):
        for layer in range(4):
            q, k = (flat_q, flat_k) if layer == 1 else (tight_q, tight_k)
            runner(q, k, v, CallInfo(layer, step, 3, (0,)), dense=lambda: dense_reference(q, k, v))
    errors = cache.calibration_errors()
    assert set(errors) == {0, 1, 2, 3}
    assert errors[1] > 0.2 > max(errors[layer] for layer in (0, 2, 3))  # what the ranking below relies on
    assert cache.dense_layers == frozenset({1})  # two may run dense, one errs above the threshold
    assert runner.decide(flat_q.shape, flat_q.shape, CallInfo(1, 2, 3, (0,))) == "dense layer"
    assert runner.decide(tight_q.shape, tight_q.shape, CallInfo(0, 2, 3, (0,))) is None


def test_cache_lifecycle_frees_everything():
    q, k, v = structured_qkv(batch=2, heads=2, n=700, d=16, seed=6)
    cache = RunCache()
    cache.start_run(3)
    runner = SparseAttention(from_dict(SMALL), cache)
    run_steps(runner, q, k, v, 3, layers=2)
    assert cache.memory_bytes() > 0 and len(cache.states) == 4
    cache.end_run()
    assert cache.memory_bytes() == 0 and not cache.states and not cache.records and not cache.active
    report = cache.report()
    assert report is not None and sum(r.sparse_calls for r in report.layers) == 4
    assert "sparse steps: 1-2" in report.to_text()
    cache.start_run(3)  # a new run starts from nothing
    assert cache.report() is None and cache.dense_layers is None
    cache.release()
    assert cache.report() is None and cache.memory_bytes() == 0 and cache.last_calibration is None


def test_profile_round_trip_skips_calibration(tmp_path, monkeypatch):
    q, k, v = structured_qkv(batch=1, heads=2, n=700, d=16, seed=7)
    cache = RunCache()
    cache.start_run(3)
    runner = SparseAttention(from_dict(SMALL), cache)
    run_steps(runner, q, k, v, 2, layers=3, branches=(0,))
    cache.end_run()
    path = save_profile(cache.last_calibration, tmp_path / "wan.safetensors")
    profile = load_profile(path)
    assert profile.layers == [0, 1, 2] and profile.heads == 2 and profile.tokens == 700
    assert torch.equal(profile.counts, cache.last_calibration.counts)
    # the per-head Top-K the calibration set (matched budgets) travel with the profile
    assert profile.top_k is not None and torch.equal(profile.top_k, cache.last_calibration.top_k)

    fresh = RunCache(profile=profile)
    fresh.start_run(3)
    monkeypatch.setattr(clustering, "calibrate_keys", lambda *a, **kw: pytest.fail("profile must skip calibration"))
    runner = SparseAttention(from_dict(SMALL), fresh)
    assert fresh.dense_layers == profile.dense_layers
    run_steps(runner, q, k, v, 2, layers=3, branches=(0,))
    for layer in range(3):
        assert torch.equal(fresh.state(layer, 0).k_counts, profile.counts_for(layer).clamp_max(700))
        budgets = profile.top_k_for(layer)
        assert budgets is None or torch.equal(fresh.state(layer, 0).head_top_k, budgets)
    assert fresh.state(0, 0).probe_error is None  # nothing left to choose: the profile's budgets are used

    other = RunCache(profile=profile)
    other.start_run(3)
    q3, k3, v3 = structured_qkv(batch=1, heads=3, n=700, d=16, seed=8)
    with pytest.raises(ConfigError, match="2 heads"):
        run_steps(SparseAttention(from_dict(SMALL), other), q3, k3, v3, 1, branches=(0,))


def test_corrupt_or_foreign_profile_is_rejected(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ConfigError, match="bad.safetensors"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.randn(2, 2)}, str(foreign))
    with pytest.raises(ConfigError, match="format"):
        load_profile(foreign)


def test_matched_budget_measures_every_candidate_and_never_errs_more_than_one_top_k():
    """At calibration every head is measured at top_k x (1/2 .. 2), and at larger multiples where the layer
    errs too much (below); the budgets set at the first sparse step
    err no more, summed over the heads, than the one Top-K, keep no more keys, and sparse steps select with
    them."""
    q, k, v = structured_qkv(batch=1, heads=4, n=1200, d=16, groups=6, seed=11)
    gen = torch.Generator().manual_seed(11)
    q[:, 2:] += 2 * torch.randn(2, 1200, 16, generator=gen)  # two heads with spread attention
    cache = RunCache()
    cache.start_run(3)
    config = from_dict({**SMALL, "dense_layer_fraction": 0.0, "initial_key_clusters": 24,
                        "selection": {"top_k": 8, "min_kept_fraction": 0.0, "own_clusters": False}})
    runner = SparseAttention(config, cache)
    candidates = runner.method.budget_candidates()
    assert candidates == (4, 8, 16, 32, 64, 128, 256)
    runner(q, k, v, CallInfo(0, 0, 3, (0,)), dense=lambda: dense_reference(q, k, v))
    state = cache.state(0, 0)
    assert state.probe_error.shape == state.probe_kept.shape == (4, 7) and state.head_top_k is None
    # the candidates above twice the Top-K are measured only while the layer's error at the one before (the
    # Top-K, for four times it) is above the dense threshold, and while they leave some key cluster out
    def too_far(column):
        error = float((state.probe_error[:, column].sum() / state.probe_reference.sum()).sqrt())
        return error > config.dense_error_threshold

    widest = int(state.k_counts.max())
    measured = [bool(torch.isfinite(state.probe_error[:, c]).all()) for c in range(7)]
    assert measured[:3] == [True] * 3
    for column in range(3, 7):
        before = 1 if column == 3 else column - 1
        assert measured[column] == (measured[before] and too_far(before) and candidates[column] < widest), column
    assert all(bool(torch.isinf(state.probe_error[:, c]).all()) for c in range(7) if not measured[c])
    assert runner.decide(q.shape, k.shape, CallInfo(0, 1, 3, (0,))) is None  # settles the budgets
    chosen = state.head_top_k.tolist()
    index = [runner.method.budget_candidates().index(c) for c in chosen]
    heads = list(range(4))
    assert float(state.probe_error[heads, index].sum()) <= float(state.probe_error[:, 1].sum()) * (1 + 1e-6)
    assert float(state.probe_kept[heads, index].sum()) <= float(state.probe_kept[:, 1].sum())
    plan = runner.method.plan(q, k, CallInfo(0, 1, 3, (0,)))
    per_cluster = plan.layout.selected.sum(-1)  # (1, 4, Cq): key clusters kept per query cluster
    for head, top_k in enumerate(chosen):
        assert int(per_cluster[0, head].max()) == min(top_k, int(state.k_counts[head])), (head, chosen)


@pytest.mark.parametrize("shared_heads", [False, True])
def test_matched_budget_gives_spread_heads_more_keys_and_may_run_a_dense_layer_sparse(shared_heads):
    """The allocation reads what calibration measured: with the measurements set to known curves, the heads
    whose error falls most with more keys get the larger Top-K, and the layer the plain rule runs dense runs
    sparse at four times the Top-K, which is cheaper for no more summed error. Where processes share the
    heads of a layer (an agreement on the dense layers is given) the agreed dense layers stay dense."""
    q, k, v = structured_qkv(batch=1, heads=4, n=700, d=16, seed=14)
    cache = RunCache()
    cache.start_run(3)
    # layer 1 errs 0.32 at four times the Top-K: under the dense threshold of 0.35, so it may run sparse
    config = from_dict({**SMALL, "dense_layer_fraction": 0.5, "dense_error_threshold": 0.35,
                        "selection": {"top_k": 8, "min_kept_fraction": 0.0}})
    runner = SparseAttention(config, cache, dense_layer_agreement=(lambda c: c) if shared_heads else None)
    run_steps(runner, q, k, v, 1, layers=2, branches=(0,))
    # (squared error, kept) per candidate Top-K: concentrated heads gain little from more keys, spread ones much
    # (candidates x 1/2, 1, 2, 4, 8, 16, 32; eight times and more are not measured where four times errs little)
    inf = float("inf")
    concentrated = ([0.03, 0.01, 0.005, 0.002, inf, inf, inf], [0.05, 0.15, 0.25, 0.4, inf, inf, inf])
    spread = ([4.0, 2.0, 1.0, 0.5, inf, inf, inf], [0.05, 0.09, 0.11, 0.2, inf, inf, inf])
    # layer 1: the plain rule runs it dense; eight times the Top-K errs little less than four, for twice the keys
    dense_layer = ([8.0, 4.0, 1.0, 0.1, 0.09, inf, inf], [0.05, 0.09, 0.17, 0.33, 0.6, inf, inf])
    measured = {0: ([concentrated, concentrated, spread, spread], 0.01), 1: ([dense_layer] * 4, 0.5)}
    for layer, (curves, error) in measured.items():
        state = cache.state(layer, 0)
        state.probe_error = torch.tensor([c[0] for c in curves])
        state.probe_kept = torch.tensor([c[1] for c in curves])
        state.probe_reference = torch.ones(4)
        state.calibration_error = torch.tensor(error)
    assert runner.decide(q.shape, k.shape, CallInfo(0, 1, 3, (0,))) is None
    first = cache.state(0, 0).head_top_k.tolist()
    assert max(first[:2]) < min(first[2:]), first
    report = cache.report()  # the report shows each layer's budgets
    assert report.layers[0].top_k_per_head == first and "Top-K" in report.to_text()
    if shared_heads:
        assert cache.dense_layers == frozenset({1}) and cache.state(1, 0).head_top_k is None
    else:
        assert cache.dense_layers == frozenset() and cache.state(1, 0).head_top_k.tolist() == [32] * 4


def test_a_layer_too_far_at_four_times_the_top_k_may_run_sparse_at_eight():
    """Eight times the Top-K is the option that replaces a dense layer whose error at four times is still above
    the dense-layer threshold, where it costs less for no more summed error."""
    q, k, v = structured_qkv(batch=1, heads=4, n=700, d=16, seed=16)
    cache = RunCache()
    cache.start_run(3)
    config = from_dict({**SMALL, "dense_layer_fraction": 0.5, "dense_error_threshold": 0.35,
                        "selection": {"top_k": 8, "min_kept_fraction": 0.0}})
    runner = SparseAttention(config, cache)
    run_steps(runner, q, k, v, 1, layers=2, branches=(0,))
    inf = float("inf")
    measured = {  # (squared error, kept) per candidate x 1/2 .. 32 of every head, and the layer's error
        0: (([4.0, 2.0, 1.0, 0.5, inf, inf, inf], [0.05, 0.09, 0.11, 0.2, inf, inf, inf]), 0.01),
        # layer 1 errs 0.45 at four times the Top-K, above the threshold, and 0.3 at eight times
        1: (([8.0, 4.0, 1.0, 0.2, 0.09, inf, inf], [0.05, 0.09, 0.17, 0.33, 0.6, inf, inf]), 0.5),
    }
    for layer, ((error, kept), layer_error) in measured.items():
        state = cache.state(layer, 0)
        state.probe_error = torch.tensor([error] * 4)
        state.probe_kept = torch.tensor([kept] * 4)
        state.probe_reference = torch.ones(4)
        state.calibration_error = torch.tensor(layer_error)
    assert runner.decide(q.shape, k.shape, CallInfo(0, 1, 3, (0,))) is None
    assert cache.dense_layers == frozenset()
    assert cache.state(1, 0).head_top_k.tolist() == [64] * 4
    # without the eight-times option the same layer stays dense
    cache.dense_layers = None
    state = cache.state(1, 0)
    state.probe_error[:, 4:] = state.probe_kept[:, 4:] = float("inf")
    state.head_top_k = None
    assert runner.decide(q.shape, k.shape, CallInfo(1, 1, 3, (0,))) == "dense layer"
    assert cache.dense_layers == frozenset({1})


@pytest.mark.parametrize("error_at_four_times, error_at_eight_times, measured_top_k",
                         [(0.05, 0.02, [4, 8, 16, 32]), (0.3, 0.02, [4, 8, 16, 32, 64]),
                          (0.3, 0.3, [4, 8, 16, 32, 64])])  # sixteen times (128) would keep every key cluster
def test_each_larger_top_k_is_measured_only_while_the_one_before_is_still_too_far(
        error_at_four_times, error_at_eight_times, measured_top_k):
    q, k, v = structured_qkv(batch=1, heads=2, n=1500, d=16, groups=8, seed=17)
    cache = RunCache()
    cache.start_run(3)
    config = from_dict({**SMALL, "dense_layer_fraction": 0.0, "initial_key_clusters": 80,
                        "selection": {"top_k": 8, "min_kept_fraction": 0.0, "own_clusters": False,
                                      "local_block": 0}})
    runner = SparseAttention(config, cache)
    call = CallInfo(0, 0, 3, (0,))
    runner.method.calibrate(q, k, call)
    counts = cache.state(0, 0).k_counts
    assert int(counts.min()) >= 64 and int(counts.max()) <= 128
    reference = dense_reference(q, k, v)
    # by the Top-K the layout ran
    relative_error = {4: 0.5, 8: 0.4, 16: 0.3, 32: error_at_four_times, 64: error_at_eight_times}
    ran = []

    def execute(layout):  # a stand-in executor whose error depends only on the Top-K
        top_k = int(layout.selected.sum(-1).max())
        ran.append(top_k)
        return reference * (1 + relative_error[top_k])

    runner.method.probe(q, k, call, reference, execute)
    state = cache.state(0, 0)
    assert sorted(set(ran)) == measured_top_k
    measured = [bool(torch.isfinite(state.probe_error[:, c]).all()) for c in range(7)]
    assert measured == [True] * len(measured_top_k) + [False] * (7 - len(measured_top_k))


def test_fixed_budget_measures_one_top_k_and_sets_no_head_budgets():
    q, k, v = structured_qkv(batch=1, heads=2, n=900, d=16, groups=4, seed=13)
    cache = RunCache()
    cache.start_run(3)
    config = from_dict({**SMALL, "selection": {"top_k": 8, "budget": "fixed"}})
    runner = SparseAttention(config, cache)
    assert runner.method.budget_candidates() == (8,)
    run_steps(runner, q, k, v, 2, branches=(0,))
    state = cache.state(0, 0)
    assert state.calibration_error is not None and state.head_top_k is None and state.probe_error is None


def test_budget_schedule_changes_top_k_per_step():
    """Sparse steps select with the Top-K of their noise phase: twice it early, half of it late."""
    q, k, v = structured_qkv(batch=1, heads=2, n=900, d=16, groups=4, seed=12)
    cache = RunCache()
    cache.start_run(8)
    config = from_dict({**SMALL, "dense_layer_fraction": 0.0, "initial_key_clusters": 24, "warmup_steps": 1,
                        "selection": {"top_k": 4, "min_kept_fraction": 0.0, "own_clusters": False,
                                      "high_noise_top_k_scale": 2.0, "low_noise_top_k_scale": 0.5}})
    runner = SparseAttention(config, cache)
    runner(q, k, v, CallInfo(0, 0, 8, (0,)), dense=lambda: dense_reference(q, k, v))
    widest = {}
    for step in (1, 4, 7):  # high noise (first quarter), middle, low noise (last quarter)
        plan = runner.method.plan(q, k, CallInfo(0, step, 8, (0,)))
        widest[step] = int(plan.layout.selected.sum(-1).max())
    assert widest == {1: 8, 4: 4, 7: 2}, widest


def test_profile_with_bad_per_head_top_k_is_rejected(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "bad_top_k.safetensors"
    tensors = {"layers": torch.tensor([0, 1]), "counts": torch.full((2, 3), 8), "dense": torch.tensor([False, False]),
               "top_k": torch.full((2, 2), 16)}
    save_file(tensors, str(path), metadata={"format": "adacluster-profile/1", "heads": "3", "tokens": "100"})
    with pytest.raises(ConfigError, match="per-head Top-K of shape"):
        load_profile(path)


def test_each_head_keeps_the_tail_weight_that_erred_less_at_calibration():
    """The calibration step runs the Top-K with the pooled tail's spread term on and off, keeps per head the one
    that erred less, measures the other candidates with it, and sparse steps execute with it."""
    q, k, v = structured_qkv(batch=1, heads=4, n=900, d=16, groups=4, seed=14)
    cache = RunCache()
    cache.start_run(3)
    config = from_dict({**SMALL, "dense_layer_fraction": 0.0, "initial_key_clusters": 24, "selection": {"top_k": 8}})
    runner = SparseAttention(config, cache)
    call = CallInfo(0, 0, 3, (0,))
    runner.method.calibrate(q, k, call)
    reference = dense_reference(q, k, v)
    second_order_errs_less = torch.tensor([True, False, True, False])
    seen = []

    def execute(layout):  # a stand-in executor whose error per head depends only on the tail weight it runs
        weight = layout.tail_spread_weight[0]
        seen.append(weight.tolist())
        better = (weight == 1) == second_order_errs_less
        return reference + torch.where(better, 0.01, 0.1).view(1, 4, 1, 1)

    runner.method.probe(q, k, call, reference, execute)
    state = cache.state(0, 0)
    assert state.tail_spread_weight.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert seen[:2] == [[1.0] * 4, [0.0] * 4] and all(w == [1.0, 0.0, 1.0, 0.0] for w in seen[2:])
    plain = runner.method.budget_candidates().index(8)
    smallest = 0.01 ** 2 * reference[0, 0].numel()
    torch.testing.assert_close(state.probe_error[:, plain], torch.full((4,), smallest), rtol=1e-3, atol=0)
    assert float(state.probe_error[:, :3].max()) <= smallest * (1 + 1e-3)
    plan = runner.method.plan(q, k, CallInfo(0, 1, 3, (0,)))
    assert plan.layout.tail_spread_weight.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_without_a_pooled_tail_no_tail_weight_is_chosen():
    q, k, v = structured_qkv(batch=1, heads=2, n=900, d=16, groups=4, seed=15)
    cache = RunCache()
    cache.start_run(3)
    runner = SparseAttention(from_dict({**SMALL, "recipe": "paper"}), cache)
    run_steps(runner, q, k, v, 2, branches=(0,))
    state = cache.state(0, 0)
    assert state.calibration_error is not None and state.tail_spread_weight is None
