"""Ulysses sequence parallelism benchmark: the pack's sparse attention on N GPUs (yunchang) against 1 GPU.

    torchrun --nproc_per_node=2 -m comfyui_adacluster.adacluster_core.tools.ulysses_bench \
        [--shapes wan14b-720p hunyuan-720p] [--full-step] [--out ulysses.json]

For every shape, with the same inputs on every rank (seeded, clustered like video tokens, never zeros):

* one layer, 1 GPU vs N: rank 0 runs the plain runner over all heads (calibration call, then one sparse
  call); all ranks run the same two calls through yunchang's LongContextAttention with this pack's
  processor on their sequence shard. The gathered N-GPU output is compared with the 1-GPU output (max and
  mean absolute difference, bf16), and both with exact attention on a sample of query rows.
* time of a steady-state sparse call, median of CUDA-event-timed runs: 1 GPU (rank 0, all heads) and N GPUs
  (every rank, both all-to-alls included); the attention time of a sparse step (layers x call), the
  speed-up and the scaling efficiency (1-GPU time / (N x N-GPU time)).
* the kept-fraction balance of the heads across the ranks.
* with ``--full-step``: the attention of one whole sparse step (every layer's call, the preset's dense
  layers included, after a calibration step), 1 GPU vs N. Only attention runs, no projections or MLPs.

``--device cpu`` (gloo) with ``--shapes tiny`` checks the script on a CPU. Dense (calibration) calls are not
timed; they use flash-attn when it is installed, else the kernels' chunked fp32 reference, which takes
tens of seconds at 720p.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

SHAPES = {  # name: (heads, video tokens, head dim, text tokens in the self-attention, layers)
    "tiny": (4, 510, 32, 2, 3),
    "wan14b-720p": (40, 75600, 128, 0, 40),
    "hunyuan-720p": (24, 118800, 128, 256, 60),
}


def clustered_inputs(heads, tokens, dim, device, dtype, seed, groups=64):
    """q, k, v (1, S, H, D): tokens around a few directions per head with varied norms, plus noise."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centres = torch.randn(heads, groups, dim, generator=gen) * 1.5
    labels = torch.randint(0, groups, (heads, tokens), generator=gen)
    base = centres.gather(1, labels.unsqueeze(-1).expand(heads, tokens, dim)).to(device)
    out = []
    for _ in range(3):
        noise = torch.randn(heads, tokens, dim, generator=gen).to(device)
        out.append((base + 0.5 * noise).to(dtype).transpose(0, 1).unsqueeze(0).contiguous())
    return out


def timed(fn, device, runs):
    """Median ms of fn() over ``runs`` runs after one warm-up, every rank starting together (a barrier
    before each run)."""
    return _median_ms(fn, device, runs, before=dist.barrier)


def bench_shape(name, args, rank, world, device):
    from ..attention import CallInfo, SparseAttention
    from ..cache import RunCache
    from ..config import load_preset
    from .. import parallel
    from ..parallel_balance import head_balance
    from ... import kernels
    from ...kernels import reference

    heads, video, dim, text, layers = SHAPES[name]
    tokens = video + text
    if tokens % world or heads % world:
        raise SystemExit(f"{name}: {tokens} tokens and {heads} heads must both divide by the world size {world}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = load_preset(args.preset)
    if name == "tiny":
        config = config.replace(min_tokens=64, query_clusters=8, initial_key_clusters=16)
    step_config = config.replace(warmup_steps=1)  # whole step: the preset's dense layers stay dense
    config = step_config.replace(dense_layer_fraction=0.0)  # one layer: sparse
    q, k, v = clustered_inputs(heads, tokens, dim, device, dtype, seed=args.seed)
    shard = slice(rank * tokens // world, (rank + 1) * tokens // world)
    branches = ((0, "cond", 0),)
    text_first = False

    # N GPUs: calibration call, then a sparse call (one layer), through yunchang
    owner = parallel.UlyssesSparseAttention(config, heads)
    module = parallel.ulysses_attention(owner.processor(0))
    owner.start_run(2)
    owner.begin_model_call(0, branches, text, text_first)
    module(q[:, shard], k[:, shard], v[:, shard])
    owner.begin_model_call(1, branches, text, text_first)
    local_out = module(q[:, shard], k[:, shard], v[:, shard])
    parallel_ms = timed(lambda: module(q[:, shard], k[:, shard], v[:, shard]), device, args.runs)
    gathered = [torch.empty_like(local_out) for _ in range(world)]
    dist.all_gather(gathered, local_out.contiguous())
    balance = head_balance(owner)
    owner.end_run()

    result = {"shape": name, "heads": heads, "tokens": tokens, "text_tokens": text, "head_dim": dim,
              "world": world, "ms_per_call_n_gpus": parallel_ms, "layers": layers,
              "kept_per_rank": balance.per_rank, "kept_imbalance": balance.imbalance}
    if rank == 0:  # 1 GPU: the plain runner over all heads
        cache = RunCache(method=config.method)
        runner = SparseAttention(config, cache)
        q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
        cache.start_run(2)
        calls = [CallInfo(layer=0, step=s, total_steps=2, branches=branches, text_len=text, text_first=text_first)
                 for s in range(2)]
        runner(q4, k4, v4, calls[0], lambda: kernels.dense_attention(q4, k4, v4))
        single = runner(q4, k4, v4, calls[1], lambda: kernels.dense_attention(q4, k4, v4)).transpose(1, 2)
        cache.end_run()
        many = torch.cat(gathered, dim=1)
        rows = torch.randperm(tokens, generator=torch.Generator().manual_seed(1))[:args.sample_rows].to(device)
        exact = reference.dense_attention(q4[:, :, rows], k4, v4)[0].transpose(1, 2)
        diff = (many.float() - single.float()).abs()
        result.update({
            "max_abs_diff_n_vs_1": float(diff.max()), "mean_abs_diff_n_vs_1": float(diff.mean()),
            "mean_abs_err_1_gpu_vs_exact": float((single[:, rows].float() - exact.float()).abs().mean()),
            "mean_abs_err_n_gpus_vs_exact": float((many[:, rows].float() - exact.float()).abs().mean()),
        })
        result["ms_per_call_1_gpu"] = _time_single(runner, cache, q4, k4, v4, calls, device, args.runs)
        one = result["ms_per_call_1_gpu"]
        result.update({"speedup": one / parallel_ms, "scaling_efficiency": one / (world * parallel_ms),
                       "attention_ms_per_sparse_step_1_gpu": one * layers,
                       "attention_ms_per_sparse_step_n_gpus": parallel_ms * layers})
    if args.full_step:
        result.update(full_step(step_config, heads, layers, text, branches, q, k, v, shard, rank, device, args))
    return result


def full_step(config, heads, layers, text, branches, q, k, v, shard, rank, device, args):
    """Attention time of one whole sparse step: every layer's call, the dense layers included, after a
    calibration step (all layers see the same inputs; only the attention is timed, not the rest of the
    model). N GPUs on every rank; 1 GPU on rank 0 afterwards."""
    from ..attention import CallInfo, SparseAttention
    from ..cache import RunCache
    from .. import parallel
    from ... import kernels

    owner = parallel.UlyssesSparseAttention(config, heads)
    modules = [parallel.ulysses_attention(owner.processor(layer)) for layer in range(layers)]
    qs, ks, vs = q[:, shard], k[:, shard], v[:, shard]
    owner.start_run(2)
    owner.begin_model_call(0, branches, text)
    for module in modules:
        module(qs, ks, vs)
    owner.begin_model_call(1, branches, text)
    many = timed(lambda: [module(qs, ks, vs) for module in modules], device, args.step_runs)
    result = {"full_step_dense_layers": sorted(owner.cache.dense_layers), "full_step_ms_n_gpus": many}
    owner.end_run()
    dist.barrier()
    if rank == 0:
        cache = RunCache(method=config.method)
        runner = SparseAttention(config, cache)
        q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
        dense = lambda: kernels.dense_attention(q4, k4, v4)  # noqa: E731 - one GPU needs no LSE
        cache.start_run(2)
        for step in range(2):
            calls = [CallInfo(layer=layer, step=step, total_steps=2, branches=branches, text_len=text)
                     for layer in range(layers)]
            if step == 0:
                for call in calls:
                    runner(q4, k4, v4, call, dense)
        one = _median_ms(lambda: [runner(q4, k4, v4, call, dense) for call in calls], device, args.step_runs)
        cache.end_run()
        result.update({"full_step_ms_1_gpu": one, "full_step_speedup": one / many,
                       "full_step_scaling_efficiency": one / (owner.world * many)})
    dist.barrier()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["wan14b-720p", "hunyuan-720p"], choices=sorted(SHAPES))
    parser.add_argument("--preset", default="wan", help="preset the configuration starts from (default: wan)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--sample-rows", type=int, default=256, help="query rows compared with exact attention")
    parser.add_argument("--full-step", action="store_true",
                        help="also time the attention of a whole sparse step (every layer; slow without flash-attn, "
                             "whose LSE the N-GPU dense layers use)")
    parser.add_argument("--step-runs", type=int, default=3, help="timed runs of the whole step (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", help="write the results as JSON here (rank 0)")
    args = parser.parse_args(argv)

    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from yunchang import set_seq_parallel_pg
    set_seq_parallel_pg(world, 1, rank, world)

    results = []
    with torch.no_grad():
        for name in args.shapes:
            result = bench_shape(name, args, rank, world, device)  # rank 0 also runs the 1-GPU side
            dist.barrier()
            if rank == 0:
                print(json.dumps(result, indent=1), flush=True)
                results.append(result)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


def _time_single(runner, cache, q4, k4, v4, calls, device, runs):
    """1-GPU steady-state sparse call on rank 0 (no collectives): calibrate at step 0, time step-1 calls."""
    from ... import kernels

    cache.start_run(2)
    runner(q4, k4, v4, calls[0], lambda: kernels.dense_attention(q4, k4, v4))
    ms = _median_ms(lambda: runner(q4, k4, v4, calls[1], None), device, runs)
    cache.end_run()
    return ms


def _median_ms(fn, device, runs, before=None):
    """Median ms of fn() after one warm-up (CUDA events, or wall clock on the CPU); ``before()``, if given,
    runs ahead of each timed run (timed runs of this rank alone by default)."""
    fn()
    times = []
    for _ in range(runs):
        if before is not None:
            before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


if __name__ == "__main__":
    main()
