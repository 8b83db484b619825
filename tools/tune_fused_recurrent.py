#!/usr/bin/env python3
"""Times launch configs (BV, num_warps) of the fused_recurrent kernel on the GPU, through Triton's JIT.

    python tools/tune_fused_recurrent.py [--out tuning.md]

For decode (T=1), and with --prompt a short prompt (T=64), of the gated delta rule and of GLA, bf16, H=16, at
B=1 and B=32 and K=V in {64, 128, 256}; each candidate is timed by CUDA events around replays of a
CUDA graph of 4 launches on 4 input sets (no launch overhead; the state is not served from L2). The
winners per BK go into `_launch_config` in triton_src/fused_recurrent.py by hand.
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.kernel_spec import DTYPE_CODES  # noqa: E402
from triton_src.fused_recurrent import fused_recurrent_fwd_kernel  # noqa: E402

CODE = {torch.float32: DTYPE_CODES["float32"], torch.bfloat16: DTYPE_CODES["bfloat16"]}


def make_set(B, T, H, K, V, delta, device="cuda"):
    d = dict(device=device)
    s = dict(q=torch.randn(B, T, H, K, dtype=torch.bfloat16, **d), k=torch.randn(B, T, H, K, dtype=torch.bfloat16, **d),
             v=torch.randn(B, T, H, V, dtype=torch.bfloat16, **d), h0=torch.randn(B, H, K, V, **d),
             o=torch.empty(B, T, H, V, dtype=torch.bfloat16, **d), ht=torch.empty(B, H, K, V, **d))
    if delta:
        s["g"] = -torch.rand(B, T, H, **d)
        s["beta"] = torch.rand(B, T, H, dtype=torch.bfloat16, **d)
    else:
        s["gk"] = -torch.rand(B, T, H, K, **d)
    return s


def launch(s, B, T, H, K, V, BV, num_warps, delta):
    """One launch, parameters bound by name as the manifest binds them (absent tensors: code 0)."""
    dummy = s["h0"]

    def code(name):
        return CODE[s[name].dtype] if name in s else 0

    grid = (B * H, triton.cdiv(V, BV))
    fused_recurrent_fwd_kernel[grid](
        q=s["q"], k=s["k"], v=s["v"], g=s.get("g", dummy), g_gamma=dummy, gk=s.get("gk", dummy), gv=dummy,
        beta=s.get("beta", dummy), initial_state=s["h0"], cu_seqlens=dummy, o=s["o"], final_state=s["ht"],
        g_dtype=code("g"), g_gamma_dtype=0, gk_dtype=code("gk"), gv_dtype=0, beta_dtype=code("beta"),
        initial_state_dtype=code("h0"), cu_seqlens_dtype=0,
        scale=K ** -0.5, T=T, H=H, HV=H, K=K, V=V,
        output_final_state=1, reverse=0, use_qk_l2norm=int(delta), beta_sigmoid=0, allow_neg_eigval=0,
        BK=triton.next_power_of_2(K), BV=BV, STATE_V_FIRST=False, DELTA_RULE=delta,
        num_warps=num_warps, num_stages=1)


def graph_time_us(fn, replays=20, repeats=5):
    """Median CUDA-event time of one replay of a graph of fn's launches: no launch overhead inside."""
    fn()  # compile
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replays)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--prompt", action="store_true", help="also time T=64 (a short prompt)")
    args = p.parse_args()
    rows = ["| op | B | T | K=V | BV | warps | µs per call |", "|---|---|---|---|---|---|---|"]
    best = {}
    for delta, T, B, K in itertools.product([True, False], [1, 64] if args.prompt else [1], [1, 32], [64, 128, 256]):
        H = 16
        sets = [make_set(B, T, H, K, K, delta) for _ in range(4)]  # 4 x 64 MB at B=32 K=128: past L2
        results = []
        for BV, w in itertools.product([8, 16, 32, 64], [1, 2, 4, 8]):
            if K * BV // (32 * w) > 256 or BV > K:  # would spill: more than 256 state values per thread
                continue
            results.append((graph_time_us(lambda: [launch(x, B, T, H, K, K, BV, w, delta) for x in sets]) / len(sets),
                            BV, w))
        results.sort()
        name = "gated_delta_rule" if delta else "gla"
        for us, BV, w in results[:3]:
            rows.append(f"| {name} | {B} | {T} | {K} | {BV} | {w} | {us:.2f} |")
        best[(name, B, T, K)] = results[0]
        print(name, B, T, K, "best", results[:3], "worst", results[-1], flush=True)
    text = "\n".join(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
