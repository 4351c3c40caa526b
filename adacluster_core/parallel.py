"""The pack's sparse attention as the per-GPU attention of Ulysses sequence parallelism.

Ulysses (yunchang, and xDiT / xfuser which builds on it) shards the sequence over N ranks. Before the
attention an all-to-all gives every rank the full sequence for H/N of the heads; after it a second
all-to-all brings the output back to sequence shards. The attention in between is pluggable: yunchang
0.6.4's ``LongContextAttention(attn_processor=...)`` calls the processor with flash-attn's forward contract,
``processor(q, k, v, dropout_p=, softmax_scale=, causal=, window_size=, softcap=, alibi_slopes=,
return_softmax=)`` on q, k, v (B, S, H/N, D), and expects ``(out (B, S, H/N, D), lse (B, H/N, S) fp32)``,
lse the natural-log log-sum-exp of each query row. It reaches the processor only through the "basic"
ring implementation and an ``attn_type`` that is none of yunchang's ``AttnType`` members (for those it
picks its own kernel); ``ATTN_TYPE`` is such a value and works for xfuser's subclass too (which turns
``None`` into flash-attn). ``ulysses_attention`` builds that module.

One ``UlyssesSparseAttention`` per rank holds the runner (``SparseAttention``), its run cache and its
statistics: everything a sparse call computes is per (batch element, head), so each rank clusters, selects
and executes its own heads. Clustering is seeded per model-wide head index, so a rank reproduces what one
GPU computes for the same heads. The only layer-level decision, the dense-layer set (from the calibrated
key-cluster counts and the hard-head flags), is agreed through one all-reduce of a few numbers per layer.

The caller tells it the step and the branches once per model call (``begin_model_call``) and hands each
attention module ``processor(layer)``.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from .. import kernels
from .attention import CallInfo, SparseAttention
from .cache import RunCache
from .config import AdaClusterConfig

log = logging.getLogger(__name__)

try:  # optional: flash-attn's forward returns the LSE of dense calls
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None

# attn_type for yunchang / xfuser that makes them call the attn_processor (no AttnType member has this value)
ATTN_TYPE = "adacluster"


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def contiguous_heads(num_heads: int, rank: int, world: int) -> tuple:
    """The model-wide heads Ulysses gives ``rank``: the rank-th of ``world`` equal contiguous slices."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1} (world size {world})")
    if num_heads % world:
        raise ValueError(f"{num_heads} heads cannot be split evenly over {world} ranks; Ulysses needs the head "
                         "count to be a multiple of the sequence-parallel degree")
    per_rank = num_heads // world
    return tuple(range(rank * per_rank, (rank + 1) * per_rank))


def dense_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None):
    """Exact attention with its per-row log-sum-exp for (B, H, N, d): (out in q's dtype, lse fp32 (B, H, N)).

    flash-attn (which returns the LSE) for fp16 / bf16 CUDA tensors when it is installed; otherwise the
    kernels' dense pass with LSE (Triton on CUDA, the chunked reference elsewhere; never N x N at once)."""
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) \
            and q.shape[-1] <= 256:
        out, lse, _ = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       softmax_scale=scale, return_attn_probs=True)
        return out.transpose(1, 2), lse.float()
    return kernels.attention_lse(q, k, v, scale=scale)


def _collective_device(group) -> torch.device:
    backend = torch.distributed.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def agree_across_ranks(group=None):
    """A ``dense_layer_agreement`` for SparseAttention: one all-reduce of (layer, score, hard) per candidate
    layer (the score ranks dense layers: mean key clusters, or the calibration error). Every rank holds as
    many heads and the same branches, so the mean over ranks of the per-rank scores stands for the model, and
    a layer is hard when any rank has a hard head there."""

    def agree(calibrated: dict) -> dict:
        _, world = rank_and_world(group)
        layers = sorted(calibrated)
        table = torch.tensor([[float(layer), float(calibrated[layer][0]), float(calibrated[layer][1])]
                              for layer in layers], dtype=torch.float64, device=_collective_device(group))
        torch.distributed.all_reduce(table, group=group)
        table = table.cpu()
        if not torch.equal(table[:, 0], torch.tensor(layers, dtype=torch.float64) * world):
            raise RuntimeError(f"the ranks calibrated different layers (this rank: {layers}); every rank must run "
                               "the same layers in the same order")
        return {layer: (float(table[i, 1]) / world, bool(table[i, 2] > 0)) for i, layer in enumerate(layers)}

    return agree


class UlyssesSparseAttention:
    """Per-rank owner of the runner, run cache and statistics for one sequence-parallel model.

    ``group``: the Ulysses process group (yunchang's ``PROCESS_GROUP.ULYSSES_PG`` when Ulysses is combined
    with other parallelism; default: the whole world). ``num_heads``: the model's head count.
    ``head_order``: the model-wide head at each position of the head dimension the engine splits (the same
    on every rank), when the caller permutes heads before the all-to-all
    (``parallel_balance.balanced_permutation``); default 0..H-1. This rank sees the rank-th contiguous
    slice of it. Text length and the sampler step come per model call (``begin_model_call``)."""

    def __init__(self, config: AdaClusterConfig, num_heads: int, group=None,
                 head_order: Optional[Sequence[int]] = None):
        self.group = group
        self.rank, self.world = rank_and_world(group)
        self.num_heads = int(num_heads)
        order = tuple(int(h) for h in head_order) if head_order is not None else tuple(range(self.num_heads))
        if sorted(order) != list(range(self.num_heads)):
            raise ValueError(f"head_order {list(order)} is not a permutation of 0..{self.num_heads - 1}")
        self.head_order = order
        self.heads = tuple(order[h] for h in contiguous_heads(self.num_heads, self.rank, self.world))
        self.cache = RunCache(method=config.method)
        agreement = agree_across_ranks(group) if self.world > 1 else None
        self.sparse = SparseAttention(config, self.cache, dense_layer_agreement=agreement)
        self._call: Optional[dict] = None
        self._logged: set = set()

    # ------------------------------------------------------------------ lifecycle
    def start_run(self, total_steps: int) -> None:
        """Begins a sampling run of ``total_steps`` steps (clears the previous run's cache)."""
        self.cache.start_run(total_steps)

    def end_run(self) -> None:
        """Ends the run: frees the cached tensors, keeps the statistics for ``report()``."""
        self.cache.end_run()
        self._call = None

    def begin_model_call(self, step: int, branches: Optional[Sequence] = None, text_len: int = 0,
                         text_first: bool = False) -> None:
        """What every attention call of the next model evaluation shares: the sampler step (0-based), one
        hashable per batch element (cond / uncond; default: the batch index), and the joint text tokens."""
        if not self.cache.active:
            raise RuntimeError("begin_model_call outside a sampling run; call start_run(total_steps) first")
        if not 0 <= int(step) < max(self.cache.total_steps, 1):
            raise ValueError(f"step {step} is outside 0..{self.cache.total_steps - 1}")
        self._call = {"step": int(step), "branches": None if branches is None else tuple(branches),
                      "text_len": int(text_len), "text_first": bool(text_first)}

    def processor(self, layer: int) -> "UlyssesProcessor":
        """The attn_processor for the attention module of transformer block ``layer`` (0-based)."""
        return UlyssesProcessor(self, int(layer))

    def report(self):
        """This rank's RunReport (its heads only)."""
        return self.cache.report()

    # ------------------------------------------------------------------ per call
    def call_info(self, layer: int, batch: int) -> Optional[CallInfo]:
        state = self._call
        if state is None or not self.cache.active:
            return None
        branches = state["branches"] or tuple(("batch", None, b) for b in range(batch))
        if len(branches) != batch:
            raise ValueError(f"{len(branches)} branches given to begin_model_call for a batch of {batch}")
        return CallInfo(layer=layer, step=state["step"], total_steps=self.cache.total_steps, branches=branches,
                        text_len=state["text_len"], text_first=state["text_first"], heads=self.heads)

    def log_once(self, key, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.info("[AdaCluster] rank %d: %s", self.rank, message)


class UlyssesProcessor:
    """The per-layer attention processor (flash-attn forward contract, see the module docstring)."""

    def __init__(self, owner: UlyssesSparseAttention, layer: int):
        self.owner = owner
        self.layer = layer

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                 softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                 softcap: float = 0.0, alibi_slopes=None, **unused):
        """q, k, v (B, S, H/N, D) -> (out (B, S, H/N, D), lse (B, H/N, S) fp32, natural log)."""
        if dropout_p or causal or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None:
            raise ValueError(f"sparse attention supports plain bidirectional attention only; got dropout_p="
                             f"{dropout_p}, causal={causal}, window_size={window_size}, softcap={softcap}, "
                             f"alibi_slopes={'set' if alibi_slopes is not None else None}")
        if q.ndim != 4 or q.shape[2] != len(self.owner.heads):
            raise ValueError(f"q of shape {tuple(q.shape)}: expected (B, S, {len(self.owner.heads)}, D), this "
                             f"rank's {len(self.owner.heads)} heads")
        q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
        head_dim = q.shape[-1]
        custom_scale = softmax_scale is not None and abs(float(softmax_scale) - head_dim ** -0.5) > 1e-6
        call = self.owner.call_info(self.layer, q.shape[0])
        if call is None or custom_scale:
            reason = "no sampling run" if call is None else f"custom softmax scale {softmax_scale}"
            self.owner.log_once(reason, f"{reason}; attention stays dense")
            out, lse = dense_with_lse(q4, k4, v4, scale=softmax_scale)
        else:
            out, lse = self.owner.sparse(q4, k4, v4, call, lambda: dense_with_lse(q4, k4, v4), return_lse=True)
        return out.transpose(1, 2), lse


def ulysses_attention(processor: UlyssesProcessor):
    """yunchang's LongContextAttention running ``processor`` between its all-to-alls (pure Ulysses).

    Needs ``yunchang.set_seq_parallel_pg(ulysses_degree, 1, rank, world_size)`` first. A ring degree above 1
    is refused: the ring would call the processor once per key block, which sparse selection cannot use."""
    try:
        from yunchang import LongContextAttention
        from yunchang.globals import PROCESS_GROUP
    except ImportError as exc:
        raise ImportError("Ulysses sequence parallelism needs yunchang: pip install 'comfyui-adacluster[multigpu]'"
                          ) from exc
    ring = PROCESS_GROUP.RING_PG
    if ring is not None and torch.distributed.get_world_size(ring) != 1:
        raise ValueError(f"ring degree {torch.distributed.get_world_size(ring)}: sparse attention runs under pure "
                         "Ulysses only; call set_seq_parallel_pg(world_size, 1, rank, world_size)")
    return LongContextAttention(ring_impl_type="basic", attn_type=ATTN_TYPE, attn_processor=processor)
