"""Memory that outlives one attention call: the one place the run cache allocates it.

ComfyUI's model compiler (comfy-aimdo allocation graphs, ComfyUI 0.38 and later) records the allocations
made while a model runs and replays them on later steps. A tensor that must survive the block or the step it
was made in (centroids, cluster counts, statistics) has to be allocated with that recording paused, through
``comfy.model_prefetch.pause_malloc_graph()``; otherwise it breaks the graph and leaks memory.
``allocation_scope()`` is that pause when the running ComfyUI has it, and does nothing anywhere else (older
ComfyUI, tests, the command-line tools). It never imports ComfyUI: it only uses the module when ComfyUI has
already loaded it.
"""
from __future__ import annotations

import contextlib
import sys

import torch

PREFETCH_MODULE = "comfy.model_prefetch"


def allocation_scope():
    """A context manager under which allocations are kept out of ComfyUI's allocation graph (or a no-op)."""
    module = sys.modules.get(PREFETCH_MODULE)
    pause = getattr(module, "pause_malloc_graph", None)
    return pause() if callable(pause) else contextlib.nullcontext()


def persistent_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` in memory allocated inside ``allocation_scope()``."""
    with allocation_scope():
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def store(current, value: torch.Tensor) -> torch.Tensor:
    """Keeps ``value`` across calls: written into ``current`` when that has the same shape, dtype and device
    (no new allocation on a steady step), else into a fresh persistent copy."""
    if (isinstance(current, torch.Tensor) and current.shape == value.shape and current.dtype == value.dtype
            and current.device == value.device and current.is_contiguous()):
        if current.data_ptr() != value.data_ptr():
            current.copy_(value)
        return current
    return persistent_copy(value)
