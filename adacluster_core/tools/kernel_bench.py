"""Kernel benchmark on the GPU it finds: dense SDPA, FlexAttention on the same layout, the layout kernel,
and whole steady-state AdaCluster calls, for the attention shapes of the supported video models (README,
"Speed on the GPU").

    adacluster-bench [--shapes wan14b-720p ...] [--kept 0.10] [--out results.json]
    (or: python -m comfyui_adacluster.adacluster_core.tools.kernel_bench)

Kernel rows: layouts clustered like AdaCluster's (65 query clusters, N/100 (300..1000) key clusters of
skewed, ragged sizes; every query cluster keeps key clusters in random order until ``--kept`` of the key
tokens are kept).
Whole-call rows ("runner"): the real entry point, ``SparseAttention`` with the Wan preset and a RunCache:
one calibration call, then timed calls at a sparse step (warm-started clustering, selection, layout
kernel, statistics). Recipes: "paper" with Top-1 plus a minimum kept fraction of ``--kept`` (so about
``--kept`` of the keys), "hybrid" tuned to about ``--kept`` (top_p), and the default "hybrid" as shipped
(its kept fraction depends on the inputs; on random inputs attention mass is flat, so it keeps much more).
Times are medians of CUDA-event-timed runs after warm-up; inputs are random (never zeros).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from ..config import ConfigError, parse_settings
from .demo import relative_l2

SHAPES = {  # name: (heads, tokens, head dim), batch 1, bf16
    "cogvideox2b-480p": (30, 17550, 64),
    "wan1.3b-480p": (12, 32760, 128),
    "wan14b-480p": (40, 32760, 128),
    "wan14b-720p": (40, 75600, 128),
    "hunyuan-720p": (24, 118800, 128),
}
QUERY_CLUSTERS = 65


def time_ms(fn, min_runs: int = 5, max_runs: int = 50, budget_ms: float = 1500.0) -> float:
    """Median time of fn() in ms (CUDA events), after warm-up."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    runs = int(min(max_runs, max(min_runs, budget_ms // estimate)))
    times = []
    for _ in range(runs):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fastest_dense(q, k, v):
    """(name, ms) of the fastest torch SDPA backend, and all measured backends."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    results = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                results[backend.name] = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        except RuntimeError as error:  # backend not available for this shape / GPU
            results[backend.name] = f"unavailable: {str(error).splitlines()[0][:80]}"
    timed = {name: ms for name, ms in results.items() if isinstance(ms, float)}
    best = min(timed, key=timed.get)
    return best, timed[best], results


def skewed_labels(heads, tokens, n_clusters, generator, device):
    weights = torch.rand(heads, n_clusters, generator=generator, device=device) ** 2 + 0.05
    return torch.multinomial(weights, tokens, replacement=True, generator=generator).unsqueeze(0)


def select_until_kept(scores, k_sizes, kept: float):
    """Per query cluster: key clusters in score order until ``kept`` of the key tokens are kept.

    scores (B, H, Cq, Ck), k_sizes (B, H, Ck). Device-only (sort, cumsum, scatter)."""
    order = scores.sort(dim=-1, descending=True).indices
    sizes_in_order = k_sizes.unsqueeze(-2).expand_as(scores).gather(-1, order).float()
    before = sizes_in_order.cumsum(-1) - sizes_in_order
    budget = kept * k_sizes.sum(-1, keepdim=True).unsqueeze(-1).float()
    take = (before < budget) & torch.isfinite(scores.gather(-1, order))
    return torch.zeros_like(take).scatter_(-1, order, take)


def clustered_layout(heads, tokens, kept, generator, device):
    from ..layout import Layout
    from ...kernels import triton_ops
    n_keys = min(1000, max(300, tokens // 100))
    q_labels = skewed_labels(heads, tokens, QUERY_CLUSTERS, generator, device)
    k_labels = skewed_labels(heads, tokens, n_keys, generator, device)
    q_perm, q_off = triton_ops.segments_from_labels(q_labels, QUERY_CLUSTERS)
    k_perm, k_off = triton_ops.segments_from_labels(k_labels, n_keys)
    scores = torch.rand(1, heads, QUERY_CLUSTERS, n_keys, generator=generator, device=device)
    selected = select_until_kept(scores, k_off[..., 1:] - k_off[..., :-1], kept)
    return Layout(q_offsets=q_off, k_offsets=k_off, selected=selected, q_perm=q_perm, k_perm=k_perm)


def flex_block_mask(layout, tokens, block=128):
    """FlexAttention BlockMask for the same layout over permuted q/k: block-level any/all from segment
    overlaps, exact token mask in the partial blocks."""
    from torch.nn.attention.flex_attention import BlockMask
    sq, sk = layout.num_query_segments, layout.num_key_segments
    n_blocks = -(-tokens // block)
    padded = n_blocks * block
    device = layout.selected.device
    positions = torch.arange(padded, device=device)

    def labels_in_order(offsets):  # (B, H, padded) segment of each permuted position (pads -> 0)
        seg = torch.searchsorted(offsets[..., 1:].contiguous(), positions.expand(*offsets.shape[:-1], padded).contiguous(),
                                 right=True)
        return torch.where(positions < tokens, seg, 0).clamp_max(offsets.shape[-1] - 2)

    q_seg, k_seg = labels_in_order(layout.q_offsets), labels_in_order(layout.k_offsets)
    real = (positions < tokens).float()

    def overlap(seg, n_seg):  # (B, H, n_blocks, n_seg) tokens of each segment in each block
        one_hot = torch.nn.functional.one_hot(seg, n_seg).float() * real[:, None]
        return one_hot.reshape(*seg.shape[:-1], n_blocks, block, n_seg).sum(-2)

    cq, ck = overlap(q_seg, sq), overlap(k_seg, sk)
    pairs = cq @ layout.selected.float() @ ck.transpose(-1, -2)  # selected token pairs per block pair
    full_pairs = cq.sum(-1).unsqueeze(-1) * ck.sum(-1).unsqueeze(-2)
    full = (pairs == full_pairs) & (pairs > 0)
    partial = (pairs > 0) & ~full
    def indices(mask):
        count = mask.sum(-1).to(torch.int32)
        order = mask.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices.to(torch.int32)
        return count, order
    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)
    selected = layout.selected

    def mask_mod(b, h, q_idx, kv_idx):
        return selected[b, h, q_seg[b, h, q_idx], k_seg[b, h, kv_idx]]

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(tokens, tokens))


def runner_recipes(kept: float) -> dict:
    """Selection settings of the whole-call rows: name -> preset overrides."""
    return {
        "paper": {"recipe": "paper", "selection": {"top_k": 1, "min_kept_fraction": kept}},
        "hybrid-tuned": {"recipe": "hybrid", "selection": {"top_p": kept / 2, "min_kept_fraction": kept * 0.8}},
        "hybrid-default": {"recipe": "hybrid"},
    }


def bench_runner(q, k, v, overrides: dict, dense_ms: float) -> dict:
    """One real steady-state call through SparseAttention (after a calibration call), timed whole and by part."""
    from ..attention import CallInfo, SparseAttention
    from ..cache import RunCache
    from ..config import load_preset
    from ...kernels import dense_attention, execute_layout

    config = load_preset("wan", **{"warmup_steps": 1, "dense_layer_fraction": 0.0, **overrides})
    cache = RunCache()
    cache.start_run(total_steps=50)
    runner = SparseAttention(config, cache)
    dense = lambda: dense_attention(q, k, v)
    started = time.time()
    runner(q, k, v, CallInfo(0, 0, 50, (0,)), dense=dense)  # calibration step: dense output, clustering cached
    torch.cuda.synchronize()
    row = {"calibration_s": time.time() - started}
    sparse_call = CallInfo(0, 1, 50, (0,))
    if runner.decide(q.shape, k.shape, sparse_call) is not None:
        return {"error": f"call stays dense: {runner.decide(q.shape, k.shape, sparse_call)}"}
    call = lambda: runner(q, k, v, sparse_call, dense=dense)
    row["call_ms"] = time_ms(call)
    replayed = SparseAttention(config.replace(cuda_graphs=True), cache)  # shares the calibrated cache
    row["replay_ms"] = time_ms(lambda: replayed(q, k, v, sparse_call, dense=dense))
    plan = _plan(runner, q, k, sparse_call)
    layout = plan.layout
    row["kept_fraction"] = float(plan.kept.float().mean())
    row["key_clusters"] = float(plan.key_counts.float().mean())
    row["plan_ms"] = time_ms(lambda: _plan(runner, q, k, sparse_call))
    row["kernel_ms"] = time_ms(lambda: execute_layout(q, k, v, layout))
    row["plan_share"] = row["plan_ms"] / row["call_ms"]
    row["speedup"] = dense_ms / row["call_ms"]
    row["kernel_vs_floor"] = row["kernel_ms"] / (row["kept_fraction"] * dense_ms)
    try:  # no host synchronisation: the whole runner call must be capturable in a CUDA graph
        row["graph_ms"] = time_ms(_graph(call).replay)
    except Exception as error:  # noqa: BLE001 - report, keep benchmarking
        row["graph_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    cache.release()
    return row


def _graph(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph (after one eager run for compilation and allocation)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _plan(runner, q, k, call):
    """The planning part of a runner call on its video tokens, as the runner runs it: the method's Plan
    (clustering, selection with the step's budget, the kept-fraction statistic)."""
    return runner.method.plan(q, k, call)


def bench_shape(name, kept, generator, with_flex=True, with_runner=True):
    from ...kernels import triton_ops
    heads, tokens, d = SHAPES[name]
    device = "cuda"
    q, k, v = [torch.randn(1, heads, tokens, d, generator=generator, device=device, dtype=torch.bfloat16)
               for _ in range(3)]
    row = {"shape": name, "heads": heads, "tokens": tokens, "head_dim": d}
    backend, dense_ms, all_dense = fastest_dense(q, k, v)
    row.update(dense_backend=backend, dense_ms=dense_ms, dense_all=all_dense,
               dense_tflops=4 * heads * tokens ** 2 * d / dense_ms / 1e9)

    layout = clustered_layout(heads, tokens, kept, generator, device)
    row["kept_fraction"] = float(layout.kept_fraction().mean())
    rho = row["kept_fraction"]
    from ...kernels.triton_attention import _key_path
    row["layout_key_path"] = _key_path(q, layout.k_perm)
    run_layout = lambda: triton_ops.execute_layout(q, k, v, layout)
    row["layout_ms"] = time_ms(run_layout)
    row["layout_vs_floor"] = row["layout_ms"] / (rho * dense_ms)
    row["layout_speedup"] = dense_ms / row["layout_ms"]
    row["layout_graph_ms"] = time_ms(_graph(run_layout).replay)  # GPU time without per-run launch latency
    row["layout_graph_vs_floor"] = row["layout_graph_ms"] / (rho * dense_ms)

    if with_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            from ...kernels.reference import gather_tokens
            flex = torch.compile(flex_attention, dynamic=False)
            block_mask = flex_block_mask(layout, tokens)
            qp, kp, vp = gather_tokens(q, layout.q_perm), gather_tokens(k, layout.k_perm), gather_tokens(v, layout.k_perm)
            row["flex_ms"] = time_ms(lambda: flex(qp, kp, vp, block_mask=block_mask))
            row["flex_block_fraction"] = float((block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum())
                                               / (heads * block_mask.kv_num_blocks.shape[-1] ** 2))
            row["layout_vs_flex"] = row["flex_ms"] / row["layout_ms"]
        except Exception as error:  # noqa: BLE001 - report, keep benchmarking
            row["flex_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"

    if with_runner:
        row["runner"] = {}
        for recipe, overrides in runner_recipes(kept).items():
            try:
                row["runner"][recipe] = bench_runner(q, k, v, overrides, dense_ms)
            except Exception as error:  # noqa: BLE001 - report, keep benchmarking
                row["runner"][recipe] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
            print(recipe, json.dumps(row["runner"][recipe]), flush=True)
            torch.cuda.empty_cache()
    torch.cuda.empty_cache()
    return row


def _fmt(value, digits=2):
    return f"{value:.{digits}f}" if isinstance(value, float) else ("-" if value is None else str(value))


def print_table(rows, device_name):
    print(f"\nDevice: {device_name}; bf16, batch 1; times in ms (median)")
    header = ["shape", "dense (backend)", "kept", "layout", "vs floor", "speedup", "layout (graph)", "vs floor",
              "flex", "flex/layout"]
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([
            r["shape"], f"{_fmt(r['dense_ms'])} ({r['dense_backend']})", f"{r['kept_fraction']:.3f}",
            _fmt(r["layout_ms"]), _fmt(r["layout_vs_floor"]), f"{_fmt(r['layout_speedup'])}x",
            _fmt(r["layout_graph_ms"]), _fmt(r["layout_graph_vs_floor"]),
            _fmt(r.get("flex_ms", r.get("flex_error"))), _fmt(r.get("layout_vs_flex")),
        ]))
    print("\nWhole call through SparseAttention (Wan preset, steady-state sparse step):")
    print(" | ".join(["shape", "recipe", "kept", "key clusters", "call", "speedup vs dense", "replayed call",
                      "planning", "share", "kernel", "kernel vs floor", "graph call"]))
    for r in rows:
        for recipe, c in r.get("runner", {}).items():
            if "error" in c:
                print(f"{r['shape']} | {recipe} | {c['error']}")
                continue
            print(" | ".join([r["shape"], recipe, f"{c['kept_fraction']:.3f}", f"{c['key_clusters']:.0f}",
                              _fmt(c["call_ms"]), f"{_fmt(c['speedup'])}x", _fmt(c["replay_ms"]),
                              _fmt(c["plan_ms"]),
                              f"{100 * c['plan_share']:.0f}%", _fmt(c["kernel_ms"]),
                              _fmt(c["kernel_vs_floor"]), _fmt(c.get("graph_ms", c.get("graph_error")))]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adacluster-bench", description=__doc__.split("\n\n")[0],
                                     epilog="Needs a CUDA GPU; times are medians of CUDA-event-timed runs.")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                        help="shapes to run (default: all)")
    parser.add_argument("--kept", type=float, default=0.10, help="fraction of key tokens kept, in (0, 1] (default 0.10)")
    parser.add_argument("--out", default="kernel_benchmark.json", help="JSON file for the results")
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention rows")
    parser.add_argument("--no-runner", action="store_true", help="skip the whole-call rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--workload", choices=("random", "video"), default="random",
                        help="random: kernel and whole-call rows on random inputs; video: whole calls of the "
                             "default, paper, svg2 and Sol-Attn on video-like inputs at the real token grids")
    parser.add_argument("--methods", nargs="+", choices=("default", "paper", "svg2"),
                        default=["default", "paper", "svg2"], help="video workload: the runner rows to measure")
    parser.add_argument("--sol-tau", type=float, nargs="*", default=[1.0, 1.3, 1.5],
                        help="video workload: Sol-Attn thresholds to compare with (none: no Sol-Attn rows)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="video workload: a setting on top of each shape's preset for every runner row, e.g. "
                             "query_clusters=130 or selection.top_k=24 (repeatable)")
    parser.add_argument("--case-steps", type=int, nargs="+", default=None, metavar="STEP",
                        help="video workload: the sparse steps of the 50-step schedule to measure, 1-49 "
                             "(default 10 25 40)")
    parser.add_argument("--tile-config", dest="tile_configs", action="append", default=[],
                        metavar="D=BM,BN,WARPS,STAGES",
                        help="the layout kernel's tiling at head dim D in place of the pack's choice, e.g. "
                             "128=64,64,8,3 (query rows, key rows, warps, pipeline stages; repeatable), to compare "
                             "tilings on the same inputs")
    parser.add_argument("--compare-tilings", dest="compared_tilings", action="append", default=[],
                        metavar="D=BM,BN,WARPS,STAGES",
                        help="video workload: in every case, also time the default row's layout kernel in this tiling "
                             "on the same layout (repeatable); the table then lists each tiling's mean time against "
                             "the run's own tiling (the pack's choice, or --tile-config), so one run compares several")
    return parser


TILE_ROWS = (16, 32, 64, 128, 256)


def parse_tile_config(item: str, flag: str = "--tile-config") -> tuple:
    """(head dim, (BLOCK_M, BLOCK_N, num_warps, num_stages)) from one ``D=BM,BN,WARPS,STAGES`` item; ValueError
    naming the flag, the item and the allowed values where it is malformed."""
    try:
        dim, values = item.split("=")
        d, (block_m, block_n, warps, stages) = int(dim), (int(x) for x in values.split(","))
    except ValueError:
        raise ValueError(f"{flag} {item!r}: expected D=BM,BN,WARPS,STAGES, e.g. 128=64,64,8,3") from None
    if d not in (64, 128) or block_m not in TILE_ROWS or block_n not in TILE_ROWS:
        raise ValueError(f"{flag} {item!r}: head dim 64 or 128, tile rows one of {TILE_ROWS}")
    if warps not in (1, 2, 4, 8, 16) or not 1 <= stages <= 5:
        raise ValueError(f"{flag} {item!r}: warps one of 1, 2, 4, 8, 16 and stages 1-5")
    return d, (block_m, block_n, warps, stages)


def parse_tile_configs(items: list) -> dict:
    """{head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages)} from ``D=BM,BN,WARPS,STAGES`` items (the last one
    per head dim wins)."""
    return dict(parse_tile_config(item) for item in items)


def tiling_label(d: int, config: tuple) -> str:
    return f"{d}=" + ",".join(str(x) for x in config)


@contextlib.contextmanager
def layout_tiling(d: int, config: tuple):
    """The layout kernel runs in ``config`` at head dim ``d`` inside the block; the previous override (or the
    pack's own choice) comes back after it."""
    from ...kernels import triton_attention
    overrides = triton_attention.CONFIG_OVERRIDE
    previous = overrides.get(d)
    overrides[d] = config
    try:
        yield
    finally:
        if previous is None:
            overrides.pop(d, None)
        else:
            overrides[d] = previous


def kernel_by_tiling(execute, head_dim: int, tilings, run_tiling_ms: float) -> dict:
    """The layout kernel timed in each of ``tilings`` ((head dim, tiling) pairs; those of another head dim are
    skipped) on one fixed layout. ``execute()`` runs it once; ``run_tiling_ms`` is its time in the run's own
    tiling. Returns {label: {"rel_diff", "ms", "run_tiling_ms"}}, or {label: {"error"}} for a tiling that fails."""
    compared = [(d, config) for d, config in tilings if d == head_dim]
    chosen_out = execute() if compared else None
    timings = {}
    for d, config in compared:
        timing = timings[tiling_label(d, config)] = {}
        try:
            with layout_tiling(d, config):
                # the difference from the run's tiling guards the comparison against a fast but wrong tiling
                timing["rel_diff"] = relative_l2(execute(), chosen_out)
                timing["ms"] = time_ms(execute, max_runs=20, budget_ms=400.0)
            timing["run_tiling_ms"] = run_tiling_ms
        except Exception as error:  # noqa: BLE001 - a tiling that does not compile here (shared memory)
            timing["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return timings


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 < args.kept <= 1.0:
        parser.error(f"--kept {args.kept}: expected a fraction in (0, 1]")
    try:
        tile_configs = parse_tile_configs(args.tile_configs)
        compared = [parse_tile_config(item, "--compare-tilings") for item in args.compared_tilings]
    except ValueError as error:
        parser.error(str(error))
    if compared and args.workload != "video":
        parser.error("--compare-tilings needs --workload video")
    if compared and "default" not in args.methods:
        parser.error("--compare-tilings times the default row's layouts: keep default in --methods")
    if not torch.cuda.is_available():
        parser.error("the kernel benchmark needs a CUDA GPU")
    from ...kernels import triton_attention
    triton_attention.CONFIG_OVERRIDE.update(tile_configs)
    if tile_configs:
        print(f"layout kernel tiling by head dim, (query rows, key rows, warps, stages): {tile_configs}")
    if args.workload == "video":
        from .video_bench import CASE_STEPS, SCHEDULE_STEPS, run
        if any(not 0.0 < tau <= 10.0 for tau in args.sol_tau):
            parser.error(f"--sol-tau values must be in (0, 10], got {args.sol_tau}")
        try:
            settings = parse_settings(args.settings)
        except ConfigError as error:
            parser.error(str(error))
        steps = tuple(args.case_steps or CASE_STEPS)
        if any(not 1 <= step <= SCHEDULE_STEPS - 1 for step in steps):
            parser.error(f"--case-steps {list(steps)}: expected steps in [1, {SCHEDULE_STEPS - 1}]")
        run(args.shapes, args.seed, args.out, methods=args.methods, sol_taus=tuple(args.sol_tau), settings=settings,
            steps=steps, tilings=compared)
        print(f"\nwrote {args.out}")
        return
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    device_name = torch.cuda.get_device_name()
    rows = []
    for name in args.shapes:
        started = time.time()
        rows.append(bench_shape(name, args.kept, generator, not args.no_flex, not args.no_runner))
        rows[-1]["bench_seconds"] = time.time() - started
        print(json.dumps(rows[-1]), flush=True)
        _write(args, device_name, rows)  # after every shape, so a cut-short run keeps what it measured
    print_table(rows, device_name)
    print(f"\nwrote {args.out}")


def _write(args, device_name, rows):
    import triton
    result = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__, "kept": args.kept,
              "dtype": "bfloat16", "rows": rows}
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)



# ------------------------------------------------------------------------------------- AdaSpa and MOD-DiT
# token grids (frames, height, width) of the shapes, for MOD-DiT's frame patterns
GRIDS = {"cogvideox2b-480p": (13, 30, 45), "wan1.3b-480p": (21, 30, 52), "wan14b-480p": (21, 30, 52),
         "wan14b-720p": (21, 45, 80), "hunyuan-720p": (33, 45, 80)}


def bench_methods(name: str, generator, sparsity: float = 0.8, top_k: int = 350, with_clustering: bool = True,
                  tilings=()) -> dict:
    """The pack's methods at one shape, through the runner, on the same q/k/v: AdaSpa's and MOD-DiT's sparse
    calls and their floor (kept fraction x fastest dense), AdaSpa's fused search step and LSE-cached search,
    MOD-DiT's fit step, fit (from the map to the mask) and refresh, each also as a share of a dense call or
    of the sparse call; with ``with_clustering`` also AdaCluster's default and the SVG2 rule (bench_runner).
    ``tilings``: (head dim, tiling) pairs in which AdaSpa's and MOD-DiT's layout kernels are also timed."""
    from ..attention import CallInfo, SparseAttention
    from ..cache import RunCache
    from ..config import from_dict
    from ..methods.adaspa import AdaSpa, AdaSpaConfig
    from ..methods.moddit import ModDiT, ModDiTConfig
    from ...kernels import dense_attention, execute_layout

    heads, tokens, d = SHAPES[name]
    q, k, v = [torch.randn(1, heads, tokens, d, generator=generator, device="cuda", dtype=torch.bfloat16)
               for _ in range(3)]
    backend, dense_ms, _ = fastest_dense(q, k, v)
    row = {"shape": name, "heads": heads, "tokens": tokens, "head_dim": d, "dense_backend": backend,
           "dense_ms": dense_ms}
    dense = lambda: dense_attention(q, k, v)  # noqa: E731

    def sparse_rows(runner, method, call) -> dict:
        layout = method.plan(q, k, call).layout
        kept = float(layout.kept_fraction().mean())
        out = {"kept_fraction": kept, "call_ms": time_ms(lambda: runner(q, k, v, call, dense=dense)),
               "plan_ms": time_ms(lambda: method.plan(q, k, call)),
               "kernel_ms": time_ms(lambda: execute_layout(q, k, v, layout))}
        floor = kept * dense_ms
        out.update(call_vs_floor=out["call_ms"] / floor, kernel_vs_floor=out["kernel_ms"] / floor,
                   speedup=dense_ms / out["call_ms"])
        timings = kernel_by_tiling(lambda: execute_layout(q, k, v, layout), d, tilings, out["kernel_ms"])
        if timings:
            out["kernel_by_tiling"] = timings
        return out

    cache = RunCache()
    cache.start_run(50)
    adaspa = AdaSpa(AdaSpaConfig(sparsity=sparsity), cache)
    runner = SparseAttention(from_dict({"method": "adaspa", "min_tokens": 0}), cache, method=adaspa)
    first, later = adaspa.config.search_schedule(50)[:2]
    fused = time_ms(lambda: runner(q, k, v, CallInfo(0, first, 50, (0,)), dense=dense))
    state = cache.state(0, 0)
    cached_call = CallInfo(0, later, 50, (0,))
    cached = time_ms(lambda: adaspa._search(q, k, state.lse[None], state.text_mass[None], cached_call))
    row["adaspa"] = {"sparsity": sparsity, "fused_search_ms": fused, "fused_search_vs_dense": fused / dense_ms,
                     "cached_search_ms": cached, "cached_search_vs_dense": cached / dense_ms,
                     **sparse_rows(runner, adaspa, CallInfo(0, later + 1, 50, (0,)))}
    cache.release()
    torch.cuda.empty_cache()

    cache = RunCache()
    cache.start_run(50)
    moddit = ModDiT(ModDiTConfig(top_k=top_k), cache)
    runner = SparseAttention(from_dict({"method": "moddit", "min_tokens": 0}), cache, method=moddit)
    grid = GRIDS.get(name)
    m = moddit.config.warmup_steps
    runner(q, k, v, CallInfo(0, m - 2, 50, (0,), grid=grid), dense=dense)
    fit_step = time_ms(lambda: runner(q, k, v, CallInfo(0, m - 1, 50, (0,), grid=grid), dense=dense))
    fitter = moddit.fitter(tokens, grid, q.device)
    state = cache.state(0, 0)
    sparsity_map = moddit.sparsity_map(q, k, state.lse[None])
    fit = time_ms(lambda: moddit.mask_from(fitter, fitter.fit(sparsity_map), state.squares[None]))
    sparse = sparse_rows(runner, moddit, CallInfo(0, m, 50, (0,), grid=grid))
    refresh_call = CallInfo(0, m + moddit.config.refresh_interval, 50, (0,), grid=grid)
    refresh = time_ms(lambda: moddit._refresh(q, k, refresh_call, fitter, [cache.state(0, 0)]))
    row["moddit"] = {"top_k": top_k, "grid": grid, "patterns": fitter.bases.size, "fit_step_ms": fit_step,
                     "fit_step_vs_dense": fit_step / dense_ms, "fit_ms": fit,
                     "fit_vs_sparse_call": fit / sparse["call_ms"],
                     "refresh_ms": refresh, "refresh_vs_sparse_call": refresh / sparse["call_ms"], **sparse}
    cache.release()
    torch.cuda.empty_cache()
    if with_clustering:
        for label, overrides in (("adacluster", {"recipe": "hybrid"}), ("svg2", {"recipe": "svg2", "method": "svg2"})):
            try:
                row[label] = bench_runner(q, k, v, overrides, dense_ms)
            except Exception as error:  # noqa: BLE001 - report, keep benchmarking
                row[label] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
            torch.cuda.empty_cache()
    return row


def methods_main(argv=None):
    """python -c "from comfyui_adacluster.adacluster_core.tools.kernel_bench import methods_main; methods_main()"
    [--shapes ...] [--sparsity 0.8] [--top-k 350] [--out methods_benchmark.json]"""
    parser = argparse.ArgumentParser(description="AdaSpa and MOD-DiT on the GPU: sparse calls vs floor, search and "
                                     "fit costs")
    parser.add_argument("--shapes", nargs="+", default=["wan1.3b-480p", "wan14b-720p"], choices=list(SHAPES))
    parser.add_argument("--sparsity", type=float, default=0.8, help="AdaSpa sparsity in [0, 1)")
    parser.add_argument("--top-k", type=int, default=350, help="MOD-DiT diagonal / column patterns kept per head")
    parser.add_argument("--out", default="methods_benchmark.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-clustering", action="store_true", help="skip the AdaCluster and SVG2 rows")
    parser.add_argument("--compare-tilings", dest="compared_tilings", action="append", default=[],
                        metavar="D=BM,BN,WARPS,STAGES",
                        help="also time AdaSpa's and MOD-DiT's layout kernels in this tiling on the same layouts "
                             "(repeatable), against the pack's choice")
    args = parser.parse_args(argv)
    try:
        tilings = [parse_tile_config(item, "--compare-tilings") for item in args.compared_tilings]
    except ValueError as error:
        parser.error(str(error))
    if not torch.cuda.is_available():
        parser.error("the benchmark needs a CUDA GPU")
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    rows = []
    for name in args.shapes:
        rows.append(bench_methods(name, generator, args.sparsity, args.top_k, not args.no_clustering, tilings))
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, handle,
                      indent=1)
    print_method_tilings(rows)
    print(f"wrote {args.out}")


def print_method_tilings(rows: list, print_fn=print) -> None:
    """Each compared tiling's layout-kernel time against the pack's choice, per shape and method."""
    lines = [" | ".join([row["shape"], method, label, _fmt(t.get("ms", t.get("error"))), _fmt(t.get("run_tiling_ms")),
                         f"{t['ms'] / t['run_tiling_ms']:.2f}x" if "ms" in t else "-",
                         f"{t['rel_diff']:.1e}" if "rel_diff" in t else "-"])
             for row in rows for method in ("adaspa", "moddit")
             for label, t in row[method].get("kernel_by_tiling", {}).items()]
    if lines:
        print_fn("\nLayout kernel in other tilings, on the same layouts: ms against the pack's choice")
        print_fn(" | ".join(["shape", "method", "tiling", "kernel ms", "pack's tiling ms", "ratio", "rel. difference"]))
        for line in lines:
            print_fn(line)


if __name__ == "__main__":
    main()
