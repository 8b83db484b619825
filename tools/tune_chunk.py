#!/usr/bin/env python3
"""Times launch configs of the chunk kernels (triton_src/chunk*.py) on the GPU, through Triton's JIT.

    python tools/tune_chunk.py [--out docs/tuning/chunk.md] [--kernels chunk_gla_scan,...] [--no-split] [--fixup]
    python tools/tune_chunk.py --breakdown gla      # the GPU time of each kernel, frozen configs
    python tools/tune_chunk.py --breakdown gla --aot  # the same for the installed package's cubins (what ships)
    python tools/tune_chunk.py --streams [gla delta ...]  # end to end, installed cubins: one stream against two

Runs chunk_simple_gla (gate g) or, for GLA's kernels, chunk_gla, for the delta rule's, chunk_gated_delta_rule,
forward + backward (bf16, H=16, K=V=128) at the benchmark shapes B=8 T=2048, B=2 T=8192 and B=1 T=32768 with the manifest ops of fla_aot.ops.chunk replaced by
JIT launches of the same kernels, bound by name from the spec as the C++ dispatcher binds them. For one kernel (and, for the
scan, one WRITE_O mode) at a time, each candidate config replaces the spec's launch config, and that kernel's
GPU time per step is read from torch.profiler (host overhead excluded). Also times the segment split
(fla_aot.ops.chunk.SEGMENTS_PER_SM). The winners go into the _*_config functions of triton_src/ by hand.
"""
import argparse
import itertools
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fla_aot.ops as ops  # noqa: E402
import fla_aot.ops.chunk as chunk  # noqa: E402
import fla_aot.ops.chunk_delta as chunk_delta  # noqa: E402
import fla_aot.ops.utils as utils  # noqa: E402
from benchmarks._harness import event_time_per_call  # noqa: E402
from tools.jit_launch import jit_runner, kernel_times_ms  # noqa: E402
from triton_src import chunk as chunk_src, chunk_delta as chunk_delta_src, chunk_gla as chunk_gla_src  # noqa: E402

SHAPES = [(8, 2048), (2, 8192), (1, 32768)]
SPECS = chunk_src.SPECS + chunk_gla_src.SPECS + chunk_delta_src.SPECS
OPS_AOT = {**chunk._ops, **chunk_delta._ops}  # the installed cubins, before any is swapped for a JIT launch
STREAM_OPS = ["gla", "simple_gla", "delta", "delta_rule"]  # what --streams times (_op_calls)
SPANS = [None, 30.0, -1.0]  # GLA's intra kernels: the frozen SPAN, and two others (candidates)


def install(name, runner):
    (chunk_delta._ops if name in chunk_delta._ops else chunk._ops)[name] = runner


def family(name):
    """The op whose forward + backward runs the kernel `name`."""
    if name.startswith("chunk_gla") or name in ("chunk_fixup", "chunk_gk_cumsum"):  # fixup: GLA corrects its splits
        return "gla"
    return "delta" if name.startswith("chunk_delta") else "simple_gla"


def candidates(name):
    """(label, filter on the variant's constexprs, overrides) for the kernel `name`."""
    if name == "chunk_scan":
        for write_o, bv, w, s in itertools.product([True, False], [32, 64], [4, 8], [1, 2, 3]):
            yield (f"WRITE_O={int(write_o)} BV={bv} warps={w} stages={s}", {"WRITE_O": write_o},
                   dict(BV=bv, num_warps=w, num_stages=s))
    elif name == "chunk_bwd_dqk":
        for bv, w, s in itertools.product([32, 64], [4, 8], [1, 2, 3]):
            yield f"BK=128 BV={bv} warps={w} stages={s}", {}, dict(BK=128, BV=bv, num_warps=w, num_stages=s)
    elif name == "chunk_bwd_dv":
        for bk, bv, w, s in itertools.product([64, 128], [32, 64], [4, 8], [1, 2]):
            yield f"BK={bk} BV={bv} warps={w} stages={s}", {}, dict(BK=bk, BV=bv, num_warps=w, num_stages=s)
    elif name == "chunk_gla_intra":  # TF32 timed and left off (docs/tuning/chunk.md)
        # SPAN=30 (the benchmark's gates: 16-row blocks on one reference row, not whole chunks) and SPAN=-1 (every
        # pair on the pairing tree), for comparison; 8 warps and 2 stages lost at every BK (H200, December 2026)
        for span, bk, w, s in itertools.product(SPANS, [16, 32, 64], [4], [1]):
            yield (f"BK={bk} warps={w} stages={s}" + ("" if span is None else f" SPAN={span:g}"), {},
                   dict(BK=bk, num_warps=w, num_stages=s, **({} if span is None else dict(SPAN=span))))
    elif name == "chunk_gla_bwd_intra":
        # TF32 cost the tree's products 9-11% end to end; the one-reference form has two products, and TF32 would
        # take dg's error from 1.1e-2 to 1.4e-3 (float64 replay, docs/tuning/chunk.md)
        for tf32, span, bk in itertools.product([False, True], SPANS, [16, 32, 64]):
            yield (f"TF32={int(tf32)} BK={bk} warps=4 stages=1" + ("" if span is None else f" SPAN={span:g}"), {},
                   dict(TF32=tf32, BK=bk, num_warps=4, num_stages=1, **({} if span is None else dict(SPAN=span))))
    elif name in ("chunk_gla_fwd_o", "chunk_gla_bwd_inter", "chunk_gla_bwd_dv"):
        # BV=128: one program per chunk reads q (or k) and the gates once instead of once per slice of V
        for bk, bv, w, s in itertools.product([64, 128], [32, 64, 128], [4, 8], [1, 2, 3]):
            yield f"BK={bk} BV={bv} warps={w} stages={s}", {}, dict(BK=bk, BV=bv, num_warps=w, num_stages=s)
    elif name in ("chunk_delta_state", "chunk_delta_bwd_state"):
        for bv, w, s in itertools.product([16, 32, 64], [2, 4, 8], [1, 2, 3]):
            yield f"BV={bv} warps={w} stages={s}", {}, dict(BV=bv, num_warps=w, num_stages=s)
    elif name == "chunk_delta_solve":
        for bk, w, s in itertools.product([32, 64, 128], [1, 2, 4], [1, 2]):
            yield f"BK={bk} warps={w} stages={s}", {}, dict(BK=bk, num_warps=w, num_stages=s)
    elif name in ("chunk_delta_fwd_o", "chunk_delta_bwd_dv_local"):
        # BV=128: the chunk's q k^T once per program instead of once per slice of V
        for bk, bv, w, s in itertools.product([64, 128], [64, 128], [4, 8], [2, 3]):
            yield f"BK={bk} BV={bv} warps={w} stages={s}", {}, dict(BK=bk, BV=bv, num_warps=w, num_stages=s)
    elif name in ("chunk_delta_wu", "chunk_delta_bwd_wy"):
        # 2 warps: fla-core's wy backward miscompiles on Hopper with 4 (fla-org/flash-linear-attention#984); the
        # state passes and dqkw have 2-warp candidates too, for the same reason
        for bk, bv, w, s in itertools.product([64, 128], [32, 64], [2, 4, 8], [1, 2, 3]):
            yield f"BK={bk} BV={bv} warps={w} stages={s}", {}, dict(BK=bk, BV=bv, num_warps=w, num_stages=s)
    elif name == "chunk_delta_bwd_dqkw":
        for bk, bv, w, s in itertools.product([64, 128], [32, 64], [2, 4, 8], [1, 2]):
            yield f"BK={bk} BV={bv} warps={w} stages={s}", {}, dict(BK=bk, BV=bv, num_warps=w, num_stages=s)
    elif name == "chunk_fixup":  # memory-bound: a state tile read, corrected and written per program
        for bv, w in itertools.product([16, 32, 64, 128], [4, 8]):
            yield f"BV={bv} warps={w}", {}, dict(BV=bv, num_warps=w, num_stages=1)
    elif name == "chunk_gk_cumsum":  # memory-bound: the gate read once, its sums written once
        for bk, w in itertools.product([16, 32, 64, 128], [1, 2, 4, 8]):
            yield f"BK={bk} warps={w}", {}, dict(BK=bk, num_warps=w, num_stages=1)
    elif name == "chunk_gla_scan":
        for bv, w, s in itertools.product([32, 64, 128], [4, 8], [1, 2, 3]):
            yield f"BV={bv} warps={w} stages={s}", {}, dict(BV=bv, num_warps=w, num_stages=s)


def _op_calls(B, T, op):
    """(forward, forward + backward) of chunk_simple_gla, chunk_gla, chunk_gated_delta_rule ("delta") or
    chunk_delta_rule ("delta_rule") on random inputs (bf16, H=16, K=V=128)."""
    H, K = 16, 128
    torch.manual_seed(0)
    leaves = [torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    delta = op in ("delta", "delta_rule")
    if delta:
        leaves[1] = F.normalize(leaves[1].float(), dim=-1).to(torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H, *([K] if op == "gla" else []), device="cuda"))
    beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16)
    leaves = [x.requires_grad_() for x in leaves + [g, beta]]
    if op == "delta_rule":
        del leaves[3]
    elif not delta:
        del leaves[4]
    do = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
    fn = {"delta": ops.chunk_gated_delta_rule, "delta_rule": ops.chunk_delta_rule, "gla": ops.chunk_gla,
          "simple_gla": ops.chunk_simple_gla}[op]

    def forward():
        return fn(*leaves)[0]

    def step():
        torch.autograd.grad(forward(), leaves, do)
    return forward, step


def step_times(B, T, kernel_names, steps=3, op="simple_gla"):
    """Per-step GPU time of each kernel (by name) over forward + backward of chunk_simple_gla (or chunk_gla,
    chunk_gated_delta_rule)."""
    return kernel_times_ms(_op_calls(B, T, op)[1], kernel_names, steps)


def stream_times(ops_to_time, jit_kernel=None, only=None):
    """Wall time (CUDA events: the lower of two interleaved medians of 7 x 10 calls) of forward and forward +
    backward of each op at each shape, with the independent kernels on one stream and on two
    (fla_aot.ops.utils.CONCURRENT): markdown rows. With jit_kernel, that kernel runs through the JIT with each of
    its candidate configs in turn (a kernel that overlaps another may want a config that leaves it room)."""
    rows = ["| op | shape | config | pass | one stream ms | two streams ms | ratio |", "|---|---|---|---|---|---|---|"]
    specs = {s.name: s for s in SPECS}
    configs = [("frozen", None)]
    if jit_kernel:
        configs = [(f"{jit_kernel} {label}", (when, override)) for label, when, override in candidates(jit_kernel)
                   if only is None or re.search(only, label)]
    for op, (B, T), (config, cand) in itertools.product(ops_to_time, SHAPES, configs):
        if cand:
            install(jit_kernel, jit_runner(specs[jit_kernel], cand[1], cand[0]))
        forward, step = _op_calls(B, T, op)
        for label, fn in (("forward", forward), ("forward + backward", step)):
            times = {}
            try:
                for concurrent in (False, True, False, True):  # interleaved: drift hits both alike
                    utils.CONCURRENT = concurrent
                    times.setdefault(concurrent, []).append(event_time_per_call(fn, n=10, repeats=7, warmup=3) * 1e3)
            except Exception as e:  # e.g. out of shared memory or registers for this config
                print(f"{op} B{B} T{T} {config}: failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                break
            one, two = min(times[False]), min(times[True])
            rows.append(f"| {op} | B{B} T{T} | {config} | {label} | {one:.3f} | {two:.3f} | {one / two:.3f}x |")
            print(rows[-1], flush=True)
    utils.CONCURRENT = True
    if jit_kernel:
        install(jit_kernel, OPS_AOT[jit_kernel])
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--kernels", default="chunk_scan,chunk_bwd_dqk,chunk_bwd_dv")
    p.add_argument("--no-split", action="store_true", help="skip timing the segment split")
    p.add_argument("--fixup", action="store_true",
                   help="time the split passes' two fix-ups (fla_aot.ops.chunk.SPLIT_FIXUP) over simple_gla and gla")
    p.add_argument("--breakdown", default=None, choices=["simple_gla", "gla", "delta"],
                   help="only list the GPU time of every kernel of this op's forward + backward, per shape")
    p.add_argument("--aot", action="store_true",
                   help="with --breakdown: time the installed cubins, and torch's own kernels besides, instead of "
                        "JIT launches (a kernel compiled without what Triton's JIT specialises on differs)")
    p.add_argument("--streams", nargs="*", default=None, choices=STREAM_OPS,
                   help="only time these ops (default: all four) end to end, installed cubins, with their independent "
                        "kernels on one stream and on two; with --kernels naming one kernel, that one through the JIT "
                        "in each of its candidate configs")
    p.add_argument("--only", default=None, help="with --streams: the candidate configs whose label matches this regex")
    args = p.parse_args()
    if args.streams is not None:
        text = "\n".join(stream_times(args.streams or STREAM_OPS,
                                       args.kernels if "," not in args.kernels else None, args.only))
        if args.out:
            Path(args.out).write_text(text + "\n")
        return
    specs = {s.name: s for s in SPECS}
    if not (args.breakdown and args.aot):
        for name in list(chunk._ops) + list(chunk_delta._ops):
            install(name, jit_runner(specs[name]))
    kernel_of = {s.name: s.kernel.fn.__name__ for s in SPECS}
    if args.breakdown:  # where the time goes, with the frozen configs
        names = None if args.aot else list(kernel_of.values())
        per_shape = [step_times(B, T, names, op=args.breakdown) for B, T in SHAPES]
        rows = ["| kernel | " + " | ".join(f"B{B} T{T} ms" for B, T in SHAPES) + " |", "|---|" + "---|" * len(SHAPES)]
        listed = set().union(*per_shape)
        for kernel in sorted(listed, key=lambda k: -sum(t.get(k, 0.0) for t in per_shape)):
            if any(t.get(kernel) for t in per_shape):
                rows.append(f"| {kernel[:80]} | " + " | ".join(f"{t.get(kernel, 0.0):.3f}" for t in per_shape) + " |")
        rows.append("| all | " + " | ".join(f"{sum(t.values()):.3f}" for t in per_shape) + " |")
        print("\n".join(rows))
        return
    rows = ["| kernel | config | " + " | ".join(f"B{B} T{T} ms" for B, T in SHAPES) + " | sum |",
            "|---|---|" + "---|" * (len(SHAPES) + 1)]

    # segment split: the whole forward + backward
    for spm in [] if args.no_split else [1, 2, 4]:
        chunk.SEGMENTS_PER_SM = spm
        chunk._TABLES.clear()
        times = [sum(step_times(B, T, list(kernel_of.values())).values()) for B, T in SHAPES]
        rows.append(f"| all (fwd+bwd) | SEGMENTS_PER_SM={spm} | " + " | ".join(f"{t:.3f}" for t in times)
                    + f" | {sum(times):.3f} |")
        print(rows[-1], flush=True)
    chunk.SEGMENTS_PER_SM = 1
    chunk._TABLES.clear()

    frozen_fixup = dict(chunk.SPLIT_FIXUP)
    # split passes: a second scan, or the first scan's states corrected (the whole forward + backward)
    for op, mode in itertools.product(["simple_gla", "gla"] if args.fixup else [], ["rescan", "correct"]):
        chunk.SPLIT_FIXUP = dict.fromkeys(frozen_fixup, mode)
        times = [sum(step_times(B, T, list(kernel_of.values()), op=op).values()) for B, T in SHAPES]
        rows.append(f"| {op} (fwd+bwd) | SPLIT_FIXUP={mode} | " + " | ".join(f"{t:.3f}" for t in times)
                    + f" | {sum(times):.3f} |")
        print(rows[-1], flush=True)
    chunk.SPLIT_FIXUP = frozen_fixup

    for name in filter(None, args.kernels.split(",")):
        results = []
        for label, when, override in candidates(name):
            install(name, jit_runner(specs[name], override, when))
            try:
                times = [step_times(B, T, [kernel_of[name]], op=family(name))[kernel_of[name]]
                         for B, T in SHAPES]
            except Exception as e:  # e.g. out of shared memory or registers for this config
                print(f"{name} {label}: failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            results.append((sum(times), label, times))
            print(f"{name} {label}: " + " ".join(f"{t:.3f}" for t in times), flush=True)
        install(name, jit_runner(specs[name]))
        results.sort()
        for total, label, times in results[:4]:
            rows.append(f"| {name} | {label} | " + " | ".join(f"{t:.3f}" for t in times) + f" | {total:.3f} |")
    text = "\n".join(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
