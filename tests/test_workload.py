import math

import pytest
import torch

from comfyui_adacluster.adacluster_core.tools.workload import (VideoAttentionWorkload, WorkloadConfig, apply_rope,
                                                         rope_angles, rope_split, sigma_schedule)

SMALL = dict(frames=3, height=5, width=7, heads=3, head_dim=64, layers=5, steps=4, objects=3, feature_dim=32)


def test_shapes_order_and_determinism():
    wl = VideoAttentionWorkload(WorkloadConfig(**SMALL))
    q, k, v = wl.qkv(2, 1)
    assert q.shape == k.shape == v.shape == (1, 3, 105, 64)
    assert torch.isfinite(q).all() and q.abs().sum() > 0
    # Frame-major token order: token 7 is frame 0, row 1, column 0.
    assert wl.positions[7].tolist() == [0, 1, 0]
    again = VideoAttentionWorkload(WorkloadConfig(**SMALL)).qkv(2, 1)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), again))
    other = VideoAttentionWorkload(WorkloadConfig(**{**SMALL, "seed": 1})).qkv(2, 1)
    assert not torch.equal(q, other[0])


def test_rope_split_and_relative_positions():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(64) == (24, 20, 20)
    # RoPE makes q.k depend on the relative position only.
    pos = torch.tensor([[0, 0, 0], [1, 2, 3], [2, 4, 6], [3, 6, 9]])
    angles = rope_angles(pos, 64, 10000.0).float()
    x = torch.randn(1, 64).expand(4, 64)
    y = torch.randn(1, 64).expand(4, 64)
    rq, rk = apply_rope(x, angles), apply_rope(y, angles)
    assert torch.allclose(rq[1] @ rk[0], rq[2] @ rk[1], atol=1e-3)
    assert torch.allclose(rq[3] @ rk[2], rq[2] @ rk[1], atol=1e-3)
    assert torch.allclose(rq.norm(dim=-1), x.norm(dim=-1), atol=1e-4)


def test_steps_drift_smoothly():
    wl = VideoAttentionWorkload(WorkloadConfig(**{**SMALL, "steps": 6}))
    sig = wl.sigmas
    assert sig[0] == pytest.approx(1.0) and all(a > b for a, b in zip(sig, sig[1:]))
    qs = [wl.qkv(1, s)[0] for s in range(6)]
    steps = [float((b - a).norm() / a.norm()) for a, b in zip(qs, qs[1:])]
    assert all(0 < d < 0.5 for d in steps)
    assert float((qs[-1] - qs[0]).norm()) > max(float((b - a).norm()) for a, b in zip(qs, qs[1:]))


def _keys_for_mass(q, k, share=0.9):
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    cum = p.sort(dim=-1, descending=True).values.cumsum(-1)
    return float(((cum < share).sum(-1) + 1).float().mean() / k.shape[-2])


def test_layer_kinds_differ_in_sparsity():
    wl = VideoAttentionWorkload(WorkloadConfig(frames=4, height=12, width=16, heads=2, head_dim=64, layers=5,
                                               steps=3, feature_dim=64))
    density = {}
    for layer, kind in enumerate(wl.layer_kinds):
        q, k, _ = wl.qkv(layer, 2)
        density[kind] = _keys_for_mass(q[0], k[0])
    assert density["diffuse"] > 3 * density["local"]
    assert density["diffuse"] > 2 * density["semantic"]


def test_text_segment_and_mask():
    cfg = WorkloadConfig(**{**SMALL, "text_len": 9, "text_padding": 2, "text_first": True, "batch": 2})
    wl = VideoAttentionWorkload(cfg)
    q, k, v = wl.qkv(0, 0)
    assert q.shape == (2, 3, 114, 64)
    mask = wl.key_mask()
    assert mask.shape == (2, 1, 1, 114)
    assert mask[..., :7].all() and not mask[..., 7:9].any() and mask[..., 9:].all()
    kwargs = wl.call_kwargs()
    assert kwargs["text_len"] == 9 and kwargs["text_first"] is True
    assert not torch.equal(q[0], q[1])  # branches differ


@pytest.mark.parametrize("change, word", [({"head_dim": 96}, "head_dim"), ({"frames": 0}, "frames"),
                                          ({"text_padding": 3}, "text_padding")])
def test_bad_config_names_the_value(change, word):
    with pytest.raises(ValueError, match=word):
        VideoAttentionWorkload(WorkloadConfig(**{**SMALL, **change}))


def test_bad_layer_or_step():
    wl = VideoAttentionWorkload(WorkloadConfig(**SMALL))
    with pytest.raises(ValueError, match="layer"):
        wl.qkv(5, 0)
    with pytest.raises(ValueError, match="step"):
        wl.qkv(0, 4)


def test_sigma_schedule():
    s = sigma_schedule(3)
    assert len(s) == 3 and s[0] == pytest.approx(1.0) and 0 < s[-1] < 1
