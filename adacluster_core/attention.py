"""The sparse attention runner: the one entry point an adapter calls for every attention call.

For each call it decides (policy) whether to run dense, run the method's pass (calibration, search or
fit; dense output), or run sparse; for sparse calls the method (methods/, one module each) plans a
Layout and the kernels execute it. Joint text+video sequences are split: text queries attend everything
densely, video queries attend their selected video keys plus every text key (the always-kept sink),
honouring an additive mask.
Everything is per (batch element, head); batch elements are separate branches (cond / uncond).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import kernels
from . import graphs, methods
from .cache import CallRecord, RunCache, Timer
from .clustering import Clusters
from .config import AdaClusterConfig
from .layout import Layout
from .methods.base import SparseMethod, TextSegment
from .schedule import Phase


@dataclass(frozen=True)
class CallInfo:
    layer: int  # transformer block index, 0-based
    step: int  # sampler step, 0-based (from the sigma schedule)
    total_steps: int
    branches: tuple  # one hashable per batch element, e.g. (cond_or_uncond, uuid)
    text_len: int = 0  # joint attention: number of text tokens in the sequence
    text_first: bool = False  # text tokens before the video tokens (CogVideoX) or after (HunyuanVideo)
    mask: Optional[torch.Tensor] = None  # additive or bool mask over keys, broadcastable to (B, H, N, N)
    grid: Optional[tuple] = None  # (frames, height, width) of the video tokens after patching, when known
    heads: Optional[tuple] = None  # model-wide index of each head of q (sequence parallelism); None: 0..H-1
    progress: Optional[float] = None  # denoising progress of the step by noise level (0 noise .. 1 clean), if known


class SparseAttention:
    """``observer(call, batch_index, layout)``, if given, sees every layout before it runs (for measurements).

    ``method`` (a methods.SparseMethod built on this ``cache``) is the layout builder; by default the one
    ``config.method`` names, with its default settings.

    ``dense_layer_agreement(candidates)``, if given, maps this process's dense-layer candidates
    {layer: (score, any head hard)} to the values shared by every process that holds a part of the heads
    (sequence parallelism), so all of them pick the same dense layers."""

    def __init__(self, config: AdaClusterConfig, cache: RunCache,
                 observer: Optional[Callable[[CallInfo, int, Layout], None]] = None,
                 method: Optional[SparseMethod] = None,
                 dense_layer_agreement: Optional[Callable[[dict], dict]] = None):
        self.config = config.validate()
        self.cache = cache
        self.method = method if method is not None else methods.create(self.config, cache)
        if self.method.cache is not cache:
            raise ValueError("the method must be built on the runner's RunCache")
        self.cache.method = self.method.name
        self.observer = observer
        self.dense_layer_agreement = dense_layer_agreement

    # ------------------------------------------------------------------ policy
    def decide(self, q_shape, k_shape, call: CallInfo) -> Optional[str]:
        """Why this call stays dense (a short reason), or None when it runs sparse.

        The method's pass step (calibration, search, fit) also returns its reason: its output is dense, but
        the pass is computed."""
        if q_shape[-2] != k_shape[-2]:
            return "cross-attention"
        video = q_shape[-2] - call.text_len
        if video < max(2, self.config.min_tokens):
            return f"short sequence ({video} video tokens < min_tokens {self.config.min_tokens})"
        phase = self.method.phase(call.step, call.total_steps)
        if phase is Phase.WARMUP:
            return phase.value
        if phase is Phase.CALIBRATE:
            return self.method.pass_name
        dense_layers = self._dense_layers(call.step)
        if dense_layers is not None and call.layer in dense_layers:
            return "dense layer"
        return None

    def _dense_layers(self, step: int) -> Optional[frozenset]:
        """The dense-layer set, decided once from the method's candidates: of the layers with the largest
        score, at most the ``dense_layer_fraction`` (nearest count, halves up) whose score is above the
        method's minimum, plus every layer with a hard head; then the method settles its budgets, which may
        run some of the chosen layers sparse."""
        cache = self.cache
        if cache.dense_layers is None:
            candidates = self.method.dense_layer_candidates(step)
            if candidates is not None:
                if self.dense_layer_agreement is not None:
                    candidates = self.dense_layer_agreement(candidates)
                ranked = sorted(candidates, key=lambda layer: candidates[layer][0], reverse=True)
                n_dense = math.floor(self.method.dense_layer_fraction * len(ranked) + 0.5)
                floor = self.method.dense_layer_min_score
                chosen = [layer for layer in ranked[:n_dense] if floor is None or candidates[layer][0] > floor]
                hard = frozenset(layer for layer, (_, is_hard) in candidates.items() if is_hard)
                dense = frozenset(chosen) | hard
                # the method's budgets (AdaCluster: per-head Top-K) may run some of the chosen layers sparse;
                # processes that share the heads of a layer keep the agreed set as it is
                fixed = hard if self.dense_layer_agreement is None else dense
                cache.dense_layers = self.method.settle_budgets(dense, fixed)
        return cache.dense_layers

    # ------------------------------------------------------------------ call
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: CallInfo,
                 dense: Callable[[], torch.Tensor], return_lse: bool = False):
        """q, k, v: (B, H, N, d). ``dense()`` gives the caller's dense result (B, H, N, d).

        With ``return_lse`` the result is (out, lse (B, H, N) fp32, natural log) and ``dense()`` returns such
        a pair too."""
        total = Timer(q.device)
        reason = self.decide(q.shape, k.shape, call)
        video = self._video_slice(q.shape[-2], call)
        mask = kernels.reference.additive_mask(call.mask)
        if reason is None and mask is not None and _masks_video_keys(mask, video):
            reason = "mask on video tokens"
        if reason is not None and reason == self.method.pass_name:
            return self._pass(q, k, v, call, video, mask, reason, dense, total, return_lse)
        if reason is not None:
            out = dense()
            self.cache.record(CallRecord(call.layer, call.step, False, reason, total.stop()))
            return out
        return self._sparse(q, k, v, call, video, mask, total, return_lse)

    def _pass(self, q, k, v, call, video, mask, reason, dense, total, return_lse=False):
        """A pass step: dense output, the method's pass on the video tokens. With ``return_lse`` the output
        (and its LSE) is the caller's ``dense()``, also where the pass computed the output."""
        text = self._text_slice(q.shape[-2], call)
        segment = None
        if call.text_len:
            bias = None if mask is None else _mask_block(mask, video, text)
            segment = TextSegment(k[:, :, text], v[:, :, text], bias)
        pass_timer = Timer(q.device)
        result = self.method.run_pass(q[:, :, video], k[:, :, video], v[:, :, video], call, segment)
        if result.out is None or return_lse:
            out = dense()
        elif call.text_len:
            out = torch.empty_like(q)
            out[:, :, video] = result.out
            text_mask = None if mask is None else _mask_block(mask, text, slice(None))
            out[:, :, text] = kernels.dense_attention(q[:, :, text], k, v, mask=text_mask)
        else:
            out = result.out
        if self.method.probes_at_pass:
            reference = (out[0] if return_lse else out)[:, :, video]
            execute = lambda layout: self._execute(q, k, v, call, video, mask, layout)[:, :, video]  # noqa: E731
            self.method.probe(q[:, :, video], k[:, :, video], call, reference, execute)
        pass_timer.stop()
        self.cache.record(CallRecord(call.layer, call.step, False, reason, total.stop(), pass_timer,
                                     key_counts=result.key_counts))
        return out

    def _sparse(self, q, k, v, call, video, mask, total, return_lse=False):
        graph_key = self._graph_key(q, k, v, call, mask, return_lse)
        if graph_key is not None:
            return self._sparse_replayed(q, k, v, call, video, total, return_lse, graph_key)
        planning_timer = Timer(q.device)
        plan = self.method.plan(q[:, :, video], k[:, :, video], call)
        planning_timer.stop()
        if self.observer is not None:
            for b in range(q.shape[0]):
                self.observer(call, b, _batch_slice(plan.layout, b))
        out = self._execute(q, k, v, call, video, mask, plan.layout, return_lse)
        self.cache.record(CallRecord(call.layer, call.step, True, None, total.stop(), planning_timer,
                                     kept=plan.kept, key_counts=plan.key_counts))
        return out

    def _graph_key(self, q, k, v, call, mask, return_lse) -> Optional[tuple]:
        """The key of a call replayed as a CUDA graph (config.cuda_graphs, graphs.CallGraphs), or None when it
        runs eagerly: masks and observers always run eagerly, and the method must allow capture."""
        if not self.config.cuda_graphs or mask is not None or self.observer is not None:
            return None
        if not graphs.replay_allowed(q):
            return None
        method_key = self.method.graph_key(call)
        if method_key is None:
            return None
        shapes = tuple((tuple(t.shape), t.dtype, t.device) for t in (q, k, v))
        return (call.layer, call.branches, call.text_len, call.text_first, return_lse, shapes, method_key)

    def _sparse_replayed(self, q, k, v, call, video, total, return_lse, graph_key):
        """A sparse call run eagerly once, then captured, then replayed (planning is not timed apart)."""
        def whole_call(q, k, v):
            plan = self.method.plan(q[:, :, video], k[:, :, video], call)
            out = self._execute(q, k, v, call, video, None, plan.layout, return_lse)
            return (*(out if return_lse else (out,)), plan.kept, plan.key_counts)

        *out, kept, key_counts = self.cache.graphs.run(graph_key, (q, k, v), whole_call)
        self.cache.record(CallRecord(call.layer, call.step, True, None, total.stop(), kept=kept,
                                     key_counts=key_counts))
        return tuple(out) if return_lse else out[0]

    def _execute(self, q, k, v, call, video, mask, layout, return_lse=False):
        """Runs a layout: video queries through it (plus the text sink), text queries densely.
        With ``return_lse``: (out, lse (B, H, N) fp32)."""
        text = self._text_slice(q.shape[-2], call)
        qv, kv, vv = q[:, :, video], k[:, :, video], v[:, :, video]
        if call.text_len:
            text_k, text_v = k[:, :, text], v[:, :, text]
            text_bias = None if mask is None else _mask_block(mask, video, text)
            out = torch.empty_like(q)
            video_out = kernels.execute_layout(qv, kv, vv, layout, text_k=text_k, text_v=text_v,
                                               text_bias=text_bias, return_lse=return_lse)
            # text queries attend every key densely
            text_mask = None if mask is None else _mask_block(mask, text, slice(None))
            if not return_lse:
                out[:, :, video] = video_out
                out[:, :, text] = kernels.dense_attention(q[:, :, text], k, v, mask=text_mask)
                return out
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            out[:, :, video], lse[:, :, video] = video_out
            out[:, :, text], lse[:, :, text] = kernels.reference.dense_attention(q[:, :, text], k, v, bias=text_mask)
            return out, lse
        # no copy: the executor's output is the call's output
        return kernels.execute_layout(qv, kv, vv, layout, return_lse=return_lse)

    # ------------------------------------------------------------------ clustering (AdaCluster and SVG2)
    def calibrate(self, q: torch.Tensor, k: torch.Tensor, call: CallInfo) -> torch.Tensor:
        """Full clustering of the video tokens q, k (B, H, N, d) of every branch; returns (B, H) key counts."""
        return self._clustering_method().calibrate(q, k, call)

    def cluster(self, q: torch.Tensor, k: torch.Tensor, call: CallInfo) -> tuple[Clusters, Clusters]:
        """Query and key clusters of a sparse call (see methods.AdaCluster.cluster)."""
        return self._clustering_method().cluster(q, k, call)

    def _clustering_method(self) -> methods.AdaCluster:
        if not isinstance(self.method, methods.AdaCluster):
            raise TypeError(f"method {self.method.name!r} does not cluster tokens; cluster() and calibrate() "
                            "belong to the adacluster and svg2 methods")
        return self.method

    # ------------------------------------------------------------------ token ranges
    @staticmethod
    def _video_slice(n: int, call: CallInfo) -> slice:
        if not call.text_len:
            return slice(0, n)
        return slice(call.text_len, n) if call.text_first else slice(0, n - call.text_len)

    @staticmethod
    def _text_slice(n: int, call: CallInfo) -> slice:
        return slice(0, call.text_len) if call.text_first else slice(n - call.text_len, n)


def _batch_slice(layout: Layout, b: int) -> Layout:
    """The layout of batch element b alone (for observers)."""
    return dataclasses.replace(layout, **{field.name: getattr(layout, field.name)[b:b + 1]
                                          for field in dataclasses.fields(layout)
                                          if isinstance(getattr(layout, field.name), torch.Tensor)})


def _mask_block(mask: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """mask[..., rows, cols] for a mask broadcastable to (B, H, N, N) (size-1 dims stay)."""
    if mask.shape[-2] > 1:
        mask = mask[..., rows, :]
    return mask[..., cols] if mask.shape[-1] > 1 else mask


def _masks_video_keys(mask: torch.Tensor, video: slice) -> bool:
    """True when the mask changes any video key's logit (the sparse path only honours it on text keys)."""
    block = mask[..., video] if mask.shape[-1] > 1 else mask
    return bool((block != 0).any())
