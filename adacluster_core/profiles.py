"""Calibration profiles: per-layer, per-head key cluster counts and the dense-layer set, saved with
safetensors, so a repeated workflow can skip the multi-stage calibration."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .cache import BranchState
from .config import ConfigError

FORMAT = "adacluster-profile/1"


@dataclass
class CalibrationProfile:
    layers: list  # calibrated layer indices, ascending
    counts: torch.Tensor  # (len(layers), H) int64 key cluster counts (largest over branches)
    dense_layers: frozenset
    heads: int
    tokens: int  # video tokens the calibration saw
    method: str = "adacluster"

    def counts_for(self, layer: int) -> Optional[torch.Tensor]:
        if layer not in self.layers:
            return None
        return self.counts[self.layers.index(layer)]

    def dense_layer_set(self) -> frozenset:
        return self.dense_layers

    def check_fits(self, heads: int, tokens: int) -> None:
        """Raises ConfigError when the profile was made for another model shape."""
        if heads != self.heads:
            raise ConfigError(f"calibration profile was made for {self.heads} heads, this model has {heads}")
        if tokens != self.tokens:
            raise ConfigError(f"calibration profile was made for {self.tokens} video tokens, this run has {tokens}; "
                              "use the same resolution and length or calibrate again")


def profile_from_cache(cache) -> Optional[CalibrationProfile]:
    """The calibration held by a RunCache (None before any layer was calibrated)."""
    per_layer: dict = {}
    heads = tokens = None
    for (layer, _), state in cache.states.items():
        if not isinstance(state, BranchState):  # not a clustering state: nothing to calibrate from
            continue
        counts = state.k_counts.detach().cpu()
        per_layer[layer] = counts if layer not in per_layer else torch.maximum(per_layer[layer], counts)
        heads = counts.numel()
        tokens = getattr(state, "tokens", tokens)
    if not per_layer:
        return None
    layers = sorted(per_layer)
    return CalibrationProfile(layers, torch.stack([per_layer[l] for l in layers]), cache.dense_layers or frozenset(),
                              heads, tokens or 0, cache.method)


def save_profile(profile: CalibrationProfile, path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dense = torch.tensor([layer in profile.dense_layers for layer in profile.layers], dtype=torch.bool)
    tensors = {"layers": torch.tensor(profile.layers, dtype=torch.int64), "counts": profile.counts.to(torch.int64),
               "dense": dense}
    meta = {"format": FORMAT, "heads": str(profile.heads), "tokens": str(profile.tokens), "method": profile.method}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_profile(path) -> CalibrationProfile:
    """Loads and checks a profile; a missing, corrupt or inconsistent file raises ConfigError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration profile {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"calibration profile {path.name!r} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ConfigError(f"calibration profile {path.name!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    missing = {"layers", "counts", "dense"} - set(tensors)
    if missing:
        raise ConfigError(f"calibration profile {path.name!r} lacks {sorted(missing)}")
    layers, counts, dense = tensors["layers"], tensors["counts"], tensors["dense"]
    try:
        heads, tokens = int(meta["heads"]), int(meta["tokens"])
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"calibration profile {path.name!r} has no valid heads/tokens metadata") from exc
    if counts.dim() != 2 or counts.shape != (layers.numel(), heads) or dense.shape != layers.shape:
        raise ConfigError(f"calibration profile {path.name!r} has inconsistent shapes: layers {tuple(layers.shape)}, "
                          f"counts {tuple(counts.shape)}, dense {tuple(dense.shape)}, heads {heads}")
    if bool((counts < 1).any()) or (tokens and bool((counts > tokens).any())):
        raise ConfigError(f"calibration profile {path.name!r} has key cluster counts outside [1, {tokens}]")
    layer_list = layers.tolist()
    return CalibrationProfile(layer_list, counts, frozenset(l for l, d in zip(layer_list, dense.tolist()) if d),
                              heads, tokens, meta.get("method", "adacluster"))
