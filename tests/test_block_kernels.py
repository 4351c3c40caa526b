"""The block passes (dense attention with LSE, block statistics) against brute force on odd sizes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from block_cases import brute_attention, brute_block_statistics, brute_probabilities, case
from comfyui_adacluster import kernels
from comfyui_adacluster.kernels import reference_blocks as RB


@pytest.mark.parametrize("with_text", [False, True])
def test_attention_lse_matches_brute_force(with_text):
    q, k, v, text_k, text_v, bias = case(n=203, d=32, n_text=13, seed=1)
    extra = dict(text_k=text_k, text_v=text_v, text_bias=bias) if with_text else {}
    out, lse = kernels.attention_lse(q, k, v, **extra)
    want_out, want_lse = brute_attention(q, k, v, *((text_k, text_v, bias) if with_text else ()))
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("with_text,block_q,block_k", [(False, 64, 64), (True, 64, 32), (True, 17, 50)])
def test_block_statistics_match_brute_force(with_text, block_q, block_k, monkeypatch):
    monkeypatch.setattr(RB, "CHUNK_ELEMENTS", 3 * 64 * 203)  # several query chunks per call
    q, k, v, text_k, text_v, bias = case(n=203, d=32, n_text=13, seed=2)
    _, lse = kernels.attention_lse(q, k, v, *((text_k, text_v, bias) if with_text else ()))
    threshold = 1e-3
    mass, below = kernels.block_statistics(q, k, lse, block_q, block_k, threshold)
    want_mass, want_below = brute_block_statistics(q, k, lse, block_q, block_k, threshold)
    assert mass.shape == (2, 3, -(-203 // block_q), -(-203 // block_k))
    torch.testing.assert_close(mass.double(), want_mass, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(below.double(), want_below, atol=1e-6, rtol=0)
    assert 0 < float(below.mean()) < 1  # the threshold splits the probabilities
    # the masses are shares of each row's total: video blocks plus the text segment add up to the row count
    p, _ = brute_probabilities(q, k, text_k if with_text else None, bias if with_text else None)
    text_mass = p[..., 203:].sum(-1)  # (B, H, N)
    rows = RB.block_sizes(203, block_q).double()
    text_per_block = torch.nn.functional.pad(text_mass, (0, mass.shape[-2] * block_q - 203)).reshape(
        2, 3, -1, block_q).sum(-1)
    torch.testing.assert_close(mass.double().sum(-1) + text_per_block, rows.expand_as(text_per_block),
                               atol=1e-4, rtol=0)


def test_block_statistics_compute_only_the_blocks_asked_for():
    q, k, v, *_ = case(batch=1, heads=2, n=150, d=16, seed=3)
    _, lse = kernels.attention_lse(q, k, v)
    blocks = torch.rand(1, 2, 3, 5, generator=torch.Generator().manual_seed(3)) < 0.5
    mass, below = kernels.block_statistics(q, k, lse, 64, 32, 1e-3, blocks=blocks)
    full_mass, full_below = kernels.block_statistics(q, k, lse, 64, 32, 1e-3)
    assert torch.isnan(mass[~blocks]).all() and torch.isnan(below[~blocks]).all()
    torch.testing.assert_close(mass[blocks], full_mass[blocks])
    torch.testing.assert_close(below[blocks], full_below[blocks])


def test_bad_block_size_is_rejected_naming_it():
    q, k, v, *_ = case(batch=1, heads=1, n=40, d=16)
    with pytest.raises(ValueError, match="block_k = 0"):
        kernels.block_statistics(q, k, torch.zeros(1, 1, 40), 16, 0, 1e-3)


@pytest.mark.parametrize("script", ["interpret_block_kernels.py", "interpret_tables.py", "interpret_select.py",
                                    "interpret_cluster.py", "interpret_layout.py", "interpret_runner.py"])
def test_triton_kernels_in_the_interpreter(script):
    """The Triton kernels on the CPU through TRITON_INTERPRET=1 (a separate process: the interpreter is chosen
    when the kernels are defined): the block kernels against brute force, the layout kernel's table kernels
    against their PyTorch oracle (tests/table_oracle.py), the selection and k-means assignment kernels against
    the PyTorch reference, the layout kernel (with the pooled tail's segment statistics) against the PyTorch
    executor, and whole sparse calls through the runner on every GPU-path kernel against the reference path."""
    pytest.importorskip("triton")
    script = Path(__file__).with_name(script)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    if result.returncode == 3:
        import numpy
        pytest.skip(f"the Triton interpreter fails on loops with numpy {numpy.__version__} (numpy<2.3 works): "
                    f"{result.stdout.strip()[-200:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ok" in result.stdout
