"""Runs the k-means assignment kernel (kernels/triton_cluster.py) in the Triton interpreter on the CPU against
the PyTorch reference (run by test_block_kernels.py with TRITON_INTERPRET=1): several centroid tiles, odd
sizes, per-group cluster counts, both geometries, and rows that tie between two centroids; and the statistics
pass of a k-means step against the reference on its own labels."""
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


def check_step_statistics(spherical: bool, n: int, n_clusters: int, d: int, seed: int):
    """kmeans_step's statistics pass, as functions of its own labels: means, spreads (empty clusters too) and
    every row's squared length at its original position (the pooled tail's inputs)."""
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(1, 2, n, d, generator=gen) + 0.5
    init = x[:, :, torch.randperm(n, generator=gen)[:n_clusters]].clone()
    if spherical:
        init = reference.normalize_rows(init)
    step = triton_cluster.kmeans_step(x, init, spherical, torch.tensor([[n_clusters - 2] * 2]),  # last 2 empty
                                      spread=True, row_squares=True)
    torch.testing.assert_close(step.mean, reference.segment_means(x, step.labels, n_clusters)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step.spread, reference.segment_spread(x, step.labels, n_clusters), atol=1e-4, rtol=1e-4)
    assert bool((step.spread[..., -2:] == 0).all())
    torch.testing.assert_close(step.row_squares, x.square().sum(-1), atol=1e-4, rtol=1e-5)


if __name__ == "__main__":
    if not interpreter_works():
        sys.exit(INTERPRETER_BROKEN)
    for seed, (spherical, n, n_clusters, d) in enumerate([(True, 77, 70, 128), (False, 130, 45, 64),
                                                         (True, 5, 3, 64), (False, 61, 97, 128)]):
        check(spherical, 3, n, n_clusters, d, seed)
    check_step_statistics(True, 93, 9, 64, 5)
    check_step_statistics(False, 141, 13, 128, 6)
    print("ok")
