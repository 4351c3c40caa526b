"""Sparse VideoGen 2's rule as a baseline: Euclidean k-means of queries and keys with fixed counts, the
size-weighted centroid estimate with top-p (the "svg2" selection recipe). Same schedule as AdaCluster."""
from __future__ import annotations

import torch

from ... import kernels
from .. import clustering
from ..clustering import Clusters
from .adacluster import AdaCluster


class SVG2(AdaCluster):
    name = "svg2"
    spherical_queries = False

    def __init__(self, config, cache):
        super().__init__(config, cache)
        self.dense_layer_fraction = 0.0  # Sparse VideoGen 2 as a whole: no dense layers, no per-head budget
        self.probes_at_pass = False

    def _initial_clusters(self, q, k, call, gen):
        cfg = self.config
        n = q.shape[-2]
        qc = _euclidean(q, min(cfg.query_clusters, n), cfg.calibration_iters, gen)
        kc = _euclidean(k, min(cfg.key_clusters_svg2, n), cfg.calibration_iters, gen)
        return qc, kc, torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)


def _euclidean(x, count, iters, gen) -> Clusters:
    centroids, labels, sizes, _ = kernels.kmeans(x, clustering.sample_rows(x, count, gen), iters, False)
    return Clusters(centroids, labels, sizes, torch.full(x.shape[:2], count, dtype=torch.int64, device=x.device))
