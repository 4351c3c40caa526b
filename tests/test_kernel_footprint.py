"""The layout kernel's per-thread stack (registers spilled to local memory), compiled for Hopper (sm_90) on the
CPU with Triton's own ptxas: the pooled tail must cost about what another key loop costs.

Spilled registers slow every loop of the kernel, not only the tail's: a version that squared an fp32 copy of the
query tile inside the tail raised the stack from about 700 to about 980 bytes per thread in the 64-row tiles on 4
warps that 480p took then (the tiling itself spilled, and was replaced for that reason). Compiling needs no GPU;
the test skips where this Triton cannot compile for sm_90 or ships no cuobjdump."""
import os
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed (Linux x86-64 only)")

from comfyui_adacluster.kernels import triton_attention  # noqa: E402

# argument types of _layout_kernel by name; any other non-constexpr argument is a 32-bit integer (sizes, strides)
POINTER_TYPES = {
    "Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32", "q_perm": "*i64", "k_perm": "*i64",
    "tile_seg": "*i32", "tile_m0": "*i32", "n_tiles": "*i32", "q_off": "*i64", "cum": "*i32", "delta": "*i32",
    "bounds": "*i32", "bound_seg": "*i32", "n_chunks": "*i32", "TK": "*bf16", "TV": "*bf16", "TB": "*fp32",
    "KM": "*bf16", "VM": "*bf16", "QSQ": "*fp32", "tail_bias": "*fp32", "tail_spread": "*fp32", "selected": "*i8",
    "LO": "*bf16", "LL": "*fp32", "full_start": "*i32", "n_full": "*i32", "qk_scale": "fp32",
}


def _tools():
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(bin_dir, "cuobjdump")
    if not os.path.isfile(cuobjdump):
        pytest.skip(f"this Triton ships no cuobjdump ({bin_dir})")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as error:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {error}")
    return cuobjdump, GPUTarget, ASTSource


def stack_bytes(head_dim: int, tail: bool) -> int:
    """Per-thread stack of the Hopper (TMA) variant at the configuration the pack picks for query clusters of
    about 250 tokens (480p), with the local block and, if ``tail``, the pooled tail."""
    cuobjdump, GPUTarget, ASTSource = _tools()
    block_m, block_n, warps, stages = triton_attention._config(head_dim, 250.0, 100.0, True)
    kernel = triton_attention._layout_kernel
    constants = dict(D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, WIN=triton_attention.WINDOW, HAS_QPERM=True,
                     HAS_KPERM=False, HAS_TEXT=False, HAS_TBIAS=False, HAS_TAIL=tail, HAS_LOCAL=True,
                     STORE_LSE=True, KEY_MODE=1)
    descriptor = f"tensordesc<bf16[{block_n}, {head_dim}]>"
    signature = {name: "constexpr" if name in constants else descriptor if name in ("KD", "VD")
                 else POINTER_TYPES.get(name, "i32") for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True))
    except Exception as error:  # noqa: BLE001 - an older Triton or one built without the NVIDIA backend
        pytest.skip(f"this Triton cannot compile the layout kernel for sm_90: {type(error).__name__}: {error}")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "layout.cubin")
        with open(path, "wb") as file:
            file.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter's configuration is not the GPU's")
@pytest.mark.parametrize("head_dim", [128, 64])
def test_pooled_tail_adds_little_stack(head_dim):
    without_tail = stack_bytes(head_dim, tail=False)
    with_tail = stack_bytes(head_dim, tail=True)
    # the tail loop loads tiles like the key loops and adds one multiply-add per logit: allow a little spill
    assert with_tail <= without_tail + 16 + without_tail // 10, (head_dim, without_tail, with_tail)
