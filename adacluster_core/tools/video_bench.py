"""Whole-call benchmark on video-like inputs at the real token grids (``adacluster-bench --workload video``).

For every shape, the main command's video-like generator (3-D RoPE, moving objects, several layer kinds)
builds q/k/v at the model's latent token grid on the GPU. Each case is one layer kind at one point of a
50-step schedule: the runner calibrates on the step before (as the last warm-up step does) and the
steady-state sparse call at that step is timed and compared with dense attention. Rows:

* ``default``: the node's default for the model family (its preset, as shipped);
* ``paper``: AdaCluster as published (TensorQuest Top-K, 65 query / 100 initial key clusters);
* ``svg2``: the SVG2 method (Euclidean k-means of queries and keys, top-p);
* ``sol tau X``: comfy-kitchen's fused Sol-Attn (ComfyUI core's sparse node), where it runs (head dim 128).

Error is the relative L2 distance of the video queries' output from dense attention; kept is the
fraction of (query, key) pairs attended exactly. For the default the call is also timed replayed as a CUDA
graph (replay ms, the "CUDA graphs" widget, copies in and out included) and split into planning
(clustering + selection), statistics, the two as one graph, and the layout kernel on both key paths;
"graph ms" is the whole call captured in one graph, without the copies that replay adds. With
``--compare-tilings`` the default row's layout kernel is also timed in other tilings on the same layouts.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import PUBLISHED_SETTINGS
from .demo import relative_l2, sol_attn_function
from .kernel_bench import _graph, _plan, fastest_dense, kernel_by_tiling, time_ms, tiling_label
from .workload import VideoAttentionWorkload, WorkloadConfig


@dataclass(frozen=True)
class VideoShape:
    frames: int
    height: int
    width: int
    heads: int
    head_dim: int
    preset: str
    text_len: int = 0
    text_first: bool = False


VIDEO_SHAPES = {  # latent token grids (frames x h x w after patching) of the models users run
    "cogvideox2b-480p": VideoShape(13, 30, 45, 30, 64, "cogvideox", 226, True),
    "wan1.3b-480p": VideoShape(21, 30, 52, 12, 128, "wan"),
    "wan14b-480p": VideoShape(21, 30, 52, 40, 128, "wan"),
    "wan14b-720p": VideoShape(21, 45, 80, 40, 128, "wan"),
    "hunyuan-720p": VideoShape(33, 45, 80, 24, 128, "hunyuan_video", 256, False),
}
SCHEDULE_STEPS = 50
CASE_STEPS = (10, 25, 40)  # a high-noise, a middle and a low-noise sparse step of the 50-step schedule
LAYER_KINDS = 5  # the workload's first five layer kinds: local, semantic, mixed, temporal, diffuse
SOL_TAUS = (1.0, 1.3, 1.5)


def method_overrides() -> dict:
    """Runner rows: name -> (config overrides on top of the family preset)."""
    return {
        "default": {},
        "paper": PUBLISHED_SETTINGS,
        "svg2": {"method": "svg2", "recipe": "svg2"},
    }


def sol_attention(head_dim: int):
    """(comfy-kitchen's sol_attn, None), or (None, why its rows cannot be measured here)."""
    if head_dim != 128:
        return None, f"Sol-Attn runs at head dim 128 only (this shape: {head_dim})"
    sol, why_not = sol_attn_function()
    if sol is None:
        return None, why_not
    import comfy_kitchen
    try:
        available = comfy_kitchen.sol_attn_is_available(torch.device("cuda"))
    except Exception as error:  # noqa: BLE001 - optional comparison
        return None, f"comfy-kitchen's sol_attn check failed ({type(error).__name__}: {error})"
    return (sol, None) if available else (None, "comfy-kitchen reports sol_attn unavailable on this GPU")


def run_case(name, q, k, v, call_kwargs, step, overrides, dense_out, dense_ms, video, detail: bool,
             tilings=()) -> dict:
    """One runner row on one case: calibrate at step - 1, time the sparse call at ``step``. ``overrides``:
    settings on top of the family preset (the row's, then the command line's ``--set``); ``tilings``: (head dim,
    tiling) pairs in which the detail also times the layout kernel on the same layout."""
    from ..attention import CallInfo, SparseAttention
    from ..cache import RunCache
    from ..config import load_preset
    from ...kernels import execute_layout
    from ...kernels import triton_attention

    shape = VIDEO_SHAPES[name]
    config = load_preset(shape.preset, **{**overrides, "warmup_steps": step, "dense_layer_fraction": 0.0,
                                          "min_tokens": 0})
    cache = RunCache()
    cache.start_run(total_steps=SCHEDULE_STEPS)
    runner = SparseAttention(config, cache)
    dense = lambda: dense_out  # noqa: E731 - the dense result is known; calibration only needs the clustering
    runner(q, k, v, CallInfo(0, step - 1, SCHEDULE_STEPS, (0,), **call_kwargs), dense=dense)
    call_info = CallInfo(0, step, SCHEDULE_STEPS, (0,), **call_kwargs)
    reason = runner.decide(q.shape, k.shape, call_info)
    if reason is not None:
        return {"error": f"call stays dense: {reason}"}
    out = runner(q, k, v, call_info, dense=dense)  # the first sparse call: error measured on it
    row = {"rel_l2": relative_l2(out[:, :, video], dense_out[:, :, video]),
           "kept": float(cache.records[-1].kept.float().mean())}
    call = lambda: runner(q, k, v, call_info, dense=dense)  # noqa: E731
    row["call_ms"] = time_ms(call, max_runs=20, budget_ms=600.0)
    row["speedup"] = dense_ms / row["call_ms"]
    if detail:
        # the same call replayed as a CUDA graph (the "CUDA graphs" widget; the runner shares the calibrated cache)
        replayed = SparseAttention(config.replace(cuda_graphs=True), cache)
        row["replay_ms"] = time_ms(lambda: replayed(q, k, v, call_info, dense=dense), max_runs=20, budget_ms=600.0)
        qv, kv, vv = q[:, :, video], k[:, :, video], v[:, :, video]
        layout = _plan(runner, qv, kv, call_info).layout
        # planning (its kept-fraction statistic included) alone, and as one CUDA graph: its GPU time without
        # launch latency
        row["plan_ms"] = time_ms(lambda: _plan(runner, qv, kv, call_info), max_runs=20, budget_ms=400.0)
        row["plan_graph_ms"] = time_ms(_graph(lambda: _plan(runner, qv, kv, call_info)).replay, max_runs=20,
                                       budget_ms=300.0)
        for path in ("stream", "hybrid"):
            triton_attention.KEY_PATH_OVERRIDE = path
            try:
                row[f"kernel_{path}_ms"] = time_ms(lambda: execute_layout(qv, kv, vv, layout), max_runs=20,
                                                   budget_ms=400.0)
            finally:
                triton_attention.KEY_PATH_OVERRIDE = None
        row["key_path"] = triton_attention._key_path(qv, layout.k_perm)
        timings = kernel_by_tiling(lambda: execute_layout(qv, kv, vv, layout), qv.shape[-1], tilings,
                                   row[f"kernel_{row['key_path']}_ms"])
        if timings:
            row["kernel_by_tiling"] = timings
        try:
            row["graph_ms"] = time_ms(_graph(call).replay, max_runs=20, budget_ms=400.0)
        except Exception as error:  # noqa: BLE001 - report, keep benchmarking
            row["graph_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    cache.release()
    return row


def run_sol(sol, q, k, v, tau, shape: VideoShape, dense_out, dense_ms, video) -> dict:
    """comfy-kitchen's fused Sol-Attn on (B, T, H, D) inputs; text blocks (if any) as sinks, as core's node does."""
    n = q.shape[-2]
    kwargs = {}
    if shape.text_len:
        blocks = -(-n // 64)
        first = 0 if shape.text_first else (n - shape.text_len) // 64
        last = -(-shape.text_len // 64) if shape.text_first else blocks
        kwargs = {"sink_blocks": [first, last], "sink_q": [first, last]}
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    call = lambda: sol(qt, kt, vt, tau=tau, **kwargs)  # noqa: E731
    out = call().transpose(1, 2)
    ms = time_ms(call, max_runs=20, budget_ms=600.0)
    return {"rel_l2": relative_l2(out[:, :, video], dense_out[:, :, video]), "call_ms": ms, "speedup": dense_ms / ms}


def bench_video_shape(name: str, seed: int, methods=("default", "paper", "svg2"), sol_taus=SOL_TAUS,
                      log=print, settings: Optional[dict] = None, steps=CASE_STEPS, tilings=()) -> dict:
    """Every case of one shape. ``settings``: config overrides applied to every runner row (``--set``);
    ``steps``: the sparse steps of the 50-step schedule measured; ``tilings``: (head dim, tiling) pairs in which
    the default row's layout kernel is also timed (``--compare-tilings``)."""
    shape = VIDEO_SHAPES[name]
    started = time.time()
    workload = VideoAttentionWorkload(WorkloadConfig(
        frames=shape.frames, height=shape.height, width=shape.width, heads=shape.heads, head_dim=shape.head_dim,
        layers=LAYER_KINDS, steps=SCHEDULE_STEPS, text_len=shape.text_len, text_first=shape.text_first,
        seed=seed)).to("cuda")
    kinds = workload.layer_kinds
    n_video = workload.video_tokens
    video = slice(shape.text_len, workload.tokens) if shape.text_first else slice(0, n_video)
    result = {"shape": name, "tokens": workload.tokens, "video_tokens": n_video, "heads": shape.heads,
              "head_dim": shape.head_dim, "preset": shape.preset, "cases": []}
    sol = None
    if sol_taus:
        sol, result["sol_skipped"] = sol_attention(shape.head_dim)
        if sol is None:
            log(f"{name}: no Sol-Attn rows: {result['sol_skipped']}")
    for step in steps:
        for layer, kind in enumerate(kinds):
            q, k, v = workload.qkv(layer, step, dtype=torch.bfloat16)
            backend, dense_ms, _ = fastest_dense(q, k, v)
            dense_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            case = {"layer_kind": kind, "step": step, "sigma": workload.sigmas[step], "dense_ms": dense_ms,
                    "dense_backend": backend, "rows": {}}
            for method, overrides in method_overrides().items():
                if method not in methods:
                    continue
                try:
                    case["rows"][method] = run_case(name, q, k, v, workload.call_kwargs(), step,
                                                    {**overrides, **(settings or {})}, dense_out, dense_ms, video,
                                                    detail=method == "default",
                                                    tilings=tilings if method == "default" else ())
                except Exception as error:  # noqa: BLE001 - report, keep benchmarking
                    case["rows"][method] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
            if sol is not None:
                for tau in sol_taus:
                    case["rows"][f"sol tau {tau:g}"] = run_sol(sol, q, k, v, tau, shape, dense_out, dense_ms, video)
            log(json.dumps({"shape": name, **case}))
            result["cases"].append(case)
            del q, k, v, dense_out
            torch.cuda.empty_cache()
    result["summary"] = summarize(result["cases"])
    result["bench_seconds"] = time.time() - started
    return result


DETAIL_KEYS = ("replay_ms", "plan_ms", "plan_graph_ms", "kernel_stream_ms", "kernel_hybrid_ms",
               "graph_ms")


def summarize(cases: list) -> dict:
    """Per method: mean error and kept fraction, and the speedup of the summed times over all cases."""
    methods = {}
    for case in cases:
        for method, row in case["rows"].items():
            if "error" in row:
                continue
            m = methods.setdefault(method, {"rel_l2": [], "kept": [], "call_ms": 0.0, "dense_ms": 0.0})
            m["rel_l2"].append(row["rel_l2"])
            if "kept" in row:
                m["kept"].append(row["kept"])
            m["call_ms"] += row["call_ms"]
            m["dense_ms"] += case["dense_ms"]
            for key in DETAIL_KEYS:
                if key in row:
                    m.setdefault(key, []).append(row[key])
            for label, timing in row.get("kernel_by_tiling", {}).items():
                if "error" not in timing:
                    m.setdefault("kernel_by_tiling", {}).setdefault(label, []).append(timing)
    summary = {}
    for method, m in methods.items():
        s = {"rel_l2": statistics.fmean(m["rel_l2"]), "kept": statistics.fmean(m["kept"]) if m["kept"] else None,
             "call_ms": m["call_ms"] / len(m["rel_l2"]), "speedup": m["dense_ms"] / m["call_ms"]}
        for key in DETAIL_KEYS:
            if key in m:
                s[key] = statistics.fmean(m[key])
        if "kernel_by_tiling" in m:
            s["kernel_by_tiling"] = {label: {"ms": statistics.fmean(t["ms"] for t in timings),
                                             "run_tiling_ms": statistics.fmean(t["run_tiling_ms"] for t in timings),
                                             "max_rel_diff": max(t["rel_diff"] for t in timings)}
                                     for label, timings in m["kernel_by_tiling"].items()}
        summary[method] = s
    return summary


def print_video_table(results: list, device_name: str, print_fn=print, steps=CASE_STEPS,
                      settings: Optional[dict] = None) -> None:
    print_fn(f"\nVideo-like workload, whole steady-state call; {device_name}; bf16, batch 1; mean over "
             f"{LAYER_KINDS} layer kinds x steps {tuple(steps)} of {SCHEDULE_STEPS}"
             + (f"; settings {settings}" if settings else ""))
    print_fn(" | ".join(["shape", "method", "kept", "rel L2", "call ms", "dense ms", "speedup", "replay ms",
                         "plan ms", "plan graph ms", "kernel stream", "kernel hybrid", "graph ms"]))
    fmt = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    for result in results:
        dense = statistics.fmean(c["dense_ms"] for c in result["cases"])
        for method, s in result["summary"].items():
            print_fn(" | ".join([result["shape"], method, fmt(s["kept"], 3), fmt(s["rel_l2"], 4), fmt(s["call_ms"]),
                                 fmt(dense), f"{s['speedup']:.2f}x", fmt(s.get("replay_ms")),
                                 fmt(s.get("plan_ms")), fmt(s.get("plan_graph_ms")),
                                 fmt(s.get("kernel_stream_ms")), fmt(s.get("kernel_hybrid_ms")),
                                 fmt(s.get("graph_ms"))]))
    for result in results:
        if result.get("sol_skipped"):
            print_fn(f"{result['shape']}: no Sol-Attn rows: {result['sol_skipped']}")
    compared = [(result["shape"], s) for result in results for s in result["summary"].values()
                if "kernel_by_tiling" in s]
    if compared:
        print_fn("\nLayout kernel of the default in other tilings, on the same layouts and key path: mean ms over "
                 "the cases, against the run's own tiling (the pack's choice, or --tile-config)")
        print_fn(" | ".join(["shape", "tiling", "kernel ms", "run's tiling ms", "ratio", "max rel. difference"]))
        for shape, s in compared:
            for label, t in s["kernel_by_tiling"].items():
                print_fn(" | ".join([shape, label, fmt(t["ms"]), fmt(t["run_tiling_ms"]),
                                     f"{t['ms'] / t['run_tiling_ms']:.2f}x", f"{t['max_rel_diff']:.1e}"]))


def run(shapes: list, seed: int, out: Optional[str], methods=("default", "paper", "svg2"), sol_taus=SOL_TAUS,
        settings: Optional[dict] = None, steps=CASE_STEPS, tilings=()) -> list:
    import triton
    from ...kernels.triton_attention import CONFIG_OVERRIDE
    device_name = torch.cuda.get_device_name()
    results = []
    for name in shapes:
        results.append(bench_video_shape(name, seed, methods, sol_taus, settings=settings, steps=steps,
                                         tilings=tilings))
        if out:
            with open(out, "w") as handle:
                json.dump({"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
                           "workload": "video", "settings": settings or {}, "steps": list(steps),
                           "tile_configs": {str(d): list(c) for d, c in CONFIG_OVERRIDE.items()},
                           "compared_tilings": [tiling_label(d, c) for d, c in tilings],
                           "results": results}, handle, indent=1)
    print_video_table(results, device_name, steps=steps, settings=settings)
    return results
