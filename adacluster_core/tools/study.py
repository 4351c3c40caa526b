"""Selection study: error and kept attention mass per kept fraction, for every selection part.

    adacluster-study [--out-dir output] [--quick]
    (or: python -m comfyui_adacluster.adacluster_core.tools.study)

On the main command's workload, every layer is clustered exactly as the runner does (calibration on the
last warm-up step, warm-started k-means with fixed counts on every later step), then on the measured
steps many selection settings are applied to the same clusters: score (TensorQuest bound, size-weighted
centroid estimate, blend) x count (Top-K at several K, cumulative mass at several top_p), with the pooled
tail and the locality guard (own 64-token block + own key clusters) on or off. The SVG2 rule (Euclidean
k-means on both sides, centroid estimate, top-p) and Sol-Attn (comfy-kitchen, several tau) are measured
on the same calls; AdaSpa (several sparsities) and MOD-DiT (several pattern Top-K) run through the runner
with their own search / fit schedule on the same steps. Each family's curve is interpolated to fixed kept
fractions, so methods compare at equal density. No layer runs dense here: the study isolates selection.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import kernels
from .. import selection
from ..attention import CallInfo, SparseAttention
from ..cache import RunCache
from ..config import SELECTION_RECIPES, SelectionConfig, from_dict
from .demo import (DenseReference, LayoutRecorder, _kept_pairs_fraction, _progress, adaspa_method, add_threads_flag,
                   check_flags, layout_attended, layout_kept_fraction, moddit_method, out_dir_problem,
                   relative_l2, run_sol, set_threads, sol_attn_function, sol_routing, SOL_BLOCK)
from ..jsonable import finite_json
from .workload import VideoAttentionWorkload, WorkloadConfig

TARGETS = (0.10, 0.15, 0.20)
TOP_KS = (2, 4, 8, 16, 32, 64)
TOP_PS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
SOL_TAUS = (0.5, 1.0, 1.3, 2.0, 2.5, 3.0, 4.0)
ADASPA_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
MODDIT_PATTERN_SHARES = (0.03, 0.06, 0.1, 0.2, 0.35)  # share of the 3n - 1 diagonal / column patterns kept


@dataclass
class Point:
    family: str
    setting: str
    kept: float
    rel_l2: float
    kept_mass: float


def selection_families() -> list[tuple[str, str, list[tuple[str, SelectionConfig]]]]:
    """(family name, clustering ("adacluster" or "svg2"), [(setting, SelectionConfig)]) to sweep."""
    families = []
    base = dict(tail=False, local_block=0, own_clusters=False, min_kept_fraction=0.0)
    variants = {"": {}, " + tail": {"tail": True}, " + local": {"local_block": 64, "own_clusters": True},
                " + tail + local": {"tail": True, "local_block": 64, "own_clusters": True}}
    for score in ("quest", "centroid", "blend"):
        for suffix, change in variants.items():
            if score == "blend" and suffix not in ("", " + tail + local"):
                continue
            topk = [(f"K={k}", SelectionConfig(score=score, count="topk", top_k=k, **{**base, **change}))
                    for k in TOP_KS]
            mass = [(f"p={p}", SelectionConfig(score=score, count="mass", top_p=p, **{**base, **change}))
                    for p in TOP_PS]
            families.append((f"{score} top-k{suffix}", "adacluster", topk))
            families.append((f"{score} mass{suffix}", "adacluster", mass))
    paper = SELECTION_RECIPES["paper"]
    families.append(("paper recipe (quest top-k, 5% guard)", "adacluster",
                     [(f"K={k}", dataclasses.replace(paper, top_k=k)) for k in TOP_KS]))
    svg2 = SELECTION_RECIPES["svg2"]
    families.append(("SVG2 rule (Euclidean both sides)", "svg2",
                     [(f"p={p}", dataclasses.replace(svg2, top_p=p)) for p in TOP_PS]))
    return families


def method_families(warmup_steps: int, steps: int, video_tokens: int) -> list[tuple[str, list]]:
    """(family name, [(setting, RunCache -> SparseMethod)]) of the block methods, swept over their budget."""
    patterns = 3 * -(-video_tokens // 128) - 1
    return [
        ("AdaSpa (64-token blocks, head-adaptive)",
         [(f"s={s}", adaspa_method(warmup_steps, steps, s)) for s in ADASPA_SPARSITIES]),
        ("MOD-DiT (fitted patterns + frames)",
         [(f"K={k}", moddit_method(warmup_steps, video_tokens, k))
          for k in sorted({max(1, round(share * patterns)) for share in MODDIT_PATTERN_SHARES})]),
    ]


def method_raw(workload: VideoAttentionWorkload, warmup_steps: int, measured: list[int], samples: int,
               generator: torch.Generator) -> dict:
    """(family, setting) -> [(kept, rel L2, kept mass)] of AdaSpa and MOD-DiT run through the runner (their own
    search / fit schedule, aligned with the warm-up) on the measured steps of every layer."""
    cfg = workload.config
    n = workload.video_tokens
    raw: dict = {}
    for family, settings in method_families(warmup_steps, cfg.steps, n):
        for setting, build in settings:
            for layer in range(cfg.layers):
                cache = RunCache()
                cache.start_run(cfg.steps)
                runner = SparseAttention(from_dict({"min_tokens": 0}), cache, observer=LayoutRecorder(),
                                         method=build(cache))
                for step in range(max(measured) + 1):
                    q, k, v = workload.qkv(layer, step)
                    call = CallInfo(layer, step, cfg.steps, branches=tuple(range(q.shape[0])),
                                    grid=(cfg.frames, cfg.height, cfg.width))
                    out = runner(q, k, v, call, dense=lambda: kernels.dense_attention(q, k, v))
                    layouts = runner.observer.take()
                    if step not in measured or not layouts:
                        continue
                    sample = torch.randperm(n, generator=generator)[:min(samples, n)].sort().values
                    ref = DenseReference(q, k, v, None, sample)
                    attended = torch.cat([layout_attended(lay, sample, n) for lay in layouts])
                    kept = sum(layout_kept_fraction(lay, n) for lay in layouts) / len(layouts)
                    raw.setdefault((family, setting), []).append(
                        (kept, relative_l2(out, ref.output()), float((ref.probs * attended).sum(-1).mean())))
                cache.release()
    return raw


def interpolate(points: list[Point], target: float, attr: str) -> float:
    """Linear interpolation of ``attr`` at kept fraction ``target`` along a family's curve (nan outside)."""
    pts = sorted(points, key=lambda p: p.kept)
    for a, b in zip(pts, pts[1:]):
        if a.kept <= target <= b.kept:
            if b.kept - a.kept < 1e-12:
                return getattr(a, attr)
            w = (target - a.kept) / (b.kept - a.kept)
            return getattr(a, attr) * (1 - w) + getattr(b, attr) * w
    return float("nan")


def cluster_runs(workload: VideoAttentionWorkload, layer: int, warmup_steps: int, measured: list[int],
                 config_values: dict):
    """Yields (step, qc, kc) on measured steps for one layer, clustered by the runner itself: calibration on
    the last warm-up step, then one warm-started round per step."""
    cfg = from_dict({"min_tokens": 0, "warmup_steps": warmup_steps, **config_values})
    runner = SparseAttention(cfg, RunCache())
    runner.cache.start_run(workload.config.steps)
    for step in range(warmup_steps - 1, max(measured) + 1):
        q, k, _ = workload.qkv(layer, step)
        call = CallInfo(layer, step, workload.config.steps, branches=tuple(range(q.shape[0])))
        if step == warmup_steps - 1:
            runner.calibrate(q, k, call)
            continue
        qc, kc = runner.cluster(q, k, call)
        if step in measured:
            yield step, qc, kc
    runner.cache.release()


def run_study(workload: VideoAttentionWorkload, warmup_steps: int, measured: list[int], samples: int,
              progress: bool = True) -> list[Point]:
    families = selection_families()
    sol = sol_attn_function()[0] if workload.config.head_dim == 128 else None
    n = workload.video_tokens
    raw: dict[tuple[str, str], list] = {}
    total = workload.config.layers * len(measured) * 2
    bar = _progress(total, progress, "selection study")
    gen = torch.Generator().manual_seed(workload.config.seed + 29)
    for layer in range(workload.config.layers):
        for clustering_kind in ("adacluster", "svg2"):
            values = {"method": clustering_kind, "warmup_steps": warmup_steps}
            for step, qc, kc in cluster_runs(workload, layer, warmup_steps, measured, values):
                q, k, v = workload.qkv(layer, step)
                sample = torch.randperm(n, generator=gen)[:min(samples, n)].sort().values
                ref = DenseReference(q, k, v, None, sample)
                dense_out = ref.output()
                for family, kind, settings in families:
                    if kind != clustering_kind:
                        continue
                    for setting, sel in settings:
                        layout = selection.build_layout(q, k, qc, kc, sel)
                        out = kernels.execute_layout(q, k, v, layout)
                        mass = float((ref.probs * layout_attended(layout, sample, n)).sum(-1).mean())
                        raw.setdefault((family, setting), []).append(
                            (layout_kept_fraction(layout, n), relative_l2(out, dense_out), mass))
                if clustering_kind == "svg2" and sol is not None:
                    blocks = torch.arange(n) // SOL_BLOCK
                    for tau in SOL_TAUS:
                        out = run_sol(sol, q, k, v, tau)
                        exact = sol_routing(q, k, tau)
                        attended = exact[:, :, sample // SOL_BLOCK][..., blocks]
                        raw.setdefault(("Sol-Attn (comfy-kitchen)", f"tau={tau}"), []).append(
                            (_kept_pairs_fraction(exact, n), relative_l2(out, dense_out),
                             float((ref.probs * attended).sum(-1).mean())))
                bar.update(1)
    bar.close()
    raw.update(method_raw(workload, warmup_steps, measured, samples, gen))
    points = []
    for (family, setting), rows in raw.items():
        kept, err, mass = (sum(r[i] for r in rows) / len(rows) for i in range(3))
        points.append(Point(family, setting, kept, err, mass))
    return points


def study_table(points: list[Point]) -> str:
    families = list(dict.fromkeys(p.family for p in points))
    rows = []
    for family in families:
        pts = [p for p in points if p.family == family]
        errs = [interpolate(pts, t, "rel_l2") for t in TARGETS]
        masses = [interpolate(pts, t, "kept_mass") for t in TARGETS]
        rows.append((family, errs, masses))
    rows.sort(key=lambda r: (math.isnan(r[1][1]), r[1][1]))
    fmt = lambda x, pct=False: "-" if not math.isfinite(x) else (f"{100 * x:.1f}%" if pct else f"{x:.4f}")  # noqa: E731
    head = ("| selection | " + " | ".join(f"rel L2 @{int(100 * t)}%" for t in TARGETS) + " | "
            + " | ".join(f"kept mass @{int(100 * t)}%" for t in TARGETS) + " |")
    lines = [head, "|" + "---|" * (1 + 2 * len(TARGETS))]
    for family, errs, masses in rows:
        lines.append(f"| {family} | " + " | ".join(fmt(e) for e in errs) + " | "
                     + " | ".join(fmt(m, True) for m in masses) + " |")
    return "\n".join(lines)


def points_table(points: list[Point]) -> str:
    lines = ["| selection | setting | kept | rel L2 | kept mass |", "|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.family} | {p.setting} | {100 * p.kept:.1f}% | {p.rel_l2:.4f} | {100 * p.kept_mass:.1f}% |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adacluster-study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny workload (for tests)")
    parser.add_argument("--layers", type=int, default=6, help="transformer layers, 1 to 256 (default 6)")
    parser.add_argument("--steps", type=int, default=6, help="sampler steps, 2 to 1000 (default 6)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="dense warm-up steps, at least 1 (the last calibrates) and below --steps (default 1)")
    parser.add_argument("--measure", type=str, default="last",
                        help="steps to measure: 'last' or comma-separated step numbers from --warmup to --steps - 1")
    parser.add_argument("--samples", type=int, default=256, help="queries sampled per call, 1 or more (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("output"), help="folder for the results (default ./output)")
    parser.add_argument("--no-progress", action="store_true")
    add_threads_flag(parser)
    return parser


def parse_args(argv=None):
    """Checked flags, the workload config and the measured steps; exits with status 2 naming a bad flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    shape = dict(frames=2, height=16, width=16, heads=2, layers=2, steps=3) if args.quick else dict(
        layers=args.layers, steps=args.steps)
    steps = shape["steps"]
    check_flags(parser, args, [
        ("--layers", args.quick or 1 <= args.layers <= 256, "an integer in [1, 256]"),
        ("--steps", args.quick or 2 <= args.steps <= 1000, "an integer in [2, 1000] (a warm-up step and a measured step)"),
        ("--warmup", 1 <= args.warmup < steps, f"an integer in [1, {steps - 1}] (below --steps {steps})"),
        ("--samples", args.samples >= 1, "an integer >= 1"),
        ("--seed", 0 <= args.seed < 2 ** 62, "an integer in [0, 2**62)"),
        ("--threads", args.threads >= 0, "an integer >= 0 (0 keeps torch's default)"),
    ])
    if args.measure == "last":
        measured = [steps - 1]
    else:
        try:
            measured = sorted({int(part) for part in args.measure.split(",")})
        except ValueError:
            parser.error(f"--measure {args.measure}: expected 'last' or comma-separated step numbers, e.g. 3,5")
        bad = [m for m in measured if not args.warmup <= m < steps]
        if bad:
            parser.error(f"--measure {args.measure}: steps {bad} are outside [{args.warmup}, {steps - 1}] "
                         f"(from --warmup {args.warmup} to --steps {steps} minus 1)")
    problem = out_dir_problem(args.out_dir)
    if problem:
        parser.error(f"--out-dir {args.out_dir}: {problem}")
    return args, WorkloadConfig(seed=args.seed, **shape).validate(), measured


def main(argv=None) -> int:
    args, config, measured = parse_args(argv)
    set_threads(args.threads)
    workload = VideoAttentionWorkload(config)
    started = time.perf_counter()
    print(f"workload: {workload.describe()}; measured steps {measured}")
    points = run_study(workload, args.warmup, measured, args.samples, progress=not args.no_progress)
    elapsed = time.perf_counter() - started
    table = study_table(points)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    md = args.out_dir / "selection_study.md"
    md.write_text(f"# Selection study\n\nWorkload: {workload.describe()}; measured steps {measured}; every layer "
                  f"sparse; mean over layers and heads. Interpolated at equal kept fraction:\n\n{table}\n\n"
                  f"## All points\n\n{points_table(points)}\n\n({elapsed:.0f} s)\n")
    (args.out_dir / "selection_study.json").write_text(json.dumps(finite_json(
        {"workload": dataclasses.asdict(workload.config), "measured_steps": measured,
         "points": [dataclasses.asdict(p) for p in points]}), indent=1, allow_nan=False))
    print(f"wrote {md} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
