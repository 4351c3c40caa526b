"""Whole sparse calls of the default recipe through the runner with every kernel of the GPU path (clustering,
fused selection, tables, layout kernel with the pooled tail's inputs from the statistics pass, through the
registered custom op) in the Triton interpreter on the CPU, against the same calls on the PyTorch reference path
(run by test_block_kernels.py with TRITON_INTERPRET=1)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interpret_block_kernels import INTERPRETER_BROKEN, interpreter_works  # noqa: E402
from qkv_data import structured_qkv  # noqa: E402
from comfyui_adacluster import kernels  # noqa: E402
from comfyui_adacluster.adacluster_core.attention import CallInfo, SparseAttention  # noqa: E402
from comfyui_adacluster.adacluster_core.cache import RunCache  # noqa: E402
from comfyui_adacluster.adacluster_core.config import from_dict  # noqa: E402
from comfyui_adacluster.kernels import reference, triton_ops  # noqa: E402

SETTINGS = dict(warmup_steps=1, min_tokens=64, initial_key_clusters=12, query_clusters=5, max_stages=4)


def sparse_calls(q, k, v, backend):
    """The outputs and layouts of steps 1 and 2 (step 0 calibrates) with every kernel from ``backend``."""
    kernels.backend_for = lambda x: backend
    cache = RunCache()
    cache.start_run(4)
    layouts = []
    runner = SparseAttention(from_dict(SETTINGS), cache, observer=lambda call, b, layout: layouts.append(layout))
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    outs = [runner(q, k, v, CallInfo(0, step, 4, (0,)), dense=dense) for step in range(3)]
    assert all(record.sparse for record in cache.records[1:]), [r.reason for r in cache.records]
    return outs[1:], layouts


if __name__ == "__main__":
    if not interpreter_works():
        sys.exit(INTERPRETER_BROKEN)
    triton_ops.layout_op_supported = lambda q: True  # the layout kernel on CPU tensors (interpreter)
    q, k, v = structured_qkv(batch=1, heads=2, n=333, d=64, seed=5)
    want, _ = sparse_calls(q, k, v, reference)
    got, layouts = sparse_calls(q, k, v, triton_ops)
    assert layouts and all(layout.query_squares is not None and layout.tail_key_spread is not None
                           for layout in layouts)
    for out, ref in zip(got, want):
        difference = float((out - ref).norm() / ref.norm())
        print(f"relative difference {difference:.2e}")
        assert 0 < difference < 1e-3, difference  # 0 would mean both ran one path
    print("ok")
