"""The Layout: the one value a sparse method hands to the kernels.

A layout says, for one attention call over the video tokens of q/k/v shaped (B, H, N, d), which keys
every query attends exactly. It is built from three kinds of pieces, all per (batch element, head):

* query segments: contiguous runs of the query tokens after permuting them (clusters), or fixed blocks
  in original order when ``q_perm`` is None;
* key segments: likewise for keys; ``selected[b, h, i, j]`` says that query segment i attends every
  token of key segment j;
* extras that do not depend on segment choice: each query's own neighbourhood block in original token
  order (``local_block``), a pooled tail for the key segments a query segment skips (``tail``: each enters as its
  mean key and value, weighted by its size and its spread, kernels.reference.tail_log_weights), and the
  always-kept text "sink" keys, which are passed to the executor beside the layout.

Per-head segment counts may differ: shorter heads are padded with empty segments (equal offsets), which
are never selected. Offsets are int64 so that they index directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Layout:
    q_offsets: torch.Tensor  # (B, H, Sq + 1) start of each query segment in permuted order
    k_offsets: torch.Tensor  # (B, H, Sk + 1) start of each key segment in permuted order
    selected: torch.Tensor  # (B, H, Sq, Sk) bool: query segment i attends key segment j
    q_perm: Optional[torch.Tensor] = None  # (B, H, N) original token index at each permuted position
    k_perm: Optional[torch.Tensor] = None  # (B, H, N); None means original order (fixed blocks)
    local_block: int = 0  # >0: each query also attends its own block of this size in original order
    # pooled tail: skipped key segments enter as (mean key, mean value, log size + a second-order spread term)
    tail: bool = False
    # (B, H) weight of the tail's spread term per head (1: second order, 0: size only); None: 1 everywhere
    tail_spread_weight: Optional[torch.Tensor] = None
    # (B, H, N) int64 segment of every token in original order, where the builder has it (clusters' labels);
    # None: derived from perm and offsets where needed (the local block)
    q_labels: Optional[torch.Tensor] = None
    k_labels: Optional[torch.Tensor] = None
    # the pooled tail's inputs, where the builder's clustering computed them on these segments and tokens:
    # (B, H, Sk, d) fp32 mean key and (B, H, Sk) fp32 spread of every key segment, (B, H, N) fp32 |q|^2 of
    # every query; None: the executor computes them
    tail_key_means: Optional[torch.Tensor] = None
    tail_key_spread: Optional[torch.Tensor] = None
    query_squares: Optional[torch.Tensor] = None

    @property
    def num_query_segments(self) -> int:
        return self.q_offsets.shape[-1] - 1

    @property
    def num_key_segments(self) -> int:
        return self.k_offsets.shape[-1] - 1

    def validate(self, batch: int, heads: int, tokens: int) -> None:
        """Checks shapes and bounds; raises ValueError naming the field that is wrong."""
        sq, sk = self.num_query_segments, self.num_key_segments
        expect = {
            "q_offsets": (self.q_offsets, (batch, heads, sq + 1)),
            "k_offsets": (self.k_offsets, (batch, heads, sk + 1)),
            "selected": (self.selected, (batch, heads, sq, sk)),
        }
        if self.q_perm is not None:
            expect["q_perm"] = (self.q_perm, (batch, heads, tokens))
        if self.k_perm is not None:
            expect["k_perm"] = (self.k_perm, (batch, heads, tokens))
        for name in ("q_labels", "k_labels"):
            if getattr(self, name) is not None:
                expect[name] = (getattr(self, name), (batch, heads, tokens))
        if self.tail_spread_weight is not None:
            expect["tail_spread_weight"] = (self.tail_spread_weight, (batch, heads))
        if self.tail_key_means is not None:
            expect["tail_key_means"] = (self.tail_key_means, (batch, heads, sk, self.tail_key_means.shape[-1]))
        if self.tail_key_spread is not None:
            expect["tail_key_spread"] = (self.tail_key_spread, (batch, heads, sk))
        if self.query_squares is not None:
            expect["query_squares"] = (self.query_squares, (batch, heads, tokens))
        for name, (tensor, shape) in expect.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"Layout.{name} has shape {tuple(tensor.shape)}, expected {shape}")
        if self.selected.dtype != torch.bool:
            raise ValueError(f"Layout.selected must be bool, got {self.selected.dtype}")
        for name in ("q_offsets", "k_offsets"):
            off = getattr(self, name)
            if int(off[..., 0].min()) != 0 or int(off[..., -1].min()) != tokens or int(off[..., -1].max()) != tokens:
                raise ValueError(f"Layout.{name} must start at 0 and end at {tokens} tokens")
            if bool((off[..., 1:] < off[..., :-1]).any()):
                raise ValueError(f"Layout.{name} must be non-decreasing")
        if self.local_block < 0:
            raise ValueError(f"Layout.local_block must be >= 0, got {self.local_block}")

    def kept_fraction(self) -> torch.Tensor:
        """(B, H) fraction of query-key pairs attended exactly through selected segments.

        The local block adds at most ``local_block / N`` on top; it is counted by the executor's
        statistics, not here, because its overlap with selected segments depends on the tokens."""
        q_sizes = (self.q_offsets[..., 1:] - self.q_offsets[..., :-1]).to(torch.float64)
        k_sizes = (self.k_offsets[..., 1:] - self.k_offsets[..., :-1]).to(torch.float64)
        kept_keys = (self.selected.to(torch.float64) * k_sizes.unsqueeze(-2)).sum(-1)  # (B,H,Sq)
        tokens = k_sizes.sum(-1)
        return (kept_keys * q_sizes).sum(-1) / (tokens * tokens)


def block_offsets(batch: int, heads: int, tokens: int, block: int, device=None) -> torch.Tensor:
    """Offsets of fixed blocks of ``block`` tokens in original order (last block may be shorter)."""
    starts = torch.arange(0, tokens, block, device=device)
    offsets = torch.cat([starts, torch.tensor([tokens], device=device)])
    return offsets.expand(batch, heads, -1).contiguous()
