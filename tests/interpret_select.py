"""Runs the fused selection kernels (kernels/triton_select.py) in the Triton interpreter on the CPU against the
PyTorch selection (run by test_block_kernels.py with TRITON_INTERPRET=1)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interpret_block_kernels import INTERPRETER_BROKEN, interpreter_works  # noqa: E402
from select_cases import CASES, check_case  # noqa: E402
from comfyui_adacluster.kernels import triton_select  # noqa: E402

if __name__ == "__main__":
    if not interpreter_works():
        sys.exit(INTERPRETER_BROKEN)
    for seed, case in enumerate(CASES):
        check_case(case, triton_select.select_and_count, "cpu", seed=seed)
    print("ok")
