"""Strict JSON values for reports and tool outputs (bare NaN or Infinity is not JSON)."""
from __future__ import annotations

import math

import torch


def finite_json(value):
    """``value`` as strict JSON data: NaN and infinities become null, tensors lists, dict keys text, paths and
    other objects their text."""
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return finite_json(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
