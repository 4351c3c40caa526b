"""The AdaSpa and MOD-DiT nodes: their widgets, the conversion into method settings, the patch, and the V1
node classes. The V3 classes (method_nodes_v3.py) use the same tables. Nothing here imports ComfyUI.

Both nodes install the same adapter as the AdaCluster node (one runner, one report); only the method that
builds the layouts differs. Unsupported models pass through unchanged with one log line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..adacluster_core.config import ConfigError, from_dict
from ..adacluster_core.methods.adaspa import AdaSpa, AdaSpaConfig, parse_search_steps
from ..adacluster_core.methods.moddit import FAMILY_TOP_K, ModDiT, ModDiTConfig
from .common import CATEGORY
from .widgets import Widget, check_value, check_widget_values

log = logging.getLogger(__name__)

MODEL_TOOLTIP = "A Wan 2.1/2.2, HunyuanVideo or CogVideoX model. Other models pass through unchanged."
TOP_K_FROM_FAMILY = 0

MIN_TOKENS = Widget("min_tokens", "INT", 4096, "Self-attention over fewer video tokens than this stays dense (sparse "
                    "attention does not pay off on short sequences).", "min tokens", 0, 1 << 30, 256, advanced=True)
VERBOSE = Widget("verbose", "BOOLEAN", False, "Log once per shape whether a call ran sparse or why it stayed dense.",
                 "verbose", advanced=True)

ADASPA_WIDGETS: tuple = (
    Widget("sparsity", "FLOAT", 0.8, "Share of 64-token key blocks every query block skips (0 = dense). Heads whose "
           "attention is concentrated get sparser, diffuse heads denser, keeping this mean.", "sparsity", 0.0, 0.99,
           0.01),
    Widget("search_steps", "STRING", "10, 30", "Steps at which the sparse blocks are searched, given for a run of "
           "'search steps of a run of' steps and scaled to this run's length (10, 30 of 50 -> 4, 12 of 20). Steps "
           "before the first search run dense; the first search is a full pass, later ones reuse its log-sum-exp.",
           "search steps"),
    Widget("search_reference_steps", "INT", 50, "The run length the search steps are given for.",
           "search steps of a run of", 1, 10000, 1, advanced=True),
    Widget("head_adaptive", "BOOLEAN", True, "Give heads with high recall a higher sparsity and as many low-recall "
           "heads a lower one (AdaSpa's head-adaptive rule; applies from sparsity 1/3 up).", "head-adaptive",
           advanced=True),
    MIN_TOKENS,
    VERBOSE,
)

MODDIT_WIDGETS: tuple = (
    Widget("pattern_top_k", "INT", TOP_K_FROM_FAMILY, "Diagonal and vertical block patterns kept per head: those with "
           "the lowest fitted sparsity. 0 uses the model family's value (Wan 350, HunyuanVideo 300, CogVideoX 100).",
           "pattern Top-K", 0, 1 << 20, 1),
    Widget("warmup_steps", "INT", 12, "Dense steps before sparse attention starts; the last two of them fit the "
           "pattern intensities (one step: a single fit). Counted from the sigma schedule.", "warm-up steps", 1,
           10000, 1),
    Widget("refresh_interval", "INT", 10, "Steps between refits of the intensities; in between they are "
           "extrapolated linearly.", "refresh interval", 1, 10000, 1, advanced=True),
    Widget("frame_threshold", "FLOAT", 0.1, "A frame's block-diagonal square is kept when its fitted intensity (how "
           "much denser it is than the other patterns predict) exceeds this at both of the last two fits.",
           "frame threshold", 0.0, 0.99, 0.01, advanced=True),
    MIN_TOKENS,
    VERBOSE,
)


@dataclass(frozen=True)
class MethodNode:
    node_id: str
    display_name: str
    method: str  # AdaClusterConfig.method
    description: str
    widgets: tuple
    search_aliases: tuple
    build: Callable[[str, dict], Callable]  # (family, widget values) -> RunCache -> SparseMethod; ConfigError


def adaspa_config(values: dict) -> AdaSpaConfig:
    check_widget_values(ADASPA_WIDGETS, values)
    defaults = AdaSpaConfig()
    steps = parse_search_steps(values.get("search_steps", "10, 30"))
    return AdaSpaConfig(sparsity=float(values.get("sparsity", defaults.sparsity)), search_steps=steps,
                        reference_steps=int(values.get("search_reference_steps", defaults.reference_steps)),
                        head_adaptive=bool(values.get("head_adaptive", defaults.head_adaptive))).validate()


def moddit_config(family: str, values: dict) -> ModDiTConfig:
    check_widget_values(MODDIT_WIDGETS, values)
    defaults = ModDiTConfig()
    top_k = int(values.get("pattern_top_k", TOP_K_FROM_FAMILY)) or FAMILY_TOP_K.get(family, defaults.top_k)
    return ModDiTConfig(top_k=top_k, warmup_steps=int(values.get("warmup_steps", defaults.warmup_steps)),
                        refresh_interval=int(values.get("refresh_interval", defaults.refresh_interval)),
                        tau_e=float(values.get("frame_threshold", defaults.tau_e))).validate()


def _build_adaspa(family: str, values: dict):
    config = adaspa_config(values)
    return lambda cache: AdaSpa(config, cache)


def _build_moddit(family: str, values: dict):
    config = moddit_config(family, values)
    return lambda cache: ModDiT(config, cache)


ADASPA = MethodNode(
    "AdaSpaSparseAttention", "AdaSpa Sparse Attention", "adaspa",
    "Runs the self-attention of Wan 2.1/2.2, HunyuanVideo and CogVideoX with AdaSpa: blockified Top-k sparse "
    "attention over 64-token blocks, found by an online search at a few steps (a full pass at the first search, "
    "cached log-sum-exp later) with head-adaptive sparsity. Steps before the first search stay dense. Returns a "
    "patched copy of the model; connect Sparse Attention Report for its statistics.",
    ADASPA_WIDGETS, ("adaspa", "sparse attention", "blockified attention", "video speedup"), _build_adaspa)
MODDIT = MethodNode(
    "ModDiTSparseAttention", "MOD-DiT Sparse Attention", "moddit",
    "Runs the self-attention of Wan 2.1/2.2, HunyuanVideo and CogVideoX with MOD-DiT: the block sparsity map is "
    "fitted as a mixture of diagonal, vertical and per-frame patterns at the end of a dense warm-up, extrapolated "
    "over the steps and refreshed; every head attends its Top-K patterns and the strong frame blocks. Returns a "
    "patched copy of the model; connect Sparse Attention Report for its statistics.",
    MODDIT_WIDGETS, ("mod-dit", "moddit", "sparse attention", "mixture of distributions", "video speedup"),
    _build_moddit)
METHOD_NODES = (ADASPA, MODDIT)


def validation_error(node: MethodNode, values: dict) -> Optional[str]:
    """The first problem of a set of widget values, or None (the family is not known yet: Wan's defaults)."""
    try:
        node.build("wan", dict(values))
    except ConfigError as exc:
        return str(exc)
    return None


def apply_method(node: MethodNode, model, **values: Any):
    """The patched clone of ``model``; raises ValueError naming a bad value."""
    from ..adacluster_core import comfy_adapter

    verbose = bool(values.pop("verbose", False))
    min_tokens = values.pop("min_tokens", MIN_TOKENS.default)
    family = comfy_adapter.detect_family(model)
    try:
        message = check_value(MIN_TOKENS, min_tokens)
        if message:
            raise ConfigError(message)
        shared = from_dict({"method": node.method, "min_tokens": int(min_tokens)})
        method = node.build(family.name if family is not None else "wan", values)
    except ConfigError as exc:
        raise ValueError(f"{node.display_name}: {exc}") from exc
    if family is None:  # an unpatched clone, and one log line from the adapter
        return comfy_adapter.patch_model(model, shared)
    return comfy_adapter.patch_model(model, shared, family=family, verbose=verbose, method=method)


# ------------------------------------------------------------------------------------------ V1 classes
def v1_input_types(node: MethodNode) -> dict:
    from .v1 import _input_spec

    required = {"model": ("MODEL", {"tooltip": MODEL_TOOLTIP})}
    required.update({w.name: _input_spec(w) for w in node.widgets})
    return {"required": required}


class _MethodNodeV1:
    """What the V1 classes of the method nodes share; each subclass names its MethodNode."""
    node: MethodNode
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return v1_input_types(cls.node)

    def patch(self, model, **values):
        return (apply_method(self.node, model, **values),)


class AdaSpaSparseAttentionV1(_MethodNodeV1):
    node = ADASPA
    DESCRIPTION = ADASPA.description
    SEARCH_ALIASES = list(ADASPA.search_aliases)
    OUTPUT_TOOLTIPS = ("The model with AdaSpa self-attention.",)

    @classmethod
    def VALIDATE_INPUTS(cls, search_steps="10, 30", search_reference_steps=50):
        # the text of the search steps and its rule against the run length; ComfyUI checks the other ranges
        return validation_error(ADASPA, {"search_steps": search_steps,
                                         "search_reference_steps": search_reference_steps}) or True


class ModDiTSparseAttentionV1(_MethodNodeV1):
    node = MODDIT
    DESCRIPTION = MODDIT.description
    SEARCH_ALIASES = list(MODDIT.search_aliases)
    OUTPUT_TOOLTIPS = ("The model with MOD-DiT self-attention.",)


V1_CLASSES = {ADASPA.node_id: AdaSpaSparseAttentionV1, MODDIT.node_id: ModDiTSparseAttentionV1}
V1_DISPLAY_NAMES = {node.node_id: node.display_name for node in METHOD_NODES}
