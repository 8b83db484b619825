"""A kernel family that does not compile, for tests/test_compile_kernels.py (imported only by the tool's
subprocess, as `--families tests.broken_family`)."""
import triton
import triton.language as tl

from tools.kernel_spec import BucketAxis, OpSpec, Output, Tensor


@triton.jit
def broken_copy_kernel(x, y, L, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    tl.store(y + offs, tl.load(x + offs, mask=mask) * undefined_factor, mask=mask)  # noqa: F821  the error


SPECS = [
    OpSpec(
        name="broken_copy",
        kernel=broken_copy_kernel,
        args=[Tensor("x", "L", dtypes=["float32"])],
        outputs=[Output("y", "L", dtype_of="x")],
        axes=[BucketAxis("BLOCK", "L", [64])],
        launch_config=lambda **_: dict(num_warps=1, num_stages=1),
        grid=["cdiv(L, BLOCK)"],
    ),
]
