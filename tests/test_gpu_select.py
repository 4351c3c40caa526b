"""The fused selection kernels (kernels/triton_select.py) against the PyTorch selection on fresh random
inputs: odd sizes, padded key slots, per-head Top-K, every guard rail on and off, both half dtypes, and the
default preset's plan through AdaCluster. Needs CUDA and Triton."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU selection tests need CUDA (torch.cuda.is_available() is False)", allow_module_level=True)
pytest.importorskip("triton", reason="GPU selection tests need Triton")

from comfyui_adacluster import kernels  # noqa: E402
from comfyui_adacluster.adacluster_core import selection  # noqa: E402
from comfyui_adacluster.adacluster_core.config import SelectionConfig  # noqa: E402
from comfyui_adacluster.kernels import triton_select  # noqa: E402
from select_cases import CASES, check_case, clusters_for, near_tie  # noqa: E402

WIDE_CASES = [
    dict(batch=1, heads=4, n=4099, cq=33, ck=257, ragged=True, per_head=True, config={}),
    dict(batch=2, heads=2, n=3001, cq=65, ck=1500, ragged=True, per_head=False,
         config=dict(top_k=64, min_kept_fraction=0.2, local_block=96)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES) + len(WIDE_CASES)))
def test_fused_selection_matches_pytorch(case, dtype):
    for seed in range(3):
        check_case((CASES + WIDE_CASES)[case], triton_select.select_and_count, "cuda", dtype, seed=100 * case + seed)


def test_default_recipe_plans_through_the_fused_kernels():
    case = CASES[1]
    q, k, qc, kc, top_k = clusters_for(case, "cuda", torch.bfloat16, seed=7)
    config = SelectionConfig()
    assert selection.fused_selection_applies(q, qc, kc, config)
    assert not selection.fused_selection_applies(q, qc, kc, SelectionConfig(score="quest"))
    assert not selection.fused_selection_applies(q.cpu(), qc, kc, config)
    layout, kept = selection.plan_layout(q, k, qc, kc, config, top_k=top_k)
    want = selection.reference_layout(q, k, qc, kc, config, q.shape[-1] ** -0.5, top_k)
    rank = selection.cluster_logits(q, k, qc, kc, "centroid", 0.5, q.shape[-1] ** -0.5)[0]
    # empty query clusters rank key clusters by size alone: exact ties, which the kernel keeps all of
    assert near_tie(rank.cpu(), want.selected.cpu(), layout.selected.cpu())
    assert torch.equal(layout.k_perm, want.k_perm) and torch.equal(layout.q_offsets, want.q_offsets)
    expected = selection.kept_fraction(layout, qc.labels, kc.labels)
    torch.testing.assert_close(kept, expected.double(), rtol=1e-6, atol=1e-8)


def test_fused_selection_in_a_cuda_graph():
    """No host synchronisation: the kernels capture and replay with the same result."""
    q, k, qc, kc, top_k = clusters_for(CASES[1], "cuda", torch.float16, seed=3)
    config = SelectionConfig()
    eager, eager_kept = selection.plan_layout(q, k, qc, kc, config, top_k=top_k)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, captured_kept = selection.plan_layout(q, k, qc, kc, config, top_k=top_k)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.selected, eager.selected)
    torch.testing.assert_close(captured_kept, eager_kept, rtol=0, atol=0)


def test_too_many_key_clusters_take_the_pytorch_path():
    q, k, qc, kc, _ = clusters_for(CASES[0], "cuda", torch.float16, seed=1)
    assert selection.fused_selection_applies(q, qc, kc, SelectionConfig())
    wide = torch.zeros(1, 1, 2, triton_select.MAX_KEY_CLUSTERS + 1, device="cuda")
    with pytest.raises(ValueError, match="exceed"):
        triton_select.select_and_count(wide, wide[..., 0, :].long(), wide[..., 0].long(),
                                       torch.zeros(1, 1, 4, dtype=torch.long, device="cuda"),
                                       torch.zeros(1, 1, 4, dtype=torch.long, device="cuda"), 1.0, 2, 0.0, 0.0, 0)
    assert kernels.fused_selection(q) is triton_select.select_and_count


def test_layout_labels_carried_to_the_executor_change_nothing():
    """The clusters' labels the layout carries are what the executor would derive from perm and offsets."""
    import dataclasses
    q, k, qc, kc, top_k = clusters_for(CASES[2], "cuda", torch.bfloat16, seed=5)
    v = torch.randn_like(k)
    layout, _ = selection.plan_layout(q, k, qc, kc, SelectionConfig(), top_k=top_k)
    assert layout.q_labels is qc.labels and layout.k_labels is kc.labels
    derived = dataclasses.replace(layout, q_labels=None, k_labels=None)
    torch.testing.assert_close(kernels.execute_layout(q, k, v, layout), kernels.execute_layout(q, k, v, derived),
                               rtol=0, atol=0)
    reference = kernels.reference.execute_layout(q, k, v, layout)
    torch.testing.assert_close(kernels.execute_layout(q, k, v, layout).float(), reference.float(), rtol=2e-2, atol=2e-2)
