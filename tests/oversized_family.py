"""A kernel too large for any arch's shared memory even unpipelined, for tests/test_compile_kernels.py (imported
only by the tool's subprocess, as `--families tests.oversized_family`)."""
from tests.shared_memory_family import matmul_spec

SPECS = [matmul_spec("huge_matmul", 256, 256, 256, 2)]
