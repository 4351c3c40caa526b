"""AdaCluster: angular query clusters, adaptive key clusters, critical-cluster selection.

The last warm-up step calibrates (full clustering, per-head key counts); every sparse step takes one
warm-started k-means round from the branch's cached centroids and selects key clusters per query cluster.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import budget, clustering, selection
from ..cache import BranchState, RunCache
from ..clustering import Clusters
from ..config import AdaClusterConfig
from ..schedule import Phase, phase_of
from .base import PassResult, Plan, SparseMethod

# the Top-K multiples measured at calibration for the budget allocation (config.selection.budget "matched")
BUDGET_FACTORS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
# Multiples above this are measured only in layers that might run dense, each while the layer's error at the
# one before is still above the dense-layer threshold and it leaves some key cluster out: there they may let
# the layer run sparse instead of dense (the more key clusters a layer has, the larger the multiple it takes);
# elsewhere they would cost more to measure than all the smaller candidates together.
ALWAYS_MEASURED_FACTOR = 2.0


class AdaCluster(SparseMethod):
    name = "adacluster"
    spherical_queries = True  # AdaCluster clusters the normalised queries; SVG2 the raw ones

    def __init__(self, config: AdaClusterConfig, cache: RunCache):
        super().__init__(cache)
        self.config = config
        self.dense_layer_fraction = config.dense_layer_fraction
        # dense layers ranked by measured error, and per-head budgets, are measured at the calibration step
        self.probes_at_pass = config.dense_layers_by == "error" or len(self.budget_candidates()) > 1
        self.dense_layer_min_score = config.dense_error_threshold if config.dense_layers_by == "error" else None

    def phase(self, step: int, total_steps: int) -> Phase:
        return phase_of(step, self.config.warmup_steps)

    def run_pass(self, q, k, v, call, text) -> PassResult:
        return PassResult(key_counts=self.calibrate(q, k, call))

    def plan(self, q: torch.Tensor, k: torch.Tensor, call) -> Plan:
        qc, kc = self.cluster(q, k, call)
        states = [self.cache.state(call.layer, branch) for branch in call.branches[:q.shape[0]]]
        sel = self.config.selection
        top_k = None
        if all(s.head_top_k is not None for s in states):
            top_k = torch.stack([s.head_top_k for s in states])
        scale = sel.top_k_scale(call.step, call.total_steps, call.progress)
        if scale != 1.0:
            base = top_k if top_k is not None else torch.full((q.shape[0], q.shape[1]), sel.top_k, device=q.device)
            top_k = (base * scale).round().clamp_min(1).long()
        layout, kept = selection.plan_layout(q, k, qc, kc, sel, top_k=top_k)
        if all(s.tail_spread_weight is not None for s in states):
            layout.tail_spread_weight = torch.stack([s.tail_spread_weight for s in states])
        return Plan(layout, kept, kc.counts)

    def graph_key(self, call):
        """The step's Top-K multiplier and the branch states a captured call reads and writes in place (a state
        replaced since is another key). None until every branch is calibrated."""
        states = [self.cache.state(call.layer, branch) for branch in call.branches]
        if any(s is None for s in states):
            return None
        return (self.config.selection.top_k_scale(call.step, call.total_steps, call.progress),
                tuple(t.data_ptr() for s in states for t in s.tensors()))

    def budget_candidates(self) -> tuple:
        """The Top-K values the calibration step measures every head at, in increasing order (one: the
        config's Top-K, where budgets are not chosen)."""
        sel = self.config.selection
        if sel.budget != "matched" or sel.count != "topk":
            return (sel.top_k,)
        return tuple(sorted({max(1, round(sel.top_k * f)) for f in BUDGET_FACTORS}))

    def probe(self, q, k, call, reference, execute) -> None:
        """At calibration: each head's weight of the pooled tail's spread term (1 or 0, whichever errs less at
        the config's Top-K: the second-order weight assumes a roughly Gaussian spread of the keys around their
        cluster means, which a head may not have), then each head's squared error against dense and kept
        fraction at the candidate Top-K values with that weight (kept for ``settle_budgets``), and the layer's
        error at the config's Top-K, which ranks the dense layers. The candidates above ALWAYS_MEASURED_FACTOR
        times the Top-K cost more than the others together and matter only where a layer might run dense, so
        each is measured only where the layer's error at the candidate before it is above the dense-layer
        threshold, and only while it leaves some key cluster of the layer out (keeping all of them is exact
        attention at a dense layer's cost); elsewhere it is no option."""
        qc, kc = self.cluster(q, k, call)
        sel = self.config.selection
        # with a calibration profile the budgets are the profile's, and the dense layers too
        candidates = self.budget_candidates() if self.cache.profile is None else (sel.top_k,)
        ref_sq = squared_norms(reference)  # (B, H)

        def run(top_k, spread_weight):
            per_head = torch.full(ref_sq.shape, top_k, device=q.device)
            layout, layout_kept = selection.plan_layout(q, k, qc, kc, sel, top_k=per_head)
            layout.tail_spread_weight = spread_weight
            return squared_norms(execute(layout), reference), layout_kept.float()

        spread_weight, at_top_k = None, None
        if sel.tail:
            second_order, kept_at_top_k = run(sel.top_k, torch.ones_like(ref_sq))
            size_only, _ = run(sel.top_k, torch.zeros_like(ref_sq))
            spread_weight = (second_order <= size_only).float()
            at_top_k = (torch.minimum(second_order, size_only), kept_at_top_k)

        def measure(top_k):
            return at_top_k if top_k == sel.top_k and at_top_k is not None else run(top_k, spread_weight)

        always = [top_k for top_k in candidates if top_k <= ALWAYS_MEASURED_FACTOR * sel.top_k]
        measured = [measure(top_k) for top_k in always]
        plain = candidates.index(sel.top_k)
        threshold = self.config.dense_error_threshold
        unmeasured = torch.full_like(ref_sq, float("inf"))
        too_far = float(budget.layer_relative_error(measured[plain][0], ref_sq).max()) > threshold
        widest = int(kc.counts.max()) if too_far else 0  # read from the device only where it may be needed
        for top_k in candidates[len(always):]:
            if not too_far or top_k >= widest:
                measured.append((unmeasured, unmeasured))
                continue
            measured.append(measure(top_k))
            too_far = float(budget.layer_relative_error(measured[-1][0], ref_sq).max()) > threshold
        diff_sq = torch.stack([m[0] for m in measured], dim=-1)  # (B, H, candidates)
        kept = torch.stack([m[1] for m in measured], dim=-1)
        layer_error = budget.layer_relative_error(diff_sq[..., plain], ref_sq)  # (B,)
        for b, branch in enumerate(call.branches[:q.shape[0]]):
            state = self.cache.state(call.layer, branch)
            state.calibration_error = layer_error[b]
            if spread_weight is not None:
                state.tail_spread_weight = spread_weight[b]
            if len(candidates) > 1:
                state.probe_error, state.probe_kept, state.probe_reference = diff_sq[b], kept[b], ref_sq[b]

    def settle_budgets(self, dense_layers: frozenset, fixed_dense: frozenset) -> frozenset:
        """Sets each calibrated head's Top-K by ``budget.allocate_budgets`` and returns the dense layers:
        those of ``dense_layers`` the allocation keeps dense, plus ``fixed_dense`` (which always run dense).
        Layers without a full measurement keep the config's Top-K."""
        candidates = self.budget_candidates()
        if len(candidates) == 1:
            return dense_layers
        tables = {}
        for layer, states in self.cache.clustering_states().items():
            if layer in fixed_dense or any(s.probe_error is None for s in states):
                continue
            tables[layer] = (states, tuple(torch.cat([getattr(s, name).cpu() for s in states])
                                           for name in ("probe_error", "probe_kept", "probe_reference")))
        chosen = budget.allocate_budgets({layer: t for layer, (_, t) in tables.items()},
                                         candidates.index(self.config.selection.top_k),
                                         frozenset(dense_layers) - fixed_dense, self.config.dense_error_threshold)
        values = torch.tensor(candidates)
        for layer, (states, _) in tables.items():
            if chosen[layer] is None:
                continue
            for state, rows in zip(states, chosen[layer].split([s.probe_error.shape[0] for s in states])):
                state.head_top_k = values[rows].to(state.k_counts.device)
        return frozenset(layer for layer in dense_layers if tables.get(layer) is None or chosen[layer] is None)

    def dense_layer_candidates(self, step: int) -> Optional[dict]:
        # decided once every layer has been calibrated: at the first sparse step, or after step 0 when there
        # is no warm-up and layers calibrate on first use
        if self.config.warmup_steps == 0 and step == 0:
            return None
        calibrated = self.cache.calibrated_layers()
        if not calibrated or self.config.dense_layers_by != "error":
            return calibrated or None
        # layers calibrated lazily (no calibration step) have no measured error: never chosen for it
        errors = self.cache.calibration_errors()
        return {layer: (errors.get(layer, 0.0), hard) for layer, (_, hard) in calibrated.items()}

    def describe(self) -> str:
        c = self.config
        sel = c.selection
        budget = "" if (sel.high_noise_top_k_scale, sel.low_noise_top_k_scale) == (1.0, 1.0) else (
            f" (x{sel.high_noise_top_k_scale:g} on the first {sel.noise_phase_fraction:.0%} of the denoising, "
            f"x{sel.low_noise_top_k_scale:g} on the last {sel.noise_phase_fraction:.0%})")
        return (f"method {self.name}, recipe {c.recipe}, query clusters {c.query_clusters}, initial key clusters "
                f"{c.initial_key_clusters}, threshold {c.sparsity_threshold}, top-k {sel.top_k}{budget}, warm-up "
                f"{c.warmup_steps}, dense layers {c.dense_layer_fraction:.0%}, min tokens {c.min_tokens}")

    # ------------------------------------------------------------------ clustering
    def calibrate(self, q: torch.Tensor, k: torch.Tensor, call) -> torch.Tensor:
        """Full clustering of the video tokens q, k (B, H, N, d) of every branch; returns (B, H) key counts."""
        return torch.stack([self._calibrate(q[b:b + 1], k[b:b + 1], call, b) for b in range(q.shape[0])])

    def cluster(self, q: torch.Tensor, k: torch.Tensor, call) -> tuple[Clusters, Clusters]:
        """Query and key clusters of a sparse call: a branch seen for the first time (no calibration step)
        is calibrated now; then every branch takes one warm-started round from its cached centroids."""
        for b in range(q.shape[0]):
            if self.cache.state(call.layer, call.branches[b]) is None:
                self._calibrate(q[b:b + 1], k[b:b + 1], call, b)
        return self._warm_start(q, k, call)

    def _initial_clusters(self, q, k, call, gen) -> tuple[Clusters, Clusters, torch.Tensor]:
        """Query clusters, key clusters (count chosen per head) and the hard-head flags of one batch element."""
        cfg = self.config
        n = q.shape[-2]
        qc = clustering.cluster_queries(q, min(cfg.query_clusters, n), cfg.calibration_iters, generator=gen)
        profile_counts = self.cache.profile.counts_for(call.layer) if self.cache.profile is not None else None
        if profile_counts is not None:
            self.cache.profile.check_fits(q.shape[1], n)
            counts = profile_counts.to(k.device).clamp_max(n).unsqueeze(0)
            init = clustering.sample_rows(k, int(counts.max()), gen)
            kc = clustering.cluster_keys_fixed(k, init, counts, cfg.calibration_iters)
            return qc, kc, torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)
        calib = clustering.calibrate_keys(
            k, min(cfg.initial_key_clusters, n), cfg.sparsity_threshold, cfg.threshold_mode == "relative",
            cfg.max_stages, cfg.max_clusters_fraction, cfg.calibration_iters, gen)
        return qc, calib.clusters, calib.hard[0]

    def _calibrate(self, q: torch.Tensor, k: torch.Tensor, call, b: int) -> torch.Tensor:
        """Full clustering of one batch element; stores the branch state. Returns (H,) key counts."""
        gen = clustering.head_generators(self.config.seed, call.layer, call.heads or range(q.shape[1]))
        qc, kc, hard = self._initial_clusters(q, k, call, gen)
        state = BranchState(q_centroids=qc.centroids[0].to(q.dtype), k_centroids=kc.centroids[0].to(k.dtype),
                            k_counts=kc.counts[0], hard=hard, tokens=q.shape[-2])
        profile_top_k = self.cache.profile.top_k_for(call.layer) if self.cache.profile is not None else None
        if profile_top_k is not None and len(self.budget_candidates()) > 1:
            state.head_top_k = profile_top_k.to(q.device)
        self.cache.set_state(call.layer, call.branches[b], state)
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
        # the pooled tail's inputs come from the statistics pass (selection._layout); the key spread not beside
        # max/min, where the pass would spill registers at head dim 128 (the executor then computes it)
        tail = cfg.selection.tail
        qc = clustering.warm_step(q, q_init, cfg.step_iters, self.spherical_queries, row_squares=tail)
        kc = clustering.warm_step(k, k_init, cfg.step_iters, False, k_counts, minmax=minmax,
                                  spread=tail and not minmax)
        for b, s in enumerate(states):
            s.q_centroids = qc.centroids[b].to(q.dtype)
            s.k_centroids = kc.centroids[b, :, :k_slots[b]].to(k.dtype)
        return qc, kc


def squared_norms(x: torch.Tensor, minus: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of squares of x (or of x - minus) over tokens and channels, (B, H) fp32, a few heads at a time so
    no fp32 copy of the whole output is made."""
    out = torch.empty(x.shape[:2], dtype=torch.float32, device=x.device)
    for heads in clustering.head_chunks(x):
        part = x[:, heads].float()  # not in place below: for fp32 x this is x itself
        if minus is not None:
            part = part - minus[:, heads].float()
        out[:, heads] = part.square().sum((-1, -2))
    return out
