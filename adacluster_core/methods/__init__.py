"""The sparse-attention methods, one module each, behind one interface (base.SparseMethod).

``create(config, cache)`` builds the method that ``config.method`` names, with its default settings;
a method object built by hand (e.g. ``AdaSpa(AdaSpaConfig(sparsity=0.7), cache)``) can be given to the
runner instead.
"""
from __future__ import annotations

from ..cache import RunCache
from ..config import AdaClusterConfig
from .adacluster import AdaCluster
from .adaspa import AdaSpa, AdaSpaConfig
from .base import PassResult, Plan, SparseMethod, TextSegment
from .moddit import ModDiT, ModDiTConfig
from .svg2 import SVG2

__all__ = ["AdaCluster", "SVG2", "AdaSpa", "AdaSpaConfig", "ModDiT", "ModDiTConfig", "SparseMethod", "Plan",
           "PassResult", "TextSegment", "create"]


def create(config: AdaClusterConfig, cache: RunCache) -> SparseMethod:
    """The method named by ``config.method`` (AdaCluster and SVG2 take their settings from ``config``)."""
    if config.method == "svg2":
        return SVG2(config, cache)
    if config.method == "adaspa":
        return AdaSpa(AdaSpaConfig(), cache)
    if config.method == "moddit":
        return ModDiT(ModDiTConfig(), cache)
    return AdaCluster(config, cache)
