"""The budget allocation: the fewest kept keys at no more error than the plain rule (budget.py)."""
import itertools

import pytest
import torch

from comfyui_adacluster.adacluster_core import budget


def curves(items, options, seed):
    """Random decreasing error / increasing cost curves, as a head or layer measures over Top-K values."""
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(items, options, generator=gen, dtype=torch.float64).sort(-1).values
    error = torch.rand(items, options, generator=gen, dtype=torch.float64).sort(-1, descending=True).values
    return error, cost


def test_switch_rates_are_the_slopes_of_the_lower_hull():
    # (cost, error): (0, 4), (1, 2), (2, 1.5) lies above the hull, (3, 0)
    error = torch.tensor([4.0, 2.0, 1.5, 0.0], dtype=torch.float64)
    cost = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    assert budget.switch_rates(error, cost) == pytest.approx([2.0, 1.0])


def test_allocations_by_rate_run_from_cheapest_to_most_accurate():
    error, cost = curves(6, 5, seed=1)
    allocations = budget.allocations_by_rate(error, cost)
    rows = torch.arange(6)
    totals_cost = cost[rows, allocations].sum(-1)
    totals_error = error[rows, allocations].sum(-1)
    assert allocations[0].tolist() == cost.argmin(-1).tolist()
    assert allocations[-1].tolist() == error.argmin(-1).tolist()
    assert bool((totals_cost.diff() >= 0).all()) and bool((totals_error.diff() <= 0).all())


@pytest.mark.parametrize("seed", range(40))
def test_cheapest_within_meets_the_limit_near_the_exact_optimum(seed):
    error, cost = curves(4, 4, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    plain = torch.randint(0, 4, (4,), generator=gen)
    rows = torch.arange(4)
    limit = float(error[rows, plain].sum())
    pick = budget.cheapest_within(error, cost, limit)
    assert float(error[rows, pick].sum()) <= limit * (1 + 1e-9)
    exact = min(float(cost[rows, torch.tensor(c)].sum()) for c in itertools.product(range(4), repeat=4)
                if float(error[rows, torch.tensor(c)].sum()) <= limit)
    assert float(cost[rows, pick].sum()) <= 1.6 * exact + 1e-12


def test_cheapest_within_is_none_when_the_limit_is_out_of_reach():
    error, cost = curves(3, 3, seed=5)
    assert budget.cheapest_within(error, cost, float(error.min(-1).values.sum()) * 0.5) is None


def layer_table(heads, seed):
    """(squared error, kept, squared norm) of a layer over 5 Top-K candidates, per head: every other head
    concentrated (its error barely falls with more keys), the others spread to a random degree."""
    gen = torch.Generator().manual_seed(seed)
    kept = torch.tensor([0.03, 0.05, 0.09, 0.17, 0.33]).expand(heads, 5).clone()
    scale = torch.rand(heads, 1, generator=gen) + 0.5
    scale[::2] = 0.01
    diff_sq = scale * torch.tensor([1.0, 0.55, 0.3, 0.16, 0.08])
    return diff_sq, kept, torch.ones(heads)


def layer_error_and_work(table, choice):
    diff_sq, kept, ref_sq = table
    if choice is None:
        return 0.0, 1.0
    rows = torch.arange(diff_sq.shape[0])
    return float((diff_sq[rows, choice].sum() / ref_sq.sum()).sqrt()), float(kept[rows, choice].mean())


def test_allocation_keeps_fewer_keys_at_no_more_error_than_the_plain_rule():
    layers = {layer: layer_table(16, seed=layer) for layer in range(12)}
    layers[5] = (layers[5][0] * 40, layers[5][1], layers[5][2])  # a hard layer: the plain rule runs it dense
    chosen = budget.allocate_budgets(layers, base=2, may_run_dense=frozenset({5}), sparse_error_cap=10.0)
    plain = {layer: (None if layer == 5 else torch.full((16,), 2)) for layer in layers}
    new = [layer_error_and_work(layers[layer], chosen[layer]) for layer in layers]
    old = [layer_error_and_work(layers[layer], plain[layer]) for layer in layers]
    assert sum(e for e, _ in new) <= budget.ERROR_MARGIN * sum(e for e, _ in old) * (1 + 1e-6)
    assert sum(w for _, w in new) < sum(w for _, w in old)
    # concentrated heads (even) get smaller budgets than spread ones (odd)
    sparse = torch.stack([chosen[layer] for layer in layers if chosen[layer] is not None]).float()
    assert float(sparse[:, ::2].mean()) < float(sparse[:, 1::2].mean())


def test_allocation_without_room_keeps_the_plain_rule():
    """Every head alike and the candidates on a straight line: nothing beats one Top-K for every head."""
    kept = torch.tensor([0.1, 0.2, 0.3]).expand(4, 3).clone()
    diff_sq = torch.tensor([3.0, 2.0, 1.0]).expand(4, 3).clone()
    chosen = budget.allocate_budgets({0: (diff_sq, kept, torch.ones(4))}, base=1, may_run_dense=frozenset(),
                                     sparse_error_cap=0.1)
    assert chosen[0].tolist() == [1, 1, 1, 1]


def test_allocation_of_no_layers_is_empty():
    assert budget.allocate_budgets({}, base=1, may_run_dense=frozenset({3}), sparse_error_cap=0.1) == {}


def test_a_dense_layer_runs_sparse_only_within_the_dense_threshold():
    """A layer the plain rule runs dense, ten times as spread as the others: allowed any error it runs sparse;
    with the dense-layer threshold below what its largest Top-K reaches, it stays dense."""
    layers = {layer: layer_table(16, seed=layer) for layer in range(12)}
    layers[5] = (layers[5][0] * 10, layers[5][1], layers[5][2])
    loose = budget.allocate_budgets(layers, base=2, may_run_dense=frozenset({5}), sparse_error_cap=10.0)
    assert loose[5] is not None
    best = float((layers[5][0][:, -1].sum() / layers[5][2].sum()).sqrt())  # its error at the largest Top-K
    tight = budget.allocate_budgets(layers, base=2, may_run_dense=frozenset({5}), sparse_error_cap=0.9 * best)
    assert tight[5] is None
