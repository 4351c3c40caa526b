"""AdaSpa: search schedule, head-adaptive Top-k, the recall it reports, and the runner flow."""
import pytest
import torch

from block_cases import brute_probabilities
from comfyui_adacluster import kernels
from comfyui_adacluster.adacluster_core.attention import CallInfo, SparseAttention
from comfyui_adacluster.adacluster_core.cache import RunCache
from comfyui_adacluster.adacluster_core.config import ConfigError, from_dict
from comfyui_adacluster.adacluster_core.methods import adaspa
from comfyui_adacluster.adacluster_core.methods.adaspa import AdaSpa, AdaSpaConfig
from comfyui_adacluster.adacluster_core.methods.base import unpack_mask
from comfyui_adacluster.kernels import reference as R

SHARED = from_dict({"method": "adaspa", "min_tokens": 64})


def varied_heads(batch=1, heads=4, n=301, d=16, seed=0):
    """q, k, v with locality (tokens of a run of neighbours share a direction) whose heads range from
    concentrated to diffuse attention (queries scaled per head)."""
    gen = torch.Generator().manual_seed(seed)
    groups = 8
    centres = torch.randn(batch, heads, groups, d, generator=gen) * 2
    labels = (torch.arange(n) * groups // n).expand(batch, heads, n).clone()
    relabel = torch.rand(batch, heads, n, generator=gen) < 0.1
    labels[relabel] = torch.randint(0, groups, (int(relabel.sum()),), generator=gen)
    base = centres.gather(2, labels.unsqueeze(-1).expand(batch, heads, n, d))
    q = base + 0.4 * torch.randn(batch, heads, n, d, generator=gen)
    k = base + 0.4 * torch.randn(batch, heads, n, d, generator=gen)
    v = torch.randn(batch, heads, n, d, generator=gen)
    temperature = torch.linspace(1.5, 0.1, heads).view(1, heads, 1, 1)
    return q * temperature, k, v


def joint(n_video, n_text, text_first, seed):
    q, k, v = varied_heads(n=n_video + n_text, seed=seed)
    mask = torch.zeros(1, 1, 1, n_video + n_text)
    text = slice(0, n_text) if text_first else slice(n_video, n_video + n_text)
    mask[..., text] = torch.where(torch.arange(n_text) >= n_text - 3, float("-inf"), 0.0)
    return q, k, v, mask, text


def run(runner, q, k, v, steps, mask=None, text_len=0, text_first=False, branches=(0,), total=None):
    outs = []
    for step in range(steps):
        call = CallInfo(0, step, total or steps, branches, text_len=text_len, text_first=text_first, mask=mask)
        outs.append(runner(q, k, v, call, dense=lambda: R.dense_attention(q, k, v, bias=mask)[0]))
    return outs


def test_search_steps_scale_with_the_run():
    config = AdaSpaConfig()
    assert config.search_schedule(50) == (10, 30)
    assert config.search_schedule(20) == (4, 12)
    assert config.search_schedule(4) == (1, 2)
    assert config.search_schedule(1) == (0,)
    assert adaspa.parse_search_steps(" 10, 30 ") == (10, 30)
    with pytest.raises(ConfigError, match="'ten'"):
        adaspa.parse_search_steps("ten")
    with pytest.raises(ConfigError, match="search_steps = \\(60,\\)"):
        AdaSpaConfig(search_steps=(60,)).validate()
    with pytest.raises(ConfigError, match="sparsity = 1.5"):
        AdaSpaConfig(sparsity=1.5).validate()


@pytest.mark.parametrize("text_first", [False, True])
def test_kept_mass_equals_the_reported_recall(text_first):
    n_video, n_text = 301, 11
    q, k, v, mask, text = joint(n_video, n_text, text_first, seed=1)
    cache = RunCache()
    cache.start_run(4)
    method = AdaSpa(AdaSpaConfig(sparsity=0.6, block=32), cache)
    runner = SparseAttention(SHARED, cache, method=method)
    run(runner, q, k, v, 2, mask, n_text, text_first, total=4)  # steps 0 (dense), 1 (fused search)
    state = cache.state(0, 0)
    video = slice(n_text, None) if text_first else slice(0, n_video)
    p, _ = brute_probabilities(q[:, :, video], k[:, :, video], k[:, :, text], mask[..., text])
    blocks = torch.arange(n_video) // 32
    kept = unpack_mask(state.mask, blocks.max() + 1)[:, blocks][:, :, blocks]  # (H, N, N) token mask
    kept_mass = ((p[0, :, :, :n_video] * kept).sum(-1) + p[0, :, :, n_video:].sum(-1)).mean(-1)
    torch.testing.assert_close(state.recall.double(), kept_mass, atol=2e-5, rtol=0)
    # head-adaptive: some heads sparser ((1 + s) / 2), as many denser ((3s - 1) / 2), the mean unchanged
    levels = {round(x, 4) for x in state.sparsity.tolist()}
    assert {0.4, 0.8} <= levels <= {0.4, 0.6, 0.8}
    assert abs(float(state.sparsity.mean()) - 0.6) < 1e-6


def test_head_rule_from_masses():
    torch.manual_seed(2)
    mass = torch.rand(1, 6, 8, 10) ** torch.linspace(0.2, 8, 6).view(1, 6, 1, 1)  # diffuse .. concentrated
    mass = mass / mass.sum(-1, keepdim=True)
    result = adaspa.search(mass, torch.zeros(1, 6, 8), AdaSpaConfig(sparsity=0.8))
    plain = adaspa.search(mass, torch.zeros(1, 6, 8), AdaSpaConfig(sparsity=0.8, head_adaptive=False))
    n = min(int((plain.recall > 0.8).sum()), 3)
    assert n >= 1
    ranked = plain.recall[0].argsort(descending=True)
    expected = torch.full((6,), 0.8)
    expected[ranked[:n]] = 0.9
    expected[ranked[6 - n:]] = 0.7
    torch.testing.assert_close(result.sparsity[0], expected)
    keep = result.mask.sum(-1)  # blocks kept per row
    torch.testing.assert_close(keep[0, :, 0], adaspa.keep_counts(expected, 10))


@pytest.mark.parametrize("text_len", [0, 13])
def test_sparsity_zero_reproduces_dense(text_len):
    q, k, v, mask, _ = joint(290, text_len, False, seed=3) if text_len else (*varied_heads(n=290, seed=3), None, None)
    cache = RunCache()
    cache.start_run(5)
    runner = SparseAttention(SHARED, cache, method=AdaSpa(AdaSpaConfig(sparsity=0.0, search_steps=(10, 30)), cache))
    outs = run(runner, q, k, v, 5, mask, text_len)
    expected = R.dense_attention(q, k, v, bias=mask)[0]
    assert [r.sparse for r in cache.records] == [False, False, True, True, True]
    for out in outs:
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_runner_flow_fused_then_lse_cached_search(monkeypatch):
    q, k, v = varied_heads(batch=2, n=400, seed=4)
    cache = RunCache()
    cache.start_run(5)
    runner = SparseAttention(SHARED, cache, method=AdaSpa(AdaSpaConfig(sparsity=0.75), cache))
    branches = ("cond", "uncond")
    schedule = AdaSpaConfig().search_schedule(5)
    assert schedule == (1, 3)
    outs = run(runner, q, k, v, 2, branches=branches, total=5)  # 0 dense, 1 fused search
    assert runner.decide(q.shape, k.shape, CallInfo(0, 0, 5, branches)) == "warm-up step"
    assert runner.decide(q.shape, k.shape, CallInfo(0, 1, 5, branches)) == "search step"
    torch.testing.assert_close(outs[1], R.dense_attention(q, k, v)[0], atol=2e-6, rtol=1e-5)
    first = {b: cache.state(0, b) for b in branches}
    assert first["cond"] is not first["uncond"] and all(s.step == 1 for s in first.values())

    monkeypatch.setattr(kernels, "attention_lse", lambda *a, **kw: pytest.fail("later searches reuse the LSE"))
    seen = []
    real = kernels.block_statistics
    monkeypatch.setattr(kernels, "block_statistics", lambda *a, **kw: seen.append(a[2].clone()) or real(*a, **kw))
    blocks = torch.arange(400) // 64
    for step in (2, 3, 4):
        out = runner(q, k, v, CallInfo(0, step, 5, branches), dense=lambda: pytest.fail("sparse steps run sparse"))
        kept = torch.stack([unpack_mask(cache.state(0, b).mask, 7)[:, blocks][:, :, blocks] for b in branches])
        assert 0.1 < float(kept.float().mean()) < 0.5
        torch.testing.assert_close(out, R.partial_attention(q, k, v, key_mask=kept)[0], atol=2e-6, rtol=1e-5)
    assert len(seen) == 1  # one LSE-cached search, at step 3
    torch.testing.assert_close(seen[0], torch.stack([first[b].lse for b in branches]))
    assert all(cache.state(0, b).step == 3 for b in branches)
    assert all(cache.state(0, b).lse is None for b in branches)  # no search left: the LSE is freed
    kept = cache.report().layers[0].kept_fraction
    assert 0.1 < kept < 0.5
    assert cache.memory_bytes() > 0
    cache.end_run()
    assert cache.memory_bytes() == 0 and cache.last_calibration is None


def test_the_method_must_share_the_runners_cache():
    with pytest.raises(ValueError, match="RunCache"):
        SparseAttention(SHARED, RunCache(), method=AdaSpa(AdaSpaConfig(), RunCache()))
    cache = RunCache()
    runner = SparseAttention(SHARED, cache, method=AdaSpa(AdaSpaConfig(), cache))
    q, k, _ = varied_heads(n=100)
    with pytest.raises(TypeError, match="adaspa"):
        runner.cluster(q, k, CallInfo(0, 0, 5, (0,)))


def test_block_kept_fraction_equals_the_layouts():
    from comfyui_adacluster.adacluster_core.layout import Layout, block_offsets
    from comfyui_adacluster.adacluster_core.methods.base import block_kept_fraction, pack_mask

    selected = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(9)) < 0.4
    offsets = block_offsets(2, 3, 290, 64)
    expected = Layout(offsets, offsets, selected).kept_fraction()
    torch.testing.assert_close(block_kept_fraction(selected, 290, 64).double(), expected)
    assert torch.equal(unpack_mask(pack_mask(selected), 5), selected)
