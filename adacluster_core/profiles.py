"""Calibration profiles: per-layer, per-head key cluster counts and Top-K budgets and the dense-layer set,
saved with safetensors, so a repeated workflow can skip the multi-stage calibration.

Profiles live in profile folders (inside ComfyUI: ``models/adacluster_profiles`` and any extra model path
registered for ``adacluster_profiles``). ``find_profile`` and ``save_profile_in`` never touch a file outside
the folders they are given: a profile is named by its file name relative to a folder, a saved profile by a
plain file name, and a file that is not a profile saved by this pack is never overwritten.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .cache import BranchState
from .config import ConfigError

FORMAT = "adacluster-profile/1"
FOLDER_NAME = "adacluster_profiles"  # ComfyUI folder_paths key and default folder under models/
EXTENSION = ".safetensors"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class CalibrationProfile:
    layers: list  # calibrated layer indices, ascending
    counts: torch.Tensor  # (len(layers), H) int64 key cluster counts (largest over branches)
    dense_layers: frozenset
    heads: int
    tokens: int  # video tokens the calibration saw
    method: str = "adacluster"
    # (len(layers), H) int64 per-head Top-K set at calibration (largest over branches; 0: the config's Top-K),
    # or None where the run set none (budget "fixed", older profiles)
    top_k: Optional[torch.Tensor] = None

    def counts_for(self, layer: int) -> Optional[torch.Tensor]:
        if layer not in self.layers:
            return None
        return self.counts[self.layers.index(layer)]

    def top_k_for(self, layer: int) -> Optional[torch.Tensor]:
        """(H,) the layer's per-head Top-K, or None where it has none."""
        if self.top_k is None or layer not in self.layers:
            return None
        row = self.top_k[self.layers.index(layer)]
        return None if bool((row < 1).any()) else row

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
    set_budgets = cache.head_budgets()  # 0 below: the layer keeps the config's Top-K
    budgets = torch.tensor([set_budgets.get(l, [0] * heads) for l in layers], dtype=torch.int64)
    return CalibrationProfile(layers, torch.stack([per_layer[l] for l in layers]), cache.dense_layers or frozenset(),
                              heads, tokens or 0, cache.method, budgets if bool((budgets > 0).any()) else None)


def save_profile(profile: CalibrationProfile, path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dense = torch.tensor([layer in profile.dense_layers for layer in profile.layers], dtype=torch.bool)
    tensors = {"layers": torch.tensor(profile.layers, dtype=torch.int64), "counts": profile.counts.to(torch.int64),
               "dense": dense}
    if profile.top_k is not None:
        tensors["top_k"] = profile.top_k.to(torch.int64)
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
    top_k = tensors.get("top_k")  # saved since per-head budgets exist; older profiles have none
    if top_k is not None and (top_k.shape != counts.shape or bool((top_k < 0).any())):
        raise ConfigError(f"calibration profile {path.name!r} has per-head Top-K of shape {tuple(top_k.shape)} or "
                          f"below 0; expected {tuple(counts.shape)} values of at least 0")
    layer_list = layers.tolist()
    return CalibrationProfile(layer_list, counts, frozenset(l for l, d in zip(layer_list, dense.tolist()) if d),
                              heads, tokens, meta.get("method", "adacluster"), top_k)


# ---------------------------------------------------------------------------------------------- folders
def check_profile_name(name: str) -> Optional[str]:
    """Why ``name`` cannot name a profile to save (None when it can): a plain file name only."""
    if not isinstance(name, str):
        return f"the profile name must be text, got {name!r}"
    stem = name[:-len(EXTENSION)] if name.endswith(EXTENSION) else name
    if not _PLAIN_NAME.fullmatch(stem) or stem.endswith(".") or ".." in stem:
        return (f"{name!r} is not a plain file name: use 1 to 128 letters, digits, '.', '_' or '-', starting "
                f"with a letter or digit, without folders (the file goes into the {FOLDER_NAME} folder)")
    return None


def profile_file_name(name: str) -> str:
    """The file name a save name stands for (``.safetensors`` added when missing)."""
    return name if name.endswith(EXTENSION) else name + EXTENSION


def list_profiles(folders: Sequence) -> list:
    """Profile file names (relative to their folder, '/'-separated) in the given folders, sorted."""
    names = set()
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            continue
        for path in root.rglob(f"*{EXTENSION}"):
            relative = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                names.add(relative.as_posix())
    return sorted(names)


def _inside(folder, relative: str) -> Optional[Path]:
    """folder/relative when that path (not following a final symlink) stays inside folder, else None."""
    root = os.path.abspath(folder)
    path = os.path.abspath(os.path.join(root, relative))
    if os.path.commonpath([root, path]) != root or path == root:
        return None
    return Path(path)


def find_profile(folders: Sequence, name: str) -> Path:
    """The file of the profile ``name`` (as listed by ``list_profiles``); ConfigError when there is none."""
    if name in list_profiles(folders):
        for folder in folders:
            path = _inside(folder, name)
            if path is not None and path.is_file():
                return path
    raise ConfigError(f"calibration profile {name!r} is not in the {FOLDER_NAME} folder "
                      f"({', '.join(map(str, folders)) or 'none registered'})")


def is_saved_profile(path) -> bool:
    """True when ``path`` is a safetensors file written by ``save_profile`` (its format tag says so)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False


def save_profile_in(profile: CalibrationProfile, folder, name: str) -> Path:
    """Saves ``profile`` as ``folder/<name>.safetensors``; returns the path.

    ``name`` must be a plain file name. An existing file is replaced only when it is itself a saved profile;
    ConfigError otherwise (nothing is written)."""
    problem = check_profile_name(name)
    if problem:
        raise ConfigError(f"save calibration profile as: {problem}")
    path = _inside(folder, profile_file_name(name))
    if path is None:
        raise ConfigError(f"save calibration profile as: {name!r} does not stay inside {folder}")
    if path.is_symlink() or (path.exists() and not (path.is_file() and is_saved_profile(path))):
        raise ConfigError(f"save calibration profile as: {path.name!r} already exists in {folder} and is not a "
                          "calibration profile saved by this pack; it was not overwritten (choose another name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and moved over it, so a failed save never leaves a half-written profile.
    handle, temporary = tempfile.mkstemp(prefix=".adacluster-", suffix=EXTENSION, dir=str(path.parent))
    os.close(handle)
    try:
        save_profile(profile, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path
