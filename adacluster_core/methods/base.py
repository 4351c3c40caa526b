"""The method seam: what every sparse-attention method provides to the runner.

A method is a layout builder. Given the video tokens q, k (B, H, N, d) of one attention call and its
per-(layer, branch) state in the run cache, it plans a Layout. It also says on which
sampler steps it needs its search / fit / calibration pass, and may provide the inputs of the runner's
dense-layer decision. Everything else is shared and lives in the runner: the policy (dense, pass,
sparse), the joint text split, execution through ``kernels.execute_layout`` and the statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional

import torch

from ..cache import RunCache
from ..layout import Layout
from ..schedule import Phase


@dataclass
class TextSegment:
    """The always-kept text keys of a joint call, for methods whose pass needs them (B, H, Nt, d)."""

    k: torch.Tensor
    v: torch.Tensor
    bias: Optional[torch.Tensor] = None  # additive, broadcastable to (B, H, N_video, Nt)


@dataclass
class Plan:
    layout: Layout
    kept: torch.Tensor  # (B, H) fraction of (video query, video key) pairs attended exactly
    key_counts: Optional[torch.Tensor] = None  # (B, H) key segments per head, for the report


@dataclass
class PassResult:
    """What a step's pass (calibration, search, fit) returns; its call's output stays dense."""

    out: Optional[torch.Tensor] = None  # (B, H, N_video, d) dense output of the video queries, if computed
    key_counts: Optional[torch.Tensor] = None  # (B, H)


class SparseMethod:
    """Base class of the methods. Subclasses set ``name`` and ``pass_name`` and implement the hooks."""

    name = "method"
    pass_name = Phase.CALIBRATE.value  # the step's dense reason in reports ("calibration step", "search step")
    dense_layer_fraction = 0.0  # most share of layers the runner keeps dense, ranked by dense_layer_candidates
    dense_layer_min_score = None  # a layer runs dense only with a score above this (None: no minimum)
    probes_at_pass = False  # after the pass the runner hands the dense output to probe()

    def __init__(self, cache: RunCache):
        self.cache = cache

    def phase(self, step: int, total_steps: int) -> Phase:
        """WARMUP: dense, nothing computed. CALIBRATE: dense output and this method's pass. SPARSE: plan."""
        raise NotImplementedError

    def run_pass(self, q, k, v, call, text: Optional[TextSegment]) -> PassResult:
        """The pass of a CALIBRATE step on the video tokens of every branch."""
        raise NotImplementedError

    def plan(self, q: torch.Tensor, k: torch.Tensor, call) -> Plan:
        """The layout of a sparse call (video tokens). May run the method's own search first (AdaSpa's
        LSE-cached search, MOD-DiT's refresh), which it decides from ``call.step``."""
        raise NotImplementedError

    def probe(self, q: torch.Tensor, k: torch.Tensor, call, reference: torch.Tensor, execute) -> None:
        """Measures this method's sparse output against the dense one at the pass step (when probes_at_pass):
        ``reference`` is the dense output of the video queries (B, H, N, d), ``execute(layout)`` runs a layout
        as a sparse call would (text sink included) and returns the video queries' output."""

    def dense_layer_candidates(self, step: int) -> Optional[dict]:
        """layer -> (score, hard) once every layer has done its pass (larger score: denser first), or None
        while the decision cannot be made yet. The default: no dense layers."""
        return {}

    def settle_budgets(self, dense_layers: frozenset, fixed_dense: frozenset) -> frozenset:
        """Called once with the dense layers the runner picked: the method may set its budgets from what its
        passes measured and run some of them sparse (never those of ``fixed_dense``). Returns the dense
        layers. The default: all of them, no budgets."""
        return dense_layers

    def graph_key(self, call) -> Optional[Hashable]:
        """What a sparse call's work depends on besides the shapes of q, k, v, when ``plan`` can be captured in
        a CUDA graph (no host synchronisation, persistent state written in place, ``Plan.key_counts`` set);
        None: never captured (the default)."""
        return None

    def describe(self) -> str:
        """One line for the log."""
        return self.name


def block_kept_fraction(selected: torch.Tensor, tokens: int, block: int) -> torch.Tensor:
    """(...) fraction of (query, key) pairs a fixed-block mask (..., nq, nk) keeps; fp32, one matrix-vector
    product (blocks in original order, the last one possibly shorter)."""
    n = selected.shape[-1]
    sizes = torch.full((n,), float(block), device=selected.device)
    sizes[-1] = tokens - (n - 1) * block
    kept_keys = selected.to(torch.float32) @ sizes  # (..., nq) keys kept per query block row
    return (kept_keys * sizes).sum(-1) / float(tokens * tokens)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor (..., n) as bits (..., ceil(n / 8)) uint8: cached block masks take an eighth."""
    n = mask.shape[-1]
    pad = -n % 8
    bits = torch.nn.functional.pad(mask, (0, pad)).reshape(*mask.shape[:-1], -1, 8).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_mask."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].bool()
