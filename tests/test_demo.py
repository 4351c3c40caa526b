import json
import math

import pytest
import torch

from comfyui_adacluster.adacluster_core.tools import demo
from comfyui_adacluster.adacluster_core.tools.workload import VideoAttentionWorkload, WorkloadConfig


def test_quick_demo_end_to_end(tmp_path, capsys):
    assert demo.main(["--quick", "--no-progress", "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "rel L2" in printed and "svg2 rule" in printed
    data = json.loads((tmp_path / "adacluster_demo.json").read_text())
    png = tmp_path / "adacluster_demo.png"
    assert png.stat().st_size > 1000
    methods = data["methods"]
    assert methods["dense"]["summary"]["rel_l2"] == 0.0
    for name, entry in methods.items():
        s = entry["summary"]
        if not s.get("available", True) or "kept_fraction" not in s:
            continue
        assert 0 < s["kept_fraction"] <= 1, name
        assert math.isfinite(s["rel_l2"]) and 0 <= s["rel_l2"] < 1, name
        assert 0 < s["kept_mass"] <= 1 + 1e-6, name
    for name in ("adaspa (s 0.8)", "mod-dit"):  # every method of the pack is a row, and runs sparse
        assert methods[name]["summary"]["sparse_calls"] > 0 and methods[name]["summary"]["kept_fraction"] < 1, name
    sparse = [e["summary"] for n, e in methods.items() if n != "dense" and e["summary"].get("sparse_calls")]
    assert sparse and any(s["kept_fraction_sparse_calls"] < 1 for s in sparse)
    assert any(s["rel_l2_sparse_calls"] > 0 for s in sparse)  # sparse calls really were approximate


def test_bad_arguments_are_reported(capsys):
    assert demo.main(["--quick", "--warmup", "3", "--no-progress"]) == 2
    assert "--warmup" in capsys.readouterr().err
    assert demo.main(["--quick", "--frames", "0", "--no-progress"]) == 2


def test_layout_attended_matches_kept_fraction():
    """The attended-key mask used for the kept mass agrees with the layout's own kept fraction."""
    from comfyui_adacluster.adacluster_core import clustering, selection
    from comfyui_adacluster.adacluster_core.config import SelectionConfig

    wl = VideoAttentionWorkload(WorkloadConfig(frames=2, height=9, width=11, heads=2, head_dim=64, layers=2, steps=2))
    q, k, _ = wl.qkv(1, 1)
    n = q.shape[-2]
    qc = clustering.cluster_queries(q, 7, 2, generator=torch.Generator().manual_seed(0))
    calib = clustering.calibrate_keys(k, 9, 1.5, True, 3, 1 / 3, 2, torch.Generator().manual_seed(1))
    for sel in (SelectionConfig(local_block=0, own_clusters=False, top_p=0.5), SelectionConfig(local_block=16)):
        layout = selection.build_layout(q, k, qc, calib.clusters, sel)
        attended = demo.layout_attended(layout, torch.arange(n), n)
        assert float(attended.float().mean()) == pytest.approx(demo.layout_kept_fraction(layout, n), abs=1e-6)


def test_sol_routing_kept_pairs():
    exact = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    exact[..., 0, 0] = True
    # 150 tokens: blocks of 64, 64, 22.
    assert demo._kept_pairs_fraction(exact, 150) == pytest.approx(64 * 64 / 150 ** 2)
    q = torch.randn(1, 2, 150, 16)
    routed = demo.sol_routing(q, torch.randn(1, 2, 150, 16), tau=100.0)
    assert routed.shape == (1, 2, 3, 3)
    band = (torch.arange(3).view(-1, 1) - torch.arange(3).view(1, -1)).abs() <= 1
    assert torch.equal(routed[0, 0], band)  # a huge tau keeps the diagonal band only


@pytest.mark.skipif(demo.sol_attn_function() is None, reason="comfy-kitchen (optional bench dependency) not installed")
def test_sol_routing_reproduces_sol_attn_exact_branch():
    wl = VideoAttentionWorkload(WorkloadConfig(frames=2, height=10, width=13, heads=2, layers=2, steps=2))
    q, k, v = wl.qkv(1, 1)
    n = q.shape[-2]
    exact = demo.sol_routing(q, k, 1.0)
    blocks = torch.arange(n) // demo.SOL_BLOCK
    keep = exact[:, :, blocks][..., blocks]
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mine = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v
    sol = demo.sol_attn_function()
    theirs = sol(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
                 tau=1.0, tail=False).transpose(1, 2)
    assert float((mine - theirs).norm() / theirs.norm()) < 1e-4
