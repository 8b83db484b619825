#!/usr/bin/env python3
"""Tries forms of the delta rule's backward kernels on the GPU through Triton's JIT, several in one run: for each,
every kernel's outputs against its float64 transcription (tests/chunk_delta_kernel_refs.py) at awkward head dims and
each V slicing of the state passes, then each kernel's GPU time in chunk_delta_rule forward + backward (bf16, H=16,
K=V=128) at the benchmark shapes.

    python tools/check_delta_forms.py --form committed= \\
        --form pipelined_dqkw=chunk_delta_bwd_dqkw:num_stages=2 \\
        --form float32=32bit:dv_new,32bit:dw --kernels my_kernels.py --form mine=chunk_delta_bwd_dqkw:kernel=my_dqkw

A form is a comma list of edits to triton_src/chunk_delta.py's specs: `16bit:NAME` / `32bit:NAME` stores the
tensor NAME (dv_new, dw: an output of one kernel, read by others) in the inputs' 16-bit dtype / in float32 wherever
it appears, `KERNEL:KEY=VALUE` overrides a launch config entry (BK, BV, num_warps, num_stages) of KERNEL's every
variant, and `KERNEL:kernel=FUNC` launches the @triton.jit function FUNC of the file named by --kernels instead of
KERNEL's body (same arguments). Besides the small awkward cases, each form runs one sequence at the benchmark's
size (T=2048, 16 heads, K=V=128), where a fault can show that the small cases miss; --no-check skips all that and
only times. Through the JIT, K=256 runs out of shared memory where the build's variants do not; those cases report
the error. The times are each kernel's GPU time, not end to end: with every kernel launched through the JIT the
host's launches would dominate (H200: 1.8 ms a forward at B=8 T=2048 against 0.48 for the cubins). Found this way:
docs/tuning/chunk_delta.md (16-bit dv_new and dw, kernel by kernel).
"""
import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fla_aot.ops.chunk_delta as chunk_delta  # noqa: E402
from tests import test_gpu_chunk_delta as gpu_tests  # noqa: E402
from tools.jit_launch import jit_runner, kernel_times_ms  # noqa: E402
from tools.kernel_spec import DtypeAxis  # noqa: E402
from tools.tune_chunk import SHAPES, _op_calls  # noqa: E402
from triton_src import chunk_delta as chunk_delta_src  # noqa: E402

HEAD_DIMS = [(8, 8), (16, 100), (32, 48), (60, 60), (128, 128), (256, 64), (64, 256)]
SLICES = [64, 16]


def _retyped(spec, name, sixteen_bit):
    """spec with the tensor `name` (argument or output) in the dtype of its first DtypeAxis tensor, or in float32."""
    axis = next(ax.tensor for ax in spec.axes if isinstance(ax, DtypeAxis))
    arg = dict(dtypes=None, same_dtype_as=axis) if sixteen_bit else dict(dtypes=["float32"], same_dtype_as=None)
    out = dict(dtype=None, dtype_of=axis) if sixteen_bit else dict(dtype="float32", dtype_of=None)
    args = [dataclasses.replace(a, **arg) if a.name == name else a for a in spec.args]
    outs = [dataclasses.replace(o, **out) if o.name == name else o for o in spec.outputs]
    return dataclasses.replace(spec, args=args, outputs=outs)


def parse_form(text, kernels=None):
    """'16bit:dv_new,chunk_delta_bwd_wy:BK=64' -> ({kernel: spec}, {kernel: overrides}); `kernels`: the module of
    alternative bodies."""
    specs = {s.name: s for s in chunk_delta_src.SPECS}
    overrides = {}
    for edit in filter(None, text.split(",")):
        head, _, rest = edit.partition(":")
        key, _, value = rest.partition("=")
        if head in ("16bit", "32bit"):
            specs = {n: _retyped(s, rest, head == "16bit") for n, s in specs.items()}
        elif head in specs and key == "kernel" and hasattr(kernels, value):
            specs[head] = dataclasses.replace(specs[head], kernel=getattr(kernels, value))
        elif head in specs and value.isdigit():
            overrides.setdefault(head, {})[key] = int(value)
        else:
            raise SystemExit(f"bad edit {edit!r}: expected 16bit:NAME, 32bit:NAME, KERNEL:KEY=VALUE or "
                             f"KERNEL:kernel=FUNC (FUNC in --kernels) with KERNEL one of {sorted(specs)}")
    return specs, overrides


def install(specs, overrides):
    for name, spec in specs.items():
        chunk_delta._ops[name] = jit_runner(spec, overrides.get(name))


def _cases():
    """(label, V slices of the state passes or None for the op's own choice, inputs)."""
    for (K, V), slices, dtype in [(kv, s, torch.bfloat16) for kv in HEAD_DIMS for s in SLICES] + [
            ((32, 48), 64, torch.float16)]:
        yield (f"K={K} V={V} slices={slices} {str(dtype).removeprefix('torch.')}", slices,
               gpu_tests.make_inputs(K=K, V=V, dtype=dtype, **gpu_tests.TRANSCRIPTION_INPUTS))
    yield "T=2048 H=16 K=V=128", None, gpu_tests.make_inputs(**gpu_tests.AT_SCALE_INPUTS)


def check():
    """Worst error per kernel and output over the cases, and the cases that failed (error > 1e-3 or an exception)."""
    worst, failed = {}, []
    slicing = chunk_delta._slicing
    for label, slices, kw in _cases():
        if slices is not None:
            chunk_delta._slicing = lambda tabs, v, s=slices: (s < 64, s < 32)
        try:
            errs = gpu_tests.transcription_errors(kw)
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
    p.add_argument("--kernels", type=Path, help="a file of alternative @triton.jit bodies (KERNEL:kernel=FUNC)")
    p.add_argument("--no-check", action="store_true", help="time the forms without checking their outputs")
    args = p.parse_args()
    kernels = None
    if args.kernels:
        spec = importlib.util.spec_from_file_location(args.kernels.stem, args.kernels)
        kernels = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kernels)
    for form in args.form:
        name, _, edits = form.partition("=")
        install(*parse_form(edits, kernels))
        print(f"== {name}", flush=True)
        if not args.no_check:
            worst, failed = check()
            print(f"   {len(failed)} failed; worst " + " ".join(f"{k}={v:.1e}" for k, v in sorted(worst.items())))
            for line in failed:
                print("   FAIL", line)
        for B, T in SHAPES:
            times = kernel_times_ms(_op_calls(B, T, "delta_rule")[1], None)
            ours = {k.removeprefix("chunk_delta_").removesuffix("_kernel"): v for k, v in times.items()
                    if k.startswith("chunk_delta_") or hasattr(kernels, k)}  # the --kernels bodies too
            print(f"   B{B} T{T} ms: all={sum(ours.values()):.3f} "
                  + " ".join(f"{k}={v:.3f}" for k, v in sorted(ours.items())), flush=True)


if __name__ == "__main__":
    main()
