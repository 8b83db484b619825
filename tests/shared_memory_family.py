"""A kernel whose shared memory depends on its pipelining depth, for tests/test_compile_kernels.py (imported only
by the tool's subprocess, as `--families tests.shared_memory_family`): `deep_matmul` asks for 4 stages of 64 KB tiles, more than
sm_86 has room for, so the build must lower them. tests/oversized_family.py's does not fit even with one."""
import triton
import triton.language as tl

from tools.kernel_spec import AlignedAxis, OpSpec, Output, Tensor


@triton.jit
def matmul_kernel(a, b, c, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """c = a @ b for one [BM, BN] tile (a [M, K], b [K, N], row-major)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        x = tl.load(a + rm[:, None] * K + (k0 + rk)[None, :], mask=(rm < M)[:, None] & (k0 + rk < K)[None, :], other=0.)
        y = tl.load(b + (k0 + rk)[:, None] * N + rn[None, :], mask=(k0 + rk < K)[:, None] & (rn < N)[None, :], other=0.)
        acc = tl.dot(x, y, acc)
    tl.store(c + rm[:, None] * N + rn[None, :], acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


def matmul_spec(name, BM, BN, BK, stages):
    return OpSpec(
        name=name,
        kernel=matmul_kernel,
        args=[Tensor("a", "M K", dtypes=["float16"]), Tensor("b", "K N", same_dtype_as="a")],
        outputs=[Output("c", "M N", dtype="float32")],
        axes=[AlignedAxis(["M", "N", "K"], fallback=False)],  # aligned loads: Triton pipelines them
        launch_config=lambda **_: dict(BM=BM, BN=BN, BK=BK, num_warps=8, num_stages=stages),
        grid=["cdiv(M, BM)", "cdiv(N, BN)"],
    )


SPECS = [matmul_spec("deep_matmul", 128, 128, 128, 4)]
