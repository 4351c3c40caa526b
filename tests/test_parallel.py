"""Sparse attention as the per-rank attention of Ulysses sequence parallelism (yunchang), on the CPU.

The two-rank test spawns 2 processes with the gloo backend and runs yunchang's LongContextAttention
(its all-to-all is torch.distributed.all_to_all_single, which gloo implements) over a small multi-layer,
multi-step run; the gathered output must match the single-process runner and the ranks must pick the
same dense layers although their own heads would rank the layers differently."""
import itertools
import math
import os
import socket
import threading

import pytest
import torch
import torch.multiprocessing as mp

from comfyui_adacluster.adacluster_core.attention import CallInfo, SparseAttention
from comfyui_adacluster.adacluster_core.cache import RunCache
from comfyui_adacluster.adacluster_core.config import from_dict
from comfyui_adacluster.adacluster_core import comfy_adapter, parallel, parallel_balance as balance
from comfyui_adacluster.kernels import reference as R
from qkv_data import structured_qkv

# one Top-K for every head: the ranks' outputs then equal a single process's (with matched budgets each rank
# sets the budgets of its own heads)
CONFIG = dict(warmup_steps=1, min_tokens=64, initial_key_clusters=12, query_clusters=5, max_stages=4,
              dense_layer_fraction=0.34, dense_layers_by="clusters", selection={"budget": "fixed"})
HEADS, BATCH, TOKENS, DIM, LAYERS, STEPS = 4, 2, 202, 24, 3, 3  # 101 tokens per rank, odd head size
BRANCHES = ((0, "cond", 0), (1, "uncond", 0))
# Key-cluster structure per layer for heads (0, 1) and (2, 3): rank 0 alone would rank layer 1 first,
# rank 1 alone layer 0; over all heads layer 1 has the most key clusters.
GROUPS = {0: (6, 40), 1: (22, 3), 2: (8, 8)}
PERMUTED = (2, 0, 3, 1)


def layer_inputs(layer, step):
    """q, k, v (B, S, H, D) for one layer and step: fresh but similar from step to step."""
    halves = [structured_qkv(BATCH, HEADS // 2, TOKENS, DIM, groups=g, seed=100 * layer + 10 * half)
              for half, g in enumerate(GROUPS[layer])]
    q, k, v = (torch.cat([h[i] for h in halves], dim=1) for i in range(3))
    gen = torch.Generator().manual_seed(1000 + 10 * layer + step)
    q, k, v = (t + 0.05 * step * torch.randn(t.shape, generator=gen) for t in (q, k, v))
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


def single_process_run():
    """The plain runner over all heads: outputs per (step, layer) as (B, S, H, D), and the dense layers."""
    cache = RunCache()
    runner = SparseAttention(from_dict(CONFIG), cache)
    cache.start_run(STEPS)
    outs = []
    for step in range(STEPS):
        for layer in range(LAYERS):
            q, k, v = (t.transpose(1, 2) for t in layer_inputs(layer, step))
            call = CallInfo(layer=layer, step=step, total_steps=STEPS, branches=BRANCHES)
            out = runner(q, k, v, call, lambda: R.dense_attention(q, k, v)[0])
            outs.append(out.transpose(1, 2))
    dense = sorted(cache.dense_layers)
    sparse_calls = sum(r.sparse for r in cache.records)
    cache.end_run()
    return outs, dense, sparse_calls


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from yunchang import set_seq_parallel_pg

    torch.set_num_threads(1)
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:  # gloo connects the ranks over loopback, whatever the host name resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    set_seq_parallel_pg(world, 1, rank, world)
    shard = slice(rank * TOKENS // world, (rank + 1) * TOKENS // world)
    result = {}
    for name, order in (("contiguous", None), ("permuted", PERMUTED)):
        owner = parallel.UlyssesSparseAttention(from_dict(CONFIG), HEADS, head_order=order)
        modules = [parallel.ulysses_attention(owner.processor(layer)) for layer in range(LAYERS)]
        perm = torch.tensor(order) if order is not None else None
        owner.start_run(STEPS)
        outs = []
        for step in range(STEPS):
            owner.begin_model_call(step, branches=BRANCHES)
            for layer in range(LAYERS):
                q, k, v = (t[:, shard] for t in layer_inputs(layer, step))
                if perm is not None:
                    q, k, v = (balance.permute_heads(t, perm) for t in (q, k, v))
                out = modules[layer](q, k, v)
                outs.append(balance.unpermute_heads(out, perm) if perm is not None else out)
        local = owner.cache.calibrated_layers()
        result[name] = {"outs": outs, "dense": sorted(owner.cache.dense_layers),
                        "local_top": max(local, key=lambda layer: local[layer][0]),
                        "balance": balance.head_balance(owner), "heads": owner.heads,
                        "sparse_calls": sum(r.sparse for r in owner.cache.records)}
        owner.end_run()
    set_seq_parallel_pg(1, world, rank, world)  # ring degree 2: must be refused
    try:
        parallel.ulysses_attention(owner.processor(0))
        result["ring_error"] = None
    except ValueError as exc:
        result["ring_error"] = str(exc)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_gloo_match_single_process_and_agree_on_dense_layers(tmp_path):
    pytest.importorskip("yunchang", reason="yunchang (optional multigpu extra) is not installed")
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    reference, reference_dense, reference_sparse = single_process_run()
    assert reference_sparse > 0 and reference_dense == [1]
    for name in ("contiguous", "permuted"):
        results = [r[name] for r in ranks]
        assert [r["dense"] for r in results] == [reference_dense] * world
        if name == "contiguous":  # alone, the ranks would rank the layers differently
            assert {r["local_top"] for r in results} == {0, 1}
        assert all(r["sparse_calls"] == reference_sparse for r in results)
        for i, expected in enumerate(reference):
            got = torch.cat([r["outs"][i] for r in results], dim=1)
            assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), (name, i, (got - expected).abs().max())
        first = results[0]["balance"]
        assert all(r["balance"] == first for r in results)  # one all-reduce: the same report everywhere
        assert first.imbalance >= 1.0 and len(first.per_head) == HEADS and all(k > 0 for k in first.per_head)
    assert ranks[1]["permuted"]["heads"] == PERMUTED[2:]
    assert all("ring degree 2" in r["ring_error"] for r in ranks)


def test_processor_returns_exact_output_and_lse_dense_and_sparse_with_text():
    """World of one: a dense (calibration) call and a sparse call that keeps every key cluster are exact,
    so output and lse must equal the dense reference, text rows included."""
    config = from_dict({**CONFIG, "selection": {"top_k": 48, "min_kept_fraction": 0.0, "budget": "fixed"}})
    owner = parallel.UlyssesSparseAttention(config, HEADS)
    proc = owner.processor(0)
    owner.start_run(2)
    text_len = 17
    for step in range(2):
        owner.begin_model_call(step, text_len=text_len, text_first=True)
        q, k, v = structured_qkv(1, HEADS, 131 + text_len, DIM, seed=7 + step)
        out, lse = proc(*(t.transpose(1, 2) for t in (q, k, v)))
        exact_out, exact_lse = R.dense_attention(q, k, v)
        assert out.shape == (1, 131 + text_len, HEADS, DIM) and lse.shape == (1, HEADS, 131 + text_len)
        assert lse.dtype == torch.float32
        torch.testing.assert_close(out.transpose(1, 2), exact_out, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lse, exact_lse, atol=1e-5, rtol=1e-5)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(DIM)
        torch.testing.assert_close(lse, torch.logsumexp(logits, -1), atol=1e-4, rtol=1e-5)
    assert [r.sparse for r in owner.cache.records] == [False, True]
    owner.end_run()


def test_processor_outside_a_run_and_with_custom_scale_is_dense():
    owner = parallel.UlyssesSparseAttention(from_dict(CONFIG), 2)
    q, k, v = (t.transpose(1, 2) for t in structured_qkv(1, 2, 90, 16, seed=3))
    out, lse = owner.processor(0)(q, k, v, softmax_scale=0.3)
    exact_out, exact_lse = R.dense_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.3)
    torch.testing.assert_close(out.transpose(1, 2), exact_out)
    torch.testing.assert_close(lse, exact_lse)
    assert owner.cache.records == []


def test_processor_and_owner_reject_bad_arguments():
    owner = parallel.UlyssesSparseAttention(from_dict(CONFIG), 4)
    q = torch.randn(1, 70, 4, 8)
    with pytest.raises(ValueError, match="causal=True"):
        owner.processor(0)(q, q, q, causal=True)
    with pytest.raises(ValueError, match=r"\(B, S, 4, D\)"):
        owner.processor(0)(q[:, :, :3], q[:, :, :3], q[:, :, :3])
    with pytest.raises(ValueError, match="not a permutation"):
        parallel.UlyssesSparseAttention(from_dict(CONFIG), 4, head_order=(0, 1, 1, 2))
    with pytest.raises(ValueError, match="cannot be split evenly"):
        parallel.contiguous_heads(6, 0, 4)
    with pytest.raises(RuntimeError, match="start_run"):
        owner.begin_model_call(0)
    owner.start_run(3)
    with pytest.raises(ValueError, match="step 3 is outside 0..2"):
        owner.begin_model_call(3)


def test_balanced_assignment_takes_equal_head_counts_and_beats_contiguous():
    cost = [0.9, 0.8, 0.7, 0.6, 0.2, 0.15, 0.1, 0.05]  # deeper heads keep less: contiguous is skewed
    assignment = balance.balanced_assignment(cost, 2)
    assert sorted(h for heads in assignment for h in heads) == list(range(8))
    assert [len(heads) for heads in assignment] == [4, 4]
    assert balance.imbalance(cost, assignment) < 1.01
    assert balance.imbalance(cost, balance.contiguous_assignment(8, 2)) > 1.6
    perm = balance.balanced_permutation(cost, 2)
    assert torch.equal(perm, torch.tensor([h for heads in assignment for h in heads]))
    x = torch.randn(2, 5, 8, 3)
    assert torch.equal(balance.unpermute_heads(balance.permute_heads(x, perm), perm), x)
    assert torch.equal(balance.permute_heads(x, perm)[:, :, 1], x[:, :, int(perm[1])])


@pytest.mark.parametrize("seed", range(4))
def test_balanced_assignment_close_to_the_best_split(seed):
    """Against the best equal-size split found by brute force, on fresh random costs (3 ranks, 9 heads)."""
    gen = torch.Generator().manual_seed(seed)
    cost = (torch.rand(9, generator=gen) ** 2).tolist()
    got = balance.imbalance(cost, balance.balanced_assignment(cost, 3))
    best = math.inf
    for first in itertools.combinations(range(9), 3):
        rest = [h for h in range(9) if h not in first]
        for second in itertools.combinations(rest, 3):
            third = tuple(h for h in rest if h not in second)
            best = min(best, balance.imbalance(cost, [first, second, third]))
    assert best <= got <= best * 4 / 3 + 1e-9


def test_balance_rejects_bad_costs():
    with pytest.raises(ValueError, match="cannot be split evenly"):
        balance.balanced_assignment([0.1, 0.2, 0.3], 2)
    with pytest.raises(ValueError, match="finite and >= 0"):
        balance.balanced_assignment([0.1, float("nan")], 2)


CFG_DEVICES = [("cpu", "cpu"), pytest.param(("cuda:0", "cuda:1"), marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (cond and uncond on different GPUs)"))]


@pytest.mark.parametrize("devices", CFG_DEVICES)
def test_cfg_split_threads_match_one_batched_run(devices):
    """ComfyUI's MultiGPU CFG Split runs cond and uncond at the same time, in one thread per GPU, through
    the same patch (one runner and run cache; states keyed by branch and device). Every step and layer
    must give what one batched call gives, and the same dense layers."""
    config = from_dict(CONFIG)
    inputs = {(s, l): tuple(t.transpose(1, 2) for t in layer_inputs(l, s)) for s in range(STEPS) for l in range(LAYERS)}
    ref_cache = RunCache()
    ref = SparseAttention(config, ref_cache)
    ref_cache.start_run(STEPS)
    expected = {}
    for (step, layer), (q, k, v) in inputs.items():
        call = CallInfo(layer=layer, step=step, total_steps=STEPS, branches=BRANCHES)
        expected[step, layer] = ref(q, k, v, call, lambda: R.dense_attention(q, k, v)[0])

    cache = RunCache()
    runner = SparseAttention(config, cache)
    cache.start_run(STEPS)
    got, errors = {}, []
    step_done = threading.Barrier(2)  # the sampler waits for every device at each step

    def work(b):
        try:
            device = torch.device(devices[b])
            branch = comfy_adapter.branch_keys(1, [BRANCHES[b][0]], [BRANCHES[b][1]], device)
            for step in range(STEPS):
                for layer in range(LAYERS):
                    q, k, v = (t[b:b + 1].to(device) for t in inputs[step, layer])
                    call = CallInfo(layer=layer, step=step, total_steps=STEPS, branches=branch)
                    got[step, layer, b] = runner(q, k, v, call, lambda: R.dense_attention(q, k, v)[0]).cpu()
                step_done.wait()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            step_done.abort()

    threads = [threading.Thread(target=work, args=(b,)) for b in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    tolerance = dict(atol=2e-5, rtol=1e-4) if devices[0] == "cpu" else dict(atol=2e-3, rtol=1e-2)
    for (step, layer), out in expected.items():
        torch.testing.assert_close(torch.cat([got[step, layer, 0], got[step, layer, 1]]), out, **tolerance)
    assert cache.dense_layers == ref_cache.dense_layers == frozenset({1})
    assert {key[-1] for _, key in cache.states} == {str(torch.device(d)) for d in devices}
    assert sum(r.sparse for r in cache.records) == sum(r.sparse for r in ref_cache.records) * 2


def test_branch_keys_carry_the_device_when_given():
    keys = comfy_adapter.branch_keys(2, [0, 1], ["pos", "neg"], torch.device("cuda", 1))
    assert keys == ((0, "pos", 0, "cuda:1"), (1, "neg", 0, "cuda:1"))
    assert comfy_adapter.branch_keys(2, [0, 1], ["pos", "neg"]) == ((0, "pos", 0), (1, "neg", 0))


@pytest.mark.skipif(not torch.cuda.is_available() or parallel._flash_attn_func is None,
                    reason="the flash-attn dense path needs CUDA and flash-attn")
def test_dense_with_lse_flash_path_matches_the_reference():
    q, k, v = (t.cuda().to(torch.bfloat16) for t in structured_qkv(1, 3, 1037, 64, seed=11))
    out, lse = parallel.dense_with_lse(q, k, v)
    ref_out, ref_lse = R.dense_attention(q.float(), k.float(), v.float())
    assert lse.dtype == torch.float32 and lse.shape == (1, 3, 1037)
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)
