"""The sparse attention runner: the one entry point an adapter calls for every attention call.

For each call it decides (policy) whether to run dense, calibrate, or run sparse; for sparse calls it
clusters (warm-started from the run cache), selects key clusters, builds a Layout and has the kernels
execute it. Joint text+video sequences are split: text queries attend everything densely, video queries
attend their selected video keys plus every text key (the always-kept sink), honouring an additive mask.
Everything is per (batch element, head); batch elements are separate branches (cond / uncond).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import kernels
from . import clustering, selection
from .cache import BranchState, CallRecord, RunCache, Timer
from .clustering import Clusters
from .config import AdaClusterConfig
from .layout import Layout
from .schedule import Phase, phase_of


@dataclass(frozen=True)
class CallInfo:
    layer: int  # transformer block index, 0-based
    step: int  # sampler step, 0-based (from the sigma schedule)
    total_steps: int
    branches: tuple  # one hashable per batch element, e.g. (cond_or_uncond, uuid)
    text_len: int = 0  # joint attention: number of text tokens in the sequence
    text_first: bool = False  # text tokens before the video tokens (CogVideoX) or after (HunyuanVideo)
    mask: Optional[torch.Tensor] = None  # additive or bool mask over keys, broadcastable to (B, H, N, N)
    heads: Optional[tuple] = None  # model-wide index of each head of q (sequence parallelism); None: 0..H-1


class SparseAttention:
    """``observer(call, batch_index, layout)``, if given, sees every layout before it runs (for measurements).

    ``dense_layer_agreement(calibrated)``, if given, maps this process's calibrated layers
    {layer: (mean key clusters, any head hard)} to the values shared by every process that holds a part of
    the heads (sequence parallelism), so all of them pick the same dense layers."""

    def __init__(self, config: AdaClusterConfig, cache: RunCache,
                 observer: Optional[Callable[[CallInfo, int, Layout], None]] = None,
                 dense_layer_agreement: Optional[Callable[[dict], dict]] = None):
        self.config = config.validate()
        self.cache = cache
        self.cache.method = config.method
        self.observer = observer
        self.dense_layer_agreement = dense_layer_agreement

    # ------------------------------------------------------------------ policy
    def decide(self, q_shape, k_shape, call: CallInfo) -> Optional[str]:
        """Why this call stays dense (a short reason), or None when it runs sparse.

        The calibration step also returns its reason: its output is dense, but clustering is computed."""
        if q_shape[-2] != k_shape[-2]:
            return "cross-attention"
        video = q_shape[-2] - call.text_len
        if video < max(2, self.config.min_tokens):
            return f"short sequence ({video} video tokens < min_tokens {self.config.min_tokens})"
        phase = phase_of(call.step, self.config.warmup_steps)
        if phase is not Phase.SPARSE:
            return phase.value
        dense_layers = self._dense_layers(call.step)
        if dense_layers is not None and call.layer in dense_layers:
            return "dense layer"
        return None

    def _dense_layers(self, step: int) -> Optional[frozenset]:
        """The dense-layer set, decided once every layer has been calibrated (at the first sparse step,
        or after step 0 when there is no warm-up and layers calibrate on first use)."""
        cache = self.cache
        if cache.dense_layers is None and (self.config.warmup_steps > 0 or step > 0):
            calibrated = cache.calibrated_layers()
            if calibrated:
                if self.dense_layer_agreement is not None:
                    calibrated = self.dense_layer_agreement(calibrated)
                ranked = sorted(calibrated, key=lambda layer: calibrated[layer][0], reverse=True)
                n_dense = math.floor(self.config.dense_layer_fraction * len(ranked) + 0.5)  # nearest, halves up
                if self.config.method == "svg2":  # fixed cluster counts: no ranking to pick dense layers by
                    n_dense = 0
                hard = {layer for layer, (_, is_hard) in calibrated.items() if is_hard}
                cache.dense_layers = frozenset(ranked[:n_dense]) | hard
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
        if reason == Phase.CALIBRATE.value:
            out = dense()
            clustering_timer = Timer(q.device)
            counts = self.calibrate(q[:, :, video], k[:, :, video], call)
            self.cache.record(CallRecord(call.layer, call.step, False, reason, total.stop(),
                                         clustering_timer.stop(), key_counts=counts))
            return out
        if reason is not None:
            out = dense()
            self.cache.record(CallRecord(call.layer, call.step, False, reason, total.stop()))
            return out
        return self._sparse(q, k, v, call, video, mask, total, return_lse)

    def _sparse(self, q, k, v, call, video, mask, total, return_lse=False):
        batch, heads, n, d = q.shape
        text = self._text_slice(n, call)
        qv, kv, vv = q[:, :, video], k[:, :, video], v[:, :, video]
        clustering_timer = Timer(q.device)
        qc, kc = self.cluster(qv, kv, call)
        layout = selection.build_layout(qv, kv, qc, kc, self.config.selection)
        kept = selection.kept_fraction(layout, qc.labels, kc.labels)
        clustering_timer.stop()
        if self.observer is not None:
            for b in range(batch):
                self.observer(call, b, _batch_slice(layout, b))
        if call.text_len:
            text_k, text_v = k[:, :, text], v[:, :, text]
            text_bias = None if mask is None else _mask_block(mask, video, text)
            out = torch.empty_like(q)
            video_out = kernels.execute_layout(qv, kv, vv, layout, text_k=text_k, text_v=text_v,
                                               text_bias=text_bias, return_lse=return_lse)
            # text queries attend every key densely
            text_mask = None if mask is None else _mask_block(mask, text, slice(None))
            if return_lse:
                lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
                out[:, :, video], lse[:, :, video] = video_out
                text_rows = kernels.reference.dense_attention(q[:, :, text], k, v, bias=text_mask)
                out[:, :, text], lse[:, :, text] = text_rows
                out = (out, lse)
            else:
                out[:, :, video] = video_out
                out[:, :, text] = kernels.dense_attention(q[:, :, text], k, v, mask=text_mask)
        else:  # no copy: the executor's output is the call's output
            out = kernels.execute_layout(qv, kv, vv, layout, return_lse=return_lse)
        self.cache.record(CallRecord(call.layer, call.step, True, None, total.stop(), clustering_timer,
                                     kept=kept, key_counts=kc.counts))
        return out

    # ------------------------------------------------------------------ clustering
    def calibrate(self, q: torch.Tensor, k: torch.Tensor, call: CallInfo) -> torch.Tensor:
        """Full clustering of the video tokens q, k (B, H, N, d) of every branch; returns (B, H) key counts."""
        return torch.stack([self._calibrate(q[b:b + 1], k[b:b + 1], call, b) for b in range(q.shape[0])])

    def cluster(self, q: torch.Tensor, k: torch.Tensor, call: CallInfo) -> tuple[Clusters, Clusters]:
        """Query and key clusters of a sparse call: a branch seen for the first time (no calibration step)
        is calibrated now; then every branch takes one warm-started round from its cached centroids."""
        for b in range(q.shape[0]):
            if self.cache.state(call.layer, call.branches[b]) is None:
                self._calibrate(q[b:b + 1], k[b:b + 1], call, b)
        return self._warm_start(q, k, call)

    def _calibrate(self, q: torch.Tensor, k: torch.Tensor, call: CallInfo, b: int) -> torch.Tensor:
        """Full clustering of one batch element; stores the branch state. Returns (H,) key counts."""
        cfg = self.config
        n = q.shape[-2]
        gen = clustering.head_generators(cfg.seed, call.layer, call.heads or range(q.shape[1]))
        if cfg.method == "svg2":
            qc = _euclidean(q, min(cfg.query_clusters, n), cfg.calibration_iters, gen)
            kc = _euclidean(k, min(cfg.key_clusters_svg2, n), cfg.calibration_iters, gen)
            hard = torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)
        else:
            qc = clustering.cluster_queries(q, min(cfg.query_clusters, n), cfg.calibration_iters, generator=gen)
            profile_counts = self.cache.profile.counts_for(call.layer) if self.cache.profile is not None else None
            if profile_counts is not None:
                self.cache.profile.check_fits(q.shape[1], n)
                counts = profile_counts.to(k.device).clamp_max(n).unsqueeze(0)
                init = clustering.sample_rows(k, int(counts.max()), gen)
                kc = clustering.cluster_keys_fixed(k, init, counts, cfg.calibration_iters)
                hard = torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)
            else:
                calib = clustering.calibrate_keys(
                    k, min(cfg.initial_key_clusters, n), cfg.sparsity_threshold, cfg.threshold_mode == "relative",
                    cfg.max_stages, cfg.max_clusters_fraction, cfg.calibration_iters, gen)
                kc, hard = calib.clusters, calib.hard[0]
        self.cache.set_state(call.layer, call.branches[b], BranchState(
            q_centroids=qc.centroids[0].to(q.dtype), k_centroids=kc.centroids[0].to(k.dtype),
            k_counts=kc.counts[0], hard=hard, tokens=n))
        return kc.counts[0]

    def _warm_start(self, q, k, call):
        """Warm-started clustering of every batch element from its branch's cached centroids.

        Branches may have different key cluster counts: their centroids are padded to the largest count with
        unused slots (beyond k_counts), which stay empty and are cut off again when the state is stored."""
        cfg = self.config
        states = [self.cache.state(call.layer, branch) for branch in call.branches[:q.shape[0]]]
        q_init = torch.stack([s.q_centroids for s in states])
        k_slots = [s.k_centroids.shape[-2] for s in states]
        k_init = q.new_zeros(q.shape[0], q.shape[1], max(k_slots), q.shape[-1], dtype=states[0].k_centroids.dtype)
        for b, s in enumerate(states):
            k_init[b, :, :k_slots[b]] = s.k_centroids
        k_counts = torch.stack([s.k_counts for s in states])
        minmax = cfg.selection.score in ("quest", "blend")
        spherical = cfg.method != "svg2"  # svg2 clusters queries with Euclidean k-means too
        qc = clustering.warm_step(q, q_init, cfg.step_iters, spherical)
        kc = clustering.warm_step(k, k_init, cfg.step_iters, False, k_counts, minmax=minmax)
        for b, s in enumerate(states):
            s.q_centroids = qc.centroids[b].to(q.dtype)
            s.k_centroids = kc.centroids[b, :, :k_slots[b]].to(k.dtype)
        return qc, kc

    # ------------------------------------------------------------------ token ranges
    @staticmethod
    def _video_slice(n: int, call: CallInfo) -> slice:
        if not call.text_len:
            return slice(0, n)
        return slice(call.text_len, n) if call.text_first else slice(0, n - call.text_len)

    @staticmethod
    def _text_slice(n: int, call: CallInfo) -> slice:
        return slice(0, call.text_len) if call.text_first else slice(n - call.text_len, n)


def _euclidean(x, count, iters, gen) -> Clusters:
    centroids, labels, sizes, _ = kernels.kmeans(x, clustering.sample_rows(x, count, gen), iters, False)
    return Clusters(centroids, labels, sizes, torch.full(x.shape[:2], count, dtype=torch.int64, device=x.device))


def _batch_slice(layout: Layout, b: int) -> Layout:
    """The layout of batch element b alone (for observers)."""
    pick = lambda t: None if t is None else t[b:b + 1]
    return Layout(q_offsets=pick(layout.q_offsets), k_offsets=pick(layout.k_offsets), selected=pick(layout.selected),
                  q_perm=pick(layout.q_perm), k_perm=pick(layout.k_perm), local_block=layout.local_block,
                  tail=layout.tail)


def _mask_block(mask: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """mask[..., rows, cols] for a mask broadcastable to (B, H, N, N) (size-1 dims stay)."""
    if mask.shape[-2] > 1:
        mask = mask[..., rows, :]
    return mask[..., cols] if mask.shape[-1] > 1 else mask


def _masks_video_keys(mask: torch.Tensor, video: slice) -> bool:
    """True when the mask changes any video key's logit (the sparse path only honours it on text keys)."""
    block = mask[..., video] if mask.shape[-1] > 1 else mask
    return bool((block != 0).any())
