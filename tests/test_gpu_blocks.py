"""The Triton block passes on CUDA against the PyTorch reference (odd sizes, text segment, both half dtypes,
a block subset). Needs CUDA and Triton."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU kernel tests need CUDA (torch.cuda.is_available() is False)", allow_module_level=True)
pytest.importorskip("triton")

from block_cases import case  # noqa: E402
from comfyui_adacluster import kernels  # noqa: E402
from comfyui_adacluster.kernels import reference_blocks as RB  # noqa: E402
from comfyui_adacluster.kernels import triton_ops  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,n_text", [(1531, 128, 0), (2049, 64, 29), (777, 128, 226)])
def test_attention_lse_matches_reference(dtype, n, d, n_text):
    q, k, v, text_k, text_v, bias = case(batch=2, heads=3, n=n, d=d, n_text=max(n_text, 1), seed=n,
                                         device="cuda", dtype=dtype)
    extra = (text_k, text_v, bias) if n_text else ()
    assert kernels.backend_for(q) is triton_ops
    out, lse = kernels.attention_lse(q, k, v, *extra)
    want_out, want_lse = RB.attention_lse(q, k, v, *extra)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), want_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=1e-2, rtol=1e-3)
    dense = kernels.dense_attention(q, k, v) if not n_text else None
    if dense is not None:
        torch.testing.assert_close(out.float(), dense.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,block,threshold", [(1531, 128, 64, 1e-3), (2049, 64, 128, 1e-4), (700, 128, 128, 1e-4)])
def test_block_statistics_match_reference(dtype, n, d, block, threshold):
    q, k, v, *_ = case(batch=2, heads=3, n=n, d=d, seed=n + 1, device="cuda", dtype=dtype)
    _, lse = RB.attention_lse(q, k, v)
    mass, below = kernels.block_statistics(q, k, lse, block, block, threshold)
    want_mass, want_below = RB.block_statistics(q, k, lse, block, block, threshold)
    torch.testing.assert_close(mass, want_mass, atol=2e-3, rtol=2e-2)
    # entries right at the threshold may fall either side in half precision
    assert float((below - want_below).abs().max()) < 0.02
    blocks = torch.rand(mass.shape, device="cuda") < 0.3
    some_mass, some_below = kernels.block_statistics(q, k, lse, block, block, threshold, blocks=blocks)
    assert torch.isnan(some_mass[~blocks]).all() and torch.isnan(some_below[~blocks]).all()
    torch.testing.assert_close(some_mass[blocks], mass[blocks])
