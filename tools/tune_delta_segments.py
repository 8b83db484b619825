#!/usr/bin/env python3
"""Times the delta rules' state passes split into segments (fla_aot.ops.chunk_delta.SPLIT_SEGMENTS) against the
single pass, with the compiled ops of the installed package (no JIT), on a GPU:

    python tools/tune_delta_segments.py [--out table.md] [--segments 2,4,8,16] [--shapes 1x32768,2x8192]

At B=1 (T=32768, H=16, K=V=128) the state pass runs 512 chunks one after another in each of 16 heads x 8 V-slices;
each chunk waits on the last, so the pass is latency bound (1.28 ms on an H100, about 90 % of the forward; the
backward's pass another 1.7 ms). The split (see chunk_delta.py) runs a segment's chunks once over a state widened
by K identity columns to get its affine map, chains the segments' starts, and runs them again from the true
starts: three passes of the work of one, over SPLIT_SEGMENTS times the programs. If it wins, SPLIT_SEGMENTS gets
the winning count (the split only applies where _narrow holds: the batch alone leaves SMs idle).

Each row: the forward's w, u and state pass (chunk_delta._states) or the backward's state pass
(chunk_delta._bwd_state), median CUDA-event ms, and the relative error of the split's states (state gradients)
against the single pass's. The interpreter tests (tests/test_interpreter_chunk_delta.py) check the split itself.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import _harness as h  # noqa: E402  (benchmarks/: the CUDA-event timer)
import fla_aot.ops.chunk_delta as chunk_delta  # noqa: E402
from fla_aot.ops.chunk import _tables  # noqa: E402


def event_ms(fn):
    return h.event_time_per_call(fn, n=1, repeats=10, warmup=1) * 1e3


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--segments", default="2,4,8,16", help="segments per sequence to try")
    p.add_argument("--shapes", default="1x32768,2x8192", help="BxT, comma-separated")
    args = p.parse_args()
    ops = chunk_delta._ops
    H, K = 16, 128
    scale = K ** -0.5
    rows = ["| B | T | pass | segments | ms | single / split | rel. err |", "|---|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        B, T = map(int, shape.split("x"))
        gen = torch.Generator(device="cuda").manual_seed(0)

        def randn(*size):
            return torch.randn(*size, device="cuda", generator=gen)
        k = F.normalize(randn(B, T, H, K), dim=-1).to(torch.bfloat16)
        q, v, do = (randn(B, T, H, K).to(torch.bfloat16) for _ in range(3))
        beta = torch.rand(B, T, H, device="cuda", generator=gen).to(torch.bfloat16)
        g = F.logsigmoid(randn(B, T, H)) / 16
        h0, dht = randn(B, H, K, K), randn(B, H, K, K)
        tabs = _tables((T,) * B, H, k.device, split=False)
        Ai, gcum = ops["chunk_delta_solve"](k, beta, g, tabs.chunks)
        (dv_local,) = ops["chunk_delta_bwd_dv_local"](q, k, gcum, do, tabs.chunks, scale)

        def forward():
            return chunk_delta._states(k, v, beta, Ai, gcum, h0, tabs, False, True)

        def backward(w):
            return chunk_delta._bwd_state(q, k, w, gcum, do, dv_local, dht, tabs, scale, False, True)

        single, w = {}, forward()[0]
        for segments in [1] + [int(s) for s in args.segments.split(",")]:
            chunk_delta.SPLIT_SEGMENTS = segments
            fwd_states, bwd_states = forward()[1], backward(w)[0]
            times = event_ms(forward), event_ms(lambda: backward(w))
            if segments == 1:
                single = {"forward": (times[0], fwd_states), "backward": (times[1], bwd_states)}
            for name, t, states in (("forward", times[0], fwd_states), ("backward", times[1], bwd_states)):
                t1, want = single[name]
                rows.append(f"| {B} | {T} | {name} | {segments} | {t:.3f} | {t1 / t:.2f} | {rel(states, want):.1e} |")
                print(rows[-1], flush=True)
        chunk_delta.SPLIT_SEGMENTS = 1
    text = "\n".join(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
