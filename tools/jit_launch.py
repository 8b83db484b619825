"""Launching a spec's kernel through Triton's JIT, bound by name exactly as the C++ dispatcher binds it from the
manifest: the tuning tools swap these in for the manifest ops to time candidate launch configs."""
import math

import torch
from torch.profiler import ProfilerActivity, profile

from fla_aot._manifest_rules import DTYPES, check_args, output_shapes, pick_variant
from tools.kernel_spec import DTYPE_CODES

ARCH = "sm_90"
CODE_OF = {DTYPES[name]: code for name, code in DTYPE_CODES.items()}


def jit_runner(spec, override=None, when=None):
    """A stand-in for OPS[spec.name] launching spec.kernel through Triton's JIT; `override` replaces the
    launch config of the variants whose constexprs match `when`."""
    entry = spec.manifest_entry()
    entry["variants"] = {ARCH: spec.variants()}
    dummy = torch.zeros(1, device="cuda")

    def run(*args):
        sym = check_args(entry, args, arch=ARCH)
        variant = pick_variant(entry, args, sym, ARCH)
        outs = [torch.zeros(shape, dtype=dtype, device="cuda") if o["zeros"] else
                torch.empty(shape, dtype=dtype, device="cuda")
                for o, (shape, dtype) in zip(entry["outputs"], output_shapes(entry, args, sym))]
        params = {}
        for p in entry["params"]:
            kind, i = p["kind"], p["index"]
            params[p["name"]] = {
                "tensor": lambda: dummy if args[i] is None else args[i],
                "output": lambda: outs[i] if outs[i].numel() else dummy,
                "dtype_code": lambda: 0 if args[i] is None else CODE_OF[args[i].dtype],
                "symbol": lambda: sym[i],
                "float": lambda: float(args[i]),
                "bool": lambda: int(bool(args[i])),
            }[kind]()
        constexprs = dict(variant["constexprs"])
        options = dict(variant["options"])
        if override and all(constexprs.get(k) == v for k, v in (when or {}).items()):
            for k, v in override.items():
                (options if k in options else constexprs)[k] = v
        grid = [math.prod(-(-sym[s] // div) for s, div in dim) for dim in spec._grid(constexprs) if dim]
        spec.kernel[tuple(grid)](**params, **constexprs, **options)
        return tuple(outs)
    return run


def kernel_times_ms(step, kernel_names, steps=3):
    """GPU time per call of `step` (after one warm-up call) of each named kernel (every kernel: None), summed over
    its launches, from torch.profiler: ms by name."""
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals = {}
    for ev in prof.key_averages():
        totals[ev.key] = totals.get(ev.key, 0.0) + ev.device_time_total
    if kernel_names is None:
        kernel_names = [n for n, t in totals.items() if t > 0]
    return {n: totals.get(n, 0.0) / steps / 1e3 for n in kernel_names}
