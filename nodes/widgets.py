"""Widgets of the pack's nodes: one table per node shared by the V3 and V1 node classes, and the
conversion of widget values into a validated AdaClusterConfig. Nothing here imports ComfyUI.

How validation works (the same for every node of the pack):
* every range and every choice is a widget property (min/max, combo options), so ComfyUI checks it itself
  when a prompt is queued and reports one error under the widget that is wrong;
* each widget's range is what is really accepted: no widget value is refused because of another widget;
* a check ComfyUI does not do is a widget's ``check`` (a plain file name; a profile among the listed ones,
  since ComfyUI 0.3.64 does not check V3 combo options); a node has at most one such widget, because
  ComfyUI repeats a custom validator's error under every input the validator takes (``custom_validator``);
* on ComfyUI 0.3.64 the other V3 combos (preset, selection) are checked when the node runs, with the
  same message naming the widget;
* combo options list the default first (``Widget`` refuses anything else), since clients take the first
  option as the default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..adacluster_core.config import MODEL_FAMILIES, SELECTION_RECIPES, AdaClusterConfig, ConfigError, load_preset
from ..adacluster_core.profiles import check_profile_name

PRESET_AUTO = "auto"
PRESETS = (PRESET_AUTO,) + MODEL_FAMILIES
RECIPES = tuple(SELECTION_RECIPES)
WARMUP_FROM_PRESET = -1
NO_PROFILE = ""  # calibration_profile choice: no profile
TOP_K_FROM_SELECTION = 0  # "Top-K clusters" widget value that keeps the selection recipe's own Top-K
BUDGET_BY_NOISE, BUDGET_CONSTANT = "by noise level", "same every step"  # "budget schedule" choices
HEAD_BUDGETS_MATCHED, HEAD_BUDGETS_ONE = "matched to error", "one Top-K"  # "head budgets" choices


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
    choices: Optional[Callable[[], tuple]] = None  # combo whose options are read when asked (files)
    check: Optional[Callable[[Any], Optional[str]]] = None  # extra check: a message, or None when fine

    def __post_init__(self):
        if self.kind == "COMBO" and self.choices is None and (not self.options or self.options[0] != self.default):
            raise ValueError(f"widget {self.name}: the default {self.default!r} must be the first option")

    def option_list(self) -> list:
        """The combo options, default first."""
        if self.choices is None:
            return list(self.options)
        found = [o for o in self.choices() if o != self.default]
        return [self.default] + found


WIDGETS: tuple = (
    Widget("preset", "COMBO", PRESET_AUTO, "Settings of a model family (presets/*.yaml); the widgets below override "
           "them. 'auto' picks the preset of the connected model: Wan 2.1/2.2, HunyuanVideo or CogVideoX.",
           "preset", options=PRESETS),
    Widget("sparsity_threshold", "FLOAT", 1.5, "Key clustering threshold alpha: a key farther than alpha x the mean "
           "key-to-centroid distance is an outlier and gets re-clustered. Lower = tighter clusters, more of them "
           "(more accurate, slower).", "sparsity threshold", 0.05, 100.0, 0.05, config_key="sparsity_threshold"),
    Widget("query_clusters", "INT", 130, "Clusters of the normalised queries per head. Every query of a cluster "
           "attends the same key clusters. More clusters: each attends keys closer to its own queries (published "
           "value 65).", "query clusters", 1, 4096, 1, config_key="query_clusters"),
    Widget("initial_top_k", "INT", 200, "Initial number of key clusters per head (K0) of the multi-stage key "
           "clustering; outliers then get up to this many new clusters per stage. More, smaller clusters let the "
           "same Top-K keep fewer keys (published value 100).", "initial top-K (key clusters)",
           1, 4096, 1, config_key="initial_key_clusters"),
    Widget("top_k_clusters", "INT", TOP_K_FROM_SELECTION, "Key clusters every query cluster attends. 0 uses the "
           "selection's own value ('hybrid' 12, 'paper' 64); with matched head budgets each head gets half to twice "
           "it (up to 32 times in a layer that would otherwise run dense). A value at or above a layer's key "
           "cluster count keeps every cluster of that layer (exact "
           "attention). 'svg2' keeps the smallest set of clusters holding 90% of the attention mass instead and "
           "ignores this value.", "Top-K clusters", TOP_K_FROM_SELECTION, 4096, 1,
           config_key="selection.top_k"),
    Widget("warmup_steps", "INT", WARMUP_FROM_PRESET, "Sampler steps that run dense before sparse attention starts; "
           "the last of them calibrates the clusters. -1 uses the preset (3 for every family; the published "
           "schedule is 10). Counted from the sigma schedule, so two-evaluation samplers (heun, dpm 2S) count right.",
           "warm-up steps", WARMUP_FROM_PRESET, 10000, 1, config_key="warmup_steps"),
    Widget("dense_layer_fraction", "FLOAT", 0.15, "The most layers that stay dense, as a share of all layers: after "
           "calibration the layers chosen by 'dense layers by' (plus any layer that is hard to compress) run full "
           "attention; with matched head budgets such a layer may run sparse at up to 32 times the Top-K "
           "instead, where that brings its error under the dense-layer threshold (0.1) and keeps fewer keys for "
           "no more error.",
           "dense-layer fraction", 0.0, 1.0, 0.01, config_key="dense_layer_fraction"),
    Widget("dense_layers_by", "COMBO", "error", "Which layers use the dense-layer share. 'error': the calibration "
           "step measures every layer's sparse output against dense; of the layers that err most, those above 0.1 "
           "relative error run dense. 'clusters': the layers whose keys need the most clusters, as published.",
           "dense layers by", options=("error", "clusters"), advanced=True, config_key="dense_layers_by"),
    Widget("selection", "COMBO", "hybrid", "How key clusters are chosen per query cluster. 'hybrid' (lowest error "
           "per kept token in our measurements): Top-K by the size-weighted centroid estimate, plus each query's own "
           "64-token neighbourhood, the clusters holding the query cluster's own tokens, and a pooled tail for "
           "skipped clusters. 'paper': Top-K by the TensorQuest upper bound, as published (with 65 query clusters "
           "and initial top-K 100). 'svg2': Sparse "
           "VideoGen 2 for comparison (Euclidean k-means of queries and keys, centroid rule with top-p 0.9).",
           "selection",
           options=RECIPES, advanced=True, config_key="recipe"),
    Widget("min_tokens", "INT", 4096, "Self-attention over fewer video tokens than this stays dense (sparse "
           "attention does not pay off on short sequences).", "min tokens", 0, 1 << 30, 256, advanced=True,
           config_key="min_tokens"),
    Widget("verbose", "BOOLEAN", False, "Log once per shape whether a call ran sparse or why it stayed dense.",
           "verbose", advanced=True),
    Widget("calibration_profile", "COMBO", NO_PROFILE, "Optional calibration profile saved by the Sparse Attention "
           "Report node from an earlier run of the same model, resolution and length: skips the key clustering "
           "calibration. Lists the profiles in models/adacluster_profiles (and extra model paths registered for "
           "adacluster_profiles); empty = none.", "calibration profile", advanced=True, optional=True,
           choices=lambda: _profile_names(), check=lambda value: _profile_check(value)),
    Widget("budget_schedule", "COMBO", BUDGET_BY_NOISE, "How the Top-K changes over the sampler steps. 'by noise "
           "level': the selection's own schedule; for 'hybrid', attention is more spread out at high noise, so the "
           "first quarter of the denoising keeps four times the Top-K. The quarter is read from the noise level, "
           "so a sampler that runs only part of the schedule (start/end steps, the two Wan 2.2 experts) gets "
           "the part it covers. 'same every step': "
           "one Top-K on every step, as published ('paper' and 'svg2' always do this).", "budget schedule",
           options=(BUDGET_BY_NOISE, BUDGET_CONSTANT), advanced=True, optional=True),
    Widget("cuda_graphs", "BOOLEAN", False, "Replay each layer's steady sparse call as a CUDA graph, which saves "
           "its many small kernel launches (a few ms per call at 480p). Worth it where the CPU cannot stay ahead of the GPU; in "
           "a plain run it mostly can. Costs about five copies of one layer's query tensor in VRAM, freed when the "
           "run ends. Ignored when ComfyUI runs with --disable-cuda-graphs.", "CUDA graphs", advanced=True,
           optional=True, config_key="cuda_graphs"),
    # new widgets go last: UI-format workflows store widget values by position
    Widget("head_budgets", "COMBO", HEAD_BUDGETS_MATCHED, "How many key clusters each head and layer keeps. "
           "'matched to error': the calibration step measures every head at half to twice the Top-K (and at four "
           "to 32 times in layers that might otherwise run dense) and "
           "gives keys where they remove the most error, for the fewest kept keys at no more error than one "
           "Top-K for every head; a layer picked to run dense may run sparse with a larger Top-K where that "
           "brings it under the dense-layer threshold and is cheaper for the same error ('hybrid' only: 'paper' "
           "and 'svg2' keep one Top-K, as published). "
           "'one Top-K': the same Top-K for every head, and the dense layers as picked.", "head budgets",
           options=(HEAD_BUDGETS_MATCHED, HEAD_BUDGETS_ONE), advanced=True, optional=True),
)
WIDGETS_BY_NAME = {w.name: w for w in WIDGETS}

# Input of the report node: where to save the last run's calibration for the calibration_profile widget.
SAVE_PROFILE_WIDGET = Widget(
    "save_profile", "STRING", "", "Optional plain file name (letters, digits, '.', '_', '-'; no folders): saves the "
    "last run's calibration (key cluster counts per layer and head, dense layers) as <name>.safetensors in "
    "models/adacluster_profiles, to choose later in the 'calibration profile' input of AdaCluster Sparse "
    "Attention for the same model, resolution and length. A file there that is not a saved profile is never "
    "overwritten. Empty: nothing is saved.", "save calibration profile as", optional=True,
    check=lambda value: None if value == "" else check_profile_name(value))
REPORT_WIDGETS = (SAVE_PROFILE_WIDGET,)


def _profile_names() -> tuple:
    from .profile_folder import profile_names

    return tuple(profile_names())


def _profile_check(value) -> Optional[str]:
    # Checked by the node itself: ComfyUI 0.3.64 does not check the options of V3 combo inputs.
    if value == NO_PROFILE or value in _profile_names():
        return None
    return (f"{value!r} is not a calibration profile in the adacluster_profiles folder; choose one of the "
            "listed profiles or leave it empty")


def custom_validator(widgets: tuple) -> Optional[Widget]:
    """The one widget of a node's table that needs a check ComfyUI cannot do itself (None: no such widget).

    A node's validate function takes exactly that widget's value, so its error is reported once, under it."""
    checked = [w for w in widgets if w.check is not None]
    if len(checked) > 1:
        raise ValueError(f"widgets {[w.name for w in checked]} all need a custom check; ComfyUI would report "
                         "each error under all of them: express the others as ranges or choices")
    return checked[0] if checked else None


def check_value(w: Widget, value: Any) -> Optional[str]:
    """An error message for ``value`` of widget ``w`` (its kind, range, choices and check), or None."""
    if w.kind == "COMBO" and w.check is not None:
        problem = w.check(value)
        return f"{w.name} = {problem}" if problem else None
    if w.kind == "COMBO":
        options = w.option_list()
        if value not in options:
            return f"{w.name} = {value!r} is not one of {', '.join(map(repr, options))}"
        return None
    if w.kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{w.name} must be true or false, got {value!r}"
    if w.kind == "STRING":
        if not isinstance(value, str):
            return f"{w.name} must be text, got {value!r}"
        problem = w.check(value) if w.check is not None else None
        return f"{w.name}: {problem}" if problem else None
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if w.kind == "INT" and not (is_number and float(value).is_integer()):
        return f"{w.name} = {value!r} is not an integer; expected an integer in [{w.minimum}, {w.maximum}]"
    if not is_number or not math.isfinite(value) or not w.minimum <= value <= w.maximum:
        kind = "an integer" if w.kind == "INT" else "a number"
        return f"{w.name} = {value!r} is out of range: expected {kind} in [{w.minimum}, {w.maximum}]"
    return None


def check_widget_values(widgets: tuple, values: dict) -> None:
    """ConfigError naming the first unknown widget or bad value and its allowed range."""
    by_name = {w.name: w for w in widgets}
    for name, value in values.items():
        if name not in by_name:
            raise ConfigError(f"unknown widget {name!r}")
        message = check_value(by_name[name], value)
        if message:
            raise ConfigError(message)


def config_from_widgets(family: str, **values: Any) -> AdaClusterConfig:
    """The preset of ``family`` with the widget values applied; ConfigError names any bad widget value."""
    check_widget_values(WIDGETS, values)
    overrides = {}
    if values.get("budget_schedule") == BUDGET_CONSTANT:
        overrides.update({"selection.high_noise_top_k_scale": 1.0, "selection.low_noise_top_k_scale": 1.0})
    if values.get("head_budgets") == HEAD_BUDGETS_ONE:
        overrides["selection.budget"] = "fixed"
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
