"""Runs the layout kernel (kernels/triton_attention.py) and the segment statistics it takes for the pooled
tail in the Triton interpreter on the CPU, against the PyTorch reference (run by test_block_kernels.py with
TRITON_INTERPRET=1)."""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interpret_block_kernels import INTERPRETER_BROKEN, interpreter_works  # noqa: E402
from test_reference_kernels import random_layout  # noqa: E402
from comfyui_adacluster.kernels import reference, triton_attention, triton_ops  # noqa: E402
from comfyui_adacluster.kernels.triton_cluster import segment_reduce  # noqa: E402

# (tokens, head dim, query segments, key segments, local block, pooled tail, per-head tail weights, text tokens,
#  key path)
CASES = [
    (150, 64, 5, 9, 0, True, False, 0, "hybrid"),
    (133, 128, 4, 7, 32, True, True, 0, "hybrid"),
    (97, 64, 3, 11, 24, True, True, 7, "stream"),
    (101, 128, 6, 5, 0, False, False, 5, "hybrid"),
]


def check_layout_kernel():
    for n, d, sq, sk, local, tail, weighted, n_text, path in CASES:
        gen = torch.Generator().manual_seed(n + d)
        q, k, v = (2 * torch.randn(2, 2, n, d, generator=gen) for _ in range(3))
        layout, _, _ = random_layout(2, 2, n, sq, sk, density=0.3, local_block=local, tail=tail, seed=n)
        if weighted:
            layout.tail_spread_weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        text_k = text_v = text_bias = None
        if n_text:
            text_k, text_v = (torch.randn(2, 2, n_text, d, generator=gen) for _ in range(2))
            text_bias = torch.zeros(2, 1, 1, n_text)
            text_bias[0, ..., -2:] = float("-inf")  # padded text of the first batch element
        want = reference.execute_layout(q, k, v, layout, text_k, text_v, text_bias)
        triton_attention.KEY_PATH_OVERRIDE = path
        got, _ = triton_attention.run_layout(q, k, v, layout.q_offsets, layout.k_offsets, layout.selected,
                                             layout.q_perm, layout.k_perm, layout.local_block, layout.tail,
                                             text_k, text_v, text_bias, 1 / math.sqrt(d),
                                             tail_spread_weight=layout.tail_spread_weight)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        if tail:  # the tail's inputs handed in through the layout, as the clustering's statistics pass gives them,
            # and through the registered custom op (what execute_layout calls on the GPU)
            k_labels = reference.segment_labels(layout.k_perm, layout.k_offsets, n)
            layout.tail_key_means = reference.segment_means(k, k_labels, sk)[0]
            layout.tail_key_spread = reference.segment_spread(k, k_labels, sk)
            layout.query_squares = q.square().sum(-1)
            layout.validate(2, 2, n)
            got, _ = triton_ops._layout_op(
                q, k, v, layout.q_offsets, layout.k_offsets, layout.selected, layout.q_perm, layout.k_perm,
                layout.local_block, layout.tail, text_k, text_v, text_bias, 1 / math.sqrt(d), layout.q_labels,
                layout.k_labels, layout.tail_spread_weight, layout.tail_key_means, layout.tail_key_spread,
                layout.query_squares)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def check_segment_spread():
    gen = torch.Generator().manual_seed(11)
    x = 3 * torch.randn(1, 3, 77, 64, generator=gen) + 1
    labels = torch.randint(0, 6, (1, 3, 77), generator=gen)
    labels[0, 1] = labels[0, 1].clamp_max(3)  # empty segments 4 and 5 in one head
    perm, offsets = reference.segments_from_labels(labels, 6)
    means, _, _, spread = segment_reduce(x, perm, offsets, mean=True, spread=True)
    want_means, _ = reference.segment_means(x, labels, 6)
    torch.testing.assert_close(means.reshape(1, 3, 6, 64), want_means, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(spread.reshape(1, 3, 6), reference.segment_spread(x, labels, 6), atol=1e-4, rtol=1e-4)


if __name__ == "__main__":
    if not interpreter_works():
        sys.exit(INTERPRETER_BROKEN)
    check_segment_spread()
    check_layout_kernel()
    print("ok")
