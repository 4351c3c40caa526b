"""Runs the Triton block kernels in the interpreter on the CPU against brute force (run by
test_block_kernels.py with TRITON_INTERPRET=1)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from block_cases import brute_attention, brute_block_statistics, case  # noqa: E402
from comfyui_adacluster.kernels import triton_blocks  # noqa: E402


INTERPRETER_BROKEN = 3  # exit status: this Triton's interpreter cannot run loops with this numpy


def interpreter_works() -> bool:
    import triton
    import triton.language as tl

    @triton.jit
    def count(X, N, B: tl.constexpr):
        acc = tl.zeros([B], tl.float32)
        for _ in range(0, N, B):
            acc += 1.0
        tl.store(X + tl.arange(0, B), acc)

    x = torch.zeros(16)
    try:
        count[(1,)](x, 40, B=16)
    except Exception as exc:  # noqa: BLE001 - reported by the caller as a skip with the reason
        print(f"interpreter broken: {exc!r}")
        return False
    return bool((x == 3).all())


def main():
    if not interpreter_works():
        sys.exit(INTERPRETER_BROKEN)
    for with_text in (False, True):
        q, k, v, text_k, text_v, bias = case(batch=1, heads=2, n=75, d=16, n_text=9, seed=4 + with_text)
        extra = (text_k, text_v, bias) if with_text else ()
        out, lse = triton_blocks.attention_lse(q, k, v, *extra)
        want_out, want_lse = brute_attention(q, k, v, *extra)
        torch.testing.assert_close(out.double(), want_out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-5)
        for block_q, block_k in ((32, 32), (16, 64)):
            mass, below = triton_blocks.block_statistics(q, k, lse, block_q, block_k, 2e-3)
            want_mass, want_below = brute_block_statistics(q, k, lse, block_q, block_k, 2e-3)
            torch.testing.assert_close(mass.double(), want_mass, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(below.double(), want_below, atol=1e-6, rtol=0)
        blocks = torch.rand(mass.shape, generator=torch.Generator().manual_seed(5)) < 0.5
        some_mass, _ = triton_blocks.block_statistics(q, k, lse, 16, 64, 2e-3, blocks=blocks)
        assert torch.isnan(some_mass[~blocks]).all()
        torch.testing.assert_close(some_mass[blocks], mass[blocks])
    print("ok")


if __name__ == "__main__":
    main()
