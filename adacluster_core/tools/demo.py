"""The main command: sparse attention vs dense on a synthetic video-like workload, on any machine.

    python -m comfyui_adacluster.adacluster_core.tools.demo            (or: adacluster-demo)

Builds the workload of workload.py (no model weights, no GPU needed), runs a multi-step sampling
schedule layer by layer through the sparse attention runner for: dense attention, AdaCluster with the
default selection recipe, AdaCluster as published ("paper" recipe), the SVG2 rule, and ComfyUI's
Sol-Attn (comfy-kitchen's reference, when installed). For every call after the warm-up it measures,
against dense attention on the same q/k/v:

* kept fraction: share of (query, key) pairs attended exactly;
* relative L2 error of the output, ||O - O_dense|| / ||O_dense||;
* kept attention mass: share of the dense softmax mass on the exactly attended keys (on a sample of
  queries, exactly);
* time per call and the share of it spent in clustering + selection.

It prints a table, writes the numbers as JSON and draws the per-layer / per-head report as a PNG.
Times on the CPU come from the PyTorch reference executor (a readable oracle, not the fast path).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ... import kernels
from ..attention import CallInfo, SparseAttention
from ..cache import RunCache
from ..jsonable import finite_json
from ..config import DEFAULT_RECIPE, PUBLISHED_SETTINGS, AdaClusterConfig, from_dict
from .workload import VideoAttentionWorkload, WorkloadConfig

SOL_BLOCK = 64  # Sol-Attn's fixed block of tokens


# ------------------------------------------------------------------------------------------ methods
@dataclass
class Method:
    name: str
    kind: str  # "dense", "runner" (our SparseAttention with ``config``) or "sol" (comfy-kitchen Sol-Attn)
    config: Optional[AdaClusterConfig] = None
    build: Optional[Callable] = None  # RunCache -> SparseMethod for the runner (AdaSpa, MOD-DiT); None: config's
    tau: float = 1.0  # Sol-Attn routing threshold
    note: str = ""
    short: str = ""  # label in the progress bar


def runner_config(recipe: Optional[str] = None, method: str = "adacluster", warmup_steps: int = 1,
                  **changes) -> AdaClusterConfig:
    """A validated config for the workload: short sequences allowed, warm-up as given."""
    values = {"method": method, "warmup_steps": warmup_steps, "min_tokens": 0, **changes}
    if recipe is not None:
        values["recipe"] = recipe
    return from_dict(values)


SOL_REQUIREMENT = '"comfy-kitchen>=0.2.40"'  # the first release with sol_attn (ComfyUI's core sparse node)


def sol_attn_function() -> tuple:
    """(comfy-kitchen's Sol-Attn entry point, None), or (None, why it is missing)."""
    try:
        import comfy_kitchen
    except ModuleNotFoundError:
        return None, f"comfy-kitchen is not installed: pip install {SOL_REQUIREMENT}"
    except Exception as exc:  # noqa: BLE001 - optional comparison
        return None, f"comfy-kitchen does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    sol = getattr(comfy_kitchen, "sol_attn", None)
    if sol is None:
        try:
            from importlib.metadata import version

            installed = version("comfy-kitchen")
        except Exception:  # noqa: BLE001 - only for the message
            installed = "?"
        return None, f"comfy-kitchen {installed} has no sol_attn: pip install {SOL_REQUIREMENT}"
    return sol, None


def adaspa_method(warmup_steps: int, steps: int, sparsity: float = 0.8) -> Callable:
    """AdaSpa aligned with the other methods' schedule: the full search on the last warm-up step (its output is
    dense), the LSE-cached search at 60% of the run (as 30 of 50)."""
    from ..methods.adaspa import AdaSpa, AdaSpaConfig

    first = max(0, warmup_steps - 1)
    second = min(steps - 1, max(first + 1, int(0.6 * steps + 0.5)))
    config = AdaSpaConfig(sparsity=sparsity, search_steps=tuple(sorted({first, second})), reference_steps=steps)
    return lambda cache: AdaSpa(config, cache)


def moddit_method(warmup_steps: int, video_tokens: int, top_k: Optional[int] = None) -> Callable:
    """MOD-DiT with the warm-up of the other methods (fits on its last two steps). Top-K defaults to a quarter of
    the grid's block count: a pattern covers at most n of the n x n blocks, so that keeps at most a quarter of
    the pairs, near the other methods' budgets (the released per-family values, e.g. Wan's 350, are for full
    resolution grids; on a small grid they keep nearly everything)."""
    from ..methods.moddit import ModDiT, ModDiTConfig

    n_blocks = -(-video_tokens // 128)
    config = ModDiTConfig(top_k=top_k if top_k is not None else max(1, round(n_blocks / 4)),
                          warmup_steps=max(1, warmup_steps))
    return lambda cache: ModDiT(config, cache)


def default_methods(warmup_steps: int, sol_tau: float = 1.0, head_dim: int = 128, text_len: int = 0, steps: int = 5,
                    video_tokens: int = 7680) -> list[Method]:
    methods = [
        Method("dense", "dense", note="torch SDPA"),
        Method(f"adacluster ({DEFAULT_RECIPE})", "runner", runner_config(None, warmup_steps=warmup_steps),
               note="default recipe", short="default"),
        Method("adacluster (paper)", "runner",
               runner_config(warmup_steps=warmup_steps, **PUBLISHED_SETTINGS),
               note="as published: TensorQuest Top-K, 65 / 100 clusters", short="paper"),
        Method("svg2 rule", "runner", runner_config("svg2", "svg2", warmup_steps=warmup_steps),
               note="Euclidean k-means both sides, centroid top-p", short="svg2"),
        Method("adaspa (s 0.8)", "runner", runner_config(None, "adaspa", warmup_steps=warmup_steps),
               adaspa_method(warmup_steps, steps), note="64-token blocks, Top-k by searched mass, head-adaptive",
               short="adaspa"),
        Method("mod-dit", "runner", runner_config(None, "moddit", warmup_steps=warmup_steps),
               moddit_method(warmup_steps, video_tokens), note="fitted diagonal/vertical/frame patterns, Top-K n/4",
               short="moddit"),
    ]
    sol, why_not = sol_attn_function()
    if sol is None:
        sol_note = why_not
    elif head_dim != 128:
        sol_note = f"Sol-Attn needs head dim 128, the workload has {head_dim}"
    elif text_len:
        sol_note = "Sol-Attn is measured on video-only attention (--text 0)"
    else:
        sol_note = "comfy-kitchen eager reference"
    methods.append(Method(f"sol-attn (tau {sol_tau:g})", "sol", tau=sol_tau, note=sol_note, short="sol"))
    return methods


# ---------------------------------------------------------------------------------------- measuring
@dataclass
class CallResult:
    layer: int
    step: int
    sparse: bool
    kept: float  # fraction of (query, video key) pairs attended exactly; 1 for dense calls
    rel_l2: float
    kept_mass: float
    time_ms: float
    clustering_ms: float = 0.0


@dataclass
class MethodResult:
    name: str
    note: str
    calls: list = field(default_factory=list)
    report: Optional[dict] = None  # RunReport.to_dict() for runner methods
    available: bool = True

    def summary(self) -> dict:
        """Means over the measured calls (all calls after the warm-up, dense layers included)."""
        if not self.calls:
            return {"method": self.name, "available": self.available, "note": self.note}
        calls = self.calls
        sparse = [c for c in calls if c.sparse]
        time_sparse = sum(c.time_ms for c in sparse)
        return {
            "method": self.name, "available": self.available, "note": self.note,
            "calls": len(calls), "sparse_calls": len(sparse),
            "kept_fraction": _mean([c.kept for c in calls]),
            "rel_l2": _mean([c.rel_l2 for c in calls]),
            "kept_mass": _mean([c.kept_mass for c in calls]),
            "time_ms_per_call": _mean([c.time_ms for c in calls]),
            "sparse_time_ms_per_call": time_sparse / len(sparse) if sparse else float("nan"),
            "clustering_share": (sum(c.clustering_ms for c in sparse) / time_sparse) if time_sparse > 0 else float("nan"),
            "kept_fraction_sparse_calls": _mean([c.kept for c in sparse]) if sparse else float("nan"),
            "rel_l2_sparse_calls": _mean([c.rel_l2 for c in sparse]) if sparse else float("nan"),
        }

    def per_layer(self, key: str) -> dict:
        out = {}
        for layer in sorted({c.layer for c in self.calls}):
            out[layer] = _mean([getattr(c, key) for c in self.calls if c.layer == layer])
        return out


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def relative_l2(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30))


class DenseReference:
    """Dense outputs and sampled dense probabilities of one (layer, step), computed once and shared."""

    def __init__(self, q, k, v, mask, sample: torch.Tensor):
        self.q, self.k, self.v, self.mask = q, k, v, mask
        self.sample = sample  # query indices (original order) used for the kept mass
        self._out = None
        self.time_ms = 0.0
        logits = (q[:, :, sample].float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = logits + (torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask.float())
        self.probs = torch.softmax(logits, dim=-1)  # (B, H, S, N)

    def output(self) -> torch.Tensor:
        if self._out is None:
            start = time.perf_counter()
            self._out = kernels.dense_attention(self.q, self.k, self.v, mask=self.mask)
            self.time_ms = 1000.0 * (time.perf_counter() - start)
        return self._out


def layout_attended(layout, sample: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, H, S, N) bool: the video keys each sampled video query attends exactly under ``layout``."""
    q_labels = kernels.segment_labels(layout.q_perm, layout.q_offsets, tokens)
    k_labels = kernels.segment_labels(layout.k_perm, layout.k_offsets, tokens)
    seg = q_labels[..., sample]  # (B, H, S)
    rows = layout.selected.gather(-2, seg.unsqueeze(-1).expand(*seg.shape, layout.num_key_segments))
    attended = rows.gather(-1, k_labels.unsqueeze(-2).expand(*seg.shape, tokens))
    if layout.local_block:
        block = torch.arange(tokens, device=sample.device) // layout.local_block
        attended = attended | (block.view(1, 1, 1, -1) == (sample // layout.local_block).view(1, 1, -1, 1))
    return attended


def layout_kept_fraction(layout, tokens: int) -> float:
    from ..selection import kept_fraction

    q_labels = kernels.segment_labels(layout.q_perm, layout.q_offsets, tokens)
    k_labels = kernels.segment_labels(layout.k_perm, layout.k_offsets, tokens)
    return float(kept_fraction(layout, q_labels, k_labels).mean())


class LayoutRecorder:
    """Runner observer that keeps the layouts of the calls made since the last ``take()``."""

    def __init__(self):
        self.layouts = []

    def __call__(self, call, batch_index, layout):
        self.layouts.append(layout)

    def take(self) -> list:
        taken, self.layouts = self.layouts, []
        return taken


def sol_routing(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, H, nb, nb) bool: the key blocks Sol-Attn attends exactly for each query block.

    Its rule, restated: with block-mean keys centred on their average, the score of key block J for query
    block I is the block-mean query's dot product with it; J is exact when that score exceeds tau times
    its spread over key blocks (per-dimension variance weighted by the squared mean query), and the
    diagonal band |I - J| <= 1 is always exact."""
    b, h, n, d = q.shape
    nb = -(-n // SOL_BLOCK)
    pad = nb * SOL_BLOCK - n
    sizes = torch.full((nb,), float(SOL_BLOCK))
    sizes[-1] = n - (nb - 1) * SOL_BLOCK

    def block_mean(x):
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
        return x.reshape(b, h, nb, SOL_BLOCK, d).sum(-2) / sizes.view(1, 1, -1, 1)

    q_mean, k_mean = block_mean(q), block_mean(k)
    k_centred = k_mean - k_mean.mean(-2, keepdim=True)
    score = q_mean @ k_centred.transpose(-1, -2)  # (B, H, nb, nb)
    spread = ((q_mean ** 2) * k_centred.pow(2).mean(-2, keepdim=True)).sum(-1).sqrt()  # (B, H, nb)
    exact = score > tau * spread.unsqueeze(-1)
    index = torch.arange(nb)
    return exact | ((index.view(-1, 1) - index.view(1, -1)).abs() <= 1)


def run_sol(sol, q, k, v, tau: float) -> torch.Tensor:
    """Sol-Attn on (B, H, N, d) tensors, one head at a time (its reference is O(N^2) in memory)."""
    heads = []
    for h in range(q.shape[1]):
        to_bthd = lambda x: x[:, h:h + 1].transpose(1, 2).contiguous()  # noqa: E731
        heads.append(sol(to_bthd(q), to_bthd(k), to_bthd(v), tau=tau).transpose(1, 2))
    return torch.cat(heads, dim=1)


# ----------------------------------------------------------------------------------------- running
def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="call", file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        return _SimpleProgress(total, desc)


class _NoProgress:
    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


class _SimpleProgress(_NoProgress):
    def __init__(self, total, desc):
        self.total, self.done, self.desc, self.start = total, 0, desc, time.perf_counter()

    def update(self, n=1):
        self.done += n
        width = 30
        filled = int(width * self.done / max(1, self.total))
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:5.0f}s")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


def run_methods(workload: VideoAttentionWorkload, methods: list[Method], warmup_steps: int,
                sample_queries: int = 256, sol_steps: Optional[set] = None, progress: bool = True) -> dict:
    """Runs every method over the workload's schedule; returns name -> MethodResult.

    Calls are made step by step, layer by layer, as a sampler would. Dense outputs are computed once per
    (layer, step) and shared by all methods. Measurements cover the steps after the warm-up; Sol-Attn is
    measured on ``sol_steps`` (default: the same steps)."""
    cfg = workload.config
    n_video = workload.video_tokens
    text_first = cfg.text_first
    video = slice(cfg.text_len, cfg.tokens) if text_first else slice(0, n_video)
    measured_steps = [s for s in range(cfg.steps) if s >= warmup_steps]
    sol_steps = set(measured_steps if sol_steps is None else sol_steps)
    sol, _ = sol_attn_function()
    results = {m.name: MethodResult(m.name, m.note) for m in methods}
    runners = {}
    for m in methods:
        if m.kind == "runner":
            cache = RunCache()
            cache.start_run(cfg.steps)
            runners[m.name] = SparseAttention(m.config, cache, observer=LayoutRecorder(),
                                              method=m.build(cache) if m.build is not None else None)
        if m.kind == "sol" and (sol is None or cfg.head_dim != 128 or cfg.text_len):
            results[m.name].available = False
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    call_extra = workload.call_kwargs()
    mask = call_extra["mask"]
    bar = _progress(cfg.steps * cfg.layers, progress, "sparse attention demo")
    for step in range(cfg.steps):
        for layer in range(cfg.layers):
            q, k, v = workload.qkv(layer, step)
            sample = torch.randperm(n_video, generator=gen)[:min(sample_queries, n_video)].sort().values
            reference = DenseReference(q, k, v, mask, sample + video.start)
            measure = step in measured_steps
            call = CallInfo(layer=layer, step=step, total_steps=cfg.steps,
                            branches=tuple(("branch", b) for b in range(cfg.batch)),
                            text_len=cfg.text_len, text_first=text_first, mask=mask,
                            grid=(cfg.frames, cfg.height, cfg.width))
            dense_out = reference.output()
            for m in methods:
                result = results[m.name]
                if m.kind == "dense" and measure:
                    result.calls.append(CallResult(layer, step, False, 1.0, 0.0, 1.0, reference.time_ms))
                elif m.kind == "runner":
                    _run_runner(runners[m.name], q, k, v, call, reference, sample, video, n_video, measure, result)
                elif m.kind == "sol" and results[m.name].available and measure and step in sol_steps:
                    start = time.perf_counter()
                    out = run_sol(sol, q, k, v, m.tau)
                    elapsed = 1000.0 * (time.perf_counter() - start)
                    exact = sol_routing(q, k, m.tau)
                    blocks = torch.arange(n_video) // SOL_BLOCK
                    attended = exact[:, :, (sample // SOL_BLOCK)][..., blocks]  # (B, H, S, N)
                    kept_exact = _kept_pairs_fraction(exact, n_video)
                    mass = float((reference.probs * attended).sum(-1).mean())
                    result.calls.append(CallResult(layer, step, True, kept_exact, relative_l2(out, dense_out),
                                                   mass, elapsed))
            bar.update(1)
            summaries = [f"{m.short or m.name} {results[m.name].summary().get('rel_l2', float('nan')):.3f}"
                         for m in methods if m.kind != "dense" and results[m.name].calls]
            if summaries:
                bar.set_postfix_str("rel L2: " + ", ".join(summaries))
    bar.close()
    for name, runner in runners.items():
        report = runner.cache.report()
        results[name].report = report.to_dict() if report is not None else None
        runner.cache.end_run()
    return results


def _kept_pairs_fraction(exact: torch.Tensor, tokens: int) -> float:
    """Exact (query, key) pair fraction of a block mask, weighting the ragged last block by its size."""
    nb = exact.shape[-1]
    sizes = torch.full((nb,), float(SOL_BLOCK))
    sizes[-1] = tokens - (nb - 1) * SOL_BLOCK
    pairs = (exact.float() * sizes.view(1, 1, -1, 1) * sizes.view(1, 1, 1, -1)).sum((-1, -2))
    return float((pairs / (tokens * tokens)).mean())


def _run_runner(runner, q, k, v, call, reference, sample, video, n_video, measure, result):
    cache = runner.cache
    before = len(cache.records)
    start = time.perf_counter()
    out = runner(q, k, v, call, dense=reference.output)
    elapsed = 1000.0 * (time.perf_counter() - start)
    taken = runner.observer.take()
    if not measure:
        return
    record = cache.records[before] if len(cache.records) > before else None
    sparse = bool(record is not None and record.sparse)
    if not sparse:
        # The runner returned the dense output, which was computed once for all methods and is cached here:
        # charge this call the dense attention it stands for, plus the runner's own time.
        result.calls.append(CallResult(call.layer, call.step, False, 1.0, relative_l2(out, reference.output()), 1.0,
                                       elapsed + reference.time_ms))
        return
    clustering_ms = record.clustering.milliseconds() if record.clustering is not None else 0.0
    kept_values, masses = [], []
    sample_video = sample  # indices within the video tokens
    probs = reference.probs  # (B, H, S, N_all)
    for b, layout in enumerate(taken):
        attended = layout_attended(layout, sample_video, n_video)  # (1, H, S, N_video)
        mass_video = (probs[b:b + 1, :, :, video] * attended).sum(-1)
        mass_text = probs[b:b + 1].sum(-1) - probs[b:b + 1, :, :, video].sum(-1)  # text keys: always kept
        masses.append(float((mass_video + mass_text).mean()))
        kept_values.append(layout_kept_fraction(layout, n_video))
    result.calls.append(CallResult(call.layer, call.step, True, _mean(kept_values),
                                   relative_l2(out, reference.output()), _mean(masses), elapsed, clustering_ms))


# -------------------------------------------------------------------------------------------- output
def format_table(results: dict) -> str:
    """One row per method that ran; methods that did not run are listed below the table with the reason."""
    header = ("method", "kept", "rel L2", "kept mass", "ms/call", "clustering", "note")
    rows, skipped = [], []
    for result in results.values():
        s = result.summary()
        if not result.available or "kept_fraction" not in s:
            skipped.append(f"{s['method']}: not run ({s['note'] or 'not available'})")
            continue
        share = s["clustering_share"]
        rows.append((s["method"], f"{100 * s['kept_fraction']:.1f}%", f"{s['rel_l2']:.4f}",
                     f"{100 * s['kept_mass']:.1f}%", f"{s['time_ms_per_call']:.0f}",
                     "-" if not math.isfinite(share) or share == 0 else f"{100 * share:.0f}%", s["note"]))
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows] + skipped)


def tradeoff_points(results: dict) -> list:
    """Per method that ran: mean kept fraction and error, and every measured call (the plot's first panel)."""
    points = []
    for result in results.values():
        s = result.summary()
        if result.available and "kept_fraction" in s:
            points.append({"method": result.name, "kept": s["kept_fraction"], "rel_l2": s["rel_l2"],
                           "calls": [(c.kept, c.rel_l2) for c in result.calls]})
    return points


def write_outputs(results: dict, workload: VideoAttentionWorkload, out_dir: Path, extra: dict) -> tuple[Path, Path]:
    from .plot import render_reports, render_tradeoff, stack_images

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "adacluster_demo.json"
    png_path = out_dir / "adacluster_demo.png"
    payload = {
        "workload": asdict(workload.config) | {"description": workload.describe(), "layer_kinds": workload.layer_kinds},
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "dense_backend": "torch-sdpa"},
        **extra,
        "methods": {name: {"summary": r.summary(), "calls": [asdict(c) for c in r.calls], "report": r.report}
                    for name, r in results.items()},
    }
    json_path.write_text(json.dumps(finite_json(payload), indent=1, allow_nan=False))
    images = [render_tradeoff(tradeoff_points(results), title="relative L2 error vs kept fraction over the "
                              "measured calls (square: mean, dots: calls)")]
    runner_results = [r for r in results.values() if r.report is not None]
    if runner_results:
        images.append(render_reports([r.report for r in runner_results], titles=[r.name for r in runner_results],
                                     layer_values=[{"relative L2 error per layer (measured steps)":
                                                    r.per_layer("rel_l2")} for r in runner_results]))
    stack_images(images).save(png_path)
    return json_path, png_path




# ---------------------------------------------------------------------------------------------- main
TIMING_NOTE = ("ms/call: mean over the measured calls; a dense-layer call is charged the dense attention time of "
               "that call. CPU times ({threads} thread(s)) come from the PyTorch reference executors (readable "
               "oracles, not the fast kernels).")
FLAG_OF_FIELD = {"steps": "--steps", "layers": "--layers", "frames": "--frames", "height": "--height",
                 "width": "--width", "heads": "--heads", "head_dim": "--head-dim", "text_len": "--text",
                 "seed": "--seed"}


class FlagError(ValueError):
    """A command-line value is out of range; the message names the flag as the user typed it."""


def set_threads(threads: int) -> None:
    """Intra-op threads of the tools (never changed by the library itself, so ComfyUI keeps its own).

    The reference executors run many small ops (profiled: one sparse call of the main command's workload
    is about 107,000 aten ops, all but 0.2% under 100 us; dense attention is 19). On a CPU other processes
    also use, each op's hand-off to a full thread pool waits for descheduled threads. Measured on 2 shared
    cores: a sparse call took 128-257 ms on 1 thread and 1565-2320 ms on 2, dense attention 33-62 ms either
    way."""
    if threads > 0:
        torch.set_num_threads(threads)


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: the reference executors run many small ops, which "
                             "extra threads slow down on a shared CPU; 0 keeps torch's default)")


def check_flags(parser: argparse.ArgumentParser, args, checks) -> None:
    """Calls parser.error (exit status 2, usage line) for the first failing check: (flag, ok, expectation)."""
    for flag, ok, expected in checks:
        if not ok:
            parser.error(f"{flag} {getattr(args, flag.lstrip('-').replace('-', '_'), '')!s}: expected {expected}")


def out_dir_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot take the output files (None when it can); checked before any work."""
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    import os

    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adacluster-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny workload for tests (seconds)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps, warm-up included (default 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="dense warm-up steps; the last one calibrates (default 1; at most --steps - 1)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default 6)")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default 8)")
    p.add_argument("--height", type=int, default=None, help="latent height in tokens (default 24)")
    p.add_argument("--width", type=int, default=None, help="latent width in tokens (default 40)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 4)")
    p.add_argument("--head-dim", type=int, default=None, choices=(64, 128), help="head dim (default 128)")
    p.add_argument("--text", type=int, default=0, help="text tokens for joint attention (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sol-tau", type=float, default=1.0, help="Sol-Attn threshold, > 0 (default 1.0)")
    p.add_argument("--sol-steps", choices=("last", "all"), default="last",
                   help="steps on which Sol-Attn is measured (its reference is O(N^2); default last)")
    p.add_argument("--samples", type=int, default=256,
                   help="queries sampled per call for the kept mass, 1 or more (default 256)")
    p.add_argument("--out-dir", type=Path, default=Path("output"), help="folder for the PNG and JSON (default ./output)")
    p.add_argument("--no-progress", action="store_true")
    add_threads_flag(p)
    return p


def workload_config_from_args(args) -> WorkloadConfig:
    """The workload the flags describe; FlagError names the flag of a bad value."""
    base = (dict(frames=2, height=16, width=16, heads=2, head_dim=128, layers=3, steps=3, objects=3)
            if args.quick else {})
    for name in ("steps", "layers", "frames", "height", "width", "heads"):
        value = getattr(args, name)
        if value is not None:
            base[name] = value
    if args.head_dim is not None:
        base["head_dim"] = args.head_dim
    if not args.quick and args.steps is None:
        base["steps"] = 5  # 1 warm-up + 4 sparse steps keeps the default run short on 2 cores
    base["text_len"] = args.text
    base["seed"] = args.seed
    try:
        return WorkloadConfig(**base).validate()
    except ValueError as exc:
        message = str(exc)
        for field_name, flag in FLAG_OF_FIELD.items():
            message = message.replace(f"WorkloadConfig.{field_name} ", f"{flag} ")
        raise FlagError(message) from exc


def parse_args(argv=None):
    """Parsed and checked flags plus the workload config; exits with status 2 naming a bad flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args, [
        ("--samples", args.samples >= 1, "an integer >= 1 (queries sampled per call)"),
        ("--sol-tau", math.isfinite(args.sol_tau) and args.sol_tau > 0, "a finite number > 0"),
        ("--threads", args.threads >= 0, "an integer >= 0 (0 keeps torch's default)"),
    ])
    try:
        config = workload_config_from_args(args)
    except FlagError as exc:
        parser.error(str(exc))
    warmup_given = args.warmup is not None
    args.warmup = 1 if args.warmup is None else args.warmup
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup}: expected an integer >= 0")
    if args.warmup >= config.steps:
        if warmup_given:
            parser.error(f"--warmup {args.warmup}: expected at most {config.steps - 1} (--steps {config.steps} "
                         "minus 1: at least one step must run sparse to be measured)")
        parser.error(f"--steps {config.steps}: expected at least {args.warmup + 1} (the default {args.warmup} "
                     "dense warm-up step plus one measured step)")
    problem = out_dir_problem(args.out_dir)
    if problem:
        parser.error(f"--out-dir {args.out_dir}: {problem}")
    return args, config


def main(argv=None) -> int:
    args, config = parse_args(argv)
    set_threads(args.threads)
    workload = VideoAttentionWorkload(config)
    cfg = workload.config
    started = time.perf_counter()
    print(f"workload: {workload.describe()}")
    methods = default_methods(args.warmup, args.sol_tau, cfg.head_dim, cfg.text_len, cfg.steps, cfg.video_tokens)
    sol_steps = None if args.sol_steps == "all" else {cfg.steps - 1}
    results = run_methods(workload, methods, args.warmup, args.samples, sol_steps, progress=not args.no_progress)
    elapsed = time.perf_counter() - started
    print()
    sol_ran = any(m.kind == "sol" and results[m.name].calls for m in methods)
    sol_text = ("; Sol-Attn on " + ("every measured step" if sol_steps is None else f"step {cfg.steps - 1}")
                if sol_ran else "")
    print(f"measured over steps {args.warmup}..{cfg.steps - 1} (after {args.warmup} dense warm-up step(s)), "
          f"all layers; dense layers count as kept 100%, error 0{sol_text}")
    print(format_table(results))
    print(TIMING_NOTE.format(threads=torch.get_num_threads()))
    json_path, png_path = write_outputs(results, workload, args.out_dir,
                                        {"warmup_steps": args.warmup, "wall_seconds": elapsed})
    print(f"wrote {json_path} and {png_path}  ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
