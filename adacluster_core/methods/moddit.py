"""MOD-DiT: a block sparsity map modelled as a mixture of diagonal, vertical and frame
patterns, fitted during the warm-up and extrapolated over the steps.

* Block sparsity map S (blocks of ``block`` tokens in original order): the fraction of the block's
  probabilities below ``eta``, from the block-statistics pass with a cached LSE (smaller = more informative).
* Linear model over the n x n block grid: 2n - 1 diagonals C_k (j - i = k), n columns D_l and one
  block-diagonal square E_t per video frame. The least-squares intensities solve the normal equations
  (G + lambda I) theta = M^T S; G = M^T M has closed form (diagonal lengths, column size n, frame areas,
  overlap counts) and depends only on n and the frame layout, so it is built and factorised once per shape
  and no design matrix exists. Only the right-hand side (diagonal, column and frame sums of S) depends on S.
* Schedule: ``warmup_steps`` dense steps, the last two of which fit (their output is the dense output of the
  pass that also gives the LSE). After that, intensities are extrapolated linearly from the last two fits;
  every ``refresh_interval`` steps the map is rebuilt - fresh values of the blocks the current mask computes
  (from the cached LSE), the reconstruction elsewhere - and fitted again.
* Mask per head: the ``top_k`` diagonal / column patterns with the lowest sparsity value, plus the frame
  squares whose intensity stays above ``tau_e`` at both of the last two fits.
  Our reading of the two values: a pattern's sparsity value is the mean of the fitted map over its cells
  ((G theta)_p / G_pp), which compares diagonals and columns on one scale; a frame square's intensity is
  how much lower the sparsity is inside it than the other patterns predict (-theta_t).
* Text keys are always kept and text queries attend densely (the runner's joint split).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ... import kernels
from ..cache import RunCache
from ..config import ConfigError
from ..layout import Layout, block_offsets
from ..schedule import Phase
from .base import PassResult, Plan, SparseMethod, block_kept_fraction

# Top-K patterns of the released code per model family
FAMILY_TOP_K = {"hunyuan_video": 300, "wan": 350, "cogvideox": 100}


@dataclass(frozen=True)
class ModDiTConfig:
    top_k: int = FAMILY_TOP_K["wan"]  # diagonal / column patterns kept per head
    warmup_steps: int = 12  # dense steps; the last two fit
    block: int = 128
    eta: float = 1e-4  # probability threshold of the sparsity map
    refresh_interval: int = 10  # steps between refreshes (delta t)
    tau_e: float = 0.1  # frame squares kept when their intensity exceeds this at both fits
    ridge: float = 1e-8  # Tikhonov lambda
    frame_tokens: int = 0  # frame size in tokens when the call carries no grid; 0: no frame patterns then

    def validate(self) -> "ModDiTConfig":
        _int("top_k", self.top_k, 1, 1 << 20)
        _int("warmup_steps", self.warmup_steps, 1, 10000)
        _int("block", self.block, 16, 1024)
        _int("refresh_interval", self.refresh_interval, 1, 10000)
        _int("frame_tokens", self.frame_tokens, 0, 1 << 30)
        for name, low_open in (("eta", True), ("tau_e", False), ("ridge", True)):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not (0.0 < value if low_open else 0.0 <= value) or not value < 1.0:
                raise ConfigError(f"{name} = {value!r} is out of range: expected a number in "
                                  f"{'(' if low_open else '['}0, 1)")
        return self


def _int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} = {value!r} is out of range: expected an integer in [{low}, {high}]")


# ------------------------------------------------------------------------------------------ the model
@dataclass
class Bases:
    """The pattern bases of an n x n block grid: 2n - 1 diagonals, n columns, T frame squares."""

    n: int
    frame_of_block: torch.Tensor  # (n,) int64 frame index of every block (0 .. T-1), or all -1 without frames
    frame_start: torch.Tensor  # (T,) first block of every frame
    frame_size: torch.Tensor  # (T,) blocks per frame

    @property
    def frames(self) -> int:
        return self.frame_size.numel()

    @property
    def size(self) -> int:
        return 3 * self.n - 1 + self.frames

    def gram(self) -> torch.Tensor:
        """G = M^T M (P x P, fp64) from its closed form; M is never built."""
        n, t = self.n, self.frames
        device = self.frame_size.device
        offsets = torch.arange(-(n - 1), n, device=device)  # diagonal k at index k + n - 1
        p = self.size
        g = torch.zeros(p, p, dtype=torch.float64, device=device)
        nd = 2 * n - 1
        g[:nd, :nd] = torch.diag((n - offsets.abs()).double())
        g[nd:nd + n, nd:nd + n] = torch.eye(n, dtype=torch.float64, device=device) * n
        cols = torch.arange(n, device=device)
        rows_of = cols.unsqueeze(0) - offsets.unsqueeze(1)  # row i = l - k of diagonal k in column l
        cross = ((rows_of >= 0) & (rows_of < n)).double()  # (2n-1, n)
        g[:nd, nd:nd + n] = cross
        g[nd:nd + n, :nd] = cross.T
        if t:
            size = self.frame_size.double()
            e = nd + n
            g[e:, e:] = torch.diag(size * size)
            diag_frame = (size.unsqueeze(0) - offsets.abs().unsqueeze(1).double()).clamp_min(0.0)  # (2n-1, T)
            g[:nd, e:] = diag_frame
            g[e:, :nd] = diag_frame.T
            col_frame = torch.nn.functional.one_hot(self.frame_of_block, t).double() * size  # (n, T)
            g[nd:nd + n, e:] = col_frame
            g[e:, nd:nd + n] = col_frame.T
        return g

    def project(self, s: torch.Tensor) -> torch.Tensor:
        """M^T vec(S) for maps s (..., n, n): diagonal sums, column sums, frame-square sums (fp64)."""
        n = self.n
        s = s.double()
        index = _diagonal_index(n, s.device)
        diag = torch.zeros(*s.shape[:-2], 2 * n - 1, dtype=torch.float64, device=s.device)
        diag.scatter_add_(-1, index.reshape(-1).expand(*s.shape[:-2], n * n), s.reshape(*s.shape[:-2], n * n))
        parts = [diag, s.sum(-2)]
        if self.frames:
            one_hot = torch.nn.functional.one_hot(self.frame_of_block, self.frames).double()  # (n, T)
            parts.append(((s @ one_hot) * one_hot).sum(-2))
        return torch.cat(parts, dim=-1)

    def reconstruct(self, theta: torch.Tensor) -> torch.Tensor:
        """S_hat (..., n, n) = sum of every basis times its intensity, theta (..., P)."""
        n = self.n
        nd = 2 * n - 1
        index = _diagonal_index(n, theta.device)
        s = theta[..., index] + theta[..., nd:nd + n].unsqueeze(-2)
        if self.frames:
            f = self.frame_of_block
            same = (f.view(n, 1) == f.view(1, n)).to(theta.dtype)
            s = s + theta[..., nd + n:][..., f].unsqueeze(-1) * same
        return s

    def pattern_cells(self, diagonals: torch.Tensor, columns: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
        """(..., n, n) bool: the union of the chosen diagonals (..., 2n-1), columns (..., n), squares (..., T)."""
        n = self.n
        index = _diagonal_index(n, diagonals.device)
        cells = diagonals[..., index] | columns.unsqueeze(-2)
        if self.frames:
            f = self.frame_of_block
            same = f.view(n, 1) == f.view(1, n)
            cells = cells | (squares[..., f].unsqueeze(-1) & same)
        return cells


def _diagonal_index(n: int, device) -> torch.Tensor:
    """(n, n) int64: the diagonal basis of every block (i, j), j - i + n - 1."""
    positions = torch.arange(n, device=device)
    return positions.view(1, n) - positions.view(n, 1) + n - 1


def bases_for(n_blocks: int, block: int, tokens: int, frame_tokens: int, device=None) -> Bases:
    """Bases of the grid; a block belongs to the frame of its middle token (no frames when frame_tokens is 0)."""
    if frame_tokens <= 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return Bases(n_blocks, torch.full((n_blocks,), -1, dtype=torch.int64, device=device), empty, empty)
    middle = (torch.arange(n_blocks, device=device) * block + block // 2).clamp_max(tokens - 1)
    frame = middle // frame_tokens
    ids, sizes = torch.unique_consecutive(frame, return_counts=True)
    frame_of_block = torch.repeat_interleave(torch.arange(ids.numel(), device=device), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    return Bases(n_blocks, frame_of_block, starts, sizes)


class Fitter:
    """Least-squares intensities through the normal equations, G factorised once per grid (Cholesky, fp64)."""

    def __init__(self, bases: Bases, ridge: float):
        self.bases = bases
        g = bases.gram()
        self.gram = g
        self.factor = torch.linalg.cholesky(g + ridge * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))

    def fit(self, s: torch.Tensor) -> torch.Tensor:
        """theta (..., P) fp64 of maps s (..., n, n)."""
        rhs = self.bases.project(s)
        flat = rhs.reshape(-1, rhs.shape[-1]).T  # (P, groups)
        return torch.cholesky_solve(flat, self.factor).T.reshape(rhs.shape)

    def pattern_values(self, theta: torch.Tensor) -> torch.Tensor:
        """Mean of the fitted map over every pattern's cells: (G theta)_p / G_pp, (..., P)."""
        return (theta @ self.gram) / self.gram.diagonal().clamp_min(1.0)


# ------------------------------------------------------------------------------------------ the method
@dataclass
class ModDiTState:
    """Fit state of one (layer, branch)."""

    lse: torch.Tensor  # (H, N) fp32 LSE of the last dense fit step
    theta: torch.Tensor  # (H, P) fp64 intensities of the last fit
    step: int  # its sampler step
    theta_prev: Optional[torch.Tensor]  # (H, P) the fit before, for the linear extrapolation
    step_prev: int
    squares: torch.Tensor  # (H, T) bool: frame squares kept (intensity above tau_e at both fits)
    tokens: int

    def tensors(self):
        return tuple(t for t in (self.lse, self.theta, self.theta_prev, self.squares) if t is not None)


class ModDiT(SparseMethod):
    name = "moddit"
    pass_name = "fit step"

    def __init__(self, config: ModDiTConfig, cache: RunCache):
        super().__init__(cache)
        self.config = config.validate()
        self._fitters: dict = {}

    def phase(self, step: int, total_steps: int) -> Phase:
        m = self.config.warmup_steps
        if step < m - 2:
            return Phase.WARMUP
        return Phase.CALIBRATE if step < m else Phase.SPARSE

    def is_refresh(self, step: int) -> bool:
        m, dt = self.config.warmup_steps, self.config.refresh_interval
        return step > m and (step - m) % dt == 0

    def describe(self) -> str:
        c = self.config
        return (f"method moddit, top-K patterns {c.top_k}, warm-up {c.warmup_steps} (fits at the last two), block "
                f"{c.block}, eta {c.eta:g}, refresh every {c.refresh_interval} steps, tau_e {c.tau_e:g}")

    # ------------------------------------------------------------------ shapes
    def fitter(self, tokens: int, grid: Optional[tuple], device) -> Fitter:
        block = self.config.block
        frame_tokens = self.config.frame_tokens
        if grid is not None and len(grid) == 3:
            per_frame = int(grid[1]) * int(grid[2])
            frame_tokens = per_frame if per_frame > 0 and tokens % per_frame == 0 else 0
        n_blocks = -(-tokens // block)
        key = (n_blocks, tokens, frame_tokens, str(device))
        if key not in self._fitters:
            self._fitters[key] = Fitter(bases_for(n_blocks, block, tokens, frame_tokens, device), self.config.ridge)
        return self._fitters[key]

    def sparsity_map(self, q, k, lse, blocks=None) -> torch.Tensor:
        block = self.config.block
        return kernels.block_statistics(q, k, lse, block, block, self.config.eta, blocks=blocks)[1]

    # ------------------------------------------------------------------ fits
    def run_pass(self, q, k, v, call, text) -> PassResult:
        """A warm-up fit step: dense output and LSE in one pass, then the map and its fit."""
        extra = (text.k, text.v, text.bias) if text is not None else ()
        out, lse = kernels.attention_lse(q, k, v, *extra)
        fitter = self.fitter(q.shape[-2], call.grid, q.device)
        theta = fitter.fit(self.sparsity_map(q, k, lse))
        for b, branch in enumerate(call.branches[:q.shape[0]]):
            self._store(call, branch, lse[b].float(), theta[b], q.shape[-2])
        return PassResult(out=out)

    def _store(self, call, branch, lse, theta, tokens) -> None:
        """Stores a new fit; the previous fit becomes the extrapolation's other point."""
        old = self.cache.state(call.layer, branch)
        if old is not None and old.tokens != tokens:
            old = None
        if old is None:
            theta_prev, step_prev = None, -1
        elif old.step != call.step:
            theta_prev, step_prev = old.theta, old.step
        else:  # the same step evaluated again (two-evaluation samplers): keep the fit before it
            theta_prev, step_prev = old.theta_prev, old.step_prev
        frames = 3 * self._n(tokens) - 1
        squares = -theta[..., frames:] > self.config.tau_e
        if theta_prev is not None:
            squares = squares & (-theta_prev[..., frames:] > self.config.tau_e)
        self.cache.set_state(call.layer, branch, ModDiTState(
            lse=lse, theta=theta, step=call.step, theta_prev=theta_prev, step_prev=step_prev, squares=squares,
            tokens=tokens))

    def _n(self, tokens: int) -> int:
        return -(-tokens // self.config.block)

    @staticmethod
    def intensities_at(state: ModDiTState, step: int) -> torch.Tensor:
        """theta extrapolated linearly from the last two fits to ``step`` (the last fit alone if only one)."""
        if state.theta_prev is None or state.step == state.step_prev:
            return state.theta
        slope = (state.theta - state.theta_prev) / float(state.step - state.step_prev)
        return state.theta + slope * float(step - state.step)

    def mask_from(self, fitter: Fitter, theta: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
        """(..., n, n) bool: the Top-K lowest-valued diagonal/column patterns plus the kept frame squares."""
        n = fitter.bases.n
        values = fitter.pattern_values(theta)[..., :3 * n - 1]
        top = min(self.config.top_k, 3 * n - 1)
        chosen = torch.zeros_like(values, dtype=torch.bool)
        chosen.scatter_(-1, values.topk(top, dim=-1, largest=False).indices, True)
        return fitter.bases.pattern_cells(chosen[..., :2 * n - 1], chosen[..., 2 * n - 1:], squares)

    # ------------------------------------------------------------------ sparse steps
    def plan(self, q: torch.Tensor, k: torch.Tensor, call) -> Plan:
        batch, heads, n_tokens, _ = q.shape
        fitter = self.fitter(n_tokens, call.grid, q.device)
        branches = call.branches[:batch]
        states = [self.cache.state(call.layer, b) for b in branches]
        if any(s is None or s.tokens != n_tokens for s in states):
            # no warm-up fit for this branch (it appeared later): fit now from an LSE of this step
            _, lse = kernels.attention_lse(q, k, k)
            theta = fitter.fit(self.sparsity_map(q, k, lse))
            for b, branch in enumerate(branches):
                self._store(call, branch, lse[b].float(), theta[b], n_tokens)
        elif self.is_refresh(call.step) and any(s.step < call.step for s in states):
            self._refresh(q, k, call, fitter, states)
        states = [self.cache.state(call.layer, b) for b in branches]
        theta = torch.stack([self.intensities_at(s, call.step) for s in states])
        squares = torch.stack([s.squares for s in states])
        selected = self.mask_from(fitter, theta, squares)
        offsets = block_offsets(batch, heads, n_tokens, self.config.block, device=q.device)
        layout = Layout(q_offsets=offsets, k_offsets=offsets, selected=selected)
        return Plan(layout, block_kept_fraction(selected, n_tokens, self.config.block))

    def _refresh(self, q, k, call, fitter: Fitter, states) -> None:
        """Rebuild the map (fresh values where the current mask computes, the reconstruction elsewhere), refit."""
        theta = torch.stack([self.intensities_at(s, call.step) for s in states])
        current = self.mask_from(fitter, theta, torch.stack([s.squares for s in states]))
        lse = torch.stack([s.lse for s in states])
        fresh = self.sparsity_map(q, k, lse, blocks=current)
        rebuilt = torch.where(current, fresh.double(), fitter.bases.reconstruct(theta).clamp(0.0, 1.0))
        new_theta = fitter.fit(rebuilt)
        for b, (branch, state) in enumerate(zip(call.branches, states)):
            self._store(call, branch, state.lse, new_theta[b], state.tokens)
