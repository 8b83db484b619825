#!/usr/bin/env python3
"""Tries forms of the delta rule's backward kernels on the GPU through Triton's JIT, several in one run: for each,
every kernel's outputs against its float64 transcription (tests/chunk_delta_kernel_refs.py) at awkward head dims and
each V slicing of the state passes, then each kernel's GPU time in chunk_delta_rule forward + backward (bf16, H=16,
K=V=128) at the benchmark shapes.

    python tools/check_delta_forms.py --form committed= \\
        --form wy_bk64="16bit:dv_new,16bit:dw,chunk_delta_bwd_wy:BK=64"

A form is a comma list of edits to triton_src/chunk_delta.py's specs: `16bit:NAME` stores the float32 tensor NAME
(dv_new, dw: an output of one kernel, read by others) in the inputs' 16-bit dtype wherever it appears, and
`KERNEL:KEY=VALUE` overrides a launch config entry (BK, BV, num_warps, num_stages) of KERNEL's every variant. A
form that needs a different kernel body is an edit of triton_src/ itself, tried against `committed=` in the same
run. Through the JIT, K=256 runs out of shared memory where the build's variants do not; those cases report the
error. Found this way: docs/tuning/chunk_delta.md (16-bit dv_new and dw, kernel by kernel).
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fla_aot.ops.chunk_delta as chunk_delta  # noqa: E402
from tests import chunk_delta_kernel_refs as kernel_refs  # noqa: E402
from tests import test_gpu_chunk_delta as gpu_tests  # noqa: E402
from tools.jit_launch import jit_runner, kernel_times_ms  # noqa: E402
from tools.kernel_spec import DtypeAxis  # noqa: E402
from tools.tune_chunk import SHAPES, _op_calls  # noqa: E402
from triton_src import chunk_delta as chunk_delta_src  # noqa: E402

HEAD_DIMS = [(8, 8), (16, 100), (32, 48), (60, 60), (128, 128), (256, 64), (64, 256)]
SLICES = [64, 16]


def _sixteen_bit(spec, name):
    """spec with the float32 tensor `name` (argument or output) in the dtype of its first DtypeAxis tensor."""
    axis = next(ax.tensor for ax in spec.axes if isinstance(ax, DtypeAxis))
    args = [dataclasses.replace(a, dtypes=None, same_dtype_as=axis) if a.name == name else a for a in spec.args]
    outs = [dataclasses.replace(o, dtype=None, dtype_of=axis) if o.name == name else o for o in spec.outputs]
    return dataclasses.replace(spec, args=args, outputs=outs)


def parse_form(text):
    """'16bit:dv_new,chunk_delta_bwd_wy:BK=64' -> ({kernel: spec}, {kernel: overrides})."""
    specs = {s.name: s for s in chunk_delta_src.SPECS}
    overrides = {}
    for edit in filter(None, text.split(",")):
        head, _, rest = edit.partition(":")
        if head == "16bit":
            specs = {n: _sixteen_bit(s, rest) for n, s in specs.items()}
        elif head in specs and "=" in rest:
            key, value = rest.split("=")
            overrides.setdefault(head, {})[key] = int(value)
        else:
            raise SystemExit(f"bad edit {edit!r}: expected 16bit:NAME or KERNEL:KEY=VALUE with KERNEL one of "
                             f"{sorted(specs)}")
    return specs, overrides


def install(specs, overrides):
    for name, spec in specs.items():
        chunk_delta._ops[name] = jit_runner(spec, overrides.get(name))


def check():
    """Worst error per kernel and output over the cases, and the cases that failed (error > 1e-3 or an exception)."""
    worst, failed = {}, []
    slicing = chunk_delta._slicing
    cases = [(kv, s, torch.bfloat16) for kv in HEAD_DIMS for s in SLICES] + [((32, 48), 64, torch.float16)]
    for (K, V), slices, dtype in cases:
        label = f"K={K} V={V} slices={slices} {str(dtype).removeprefix('torch.')}"
        chunk_delta._slicing = lambda tabs, v, s=slices: (s < 64, s < 32)
        kw = gpu_tests.make_inputs(B=1, T=200, H=2, HV=4, K=K, V=V, dtype=dtype, gate="strong", lengths=(70, 0, 130))
        try:
            errs = kernel_refs.compare(kernel_refs.record_backward(lambda: gpu_tests._fwd_bwd(kw)))
        except Exception as e:  # e.g. out of shared memory through the JIT
            failed.append(f"{label}: {type(e).__name__}: {str(e)[:100]}")
            errs = {}
        finally:
            chunk_delta._slicing = slicing
        for kernel, per_output in errs.items():
            for out, e in per_output.items():
                key = f"{kernel.removeprefix('chunk_delta_')}.{out}"
                prev = worst.get(key, 0.0)
                worst[key] = e if (e != e or e > prev) else prev  # a NaN stays
                if not e < 1e-3:
                    failed.append(f"{label}: {key} {e:.2e}")
    return worst, failed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--form", action="append", required=True, metavar="NAME=EDITS")
    args = p.parse_args()
    for form in args.form:
        name, _, edits = form.partition("=")
        install(*parse_form(edits))
        worst, failed = check()
        print(f"== {name}: {len(failed)} failed; worst " + " ".join(f"{k}={v:.1e}" for k, v in sorted(worst.items())))
        for line in failed:
            print("   FAIL", line)
        for B, T in SHAPES:
            times = kernel_times_ms(_op_calls(B, T, "delta_rule")[1], None)
            ours = {k.removeprefix("chunk_delta_").removesuffix("_kernel"): v for k, v in times.items()
                    if k.startswith("chunk_delta_")}
            print(f"   B{B} T{T} ms: all={sum(ours.values()):.3f} "
                  + " ".join(f"{k}={v:.3f}" for k, v in sorted(ours.items())), flush=True)


if __name__ == "__main__":
    main()
