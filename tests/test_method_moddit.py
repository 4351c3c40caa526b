"""MOD-DiT: the closed-form normal equations, the fit, extrapolation, masks and the runner flow."""
import pytest
import torch

from comfyui_adacluster import kernels
from comfyui_adacluster.adacluster_core.attention import CallInfo, SparseAttention
from comfyui_adacluster.adacluster_core.cache import RunCache
from comfyui_adacluster.adacluster_core.config import ConfigError, from_dict
from comfyui_adacluster.adacluster_core.methods.moddit import (Fitter, ModDiT, ModDiTConfig, ModDiTState,
                                                                bases_for)
from comfyui_adacluster.kernels import reference as R

SHARED = from_dict({"method": "moddit", "min_tokens": 64})


def design_matrix(bases):
    """The dense design matrix (n*n x P), built the obvious way: only the tests ever build it."""
    n = bases.n
    columns = []
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    for k in range(-(n - 1), n):
        columns.append((j - i == k).double())
    for col in range(n):
        columns.append((j == col).double())
    f = bases.frame_of_block
    for t in range(bases.frames):
        columns.append(((f[i] == t) & (f[j] == t)).double())
    return torch.stack([c.reshape(-1) for c in columns], dim=1)


@pytest.mark.parametrize("frame_tokens", [0, 300, 90])
def test_closed_form_gram_and_sums_equal_the_design_matrix(frame_tokens):
    bases = bases_for(7, 128, 7 * 128 - 50, frame_tokens)
    m = design_matrix(bases)
    torch.testing.assert_close(bases.gram(), m.T @ m)
    s = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(frame_tokens))
    torch.testing.assert_close(bases.project(s), (s.reshape(2, 3, 49).double() @ m))
    theta = torch.randn(2, 3, bases.size, dtype=torch.float64)
    torch.testing.assert_close(bases.reconstruct(theta).reshape(2, 3, 49), theta @ m.T)


def test_fit_recovers_known_intensities():
    bases = bases_for(9, 128, 9 * 128, 256)  # frames of two blocks (the last of one)
    assert bases.frames == 5
    gen = torch.Generator().manual_seed(1)
    truth = torch.randn(4, bases.size, generator=gen, dtype=torch.float64)
    s = bases.reconstruct(truth)
    fitter = Fitter(bases, 1e-8)
    theta = fitter.fit(s)
    torch.testing.assert_close(bases.reconstruct(theta), s, atol=1e-6, rtol=0)
    n, nd = 9, 17
    frames = slice(nd + n, None)
    torch.testing.assert_close(theta[:, frames], truth[:, frames], atol=1e-6, rtol=0)  # frame intensities exact
    # diagonals and columns up to their one shared constant (the grid's intercept belongs to both families)
    shift = theta[:, :nd] - truth[:, :nd]
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-6, rtol=0)
    torch.testing.assert_close(theta[:, nd:nd + n] - truth[:, nd:nd + n], -shift[:, :n], atol=1e-6, rtol=0)
    # the same as the ridge normal equations of the dense design matrix
    m = design_matrix(bases)
    direct = torch.linalg.solve(m.T @ m + 1e-8 * torch.eye(bases.size, dtype=torch.float64), m.T @ s.reshape(4, -1).T).T
    torch.testing.assert_close(theta, direct, atol=1e-6, rtol=0)


def test_extrapolation_is_linear_between_fits():
    theta_a, theta_b = torch.randn(2, 10, dtype=torch.float64), torch.randn(2, 10, dtype=torch.float64)
    state = ModDiTState(lse=torch.zeros(2, 5), theta=theta_b, step=11, theta_prev=theta_a, step_prev=10,
                        squares=torch.zeros(2, 0, dtype=torch.bool), tokens=5)
    torch.testing.assert_close(ModDiT.intensities_at(state, 11), theta_b)
    torch.testing.assert_close(ModDiT.intensities_at(state, 15), theta_b + 4 * (theta_b - theta_a))


def test_mask_keeps_lowest_patterns_and_strong_frames():
    cache = RunCache()
    method = ModDiT(ModDiTConfig(top_k=2, tau_e=0.2, warmup_steps=2), cache)
    fitter = method.fitter(6 * 128, (3, 16, 16), "cpu")  # 256-token frames: two blocks each
    n = 6
    s = torch.full((1, n, n), 0.9, dtype=torch.float64)
    s[0, :, 4] = 0.1  # a sink column
    s[0, torch.arange(n), torch.arange(n)] = 0.2  # the main diagonal
    theta = fitter.fit(s)
    squares = -theta[..., 3 * n - 1:] > 0.2
    mask = method.mask_from(fitter, theta, squares)[0]
    expected = torch.eye(n, dtype=torch.bool)
    expected[:, 4] = True
    assert torch.equal(mask, expected) and not squares.any()
    s_frames = s.clone()
    s_frames[0, 0:2, 0:2] = 0.05  # the first frame square far denser than its patterns predict
    theta = fitter.fit(s_frames)
    squares = -theta[..., 3 * n - 1:] > 0.2
    assert squares[0].tolist() == [True, False, False]


def test_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="top_k = 0"):
        ModDiTConfig(top_k=0).validate()
    with pytest.raises(ConfigError, match="eta = 2"):
        ModDiTConfig(eta=2).validate()


def local_qkv(batch, heads, n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    position = torch.arange(n).float()
    angles = position.view(n, 1) / (n / 6) * torch.arange(1, d // 2 + 1).float().view(1, -1) / (d // 4)
    base = torch.cat([angles.sin(), angles.cos()], dim=-1) * 2.0
    make = lambda: base + 0.5 * torch.randn(batch, heads, n, d, generator=gen)  # noqa: E731
    return make(), make(), torch.randn(batch, heads, n, d, generator=gen)


@pytest.mark.parametrize("text_len", [0, 19])
def test_keeping_everything_reproduces_dense(text_len):
    n = 700 + text_len
    q, k, v = local_qkv(2, 2, n, 16, seed=text_len)
    mask = None
    if text_len:
        mask = torch.zeros(2, 1, 1, n)
        mask[0, ..., -4:] = float("-inf")
    cache = RunCache()
    cache.start_run(6)
    method = ModDiT(ModDiTConfig(top_k=10_000, warmup_steps=2, refresh_interval=1), cache)
    runner = SparseAttention(SHARED, cache, method=method)
    expected = R.dense_attention(q, k, v, bias=mask)[0]
    for step in range(6):
        call = CallInfo(0, step, 6, ("c", "u"), text_len=text_len, mask=mask, grid=(5, 10, 14))
        out = runner(q, k, v, call, dense=lambda: pytest.fail("fit steps give their own dense output"))
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    assert [r.sparse for r in cache.records] == [False, False, True, True, True, True]
    assert [r.reason for r in cache.records[:2]] == ["fit step", "fit step"]


def test_runner_flow_fits_extrapolates_and_refreshes(monkeypatch):
    q, k, v = local_qkv(1, 2, 1000, 16, seed=5)
    cache = RunCache()
    cache.start_run(8)
    method = ModDiT(ModDiTConfig(top_k=6, warmup_steps=3, refresh_interval=2, block=64), cache)
    runner = SparseAttention(SHARED, cache, method=method)
    calls = [CallInfo(0, step, 8, (0,), grid=(4, 10, 25)) for step in range(8)]
    assert [runner.decide(q.shape, k.shape, c) for c in calls[:4]] == ["warm-up step", "fit step", "fit step", None]
    runner(q, k, v, calls[0], dense=lambda: R.dense_attention(q, k, v)[0])
    for step in (1, 2):
        runner(q, k, v, calls[step], dense=lambda: pytest.fail("fit steps give their own dense output"))
    state = cache.state(0, 0)
    assert state.step == 2 and state.step_prev == 1 and state.theta_prev is not None
    monkeypatch.setattr(kernels, "attention_lse", lambda *a, **kw: pytest.fail("sparse steps reuse the cached LSE"))
    asked = []
    real = kernels.block_statistics
    monkeypatch.setattr(kernels, "block_statistics", lambda *a, **kw: asked.append(kw.get("blocks")) or real(*a, **kw))
    blocks = torch.arange(1000) // 64
    for step in range(3, 8):
        out = runner(q, k, v, calls[step], dense=lambda: pytest.fail("sparse"))
        layout_mask = method.mask_from(method.fitter(1000, (4, 10, 25), "cpu"),
                                       torch.stack([ModDiT.intensities_at(cache.state(0, 0), step)]),
                                       cache.state(0, 0).squares.unsqueeze(0))
        kept = layout_mask[:, :, blocks][:, :, :, blocks]
        assert 0.05 < float(kept.float().mean()) < 0.9
        torch.testing.assert_close(out, R.partial_attention(q, k, v, key_mask=kept)[0], atol=2e-6, rtol=1e-5)
    assert len(asked) == 2 and all(a is not None for a in asked)  # refreshes at steps 5 and 7, on kept blocks only
    assert cache.state(0, 0).step == 7 and cache.state(0, 0).step_prev == 5
