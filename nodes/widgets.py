"""Widgets of the AdaCluster node: one table shared by the V3 and V1 node classes, and the
conversion of widget values into a validated AdaClusterConfig. Nothing here imports ComfyUI."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from ..adacluster_core.config import MODEL_FAMILIES, SELECTION_RECIPES, AdaClusterConfig, ConfigError, load_preset

PRESET_AUTO = "auto"
PRESETS = (PRESET_AUTO,) + MODEL_FAMILIES
RECIPES = tuple(SELECTION_RECIPES)
WARMUP_FROM_PRESET = -1
TOP_K_FROM_SELECTION = 0  # "Top-K clusters" widget value that keeps the selection recipe's own Top-K


@dataclass(frozen=True)
class Widget:
    name: str
    kind: str  # "FLOAT", "INT", "COMBO", "BOOLEAN", "STRING"
    default: Any
    tooltip: str
    display_name: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    step: Optional[float] = None
    options: tuple = ()
    advanced: bool = False
    optional: bool = False
    config_key: Optional[str] = None  # field of AdaClusterConfig this widget sets


WIDGETS: tuple = (
    Widget("preset", "COMBO", PRESET_AUTO, "Settings of a model family (presets/*.yaml); the widgets below override "
           "them. 'auto' picks the preset of the connected model: Wan 2.1/2.2, HunyuanVideo or CogVideoX.",
           "preset", options=PRESETS),
    Widget("sparsity_threshold", "FLOAT", 1.5, "Key clustering threshold alpha: a key farther than alpha x the mean "
           "key-to-centroid distance is an outlier and gets re-clustered. Lower = tighter clusters, more of them "
           "(more accurate, slower).", "sparsity threshold", 0.05, 100.0, 0.05, config_key="sparsity_threshold"),
    Widget("query_clusters", "INT", 65, "Clusters of the normalised queries per head. Every query of a cluster "
           "attends the same key clusters.", "query clusters", 1, 4096, 1, config_key="query_clusters"),
    Widget("initial_top_k", "INT", 100, "Initial number of key clusters per head (K0) of the multi-stage key "
           "clustering; outliers then get up to this many new clusters per stage.", "initial top-K (key clusters)",
           1, 4096, 1, config_key="initial_key_clusters"),
    Widget("top_k_clusters", "INT", TOP_K_FROM_SELECTION, "Key clusters every query cluster attends. 0 uses the "
           "selection's own value ('hybrid' 16, 'paper' 64). 'svg2' keeps the smallest set of clusters holding 90% "
           "of the attention mass instead and ignores this value.", "Top-K clusters", TOP_K_FROM_SELECTION, 4096, 1,
           config_key="selection.top_k"),
    Widget("warmup_steps", "INT", WARMUP_FROM_PRESET, "Sampler steps that run dense before sparse attention starts; "
           "the last of them calibrates the clusters. -1 uses the preset (Wan 10, HunyuanVideo 6, CogVideoX 10). "
           "Counted from the sigma schedule, so two-evaluation samplers (heun, dpm 2S) count right.",
           "warm-up steps", WARMUP_FROM_PRESET, 10000, 1, config_key="warmup_steps"),
    Widget("dense_layer_fraction", "FLOAT", 0.15, "Share of layers that stay dense: after calibration the layers "
           "whose keys need the most clusters (plus any layer that is hard to compress) run full attention.",
           "dense-layer fraction", 0.0, 1.0, 0.01, config_key="dense_layer_fraction"),
    Widget("selection", "COMBO", "hybrid", "How key clusters are chosen per query cluster. 'paper': Top-K by the "
           "TensorQuest upper bound, as published. 'hybrid' (lowest error per kept token in our measurements): "
           "Top-K by the size-weighted centroid estimate, plus each query's own 64-token neighbourhood, the clusters "
           "holding the query cluster's own tokens, and a pooled tail for skipped clusters. 'svg2': Sparse "
           "VideoGen 2 for comparison (Euclidean k-means of queries and keys, centroid rule with top-p 0.9).",
           "selection",
           options=RECIPES, advanced=True, config_key="recipe"),
    Widget("min_tokens", "INT", 4096, "Self-attention over fewer video tokens than this stays dense (sparse "
           "attention does not pay off on short sequences).", "min tokens", 0, 1 << 30, 256, advanced=True,
           config_key="min_tokens"),
    Widget("verbose", "BOOLEAN", False, "Log once per shape whether a call ran sparse or why it stayed dense.",
           "verbose", advanced=True),
    Widget("calibration_profile", "STRING", "", "Optional calibration profile (.safetensors) saved from an earlier run "
           "of the same model, resolution and length: skips the key clustering calibration. A bare file name is "
           "looked up in models/adacluster_profiles.", "calibration profile", advanced=True, optional=True),
)
WIDGETS_BY_NAME = {w.name: w for w in WIDGETS}

# Input of the report node: where to save the last run's calibration for the calibration_profile widget.
SAVE_PROFILE_WIDGET = Widget(
    "save_profile", "STRING", "", "Optional file name: saves the last run's calibration (key cluster counts per "
    "layer and head, dense layers) as a profile in models/adacluster_profiles, to load later through the "
    "'calibration profile' input of AdaCluster Sparse Attention for the same model, resolution and length. "
    "Empty: nothing is saved.", "save calibration profile as", optional=True)


def check_widget(name: str, value: Any) -> Optional[str]:
    """An error message naming the value and the allowed range, or None when the value is allowed."""
    w = WIDGETS_BY_NAME[name]
    if w.kind == "COMBO":
        return None if value in w.options else f"{name} = {value!r} is not one of {', '.join(map(repr, w.options))}"
    if w.kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"
    if w.kind == "STRING":
        return None if isinstance(value, str) else f"{name} must be text, got {value!r}"
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if w.kind == "INT" and not (is_number and float(value).is_integer()):
        return f"{name} = {value!r} is not an integer; expected an integer in [{w.minimum}, {w.maximum}]"
    if not is_number or not math.isfinite(value) or not w.minimum <= value <= w.maximum:
        kind = "an integer" if w.kind == "INT" else "a number"
        return f"{name} = {value!r} is out of range: expected {kind} in [{w.minimum}, {w.maximum}]"
    return None


def config_from_widgets(family: str, **values: Any) -> AdaClusterConfig:
    """The preset of ``family`` with the widget values applied; ConfigError names any bad value."""
    for name, value in values.items():
        if name not in WIDGETS_BY_NAME:
            raise ConfigError(f"unknown widget {name!r}")
        message = check_widget(name, value)
        if message:
            raise ConfigError(message)
    overrides = {}
    for name, value in values.items():
        key = WIDGETS_BY_NAME[name].config_key
        if key is None or (name == "warmup_steps" and value == WARMUP_FROM_PRESET):
            continue
        if name == "top_k_clusters" and value == TOP_K_FROM_SELECTION:
            continue
        if name == "selection" and value == "svg2":  # SVG2 as a whole: its clustering and its selection rule
            overrides["method"] = "svg2"
        overrides[key] = int(value) if WIDGETS_BY_NAME[name].kind == "INT" else value
    return load_preset(family, **overrides)


def resolve_profile_path(value: str, models_dir: Optional[str] = None) -> Optional[str]:
    """The file a calibration_profile or save_profile value names (None for an empty value).

    A bare name is looked up in models/adacluster_profiles; ".safetensors" is added when missing."""
    value = (value or "").strip()
    if not value:
        return None
    if not value.endswith(".safetensors"):
        value += ".safetensors"
    if os.path.isabs(value) or os.sep in value or not models_dir:
        return value
    return os.path.join(models_dir, "adacluster_profiles", value)


def validate_widgets(values: dict, models_dir: Optional[str] = None) -> Optional[str]:
    """The first problem of a set of widget values (ranges, cross-field rules, the profile file), or None.

    The preset family is not known before a model arrives; 'auto' is checked against the Wan preset."""
    present = {k: v for k, v in values.items() if k in WIDGETS_BY_NAME}
    family = present.get("preset", PRESET_AUTO)
    family = "wan" if family == PRESET_AUTO or family not in MODEL_FAMILIES else family
    settings = {k: v for k, v in present.items() if k not in ("preset", "calibration_profile")}
    try:
        if "preset" in present and check_widget("preset", present["preset"]):
            return check_widget("preset", present["preset"])
        config_from_widgets(family, **settings)
        path = resolve_profile_path(present.get("calibration_profile", ""), models_dir)
        if path is not None and not os.path.isfile(path):
            return f"calibration_profile = {present['calibration_profile']!r}: file {path!r} does not exist"
    except ConfigError as exc:
        return str(exc)
    return None
