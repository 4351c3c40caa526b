"""CUDA-graph replay of steady sparse calls (``config.cuda_graphs``, the node's "CUDA graphs" widget; off by
default).

At 480p a sparse call is a few milliseconds of GPU work spread over many small kernel launches
(clustering round, statistics, selection, tables, attention). Where the host cannot stay ahead of the GPU
(one call timed alone, a slow host), launching costs as much as computing; replaying the whole call as one
CUDA graph removes that cost, for static buffers of a few copies of one layer's tensors. Inside a model run
the host mostly stays ahead, which is why it is opt-in. ``CallGraphs`` does it for the runner:

* the first call of a key runs eagerly (it compiles the kernels and settles every persistent buffer);
  the second is captured; later ones replay. A key names everything the captured work depends on
  besides tensor contents: layer, branches, shapes, dtypes, device and the method's own step key.
* a graph reads its inputs from static buffers and writes its outputs into static buffers, shared by every
  graph of the same shapes and allocated outside the graphs' pool, so no pool memory is alive between
  replays: all graphs share one pool, and any replay order is safe. Callers get copies of the outputs.
* persistent state (centroids, counts) is written in place by the captured work (``memory.store``), so a
  replay updates the same tensors an eager call would.
* a capture that fails disables graphs for that key, and the call runs eagerly.
* ``release()`` (called with the run cache's) frees the graphs, their pool and every static buffer.
Graphs are never used while another capture is running (ComfyUI capturing a whole block).
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, Hashable, Optional

import torch

from .memory import allocation_scope

log = logging.getLogger(__name__)

_FAILED = "failed"  # capture failed: this key always runs eagerly
SETTLE_CALLS = 2  # calls of a key before it replays: one eager, one captured


class _Entry:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple, outputs: tuple):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


class CallGraphs:
    def __init__(self):
        self._entries: dict = {}  # key -> output specs of its eager call, _FAILED or _Entry
        self._buffers: dict = {}  # (role, position, shape, dtype, device) -> static buffer shared by graphs
        self._pool = None
        self.replays = 0
        self.captures = 0

    def run(self, key: Hashable, inputs: tuple, fn: Callable[..., tuple]) -> tuple:
        """``fn(*inputs)`` -> a tuple of tensors, run eagerly, captured or replayed (see the module doc)."""
        entry = self._entries.get(key)
        if entry is None:
            results = fn(*inputs)
            self._entries[key] = tuple((t.shape, t.dtype) for t in results)
            return results
        if entry is _FAILED:
            return fn(*inputs)
        if not isinstance(entry, _Entry):
            entry = self._capture(key, inputs, fn, entry)
            if entry is None:
                return fn(*inputs)
        for static, tensor in zip(entry.inputs, inputs):
            static.copy_(tensor)
        entry.graph.replay()
        self.replays += 1
        return tuple(t.clone() for t in entry.outputs)

    def _capture(self, key, inputs, fn, output_specs) -> Optional[_Entry]:
        device = inputs[0].device
        with allocation_scope():  # graph memory outlives the call: keep it out of ComfyUI's allocation graph
            static_inputs = tuple(self._static("in", position, t.shape, t.dtype, device, like=t)
                                  for position, t in enumerate(inputs))
            for static, tensor in zip(static_inputs, inputs):
                static.copy_(tensor)
            # allocated before capturing, so outside the graphs' pool: they hold the results between replays
            outputs = tuple(self._static("out", position, shape, dtype, device)
                            for position, (shape, dtype) in enumerate(output_specs))
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            stream = capture_stream(device)
            graph = torch.cuda.CUDAGraph()
            stream.wait_stream(torch.cuda.current_stream(device))
            try:
                with torch.cuda.stream(stream):
                    graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                    try:
                        results = fn(*static_inputs)
                        if tuple((t.shape, t.dtype) for t in results) != output_specs:
                            raise RuntimeError("the call's outputs changed shape since its first run")
                        for static, tensor in zip(outputs, results):
                            static.copy_(tensor)
                        del results  # their pool memory may be reused by the next capture
                    finally:
                        graph.capture_end()
            except Exception as error:  # noqa: BLE001 - any capture failure: run this key eagerly
                self._entries[key] = _FAILED
                log.warning("AdaCluster: CUDA-graph capture failed (%s: %s); this call runs eagerly",
                            type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
                return None
            finally:
                torch.cuda.current_stream(device).wait_stream(stream)
        entry = self._entries[key] = _Entry(graph, static_inputs, outputs)
        self.captures += 1
        return entry

    def _static(self, role: str, position: int, shape, dtype, device, like: Optional[torch.Tensor] = None):
        """The static buffer of an input or output position and shape, shared by every graph: replays run one at
        a time and callers get copies of the outputs, so graphs never need their own."""
        index = (role, position, tuple(shape), dtype, device)
        buffer = self._buffers.get(index)
        if buffer is None:  # inputs keep the caller's strides where they are dense, so the copy is plain
            buffer = torch.empty_like(like) if like is not None else torch.empty(shape, dtype=dtype, device=device)
            self._buffers[index] = buffer
        return buffer

    def memory_bytes(self) -> int:
        """Bytes of the static buffers (the graphs' pool is counted by the allocator)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def release(self) -> None:
        """Drops every graph, their pool and the static buffers."""
        for entry in self._entries.values():
            if isinstance(entry, _Entry):
                entry.graph.reset()
        self._entries.clear()
        self._buffers.clear()
        self._pool = None
        self.replays = self.captures = 0


_CAPTURE_STREAMS: dict = {}  # device -> the stream graphs are captured on, one per process


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The capture stream of a device. Made once per process: cuBLAS keeps a workspace per stream, which is
    allocated here by a first matrix product, outside any capture and outside ComfyUI's allocation graph."""
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = torch.cuda.Stream(device=device)
        with allocation_scope(), torch.cuda.stream(stream):
            one = torch.ones(2, 2, device=device)
            torch.addmm(one, one, one)
        torch.cuda.current_stream(device).wait_stream(stream)
        _CAPTURE_STREAMS[device] = stream
    return stream


def replay_allowed(q: torch.Tensor) -> bool:
    """Whether a sparse call on q may be replayed as a CUDA graph now (when the config asks for it)."""
    if q.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return False
    return not comfyui_disables_cuda_graphs()


def comfyui_disables_cuda_graphs() -> bool:
    """True when the running ComfyUI was started with --disable-cuda-graphs (never imports ComfyUI)."""
    cli = sys.modules.get("comfy.cli_args")
    return bool(getattr(getattr(cli, "args", None), "disable_cuda_graphs", False))
