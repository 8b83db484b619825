"""Where the eager time of one decode step goes: each layer of fla_aot's call path, timed alone.

    python benchmarks/launch_overhead.py

fused_recurrent_gated_delta_rule at B=1, T=1, H=16, K=V=128 (bf16; g, state float32), through
(1) the public op, (2) the registered runner (fla_aot._registry.OPS), (3) the C++ eager entry
fla_aot._C.launch and (4) the torch.ops dispatcher path, next to torch.empty and torch.add for scale.
Host wall time of 5000 back-to-back calls plus one synchronize, after 50 warm-up calls.
"""
import time

import torch

import fla_aot.ops as ops
from fla_aot import _C
from fla_aot._registry import OPS


def per_call_us(fn, n=5000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def main():
    B, H, K, V = 1, 16, 128, 128
    d = "cuda"
    q = torch.randn(B, 1, H, K, dtype=torch.bfloat16, device=d)
    k = torch.nn.functional.normalize(torch.randn_like(q), dim=-1)
    v = torch.randn(B, 1, H, V, dtype=torch.bfloat16, device=d)
    g = -torch.rand(B, 1, H, device=d)
    beta = torch.rand(B, 1, H, dtype=torch.bfloat16, device=d)
    h0 = torch.randn(B, H, K, V, device=d)
    # the manifest op's arguments, in schema order (fla_aot._manifest_rules.schema)
    args = (q, k, v, g, None, None, None, beta, h0, None, K ** -0.5, True, False, True, False, False, False, True)
    rows = {
        "public op (fla_aot.ops)": lambda: ops.fused_recurrent_gated_delta_rule(
            q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True),
        "registered runner": lambda: OPS["fused_recurrent_fwd"](*args),
        "fla_aot._C.launch": lambda: _C.launch(0, *args),
        "torch.ops.fla_aot (dispatcher)": lambda: torch.ops.fla_aot.fused_recurrent_fwd.default(*args),
        "torch.empty x2 (for scale)": lambda: (torch.empty(B, 1, H, V, device=d), torch.empty(B, H, K, V, device=d)),
        "torch.add (for scale)": lambda: torch.add(q, q),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, fn in rows.items():
        print(f"{name:34s} {per_call_us(fn):7.2f} us/call")


if __name__ == "__main__":
    main()
