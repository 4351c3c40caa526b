"""When sparse calls may be replayed as CUDA graphs (the replay itself is tested in test_gpu_graphs.py)."""
import sys
import types

import pytest
import torch

from comfyui_adacluster.adacluster_core import graphs
from comfyui_adacluster.adacluster_core.attention import CallInfo, SparseAttention
from comfyui_adacluster.adacluster_core.cache import RunCache
from comfyui_adacluster.adacluster_core.config import ConfigError, load_preset


def test_cuda_graphs_setting_is_validated():
    assert load_preset("wan").cuda_graphs is False
    with pytest.raises(ConfigError, match="cuda_graphs must be true or false, got 'yes'"):
        load_preset("wan", cuda_graphs="yes")


def test_no_replay_on_the_cpu():
    assert not graphs.replay_allowed(torch.randn(1, 2, 64, 8))


def test_comfyui_flag_disables_cuda_graphs(monkeypatch):
    assert not graphs.comfyui_disables_cuda_graphs()
    cli = types.ModuleType("comfy.cli_args")
    cli.args = types.SimpleNamespace(disable_cuda_graphs=True)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli)
    assert graphs.comfyui_disables_cuda_graphs()
    cli.args.disable_cuda_graphs = False
    assert not graphs.comfyui_disables_cuda_graphs()


def test_graph_key_needs_calibrated_branches_and_names_the_step_budget():
    config = load_preset("wan", warmup_steps=1, min_tokens=64, initial_key_clusters=8, query_clusters=4)
    cache = RunCache()
    cache.start_run(20)
    runner = SparseAttention(config, cache)
    q, k, v = (torch.randn(2, 2, 300, 16) for _ in range(3))
    first = CallInfo(0, 1, 20, (0, 1))
    assert runner.method.graph_key(first) is None  # not calibrated yet
    runner(q, k, v, CallInfo(0, 0, 20, (0, 1)), dense=lambda: q)
    high, middle = runner.method.graph_key(first), runner.method.graph_key(CallInfo(0, 10, 20, (0, 1)))
    assert high is not None and middle is not None and high != middle  # 3x Top-K, then 1x
    assert runner.method.graph_key(CallInfo(0, 11, 20, (0, 1))) == middle
    assert cache.graphs.memory_bytes() == 0 and cache.graphs.captures == 0
