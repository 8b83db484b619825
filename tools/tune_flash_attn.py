#!/usr/bin/env python3
"""Times launch configs of the attention kernels (triton_src/flash_attn.py) on the GPU, through Triton's JIT.

    python tools/tune_flash_attn.py [--out docs/tuning/flash_attn.md] [--kernels flash_attn_fwd,...] [--quick]

Runs flash_attn_func forward + backward (bf16, hidden 2048, causal and not) at the benchmark's shapes with the
manifest ops of fla_aot.ops.flash_attn replaced by JIT launches of the same kernels (tools/jit_launch.py). For one
kernel and one head-dim bucket at a time, each candidate config replaces the spec's launch config, and that
kernel's GPU time per step is read from torch.profiler; the table lists the fastest candidates per bucket with the
time summed over the shapes. The winners go into the _*_config functions of triton_src/flash_attn.py by hand.
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fla_aot.ops as ops  # noqa: E402
import fla_aot.ops.flash_attn as flash_attn  # noqa: E402
from tools.jit_launch import jit_runner, kernel_times_ms  # noqa: E402
from triton_src import flash_attn as flash_attn_src  # noqa: E402

HIDDEN, TOKENS = 2048, 32768
SEQLENS = (2048, 8192)


def candidates(name):
    """(label, overrides) for the kernel `name`."""
    if name == "flash_attn_fwd":
        for bm, bn, w, s in itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4]):
            yield f"BLOCK_M={bm} BLOCK_N={bn} warps={w} stages={s}", dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w,
                                                                           num_stages=s)
    elif name == "flash_attn_bwd_dkdv":
        for bm, bn, w, s in itertools.product([16, 32, 64], [64, 128], [4, 8], [2, 3]):
            yield f"BLOCK_M={bm} BLOCK_N={bn} warps={w} stages={s}", dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w,
                                                                           num_stages=s)
    elif name == "flash_attn_bwd_dq":
        for bm, bn, w, s in itertools.product([64, 128], [32, 64], [4, 8], [2, 3]):
            yield f"BLOCK_M={bm} BLOCK_N={bn} warps={w} stages={s}", dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w,
                                                                           num_stages=s)


def step_times(T, D, causal, kernel_names, steps=3):
    """Per-step GPU time (ms) of each kernel (by name) over flash_attn_func forward + backward."""
    B, H = TOKENS // T, HIDDEN // D
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def step():
        torch.autograd.grad(ops.flash_attn_func(*leaves, causal=causal), leaves, do)
    return kernel_times_ms(step, kernel_names, steps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--kernels", default="flash_attn_fwd,flash_attn_bwd_dkdv,flash_attn_bwd_dq")
    p.add_argument("--dims", default="64,128", help="head-dim buckets to tune")
    p.add_argument("--quick", action="store_true", help="one sequence length (8192)")
    args = p.parse_args()
    specs = {s.name: s for s in flash_attn_src.SPECS}
    for name in flash_attn._ops:
        flash_attn._ops[name] = jit_runner(specs[name])
    kernel_of = {s.name: s.kernel.fn.__name__ for s in flash_attn_src.SPECS}
    shapes = [(T, c) for T in ((8192,) if args.quick else SEQLENS) for c in (False, True)]
    rows = ["| kernel | D | config | " + " | ".join(f"T{T}{' causal' if c else ''} ms" for T, c in shapes)
            + " | sum |", "|---|---|---|" + "---|" * (len(shapes) + 1)]
    for name, D in itertools.product(args.kernels.split(","), [int(d) for d in args.dims.split(",")]):
        results = []
        for label, override in candidates(name):
            flash_attn._ops[name] = jit_runner(specs[name], override, {"BD": D})
            try:
                times = [step_times(T, D, c, [kernel_of[name]])[kernel_of[name]] for T, c in shapes]
            except Exception as e:  # e.g. out of shared memory or registers for this config
                print(f"{name} D={D} {label}: failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            results.append((sum(times), label, times))
            print(f"{name} D={D} {label}: " + " ".join(f"{t:.3f}" for t in times), flush=True)
        flash_attn._ops[name] = jit_runner(specs[name])
        results.sort()
        for total, label, times in results[:4]:
            rows.append(f"| {name} | {D} | {label} | " + " | ".join(f"{t:.3f}" for t in times) + f" | {total:.3f} |")
    text = "\n".join(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
