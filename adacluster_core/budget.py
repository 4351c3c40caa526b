"""Budgets chosen at calibration: each head's Top-K and which layers run dense.

At the calibration step AdaCluster measures, for every layer and head, the squared error of the sparse output
against dense and the kept fraction, at a few Top-K values (``AdaCluster.probe``). ``allocate_budgets`` then
spends keys where they remove the most error: of the allocations on the way from the cheapest to the most
accurate, the one that keeps the fewest keys over the model while its summed layer error is no higher than
that of the plain rule (one Top-K for every head, the dense layers picked by error). Heads and layers whose
attention is concentrated get fewer keys, spread ones more, and a layer the plain rule runs dense may run
sparse with a larger Top-K when that costs less for the same error.

Both levels are the same problem: items (heads, layers), each with a few options of (error, cost); every
item takes the option minimising error + rate * cost for one common rate, and the rate is the largest that
meets the error limit. The answer lies on the lower convex hull of each item's options.
"""
from __future__ import annotations

from typing import Optional

import torch

# The allocation aims this far below the plain rule's error: it favours the options whose measured error came
# out low at calibration, so on the steps after it the same choice errs a little more (about 3% per call on
# the GPU video workloads at 480p without this margin).
ERROR_MARGIN = 0.95


def layer_relative_error(diff_sq: torch.Tensor, ref_sq: torch.Tensor) -> torch.Tensor:
    """Relative L2 of a layer's output over its heads (the last dim), from the heads' squared errors against
    dense and the squared norms of the dense output."""
    return (diff_sq.sum(-1) / ref_sq.sum(-1).clamp_min(1e-24)).sqrt()


def switch_rates(error: torch.Tensor, cost: torch.Tensor) -> list:
    """The rates r > 0 at which one item's best option (least error + r * cost) changes, for 1-D error and
    cost over its options (non-finite entries are not options): the slopes of its lower convex hull."""
    points = [(float(c), float(e)) for c, e in zip(cost, error) if torch.isfinite(c) and torch.isfinite(e)]
    if not points:
        return []
    current = min(points)  # the cheapest, least error among equals: the best as the rate grows without bound
    rates = []
    while True:
        # as the rate falls, the option that takes over first is the one reached at the largest rate
        better = [((current[1] - e) / (c - current[0]), c, e) for c, e in points if e < current[1] and c > current[0]]
        if not better:
            return rates
        rate, c, e = max(better)
        rates.append(rate)
        current = (c, e)


def allocations_by_rate(error: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """(A, items) option indices: every allocation that some rate makes, from the cheapest to the most
    accurate. ``error``, ``cost``: (items, options) float64, +inf where an item has fewer options."""
    rates = sorted({r for e, c in zip(error, cost) for r in switch_rates(e, c)}, reverse=True)
    if rates:
        probes = [2 * rates[0]] + [(a + b) / 2 for a, b in zip(rates, rates[1:])] + [rates[-1] / 2]
    else:
        probes = [1.0]
    finite_cost = torch.where(torch.isfinite(cost), cost, torch.zeros_like(cost))
    chosen = []
    for chunk in torch.tensor(probes, dtype=torch.float64).split(256):
        total = error.unsqueeze(0) + chunk[:, None, None] * finite_cost.unsqueeze(0)  # (P, items, options)
        chosen.append(total.argmin(-1))
    return torch.cat(chosen)


def cheapest_within(error: torch.Tensor, cost: torch.Tensor, limit: float) -> Optional[torch.Tensor]:
    """(items,) option indices with summed error at most ``limit`` and a small summed cost (None where no
    allocation by rate meets the limit): the cheapest allocation by rate that meets it, then, while the
    limit leaves room, the single change to a cheaper option that saves the most cost and still fits."""
    allocations = allocations_by_rate(error, cost)
    rows = torch.arange(error.shape[0])
    bound = limit * (1 + 1e-9) + 1e-30  # the limit, with room for rounding in the sums
    total_error = error[rows, allocations].sum(-1)
    total_cost = cost[rows, allocations].sum(-1)
    feasible = total_error <= bound
    if not bool(feasible.any()):
        return None
    total_cost = torch.where(feasible, total_cost, torch.full_like(total_cost, float("inf")))
    pick = allocations[int(total_cost.argmin())].clone()
    while True:
        room = bound - float(error[rows, pick].sum())
        added = error - error[rows, pick].unsqueeze(-1)
        saved = cost[rows, pick].unsqueeze(-1) - cost
        saved = torch.where((added <= room) & (saved > 0) & torch.isfinite(error), saved, torch.zeros_like(saved))
        best = int(saved.argmax())
        if float(saved.flatten()[best]) <= 0:
            return pick
        pick[best // error.shape[1]] = best % error.shape[1]


def allocate_budgets(layers: dict, base: int, may_run_dense: frozenset, sparse_error_cap: float) -> dict:
    """Per-head budgets and dense layers: the fewest kept keys at no more summed layer error than
    ERROR_MARGIN times the plain rule's.

    ``layers``: layer -> (squared error (rows, C), kept fraction (rows, C), squared norm of the dense output
    (rows,)), a row per (branch, head), C candidate Top-K values in increasing order (+inf where a candidate
    was not measured: no option); ``base``: the index of the plain rule's one Top-K; ``may_run_dense``: the
    layers the plain rule runs dense, the only ones that may stay dense; such a layer runs sparse only where
    its error is at most ``sparse_error_cap`` (the dense-layer threshold). Returns layer -> (rows,) candidate
    index per row, or None for a layer that runs dense."""
    names = sorted(layers)
    if not names:
        return {}
    errors, costs, choices = [], [], []  # per layer: its options' relative L2, kept fraction, head choices
    for layer in names:
        diff_sq, kept, ref_sq = (t.double().cpu() for t in layers[layer])
        rows = torch.arange(diff_sq.shape[0])
        plain = torch.full((1, len(rows)), base, dtype=torch.long)
        options = torch.cat([plain, allocations_by_rate(diff_sq, kept)])  # (1 + A, rows), the plain rule first
        layer_errors = layer_relative_error(diff_sq[rows, options], ref_sq)
        layer_costs = kept[rows, options].mean(-1)
        layer_choices = list(options)
        if layer in may_run_dense:
            too_far = layer_errors > sparse_error_cap
            layer_errors = torch.where(too_far, torch.full_like(layer_errors, float("inf")), layer_errors)
            layer_costs = torch.where(too_far, torch.full_like(layer_costs, float("inf")), layer_costs)
            layer_errors = torch.cat([layer_errors, layer_errors.new_zeros(1)])
            layer_costs = torch.cat([layer_costs, layer_costs.new_ones(1)])
            layer_choices.append(None)
        errors.append(layer_errors)
        costs.append(layer_costs)
        choices.append(layer_choices)
    plain_pick = [len(c) - 1 if layer in may_run_dense else 0 for layer, c in zip(names, choices)]
    width = max(len(c) for c in choices)
    pad = lambda values: torch.cat([values, values.new_full((width - len(values),), float("inf"))])  # noqa: E731
    error, cost = torch.stack([pad(e) for e in errors]), torch.stack([pad(c) for c in costs])
    rows = torch.arange(len(names))
    plain = torch.tensor(plain_pick)
    pick = cheapest_within(error, cost, ERROR_MARGIN * float(error[rows, plain].sum()))
    if pick is None or float(cost[rows, pick].sum()) >= float(cost[rows, plain].sum()):
        pick = plain
    return {layer: layer_choices[i] for layer, i, layer_choices in zip(names, pick.tolist(), choices)}
