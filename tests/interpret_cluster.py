"""Runs the k-means assignment kernel (kernels/triton_cluster.py) in the Triton interpreter on the CPU against
the PyTorch reference (run by test_block_kernels.py with TRITON_INTERPRET=1): several centroid tiles, odd
sizes, per-group cluster counts, both geometries, and rows that tie between two centroids."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interpret_block_kernels import INTERPRETER_BROKEN, interpreter_works  # noqa: E402
from comfyui_adacluster.kernels import reference, triton_cluster  # noqa: E402


def dyadic_rows(groups: int, rows: int, d: int, spherical: bool, gen: torch.Generator) -> torch.Tensor:
    """Random rows whose dot products are exact in fp32 whatever the summation order, so a tie between two
    centroids is a tie in every matrix product (a BLAS may round one output column differently from another):
    spherical, +-1/8 on 64 random channels (unit norm exactly); Euclidean, multiples of 1/8 in [-2, 2]."""
    if not spherical:
        return torch.randint(-16, 17, (groups, rows, d), generator=gen).float() / 8
    signs = torch.randint(0, 2, (groups, rows, d), generator=gen).float() * 2 - 1
    support = torch.rand(groups, rows, d, generator=gen).argsort(-1) < 64
    return signs * support / 8


def check(spherical: bool, groups: int, n: int, n_clusters: int, d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = dyadic_rows(groups, n, d, spherical, gen)
    cent = dyadic_rows(groups, n_clusters, d, spherical, gen)
    # duplicates of one centroid 16 slots apart, and the last slot: the same column of later tiles for any
    # tile width of 16 or more, or another column; of tied centroids the lowest slot wins
    twin = min(3, n_clusters - 2)
    cent[:, twin + 16::16] = cent[:, twin:twin + 1]
    cent[:, -1] = cent[:, twin]
    x[:, :5] = cent[:, twin:twin + 1] * 2.0
    counts = torch.randint(1, n_clusters + 1, (groups,), generator=gen)
    counts[0] = n_clusters
    labels, fit, sizes = triton_cluster.assign(x, cent, spherical, counts)
    want_labels, want_fit = reference.kmeans_assign(x, cent, spherical, counts)
    assert torch.equal(labels.long(), want_labels), (spherical, n, n_clusters, d)
    torch.testing.assert_close(fit, want_fit, atol=1e-3, rtol=1e-3)
    assert torch.equal(sizes.long(), torch.nn.functional.one_hot(want_labels, n_clusters).sum(-2))


if __name__ == "__main__":
    if not interpreter_works():
        sys.exit(INTERPRETER_BROKEN)
    for seed, (spherical, n, n_clusters, d) in enumerate([(True, 77, 70, 128), (False, 130, 45, 64),
                                                         (True, 5, 3, 64), (False, 61, 97, 128)]):
        check(spherical, 3, n, n_clusters, d, seed)
    print("ok")
