"""Turns manifest.json (written by tools/compile_kernels.py) into torch ops at import.

For each op it defines the schema with its C++ CUDA kernel (fla_aot._C), and registers a fake
implementation (shapes only) so torch.compile(fullgraph=True) traces the op without running it.
"""
import json
import os

import torch

from fla_aot._manifest_rules import check_args, output_shapes, schema
from fla_aot.ops.utils import forward_only

try:
    from fla_aot import _C
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError("fla_aot's C++ extension is not built: install the package with "
                      "`pip install --no-build-isolation .` (see README.md)") from e

KERNELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")

with open(os.path.join(KERNELS_DIR, "manifest.json")) as f:
    MANIFEST = json.load(f)


def _make_fake(entry):
    def fake(*args):
        sym = check_args(entry, args)
        device = next(x.device for x in args if isinstance(x, torch.Tensor))
        outs = tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in output_shapes(entry, args, sym))
        return outs if len(outs) > 1 else outs[0]
    fake.__name__ = f"{entry['name']}_fake"
    return fake


def _register(entry):
    """Registers one manifest op; returns the function the public ops call to run it on CUDA tensors."""
    index = _C.register_op(entry, schema(entry), KERNELS_DIR)
    torch.library.register_fake(f"fla_aot::{entry['name']}")(_make_fake(entry))
    torch_op = getattr(torch.ops.fla_aot, entry["name"]).default
    launch, is_compiling = _C.launch, torch.compiler.is_compiling
    several = len(entry["outputs"]) > 1  # else torch.ops returns a bare tensor: made a 1-tuple like launch's

    def run(*args):
        # Eagerly, straight into C++ (a few microseconds less per call than the dispatcher). While
        # torch.compile traces, for tensor subclasses and when an input requires grad (launch returns
        # None), through torch.ops, with a backward that raises until the op has one.
        out = None if is_compiling() else launch(index, *args)
        if out is None:
            out = torch_op(*args)
            out = forward_only(entry["name"], out if several else (out,), args)
        return out

    run.__name__ = entry["name"]
    return run


OPS = {name: _register(entry) for name, entry in MANIFEST["ops"].items()}
