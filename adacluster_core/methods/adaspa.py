"""AdaSpa: blockified Top-k sparse attention found by an online search.

* Tokens are cut into fixed blocks of ``block`` tokens in original order. For sparsity s every query-block
  row keeps its top round((1 - s) * n_blocks) key blocks by attention mass (at least one).
* Fused search at the first search step: one dense pass gives the output and every query's LSE, a second
  pass the block masses exp(q.k * scale - LSE) summed per block. The call's output is that dense output.
* LSE-cached search at the later search steps: the masses come from one pass with the first search's LSE;
  each query block's masses are rescaled so that they and the text share seen at the first search add up
  to its row count. Steps before the first search run dense. Search steps are given for a run of
  ``reference_steps`` steps ({10, 30} of 50) and scaled to the run's length.
* Head-adaptive sparsity: recall of a head = kept mass / total mass at sparsity s. With n = the number of
  heads whose recall exceeds ``recall_threshold`` (0.8), capped at H / 2, the n highest-recall heads get
  sparsity (1 + s) / 2 and the n lowest (3s - 1) / 2; the rest keep s. Our choice: below s = 1/3, where
  (3s - 1) / 2 would be negative and the mean could not stay s, every head keeps s.
* Text keys (video -> text) are always kept and text queries attend densely (the runner's joint split);
  the text mass counts as kept in the recall.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ... import kernels
from ...kernels.reference_blocks import block_sizes
from ..cache import RunCache
from ..config import ConfigError
from ..layout import Layout, block_offsets
from ..schedule import Phase
from .base import PassResult, Plan, SparseMethod, block_kept_fraction, pack_mask, unpack_mask


@dataclass(frozen=True)
class AdaSpaConfig:
    sparsity: float = 0.8  # share of key blocks each query-block row skips
    block: int = 64  # tokens per block
    search_steps: tuple = (10, 30)  # search steps of a run of reference_steps steps
    reference_steps: int = 50
    head_adaptive: bool = True
    recall_threshold: float = 0.8

    def validate(self) -> "AdaSpaConfig":
        number = isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool)
        if not number or not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity = {self.sparsity!r} is out of range: expected a number in [0, 1)")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or not 16 <= self.block <= 1024:
            raise ConfigError(f"block = {self.block!r} is out of range: expected an integer in [16, 1024]")
        steps_ok = isinstance(self.reference_steps, int) and not isinstance(self.reference_steps, bool)
        if not steps_ok or self.reference_steps < 1:
            raise ConfigError(f"reference_steps = {self.reference_steps!r} is out of range: expected an integer >= 1")
        steps = tuple(self.search_steps)
        if not steps or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < self.reference_steps
                            for s in steps):
            raise ConfigError(f"search_steps = {self.search_steps!r}: expected one or more integers in "
                              f"[0, {self.reference_steps - 1}] (steps of a {self.reference_steps}-step run)")
        if not 0.0 < self.recall_threshold < 1.0:
            raise ConfigError(f"recall_threshold = {self.recall_threshold!r} is out of range: expected (0, 1)")
        return self

    def search_schedule(self, total_steps: int) -> tuple:
        """The search steps of a run of ``total_steps`` steps: scaled, rounded, distinct, ascending."""
        total = max(1, int(total_steps))
        scaled = {min(total - 1, int(s * total / self.reference_steps + 0.5)) for s in self.search_steps}
        return tuple(sorted(scaled))


def parse_search_steps(text: str) -> tuple:
    """"10, 30" -> (10, 30); ConfigError naming the bad text."""
    try:
        steps = tuple(int(part) for part in str(text).replace(";", ",").split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"search steps = {text!r}: expected whole numbers separated by commas, "
                          "e.g. '10, 30'") from None
    if not steps:
        raise ConfigError(f"search steps = {text!r}: give at least one step, e.g. '10, 30'")
    return steps


@dataclass
class SearchResult:
    mask: torch.Tensor  # (B, H, nq, nk) bool: kept key blocks per query-block row
    sparsity: torch.Tensor  # (B, H) fp32 sparsity each head was given
    recall: torch.Tensor  # (B, H) fp32 kept mass / total mass (text counted as kept)


@dataclass
class AdaSpaState:
    """Search state of one (layer, branch)."""

    lse: Optional[torch.Tensor]  # (H, N) fp32 LSE of the first search; dropped once no later search remains
    text_mass: torch.Tensor  # (H, nq) fp32 text share of every query block at the first search
    mask: torch.Tensor  # (H, nq, ceil(nk / 8)) uint8, packed kept-block mask
    sparsity: torch.Tensor  # (H,)
    recall: torch.Tensor  # (H,)
    kept: torch.Tensor  # (H,) fraction of (query, key) pairs the mask keeps
    tokens: int
    step: int  # sampler step of the last search

    def tensors(self):
        return tuple(t for t in (self.lse, self.text_mass, self.mask, self.sparsity, self.recall, self.kept)
                     if t is not None)


def keep_counts(sparsity: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Key blocks kept per query-block row at the given sparsity: round((1 - s) * n), at least 1."""
    return ((1.0 - sparsity) * n_blocks + 0.5).floor().clamp(1, n_blocks).long()


def top_blocks(mass: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, H, nq, nk) bool: the ``keep`` (B, H) key blocks of largest mass in every row."""
    order = mass.argsort(dim=-1, descending=True, stable=True)
    position = torch.empty_like(order)
    position.scatter_(-1, order, torch.arange(mass.shape[-1], device=mass.device).expand_as(order))
    return position < keep[..., None, None]


def search(mass: torch.Tensor, text_mass: torch.Tensor, config: AdaSpaConfig) -> SearchResult:
    """Blockified Top-k with head-adaptive sparsity from block masses (B, H, nq, nk) and the text mass of every
    query block (B, H, nq)."""
    s = float(config.sparsity)
    batch, heads, _, nk = mass.shape
    total = mass.sum((-1, -2)) + text_mass.sum(-1)  # (B, H)

    def recall_of(mask):
        return ((mass * mask).sum((-1, -2)) + text_mass.sum(-1)) / total

    sparsity = torch.full((batch, heads), s, device=mass.device)
    mask = top_blocks(mass, keep_counts(sparsity, nk))
    if config.head_adaptive and s >= 1.0 / 3.0:
        recall = recall_of(mask)
        n = torch.clamp((recall > config.recall_threshold).sum(-1), max=heads // 2)  # (B,)
        rank = recall.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = highest recall
        high = rank < n.unsqueeze(-1)
        low = rank >= heads - n.unsqueeze(-1)
        sparsity = torch.where(high, (1.0 + s) / 2.0, torch.where(low, (3.0 * s - 1.0) / 2.0, sparsity))
        mask = top_blocks(mass, keep_counts(sparsity, nk))
    return SearchResult(mask, sparsity, recall_of(mask))


class AdaSpa(SparseMethod):
    name = "adaspa"
    pass_name = "search step"

    def __init__(self, config: AdaSpaConfig, cache: RunCache):
        super().__init__(cache)
        self.config = config.validate()

    def phase(self, step: int, total_steps: int) -> Phase:
        first = self.config.search_schedule(total_steps)[0]
        if step < first:
            return Phase.WARMUP
        return Phase.CALIBRATE if step == first else Phase.SPARSE

    def describe(self) -> str:
        c = self.config
        return (f"method adaspa, sparsity {c.sparsity}, block {c.block}, search steps "
                f"{', '.join(map(str, c.search_steps))} of {c.reference_steps}, head-adaptive {c.head_adaptive}")

    # ------------------------------------------------------------------ search
    def run_pass(self, q, k, v, call, text) -> PassResult:
        """Fused search: dense output and LSE in one pass, block masses in a second."""
        extra = (text.k, text.v, text.bias) if text is not None else ()
        out, lse = kernels.attention_lse(q, k, v, *extra)
        self._search(q, k, lse, None, call)
        return PassResult(out=out)

    def _search(self, q, k, lse, cached_text, call) -> None:
        """Block masses from ``lse`` (B, H, N) and a new mask for every branch. ``cached_text`` (B, H, nq):
        the text shares of the first search, for an LSE-cached search (masses are then renormalised)."""
        block = self.config.block
        n = q.shape[-2]
        mass, _ = kernels.block_statistics(q, k, lse, block, block, 0.0)
        rows = block_sizes(n, block, q.device)  # (nq,)
        if cached_text is None:
            text_mass = (rows - mass.sum(-1)).clamp_min(0.0)
        else:
            text_mass = cached_text
            video_share = (rows - text_mass).clamp_min(0.0)
            mass = mass * (video_share / mass.sum(-1).clamp_min(1e-30)).unsqueeze(-1)
        result = search(mass, text_mass, self.config)
        kept = block_kept_fraction(result.mask, n, block)
        keep_lse = call.step < self.config.search_schedule(call.total_steps)[-1]  # a later search will reuse it
        for b, branch in enumerate(call.branches[:q.shape[0]]):
            self.cache.set_state(call.layer, branch, AdaSpaState(
                lse=lse[b].float() if keep_lse else None, text_mass=text_mass[b], mask=pack_mask(result.mask[b]),
                sparsity=result.sparsity[b], recall=result.recall[b], kept=kept[b], tokens=n, step=call.step))

    def plan(self, q: torch.Tensor, k: torch.Tensor, call) -> Plan:
        batch, heads, n, _ = q.shape
        states = [self.cache.state(call.layer, branch) for branch in call.branches[:batch]]
        later = call.step in self.config.search_schedule(call.total_steps)[1:]
        if any(s is None or s.tokens != n or (later and s.step < call.step and s.lse is None) for s in states):
            # no first search for this branch (it appeared later): search now, from an LSE of this step
            _, lse = kernels.attention_lse(q, k, k)
            self._search(q, k, lse, None, call)
        elif later and any(s.step < call.step for s in states):  # LSE-cached search
            lse = torch.stack([s.lse for s in states])
            self._search(q, k, lse, torch.stack([s.text_mass for s in states]), call)
        states = [self.cache.state(call.layer, branch) for branch in call.branches[:batch]]
        nb = -(-n // self.config.block)
        selected = torch.stack([unpack_mask(s.mask, nb) for s in states])
        offsets = block_offsets(batch, heads, n, self.config.block, device=q.device)
        layout = Layout(q_offsets=offsets, k_offsets=offsets, selected=selected)
        return Plan(layout, torch.stack([s.kept for s in states]))

    def recall(self, layer: int, branch) -> Optional[torch.Tensor]:
        """(H,) recall of the last search of (layer, branch), None before any."""
        state = self.cache.state(layer, branch)
        return None if state is None else state.recall

