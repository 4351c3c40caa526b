"""Head load balance under Ulysses sequence parallelism.

Every rank runs the sparse attention of H/N heads, and a head's sparse cost grows with its kept fraction
(the share of query-key pairs attended exactly), which differs from head to head. The slowest rank sets
the step time, so the imbalance is max over ranks of the rank's cost divided by the mean rank cost.

Ulysses gives rank r the contiguous heads r*H/N .. (r+1)*H/N - 1. An engine lets us choose which heads a
rank holds when the caller permutes the head dimension of q, k, v before the all-to-all and undoes it on
the output (or, once, permutes the head blocks of the q/k/v projection rows, the q/k norm weights and the
output projection columns). ``balanced_permutation`` gives such a permutation: the greedy
longest-processing-time assignment, each rank taking exactly H/N heads. Decide it from a finished run
(its kept fractions) and keep it for the whole next run: the run cache holds each rank's heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class HeadBalance:
    per_head: list  # kept fraction per model-wide head (0 where no sparse call ran)
    per_rank: list  # mean kept fraction of each rank's heads
    imbalance: float  # max(per_rank) / mean(per_rank); 1.0 is perfect

    def to_text(self) -> str:
        ranks = ", ".join(f"rank {r}: {100 * k:.1f}%" for r, k in enumerate(self.per_rank))
        return f"kept fraction per rank: {ranks}; imbalance (slowest / mean) {self.imbalance:.3f}"


def _check_cost(cost, world: int) -> torch.Tensor:
    cost = torch.as_tensor(cost, dtype=torch.float64).flatten()
    if world < 1 or cost.numel() % world:
        raise ValueError(f"{cost.numel()} heads cannot be split evenly over world size {world}")
    if not torch.isfinite(cost).all() or bool((cost < 0).any()):
        raise ValueError("head costs must be finite and >= 0 (kept fractions); got " + str(cost.tolist()))
    return cost


def rank_costs(cost, assignment: Sequence[Sequence[int]]) -> list:
    """Mean cost of each rank's heads."""
    cost = torch.as_tensor(cost, dtype=torch.float64).flatten()
    return [float(cost[list(heads)].mean()) for heads in assignment]


def imbalance(cost, assignment: Sequence[Sequence[int]]) -> float:
    """Slowest rank / mean rank (1.0 when balanced; 1.0 too when every cost is 0)."""
    per_rank = rank_costs(cost, assignment)
    mean = sum(per_rank) / len(per_rank)
    return max(per_rank) / mean if mean > 0 else 1.0


def contiguous_assignment(num_heads: int, world: int) -> list:
    """Ulysses' own assignment: rank r holds heads r*H/N .. (r+1)*H/N - 1."""
    if world < 1 or num_heads % world:
        raise ValueError(f"{num_heads} heads cannot be split evenly over world size {world}")
    per_rank = num_heads // world
    return [tuple(range(r * per_rank, (r + 1) * per_rank)) for r in range(world)]


def balanced_assignment(cost, world: int) -> list:
    """Heads per rank, each rank exactly H/N of them, balancing the summed cost: heads in decreasing cost
    go to the least loaded rank that still has room (ties: the lower rank). Each rank's heads are sorted."""
    cost = _check_cost(cost, world)
    per_rank = cost.numel() // world
    order = sorted(range(cost.numel()), key=lambda h: (-float(cost[h]), h))
    loads = [0.0] * world
    heads: list = [[] for _ in range(world)]
    for h in order:
        rank = min((r for r in range(world) if len(heads[r]) < per_rank), key=lambda r: (loads[r], r))
        heads[rank].append(h)
        loads[rank] += float(cost[h])
    return [tuple(sorted(h)) for h in heads]


def balanced_permutation(cost, world: int) -> torch.Tensor:
    """(H,) int64 permutation: put head perm[i] at position i, and Ulysses' contiguous split hands every rank
    the heads of ``balanced_assignment``. Apply with ``permute_heads``, undo with ``unpermute_heads``."""
    return torch.tensor([h for heads in balanced_assignment(cost, world) for h in heads], dtype=torch.int64)


def permute_heads(x: torch.Tensor, perm: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """x with its head dimension reordered by perm (x.index_select(dim, perm)); (B, S, H, D) by default."""
    return x.index_select(dim, perm.to(x.device))


def unpermute_heads(x: torch.Tensor, perm: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Inverse of permute_heads."""
    return x.index_select(dim, torch.argsort(perm).to(x.device))


def kept_per_head(report, heads: Sequence[int], num_heads: int) -> torch.Tensor:
    """(num_heads,) fp64: mean kept fraction over the sparse layers of a rank's RunReport, placed at the
    model-wide indices ``heads``; 0 elsewhere (so the ranks' vectors add up)."""
    out = torch.zeros(num_heads, dtype=torch.float64)
    rows = [layer.kept_per_head for layer in (report.layers if report is not None else []) if layer.kept_per_head]
    if rows:
        out[list(heads)] = torch.tensor(rows, dtype=torch.float64).mean(0)
    return out


def head_balance(owner) -> HeadBalance:
    """The kept-fraction balance across the ranks of a UlyssesSparseAttention, from its last run (one
    all-reduce: every rank of the group must call it)."""
    from .parallel import _collective_device

    per_head = kept_per_head(owner.report(), owner.heads, owner.num_heads)
    if owner.world > 1:
        per_head = per_head.to(_collective_device(owner.group))
        torch.distributed.all_reduce(per_head, group=owner.group)
        per_head = per_head.cpu()
    per_rank = owner.num_heads // owner.world
    assignment = [owner.head_order[r * per_rank:(r + 1) * per_rank] for r in range(owner.world)]
    return HeadBalance(per_head=per_head.tolist(), per_rank=rank_costs(per_head, assignment),
                       imbalance=imbalance(per_head, assignment))
