"""The per-run cache: the only state that lives between attention calls.

One RunCache belongs to one patched model. Its lifecycle is explicit: ``start_run`` when a sampling run
begins (clears everything from the previous run), ``end_run`` when it ends (frees every tensor, keeps the
statistics so the report can be read), ``release`` to drop everything. Centroids are kept per
(layer, branch), where a branch is one batch slot's conditioning key, so cond and uncond never share them.
Statistics are recorded as device tensors and CUDA events and only read back in ``report()``, so the
steady state does not synchronise with the host.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Hashable, Optional

import torch

from .graphs import CallGraphs
from .memory import persistent_copy, store

_STATE_TENSORS = ("q_centroids", "k_centroids", "k_counts", "hard", "calibration_error", "head_top_k",
                  "tail_spread_weight", "probe_error", "probe_kept", "probe_reference")


@dataclass
class BranchState:
    """Clustering state of one (layer, branch).

    Its tensors live across calls: every assignment goes through ``memory.store`` (written in place when
    the shape is unchanged, else copied into memory allocated outside ComfyUI's allocation graph)."""

    q_centroids: torch.Tensor  # (H, Cq, d) unit rows (or raw, for the svg2 method)
    k_centroids: torch.Tensor  # (H, Ck, d), slots >= k_counts[h] unused
    k_counts: torch.Tensor  # (H,) int64
    hard: torch.Tensor  # (H,) bool: head hard to compress
    tokens: int = 0  # video tokens seen at calibration
    calibration_error: Optional[torch.Tensor] = None  # () relative L2 of the sparse output at calibration
    head_top_k: Optional[torch.Tensor] = None  # (H,) per-head Top-K chosen at calibration (budget.py)
    # (H,) fp32 weight of the pooled tail's spread term per head, 1 or 0: whichever erred less at calibration
    tail_spread_weight: Optional[torch.Tensor] = None
    # measured at calibration at each candidate Top-K (AdaCluster.probe): squared error of each head's sparse
    # output against dense (H, C), its kept fraction (H, C), and the squared norm of the dense output (H,)
    probe_error: Optional[torch.Tensor] = None
    probe_kept: Optional[torch.Tensor] = None
    probe_reference: Optional[torch.Tensor] = None

    def __setattr__(self, name, value):
        if name in _STATE_TENSORS and isinstance(value, torch.Tensor):
            value = store(self.__dict__.get(name), value)
        object.__setattr__(self, name, value)

    def tensors(self):
        return tuple(t for t in (getattr(self, name) for name in _STATE_TENSORS) if t is not None)


@dataclass
class LayerReport:
    layer: int
    sparse_calls: int
    dense_calls: int
    kept_fraction: float  # mean over sparse calls and heads (nan when the layer never ran sparse)
    kept_per_head: list
    key_clusters_per_head: list
    dense_layer: bool
    hard: bool
    time_ms: float  # wall time of this layer's attention calls
    clustering_ms: float  # part of time_ms spent in clustering and selection
    top_k_per_head: list = field(default_factory=list)  # matched budgets (largest over branches); [] where none


@dataclass
class RunReport:
    method: str
    total_steps: int
    layers: list
    steps: list  # [{"step": s, "sparse_calls": n, "dense_calls": m}]
    dense_reasons: dict
    total_time_ms: float
    replayed_calls: int = 0  # sparse calls replayed as CUDA graphs (config.cuda_graphs)
    captured_graphs: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        sparse = sum(r.sparse_calls for r in self.layers)
        dense = sum(r.dense_calls for r in self.layers)
        lines = [f"{self.method}: {sparse} sparse and {dense} dense attention calls over {self.total_steps} steps, "
                 f"{self.total_time_ms:.1f} ms in attention"]
        sparse_steps = [s["step"] for s in self.steps if s["sparse_calls"]]
        if sparse_steps:
            lines.append(f"sparse steps: {_ranges(sparse_steps)}")
        dense_layers = [r.layer for r in self.layers if r.dense_layer]
        lines.append(f"dense layers: {_ranges(dense_layers) if dense_layers else 'none'}")
        for reason, count in sorted(self.dense_reasons.items()):
            lines.append(f"dense because {reason}: {count} calls")
        if self.captured_graphs:
            lines.append(f"CUDA graphs: {self.captured_graphs} captured, {self.replayed_calls} sparse calls replayed")
        lines.append("layer  sparse  dense  kept%  key clusters  Top-K   time ms  clustering ms")
        for r in self.layers:
            kept = "   -" if r.kept_fraction != r.kept_fraction else f"{100 * r.kept_fraction:5.1f}"
            clusters = (f"{sum(r.key_clusters_per_head) / len(r.key_clusters_per_head):7.1f}"
                        if r.key_clusters_per_head else "      -")
            flag = " dense-layer" if r.dense_layer else ""
            low, high = (min(r.top_k_per_head), max(r.top_k_per_head)) if r.top_k_per_head else (None, None)
            top_k = "-" if low is None else (f"{low}" if low == high else f"{low}-{high}")
            lines.append(f"{r.layer:5d}  {r.sparse_calls:6d}  {r.dense_calls:5d}  {kept:>5}  {clusters:>12}  "
                         f"{top_k:>6}  {r.time_ms:7.1f}  {r.clustering_ms:13.1f}{flag}")
        return "\n".join(lines)


def _ranges(values) -> str:
    values = sorted(set(values))
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


class Timer:
    """Wall-clock span of device work: CUDA events on CUDA (read later, no sync now), perf_counter elsewhere.
    Inside a caller's CUDA-graph capture, where no device work runs now, it measures host time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda" and not torch.cuda.is_current_stream_capturing()
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()
            self.end = None

    def stop(self) -> "Timer":
        if self.cuda:
            self.end.record()
        else:
            self.end = time.perf_counter()
        return self

    def milliseconds(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.begin.elapsed_time(self.end)
        return 1000.0 * (self.end - self.begin)


@dataclass
class CallRecord:
    layer: int
    step: int
    sparse: bool
    reason: Optional[str]
    total: Timer
    clustering: Optional[Timer] = None
    kept: Optional[torch.Tensor] = None  # (B, H)
    key_counts: Optional[torch.Tensor] = None  # (B, H)


@dataclass
class RunCache:
    method: str = "adacluster"
    states: dict = field(default_factory=dict)  # (layer, branch) -> BranchState
    dense_layers: Optional[frozenset] = None  # decided after calibration (or from a profile)
    profile: Optional[object] = None  # a loaded CalibrationProfile, reused across runs
    total_steps: int = 0
    active: bool = False
    records: list = field(default_factory=list)
    last_calibration: Optional[object] = None  # CalibrationProfile of the last finished run
    graphs: CallGraphs = field(default_factory=CallGraphs)  # replayed sparse calls of this run
    _summary: Optional[RunReport] = field(default=None, repr=False)

    # ------------------------------------------------------------------ lifecycle
    def start_run(self, total_steps: int) -> None:
        """Begins a sampling run: drops every trace of a previous run (the loaded profile stays)."""
        self.release(keep_profile=True)
        self.total_steps = int(total_steps)
        self.active = True
        if self.profile is not None:
            self.dense_layers = self.profile.dense_layer_set()

    def end_run(self) -> None:
        """Ends a run: frees every tensor but keeps the statistics for report()."""
        from .profiles import profile_from_cache

        self._summary = self.report()
        self.last_calibration = profile_from_cache(self)
        self.graphs.release()
        self.states.clear()
        self.records.clear()
        self.active = False

    def release(self, keep_profile: bool = False) -> None:
        """Frees everything, statistics included."""
        self.graphs.release()
        self.states.clear()
        self.records.clear()
        self.dense_layers = None
        self.total_steps = 0
        self.active = False
        self._summary = None
        self.last_calibration = None
        if not keep_profile:
            self.profile = None

    def memory_bytes(self) -> int:
        """Bytes held in tensors by the cache (centroids, statistics, static buffers of replayed calls)."""
        total = self.graphs.memory_bytes()
        for state in self.states.values():
            total += sum(t.numel() * t.element_size() for t in state.tensors())
        for rec in self.records:
            for t in (rec.kept, rec.key_counts):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------ state
    def state(self, layer: int, branch: Hashable) -> Optional[BranchState]:
        return self.states.get((layer, branch))

    def set_state(self, layer: int, branch: Hashable, state: BranchState) -> None:
        self.states[(layer, branch)] = state

    def calibrated_layers(self) -> dict:
        """layer -> (mean key cluster count over heads and branches, any head hard).

        Branches may live on different devices (ComfyUI's MultiGPU CFG Split runs cond and uncond on
        different GPUs, in threads): each state is reduced on its device and read back."""
        return {layer: (float(torch.stack([s.k_counts.float().mean().cpu() for s in states]).mean()),
                        bool(torch.stack([s.hard.any().cpu() for s in states]).any()))
                for layer, states in self.clustering_states().items()}

    def head_budgets(self) -> dict:
        """layer -> per-head Top-K (largest over branches) for the layers whose budgets were set."""
        budgets = {}
        for layer, states in self.clustering_states().items():
            rows = [s.head_top_k.cpu() for s in states if s.head_top_k is not None]
            if rows:
                budgets[layer] = [int(v) for v in torch.stack(rows).amax(0)]
        return budgets

    def calibration_errors(self) -> dict:
        """layer -> largest relative error of the sparse output measured at calibration over its branches,
        for the layers where it was measured."""
        errors = {layer: [s.calibration_error.cpu() for s in states if s.calibration_error is not None]
                  for layer, states in self.clustering_states().items()}
        return {layer: float(torch.stack(e).max()) for layer, e in errors.items() if e}

    def clustering_states(self) -> dict:
        """layer -> its branches' clustering states (other methods keep their own kinds of state), read from
        a snapshot of the dict (threads of CFG Split may add states meanwhile)."""
        per_layer = defaultdict(list)
        for (layer, _), state in list(self.states.items()):
            if isinstance(state, BranchState):
                per_layer[layer].append(state)
        return per_layer

    def record(self, rec: CallRecord) -> None:
        """Keeps a call's statistics until the report (their tensors copied outside any allocation graph)."""
        if rec.kept is not None:
            rec.kept = persistent_copy(rec.kept)
        if rec.key_counts is not None:
            rec.key_counts = persistent_copy(rec.key_counts)
        self.records.append(rec)

    # ------------------------------------------------------------------ report
    def report(self) -> Optional[RunReport]:
        """Statistics of the current run, or of the last finished run when none is active."""
        if not self.active and self._summary is not None:
            return self._summary
        if not self.records:
            return None
        by_layer = defaultdict(list)
        steps = defaultdict(lambda: [0, 0])
        reasons = Counter()
        for rec in self.records:
            by_layer[rec.layer].append(rec)
            steps[rec.step][0 if rec.sparse else 1] += 1
            if not rec.sparse:
                reasons[rec.reason] += 1
        calibrated = self.calibrated_layers()
        budgets = self.head_budgets()
        layers = []
        for layer in sorted(by_layer):
            recs = by_layer[layer]
            sparse = [r for r in recs if r.sparse]
            kept = torch.stack([r.kept.float().mean(0).cpu() for r in sparse]) if sparse else None
            counts = [r.key_counts.float().mean(0).cpu() for r in recs if r.key_counts is not None]
            layers.append(LayerReport(
                layer=layer,
                sparse_calls=len(sparse),
                dense_calls=len(recs) - len(sparse),
                kept_fraction=float(kept.mean()) if kept is not None else float("nan"),
                kept_per_head=kept.mean(0).tolist() if kept is not None else [],
                key_clusters_per_head=counts[-1].tolist() if counts else [],
                dense_layer=bool(self.dense_layers and layer in self.dense_layers),
                hard=calibrated.get(layer, (0.0, False))[1],
                time_ms=sum(r.total.milliseconds() for r in recs),
                clustering_ms=sum(r.clustering.milliseconds() for r in recs if r.clustering is not None),
                top_k_per_head=budgets.get(layer, []),
            ))
        step_rows = [{"step": s, "sparse_calls": v[0], "dense_calls": v[1]} for s, v in sorted(steps.items())]
        return RunReport(self.method, self.total_steps, layers, step_rows, dict(reasons),
                         sum(r.time_ms for r in layers), self.graphs.replays, self.graphs.captures)
