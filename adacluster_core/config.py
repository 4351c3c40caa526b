"""Configuration: one validated dataclass, selection recipes by name, and YAML presets per model family.

Every value is checked where it enters (node widgets, presets, profiles). A bad value raises
ConfigError naming the field, the value and the allowed range, before anything is applied.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

PRESET_DIR = Path(__file__).with_name("presets")
MODEL_FAMILIES = ("wan", "hunyuan_video", "cogvideox")


class ConfigError(ValueError):
    """A configuration value is out of range or unknown; the message names it."""


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not one of {', '.join(map(repr, allowed))}")


def _int_range(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} = {value!r} is out of range: expected an integer in [{low}, {high}]")


def _float_range(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} = {value!r} is out of range: expected a number in {bracket}{low}, {high}]")


@dataclass(frozen=True)
class SelectionConfig:
    """How key clusters are chosen per query cluster (README, "Selection recipes").

    Every instance is validated when it is built; a bad value raises ConfigError naming it."""

    score: str = "centroid"  # "quest" (TensorQuest bound), "centroid" (size-weighted estimate), "blend"
    blend_weight: float = 0.5  # weight of the TensorQuest bound in "blend"
    count: str = "topk"  # "topk": fixed number of clusters; "mass": smallest set reaching top_p of the mass
    # 12 with the pooled tail's second-order weight: on the budget study's whole runs it errs no more than 16 did
    # with the size-only tail, for 16% less attention work (README, "Budget and schedule")
    top_k: int = 12
    top_p: float = 0.9
    min_kept_fraction: float = 0.05  # keep adding clusters in score order until this share of keys
    tail: bool = True  # pooled tail for skipped clusters
    local_block: int = 64  # each query's own block in original order; 0 = off
    own_clusters: bool = True  # always keep the key clusters that hold the query cluster's own tokens
    # "matched" (with count "topk"): the calibration step measures every head at top_k x (1/2 .. 2), x 4 in
    # layers that err above the dense-layer threshold at top_k, and x 8, 16, 32 while the one before still does;
    # each head's Top-K, and which of the layers picked for dense really run dense (only under the dense-layer
    # threshold), are set for the fewest kept keys whose summed layer error is at most 95% of that with top_k
    # for every head (budget.py); "fixed": top_k for every head.
    budget: str = "matched"
    # Budget schedule over the denoising: attention is more spread out at high noise, so the Top-K is
    # scaled by high_noise_top_k_scale on the first noise_phase_fraction of the denoising and by
    # low_noise_top_k_scale on the last noise_phase_fraction (1 and 1: the same Top-K on every step).
    # Measured by noise level where the sampler's schedule is known (top_k_scale), else by step count.
    # A larger Top-K on the first quarter lets sparse steps start at step 3 of 50 instead of after 10 dense
    # warm-up steps. With 200 initial key clusters four times the Top-K (about a third of the keys) measured
    # the error of the previous 10-step warm-up at high noise; three times, enough with 100 clusters, measured
    # up to a fifth higher there (README, "Budget and schedule").
    high_noise_top_k_scale: float = 4.0
    low_noise_top_k_scale: float = 1.0
    noise_phase_fraction: float = 0.25

    def __post_init__(self):
        self.validate()

    def top_k_scale(self, step: int, total_steps: int, progress: Optional[float] = None) -> float:
        """The budget schedule's Top-K multiplier at a sampler step (0-based) of a run of total_steps.
        ``progress``: the step's denoising progress by noise level (schedule.noise_progress) where the run
        knows it; else the step's share of the run's steps."""
        progress = step / max(1, total_steps) if progress is None else progress
        if progress < self.noise_phase_fraction:
            return self.high_noise_top_k_scale
        if progress >= 1.0 - self.noise_phase_fraction:
            return self.low_noise_top_k_scale
        return 1.0

    def validate(self) -> "SelectionConfig":
        _choice("selection.score", self.score, ("quest", "centroid", "blend"))
        _float_range("selection.blend_weight", self.blend_weight, 0.0, 1.0)
        _choice("selection.count", self.count, ("topk", "mass"))
        # A Top-K at or above a layer's key cluster count keeps every cluster of that layer.
        _int_range("selection.top_k", self.top_k, 1, 4096)
        _float_range("selection.top_p", self.top_p, 0.0, 1.0, low_open=True)
        _float_range("selection.min_kept_fraction", self.min_kept_fraction, 0.0, 1.0)
        _int_range("selection.local_block", self.local_block, 0, 1 << 16)
        _choice("selection.budget", self.budget, ("matched", "fixed"))
        _float_range("selection.high_noise_top_k_scale", self.high_noise_top_k_scale, 0.0, 16.0, low_open=True)
        _float_range("selection.low_noise_top_k_scale", self.low_noise_top_k_scale, 0.0, 16.0, low_open=True)
        _float_range("selection.noise_phase_fraction", self.noise_phase_fraction, 0.0, 0.5)
        for name in ("tail", "own_clusters"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"selection.{name} must be true or false, got {getattr(self, name)!r}")
        return self


# Named selection recipes. "paper" is AdaCluster as published; "svg2" uses SVG2's rule on both sides.
# "hybrid" (the defaults above) measured the lowest error per kept fraction on the main command's workload
# (see README, "Selection recipes").
# The default recipe is listed first (menus built from this table show it first).
SELECTION_RECIPES: dict[str, SelectionConfig] = {
    "hybrid": SelectionConfig(),
    "paper": SelectionConfig(score="quest", count="topk", top_k=64, tail=False, local_block=0, own_clusters=False,
                             budget="fixed", high_noise_top_k_scale=1.0),
    "svg2": SelectionConfig(score="centroid", count="mass", top_k=64, top_p=0.9, tail=False, local_block=0,
                            own_clusters=False, min_kept_fraction=0.0, budget="fixed",
                            high_noise_top_k_scale=1.0),
}
DEFAULT_RECIPE = "hybrid"
# AdaCluster as published, for the "paper" rows of the demo and the benchmarks: its selection recipe, its
# dense-layer rule and its cluster counts (the defaults measured fewer kept keys at equal error with twice as
# many clusters on both sides: README, "Budget and schedule").
PUBLISHED_SETTINGS = {"recipe": "paper", "dense_layers_by": "clusters", "query_clusters": 65,
                      "initial_key_clusters": 100}
METHODS = ("adacluster", "svg2", "adaspa", "moddit")  # methods/, one module each


@dataclass(frozen=True)
class AdaClusterConfig:
    method: str = "adacluster"  # "adacluster" (angular queries, adaptive keys) or "svg2" (Euclidean both)
    recipe: str = DEFAULT_RECIPE  # selection recipe name, see SELECTION_RECIPES
    query_clusters: int = 130
    initial_key_clusters: int = 200
    sparsity_threshold: float = 1.5  # alpha: outlier if distance > alpha * mean (relative) or > alpha (absolute)
    threshold_mode: str = "relative"
    max_stages: int = 10
    max_clusters_fraction: float = 1.0 / 3.0  # a layer needing more than N * this is "hard to compress"
    key_clusters_svg2: int = 200  # fixed key cluster count for the svg2 method
    calibration_iters: int = 3
    step_iters: int = 1  # warm-started k-means iterations on sparse steps
    dense_layer_fraction: float = 0.15  # at most this share of layers runs dense
    # "error": the layers whose sparse output measured furthest from dense at calibration, if above
    # dense_error_threshold; "clusters": the layers needing the most key clusters (as published)
    dense_layers_by: str = "error"
    dense_error_threshold: float = 0.1
    warmup_steps: int = 3  # dense steps; the last calibrates (10: the published schedule)
    min_tokens: int = 4096  # shorter self-attention stays dense
    seed: int = 0
    # steady sparse calls replayed as CUDA graphs (graphs.py); ComfyUI's --disable-cuda-graphs overrides it
    cuda_graphs: bool = False
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def __post_init__(self):
        self.validate()  # built directly or through from_dict / replace: never an unchecked config

    def validate(self) -> "AdaClusterConfig":
        _choice("method", self.method, METHODS)
        _choice("recipe", self.recipe, tuple(SELECTION_RECIPES))
        _int_range("query_clusters", self.query_clusters, 1, 4096)
        _int_range("initial_key_clusters", self.initial_key_clusters, 1, 4096)
        _float_range("sparsity_threshold", self.sparsity_threshold, 0.0, math.inf, low_open=True)
        _choice("threshold_mode", self.threshold_mode, ("relative", "absolute"))
        _int_range("max_stages", self.max_stages, 1, 100)
        _float_range("max_clusters_fraction", self.max_clusters_fraction, 0.0, 1.0, low_open=True)
        _int_range("key_clusters_svg2", self.key_clusters_svg2, 1, 4096)
        _int_range("calibration_iters", self.calibration_iters, 1, 100)
        _int_range("step_iters", self.step_iters, 0, 100)
        _float_range("dense_layer_fraction", self.dense_layer_fraction, 0.0, 1.0)
        _choice("dense_layers_by", self.dense_layers_by, ("error", "clusters"))
        _float_range("dense_error_threshold", self.dense_error_threshold, 0.0, 10.0)
        _int_range("warmup_steps", self.warmup_steps, 0, 10000)
        _int_range("min_tokens", self.min_tokens, 0, 1 << 30)
        if not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if not isinstance(self.selection, SelectionConfig):
            raise ConfigError(f"selection must be a SelectionConfig, got {type(self.selection).__name__}")
        self.selection.validate()
        return self

    def replace(self, **changes: Any) -> "AdaClusterConfig":
        """A validated copy with top-level or ``selection.<name>`` fields changed.

        Changing ``recipe`` resets the selection to that recipe before other selection changes apply."""
        base = to_dict(self)
        changes = _flatten(changes)
        if "recipe" in changes:
            base = {k: v for k, v in base.items() if not k.startswith("selection.")}
        return from_dict({**base, **changes})


def to_dict(config: AdaClusterConfig) -> dict[str, Any]:
    """Flat dict with ``selection.<name>`` keys (the format of presets and profiles)."""
    flat = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "selection"}
    flat.update({f"selection.{k}": v for k, v in dataclasses.asdict(config.selection).items()})
    return flat


def from_dict(values: Mapping[str, Any]) -> AdaClusterConfig:
    """Builds and validates a config from a flat or nested mapping; unknown keys are errors."""
    values = _flatten(values)
    top_names = {f.name for f in fields(AdaClusterConfig)} - {"selection"}
    sel_names = {f.name for f in fields(SelectionConfig)}
    for key in values:
        name = key.split(".", 1)[1] if key.startswith("selection.") else key
        known = sel_names if key.startswith("selection.") else top_names
        if name not in known:
            raise ConfigError(f"unknown setting {key!r}; known: {sorted(top_names | {'selection.' + s for s in sel_names})}")
    recipe = values.get("recipe", DEFAULT_RECIPE)
    _choice("recipe", recipe, tuple(SELECTION_RECIPES))
    selection = SELECTION_RECIPES[recipe]
    sel_changes = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("selection.")}
    _check_types(sel_changes, SelectionConfig, "selection.")
    top = {k: v for k, v in values.items() if not k.startswith("selection.")}
    _check_types(top, AdaClusterConfig, "")
    return AdaClusterConfig(**top, selection=dataclasses.replace(selection, **sel_changes))


def load_preset(family: str, **overrides: Any) -> AdaClusterConfig:
    """The YAML preset of a model family, with optional overrides, validated."""
    import yaml

    _choice("preset", family, MODEL_FAMILIES)
    path = PRESET_DIR / f"{family}.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset file {path.name} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path.name} must hold a mapping of settings")
    return from_dict({**_flatten(data), **_flatten(overrides)})


def parse_assignments(items: list, option: str, form: str = "KEY=VALUE") -> dict[str, Any]:
    """``KEY=VALUE`` strings of a command line's repeatable ``option``, values read as YAML scalars;
    ConfigError names an item without a key or an ``=``."""
    import yaml

    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r}: expected {form}")
        values[key.strip()] = yaml.safe_load(value)
    return values


def parse_settings(items: list) -> dict[str, Any]:
    """``KEY=VALUE`` strings (command lines' ``--set``) as config overrides, checked against the config:
    ConfigError names a bad key or value."""
    settings = parse_assignments(items, "--set")
    from_dict(settings)
    return settings


def _flatten(values: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key == "selection" and isinstance(value, Mapping):
            flat.update({f"selection.{k}": v for k, v in value.items()})
        elif key == "selection" and isinstance(value, SelectionConfig):
            flat.update({f"selection.{k}": v for k, v in dataclasses.asdict(value).items()})
        else:
            flat[key] = value
    return flat


def _check_types(values: Mapping[str, Any], cls, prefix: str) -> None:
    defaults = {f.name: f.default for f in fields(cls) if f.default is not dataclasses.MISSING}
    for name, value in values.items():
        expected = type(defaults.get(name))
        if expected is bool and not isinstance(value, bool):
            raise ConfigError(f"{prefix}{name} must be true or false, got {value!r}")
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{prefix}{name} must be an integer, got {value!r}")
        if expected is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{prefix}{name} must be a number, got {value!r}")
        if expected is str and not isinstance(value, str):
            raise ConfigError(f"{prefix}{name} must be a string, got {value!r}")
