"""Runs the table kernels (kernels/triton_tables.py) in the Triton interpreter on the CPU against the PyTorch
oracle (run by test_block_kernels.py with TRITON_INTERPRET=1)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interpret_block_kernels import INTERPRETER_BROKEN, interpreter_works  # noqa: E402
from table_oracle import assert_tables_match  # noqa: E402
from comfyui_adacluster.kernels import triton_tables  # noqa: E402

if __name__ == "__main__":
    if not interpreter_works():
        sys.exit(INTERPRETER_BROKEN)
    assert_tables_match(triton_tables.key_tables, triton_tables.tile_table, "cpu")
    print("ok")
