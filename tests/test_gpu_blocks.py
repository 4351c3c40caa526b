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
from comfyui_adacluster.kernels import triton_blocks, triton_ops  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,n_text", [(1531, 128, 0), (2049, 64, 29), (777, 128, 226)])
def test_attention_lse_matches_reference(dtype, n, d, n_text):
    # without text the case's text tensors are made but not used
    q, k, v, text_k, text_v, bias = case(batch=2, heads=3, n=n, d=d, n_text=n_text or 4, seed=n,
                                         device="cuda", dtype=dtype)
    extra = (text_k, text_v, bias) if n_text else ()
    assert kernels.backend_for(q) is triton_ops
    want_out, want_lse = RB.attention_lse(q, k, v, *extra)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    # the dispatch (torch's flash attention where it runs) and the Triton kernel itself
    for out, lse in (kernels.attention_lse(q, k, v, *extra), triton_blocks.triton_attention_lse(q, k, v, *extra)):
        torch.testing.assert_close(out.float(), want_out.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(lse, want_lse, atol=1e-2, rtol=1e-3)
    if n_text:  # without the padding bias the dispatch takes the torch path with the text keys appended
        plain = (text_k, text_v)
        want_out, want_lse = RB.attention_lse(q, k, v, *plain)
        out, lse = kernels.attention_lse(q, k, v, *plain)
        torch.testing.assert_close(out.float(), want_out.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(lse, want_lse, atol=1e-2, rtol=1e-3)
    out, lse = kernels.attention_lse(q, k, v, *extra)
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


@pytest.mark.parametrize("method", ["adaspa", "moddit"])
@pytest.mark.parametrize("text_len", [0, 37])
def test_methods_keeping_everything_reproduce_dense_on_cuda(method, text_len):
    """AdaSpa at sparsity 0 and MOD-DiT keeping every pattern, through the runner on the Triton path."""
    from comfyui_adacluster.adacluster_core.attention import CallInfo, SparseAttention
    from comfyui_adacluster.adacluster_core.cache import RunCache
    from comfyui_adacluster.adacluster_core.config import from_dict
    from comfyui_adacluster.adacluster_core.methods import AdaSpa, AdaSpaConfig, ModDiT, ModDiTConfig

    n_video = 3 * 20 * 33
    q, k, v, *_ = case(batch=2, heads=4, n=n_video + text_len, d=128, seed=text_len, device="cuda",
                       dtype=torch.bfloat16)
    mask = None
    if text_len:
        mask = torch.zeros(2, 1, 1, n_video + text_len, device="cuda")
        mask[0, ..., -5:] = float("-inf")
    cache = RunCache()
    cache.start_run(6)
    if method == "adaspa":
        built = AdaSpa(AdaSpaConfig(sparsity=0.0, search_steps=(1, 3), reference_steps=6), cache)
    else:
        built = ModDiT(ModDiTConfig(top_k=100_000, warmup_steps=2, refresh_interval=2), cache)
    runner = SparseAttention(from_dict({"method": method, "min_tokens": 0}), cache, method=built)
    dense = kernels.dense_attention(q, k, v, mask=mask)
    for step in range(6):
        call = CallInfo(0, step, 6, ("c", "u"), text_len=text_len, mask=mask, grid=(3, 20, 33))
        out = runner(q, k, v, call, dense=lambda: dense)
        torch.testing.assert_close(out.float(), dense.float(), atol=2e-2, rtol=2e-2)
    assert sum(r.sparse for r in cache.records) >= 3
