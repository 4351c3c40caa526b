"""Budget and schedule study: how many keys the default keeps, and how early sparse attention can start.

    adacluster-budget-study [--shape wan1.3b-480p] [--device cuda] [--out budget_study.json]

Two parts, both on the video-like workload (the main command's generator) at a model's token grid:

* **selection**: clusters from the runner itself (calibrated at an early or a late warm-up step, then one
  warm-started round per step), and on each measured step every selection setting is applied to the same
  clusters: error and kept fraction at high, middle and low noise, every layer sparse.
* **schedule**: whole runs through the runner over the full sigma schedule, for the shipped default and
  for variants of the warm-up length, the dense-layer rule and the budget: mean error over every call
  (dense calls count as exact), mean error of the sparse calls, dense layers chosen, and the attention work
  (mean kept fraction, dense calls counted as 1), which is what the speed follows.

On a CPU use ``--shape small`` (7,680 tokens); the model grids need a GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Optional

import torch

from ... import kernels
from .. import selection
from ..attention import CallInfo, SparseAttention
from ..cache import RunCache
from ..config import ConfigError, SelectionConfig, from_dict, load_preset, parse_settings
from .demo import relative_l2, set_threads
from .video_bench import VIDEO_SHAPES, VideoShape
from .workload import VideoAttentionWorkload, WorkloadConfig

SHAPES = {"small": VideoShape(8, 24, 40, 4, 128, "wan"), **VIDEO_SHAPES}
NOISE_POINTS = {"high": 0.1, "middle": 0.5, "low": 0.8}  # measured steps as fractions of the schedule


def selection_settings() -> dict:
    """Name -> SelectionConfig swept in the selection part (locality and tail on, as in the default; one
    Top-K for every head, since per-head budgets are chosen at calibration, which the schedule part runs)."""
    settings = {f"top-k {k}": SelectionConfig(count="topk", top_k=k, budget="fixed") for k in (4, 8, 12, 16, 24)}
    for p in (0.7, 0.8, 0.9):
        settings[f"mass {p}"] = SelectionConfig(count="mass", top_p=p, budget="fixed")
    return settings


def schedule_variants(preset: str, steps: int = 50) -> dict:
    """Name -> config overrides of whole-run variants (on top of the family preset): the warm-up length, the
    dense-layer rule and the budget schedule (Top-K multipliers at high / low noise). Warm-up lengths are
    named for a 50-step run and scaled to ``steps`` (at least 1)."""
    def warmup(of_50: int) -> int:
        return max(1, round(of_50 * steps / 50))

    def by_noise(high: float, low: float, fraction: float = 0.25) -> dict:
        return {"high_noise_top_k_scale": high, "low_noise_top_k_scale": low, "noise_phase_fraction": fraction}

    return {
        "preset as shipped": {"warmup_steps": warmup(load_preset(preset).warmup_steps)},
        "warm-up 10, Top-K 16 on every step (published schedule)": {"warmup_steps": warmup(10),
                                                                     "selection": {"top_k": 16, **by_noise(1, 1)}},
        "warm-up 10, dense 15% by clusters (as published)": {"warmup_steps": warmup(10), "dense_layers_by": "clusters",
                                                             "selection": by_noise(1, 1)},
        "warm-up 3, Top-K 16 on every step": {"warmup_steps": warmup(3), "selection": {"top_k": 16, **by_noise(1, 1)}},
        "warm-up 3, Top-K x2 / x1 / x0.5 by noise": {"warmup_steps": warmup(3), "selection": by_noise(2, 0.5)},
        "warm-up 3, Top-K x2 / x1 / x1 by noise": {"warmup_steps": warmup(3), "selection": by_noise(2, 1)},
        "warm-up 3, Top-K x3 / x1 / x0.5 by noise": {"warmup_steps": warmup(3), "selection": by_noise(3, 0.5)},
        "warm-up 3, Top-K x3 / x1 / x1 by noise": {"warmup_steps": warmup(3), "selection": by_noise(3, 1)},
        "warm-up 3, Top-K x4 / x1 / x1 by noise": {"warmup_steps": warmup(3), "selection": by_noise(4, 1)},
        "warm-up 3, Top-K x2 on the first 40%": {"warmup_steps": warmup(3), "selection": by_noise(2, 1, 0.4)},
        "warm-up 3, Top-K x2 / x1 / x0.75 by noise": {"warmup_steps": warmup(3), "selection": by_noise(2, 0.75)},
        "warm-up 5, Top-K x2 / x1 / x0.5 by noise": {"warmup_steps": warmup(5), "selection": by_noise(2, 0.5)},
        "warm-up 3, no dense layers, Top-K x2 / x1 / x0.5": {"warmup_steps": warmup(3), "dense_layer_fraction": 0.0,
                                                             "selection": by_noise(2, 0.5)},
        # budgets per head, one Top-K on every step, 3 warm-up steps whatever the length (README, first table)
        "3 warm-up steps, no dense layers, Top-K 16 for every head": {
            "warmup_steps": 3, "dense_layer_fraction": 0.0,
            "selection": {"top_k": 16, "budget": "fixed", **by_noise(1, 1)}},
        "3 warm-up steps, no dense layers, Top-K 8 for every head": {
            "warmup_steps": 3, "dense_layer_fraction": 0.0, "selection": {"top_k": 8, "budget": "fixed", **by_noise(1, 1)}},
        "3 warm-up steps, no dense layers, matched budget": {
            "warmup_steps": 3, "dense_layer_fraction": 0.0, "selection": by_noise(1, 1)},
        # the default's budget allocation against one Top-K for every head and the plain dense-layer rule
        "preset, one Top-K for every head": {"warmup_steps": warmup(load_preset(preset).warmup_steps),
                                             "selection": {"budget": "fixed"}},
    }


def _workload(shape: VideoShape, layers: int, steps: int, seed: int, device) -> VideoAttentionWorkload:
    return VideoAttentionWorkload(WorkloadConfig(
        frames=shape.frames, height=shape.height, width=shape.width, heads=shape.heads, head_dim=shape.head_dim,
        layers=layers, steps=steps, text_len=shape.text_len, text_first=shape.text_first, seed=seed)).to(device)


def selection_part(workload, shape: VideoShape, calibration_steps: tuple, log,
                   clustering: Optional[dict] = None) -> list:
    """Rows {calibrated at, setting, noise, kept, rel_l2} for every layer kind, averaged over layers.
    ``clustering``: config overrides (``--set``) on top of the preset, for the clusters every setting selects from."""
    steps = workload.config.steps
    measured = {name: max(1, round(f * steps)) for name, f in NOISE_POINTS.items()}
    settings = selection_settings()
    call_extra = workload.call_kwargs()
    rows = {}
    for warmup in calibration_steps:
        for layer in range(workload.config.layers):
            config = load_preset(shape.preset, **{**(clustering or {}), "warmup_steps": warmup,
                                                  "dense_layer_fraction": 0.0, "min_tokens": 0})
            runner = SparseAttention(config, RunCache())
            runner.cache.start_run(steps)
            video = runner._video_slice(workload.tokens, CallInfo(0, 0, steps, (0,), **call_extra))
            for step in range(warmup - 1, max(measured.values()) + 1):
                q, k, v = workload.qkv(layer, step)
                qv, kv, vv = q[:, :, video], k[:, :, video], v[:, :, video]
                call = CallInfo(layer, step, steps, (0,), **call_extra)
                if step == warmup - 1:
                    runner.calibrate(qv, kv, call)
                    continue
                qc, kc = runner.cluster(qv, kv, call)
                for noise, at in measured.items():
                    if at != step:
                        continue
                    dense = kernels.dense_attention(qv, kv, vv)
                    for name, sel in settings.items():
                        layout = selection.build_layout(qv, kv, qc, kc, sel)
                        out = kernels.execute_layout(qv, kv, vv, layout)
                        kept = float(selection.kept_fraction(layout, qc.labels, kc.labels).mean())
                        rows.setdefault((warmup, name, noise), []).append((kept, relative_l2(out, dense)))
            runner.cache.release()
            log(f"selection: calibrated at step {warmup - 1}, layer {layer} ({workload.layer_kinds[layer]}) done")
        log(json.dumps([{"calibrated_at_step": w - 1, "setting": name, "noise": noise,
                         "kept": statistics.fmean(r[0] for r in values), "rel_l2": statistics.fmean(r[1] for r in values)}
                        for (w, name, noise), values in rows.items() if w == warmup]))
    return [{"calibrated_at_step": w - 1, "setting": name, "noise": noise, "step": measured[noise],
             "kept": statistics.fmean(r[0] for r in values), "rel_l2": statistics.fmean(r[1] for r in values)}
            for (w, name, noise), values in rows.items()]


def schedule_part(workload, shape: VideoShape, log, variants: Optional[dict] = None,
                  settings: Optional[dict] = None) -> list:
    """Whole runs over the schedule: one row per variant (``settings``: overrides under every variant's)."""
    steps = workload.config.steps
    call_extra = workload.call_kwargs()
    results = []
    dense_outputs = {}  # (layer, step) -> dense output, the same for every variant
    for name, overrides in (variants or schedule_variants(shape.preset, steps)).items():
        config = load_preset(shape.preset, **{**(settings or {}), "min_tokens": 0, **overrides})
        cache = RunCache()
        cache.start_run(steps)
        runner = SparseAttention(config, cache)
        errors, sparse_errors, work, per_step = [], [], [], {}
        started = time.time()
        for step in range(steps):
            for layer in range(workload.config.layers):
                q, k, v = workload.qkv(layer, step)
                if (layer, step) not in dense_outputs:
                    dense_outputs[layer, step] = kernels.dense_attention(q, k, v)
                dense_out = dense_outputs[layer, step]
                call = CallInfo(layer, step, steps, (0,), **call_extra)
                before = len(cache.records)
                out = runner(q, k, v, call, dense=lambda: dense_out)
                record = cache.records[before]
                error = relative_l2(out, dense_out) if record.sparse else 0.0
                kept = float(record.kept.float().mean()) if record.sparse else 1.0
                errors.append(error)
                work.append(kept)
                if record.sparse:
                    sparse_errors.append(error)
                per_step.setdefault(step, []).append((error, kept))
        row = {"variant": name, "overrides": overrides, "warmup_steps": config.warmup_steps,
               "mean_rel_l2": statistics.fmean(errors),
               "sparse_rel_l2": statistics.fmean(sparse_errors) if sparse_errors else None,
               "attention_work": statistics.fmean(work),
               "sparse_kept": statistics.fmean(w for w, e in zip(work, errors) if w < 1.0) if sparse_errors else None,
               "dense_layers": sorted(cache.dense_layers or []),
               "calibration_errors": cache.calibration_errors(),
               "per_step": {s: {"rel_l2": statistics.fmean(e for e, _ in v), "kept": statistics.fmean(k for _, k in v)}
                            for s, v in per_step.items()},
               "seconds": time.time() - started}
        cache.release()
        log(f"schedule: {name}: mean error {row['mean_rel_l2']:.4f}, work {row['attention_work']:.3f}")
        log(json.dumps({k: v for k, v in row.items() if k != "per_step"}))
        results.append(row)
    return results


def format_tables(selection_rows: list, schedule_rows: list) -> str:
    lines = ["selection (every layer sparse): kept / rel L2 at high, middle, low noise"]
    by_setting = {}
    for r in selection_rows:
        by_setting.setdefault((r["calibrated_at_step"], r["setting"]), {})[r["noise"]] = r
    lines.append("| calibrated at | selection | " + " | ".join(NOISE_POINTS) + " | mean |")
    lines.append("|---|---|" + "---|" * (len(NOISE_POINTS) + 1))
    for (w, name), cells in by_setting.items():
        vals = [cells[n] for n in NOISE_POINTS if n in cells]
        mean_kept = statistics.fmean(c["kept"] for c in vals)
        mean_err = statistics.fmean(c["rel_l2"] for c in vals)
        lines.append(f"| step {w} | {name} | " + " | ".join(
            f"{100 * cells[n]['kept']:.1f}% / {cells[n]['rel_l2']:.4f}" if n in cells else "-" for n in NOISE_POINTS)
            + f" | {100 * mean_kept:.1f}% / {mean_err:.4f} |")
    lines.append("")
    lines.append("schedule (whole runs): error over all calls, error of sparse calls, attention work, kept of sparse calls")
    lines.append("| variant | warm-up | mean rel L2 | sparse rel L2 | attention work | sparse kept | dense layers |")
    lines.append("|---|---|---|---|---|---|---|")
    fmt = lambda x, p=4: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    for r in schedule_rows:
        lines.append(f"| {r['variant']} | {r['warmup_steps']} | {fmt(r['mean_rel_l2'])} | {fmt(r['sparse_rel_l2'])} | "
                     f"{100 * r['attention_work']:.1f}% | {fmt(r['sparse_kept'] and 100 * r['sparse_kept'], 1)}% | "
                     f"{r['dense_layers']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adacluster-budget-study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="small",
                        help="token grid, heads and head dim of the workload (default: small, for a CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the workload and the attention run (default: cuda when available)")
    parser.add_argument("--layers", type=int, default=10, help="layers of the workload, 1-64 (default 10)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps of the schedule, 10-200 (default 50)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="schedule part: run only the variants whose names contain one of these words")
    parser.add_argument("--parts", nargs="+", choices=("selection", "schedule"), default=["selection", "schedule"])
    parser.add_argument("--calibrate-at", type=int, nargs="+", default=[2, 9],
                        help="selection part: steps whose clusters are calibrated (default 2 9)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: many small ops run fastest on one thread)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting on top of the preset for both parts, e.g. query_clusters=65 (repeatable)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="budget_study.json", help="JSON file written at the end")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= 64:
        parser.error(f"--layers must be in [1, 64], got {args.layers}")
    if not 10 <= args.steps <= 200:
        parser.error(f"--steps must be in [10, 200], got {args.steps}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is available")
    if "selection" in args.parts and any(not 0 <= step < args.steps - 1 for step in args.calibrate_at):
        parser.error(f"--calibrate-at steps must be in [0, {args.steps - 2}], got {args.calibrate_at}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    try:
        settings = parse_settings(args.settings)
    except ConfigError as error:
        parser.error(str(error))
    shape = SHAPES[args.shape]
    every_variant = schedule_variants(shape.preset, args.steps)
    variants = every_variant
    if args.variants:
        variants = {n: v for n, v in every_variant.items() if any(w in n for w in args.variants)}
        if not variants:
            parser.error(f"--variants {' '.join(args.variants)} matches none of: {', '.join(every_variant)}")
    set_threads(args.threads)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    workload = _workload(shape, args.layers, args.steps, args.seed, args.device)
    log(f"workload: {workload.describe()}")
    selection_rows, schedule_rows = [], []

    def write():  # after each part, so a cut-short run keeps what it measured
        with open(args.out, "w") as handle:
            json.dump({"shape": args.shape, "workload": workload.describe(), "device": args.device,
                       "settings": settings, "selection": selection_rows, "schedule": schedule_rows}, handle, indent=1)

    if "selection" in args.parts:
        selection_rows = selection_part(workload, shape, tuple(s + 1 for s in args.calibrate_at), log, settings)
        write()
    if "schedule" in args.parts:
        schedule_rows = schedule_part(workload, shape, log, variants, settings)
        write()
    print(format_tables(selection_rows, schedule_rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
