"""The variant spec: how a Triton kernel becomes a torch op served from precompiled cubins.

A family module in triton_src/ declares `SPECS`, a list of OpSpec. An OpSpec names the op's
arguments with symbolic shapes ("B T H K"), its outputs, the compile-time axes to expand (dtype of a
tensor, a bucket of a head dim, a bool flag), the launch config of each variant and the grid.
`tools/compile_kernels.py` expands the axes into variants, compiles each, and writes `manifest_entry()`
plus per-variant metadata into manifest.json, which is all the C++ dispatcher reads at run time.

Kernel parameters are bound by name: a tensor argument or output passes its data pointer, `<tensor>_dtype`
passes a dtype code (0 when the tensor is absent), a shape symbol passes its value, a Float/Bool argument
its value; constexpr parameters come from the variant.
"""
import inspect
import itertools
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

TRITON_VERSION = "3.6.0"  # the one Triton the build accepts; recorded in the manifest

# The run-time dtype codes kernels receive in `<tensor>_dtype` parameters (0 = tensor absent).
DTYPE_CODES = {"float32": 1, "bfloat16": 2, "float16": 3, "int64": 4, "int32": 5}
TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32"}


def _parse_shape(shape: str):
    """"B T H K" -> [("B", 0), ...]; "N+1" -> [("N", 1)]; a number is a fixed size, a symbol bound to its own value."""
    dims = []
    for tok in shape.split():
        m = re.fullmatch(r"([A-Za-z_]\w*|\d+)(?:\+(\d+))?", tok)
        if not m:
            raise ValueError(f"bad shape token {tok!r} in {shape!r}")
        dims.append((m.group(1), int(m.group(2) or 0)))
    return dims


@dataclass
class Tensor:
    name: str
    shape: str
    dtypes: Optional[list] = None          # allowed dtypes; more than one without an axis = run-time dtype code
    same_dtype_as: Optional[str] = None    # must match that tensor's dtype
    optional: bool = False
    transposed_if: Optional[str] = None    # Bool argument that swaps the last two dims
    varlen: bool = False                   # cu_seqlens-like: when given, B must be 1


@dataclass
class Float:
    name: str


@dataclass
class Bool:
    name: str


@dataclass
class Output:
    name: str
    shape: str
    dtype_of: Optional[str] = None         # same dtype as this input tensor
    dtype: Optional[str] = None            # or a fixed dtype
    when: Optional[str] = None             # Bool argument that asks for this output (else an empty tensor)
    transposed_if: Optional[str] = None
    zeros: bool = False                    # start from zeros (the kernel accumulates into it)


@dataclass
class DtypeAxis:
    tensor: str                            # one variant per allowed dtype of this tensor


@dataclass
class BucketAxis:
    constexpr: str                         # e.g. BK
    symbol: str                            # e.g. K: the smallest bucket >= K is used
    buckets: list
    exact: bool = False                    # the symbol must equal a bucket (kernels that do not mask along it)


@dataclass
class BoolAxis:
    constexpr: str
    arg: str
    only_with: Optional[str] = None        # True only where this other BoolAxis (its constexpr) is True too: the
                                           # combination the callers never ask for is not compiled (asked, it raises)


@dataclass
class AlignedAxis:
    """Two variants: one compiled knowing every pointer is 16-byte aligned and `symbols` are multiples of
    16 (vectorised loads, as Triton's JIT would specialise), used when that holds; one for the rest."""
    symbols: list
    divisor: int = 16
    fallback: bool = True                  # False: only the aligned variant (the op's Python side guarantees it)


@dataclass
class OpSpec:
    name: str
    kernel: object                         # a triton.jit function
    args: list
    outputs: list
    axes: list
    # constexprs of the axes and dtype= (its first dtype axis' type) -> dict(extra constexprs, num_warps, num_stages)
    launch_config: Callable
    grid: list                             # up to 3 strings: products of symbols and cdiv(symbol, CONSTEXPR)
    doc: str = ""
    divisible: list = field(default_factory=list)      # (a, b): symbol a must be a multiple of symbol b
    # symbol -> symbol it equals unless a varlen tensor is given (which then binds it): N is B
    symbol_defaults: dict = field(default_factory=lambda: {"N": "B"})

    # ---- lookups -------------------------------------------------------------------------
    def arg_index(self, name):
        for i, a in enumerate(self.args):
            if a.name == name:
                return i
        raise KeyError(f"{self.name}: no argument named {name!r}")

    def tensor(self, name):
        a = self.args[self.arg_index(name)]
        assert isinstance(a, Tensor), name
        return a

    def symbols(self):
        seen = []
        for t in [a for a in self.args if isinstance(a, Tensor)] + self.outputs:
            for s, _ in _parse_shape(t.shape):
                if s not in seen:
                    seen.append(s)
        return seen

    def allowed_dtypes(self, t: Tensor):
        return self.allowed_dtypes(self.tensor(t.same_dtype_as)) if t.same_dtype_as else t.dtypes

    def _dtype_axis_of(self, name):
        """The DtypeAxis tensor that fixes `name`'s dtype at compile time, or None."""
        root = name
        while True:
            t = self.tensor(root)
            if t.same_dtype_as is None:
                break
            root = t.same_dtype_as
        return root if any(isinstance(a, DtypeAxis) and a.tensor == root for a in self.axes) else None

    # ---- variants --------------------------------------------------------------------------
    def variants(self):
        """Every combination of the axes: (key, constexprs, signature, launch options, guards, grid).

        The guards of different variants exclude each other: a request matches at most one variant."""
        choices = []
        for ax in self.axes:
            if isinstance(ax, DtypeAxis):
                choices.append([(ax, d) for d in self.tensor(ax.tensor).dtypes])
            elif isinstance(ax, BucketAxis):
                choices.append([(ax, b) for b in ax.buckets])
            elif isinstance(ax, AlignedAxis):
                choices.append([(ax, v) for v in ((True, False) if ax.fallback else (True,))])
            else:
                choices.append([(ax, v) for v in (False, True)])
        out = []
        for combo in itertools.product(*choices):
            flags = {ax.constexpr: val for ax, val in combo if isinstance(ax, BoolAxis)}
            if any(isinstance(ax, BoolAxis) and ax.only_with and val and not flags[ax.only_with] for ax, val in combo):
                continue
            constexprs, guards, dtypes, key, attrs = {}, [], {}, [], {}
            for ax, val in combo:
                if isinstance(ax, DtypeAxis):
                    dtypes[ax.tensor] = val
                    guards.append({"kind": "dtype", "arg": self.arg_index(ax.tensor), "dtype": val})
                    key.append(TRITON_TYPES[val])
                elif isinstance(ax, BucketAxis):
                    constexprs[ax.constexpr] = val
                    i = ax.buckets.index(val)
                    above = val - 1 if ax.exact else (ax.buckets[i - 1] if i else -1)
                    guards.append({"kind": "bucket", "symbol": self.symbols().index(ax.symbol),
                                   "above": above, "value": val})
                    key.append(f"{ax.constexpr}{val}")
                elif isinstance(ax, AlignedAxis):
                    key.append(f"A{ax.divisor if val else 1}")
                    syms = [self.symbols().index(s) for s in ax.symbols]
                    guards.append({"kind": "aligned", "symbols": syms, "value": ax.divisor, "expect": val})
                    if val:
                        attrs = self._divisibility(ax)
                else:
                    constexprs[ax.constexpr] = val
                    guards.append({"kind": "bool", "arg": self.arg_index(ax.arg), "value": val})
                    key.append(f"{ax.constexpr}{int(val)}")
            # the config may depend on the element type too (a float32 tile takes twice the registers)
            cfg = dict(self.launch_config(**constexprs, dtype=next(iter(dtypes.values()), None)))
            options = {"num_warps": cfg.pop("num_warps", 4), "num_stages": cfg.pop("num_stages", 1)}
            constexprs.update(cfg)
            out.append({
                "key": "_".join(key),
                "constexprs": constexprs,
                "signature": self._signature(dtypes, constexprs),
                "attrs": attrs,
                "options": options,
                "guards": guards,
                "grid": self._grid(constexprs),
            })
        return out

    def _pointer_type(self, name, dtypes):
        t = self.tensor(name)
        axis = self._dtype_axis_of(name)
        if axis is not None:
            return "*" + TRITON_TYPES[dtypes[axis]]
        allowed = self.allowed_dtypes(t)
        # several dtypes without an axis: the kernel casts the pointer by its run-time dtype code
        return "*" + TRITON_TYPES[allowed[0] if len(allowed) == 1 else "float32"]

    def _signature(self, dtypes, constexprs):
        sig = {}
        for name in self.kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
                continue
            kind = self.param(name)["kind"]
            if kind == "tensor":
                sig[name] = self._pointer_type(name, dtypes)
            elif kind == "output":
                o = self.outputs[self.param(name)["index"]]
                sig[name] = self._pointer_type(o.dtype_of, dtypes) if o.dtype_of else "*" + TRITON_TYPES[o.dtype]
            elif kind == "float":
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        return sig

    def constexpr_names(self):
        """The kernel's tl.constexpr parameters (read from the Python function, so that this also works
        for the interpreter's wrapper under TRITON_INTERPRET=1)."""
        fn = getattr(self.kernel, "fn", self.kernel)
        return {name for name, p in inspect.signature(fn).parameters.items()
                if "constexpr" in str(p.annotation)}

    def _divisibility(self, ax):
        """Triton compile attrs: every pointer and the aligned symbols are multiples of ax.divisor."""
        attrs = {}
        constexprs = self.constexpr_names()
        for i, name in enumerate(self.kernel.arg_names):
            if name in constexprs:
                continue
            kind = self.param(name)["kind"]
            if kind in ("tensor", "output") or (kind == "symbol" and name in ax.symbols):
                attrs[str(i)] = ax.divisor
        return attrs

    def _grid(self, constexprs):
        grid = []
        for expr in self.grid:
            factors = []
            for f in expr.split("*"):
                f = f.strip()
                m = re.fullmatch(r"cdiv\(\s*(\w+)\s*,\s*(\w+)\s*\)", f)
                sym, div = (m.group(1), m.group(2)) if m else (f, 1)
                div = constexprs[div] if isinstance(div, str) and not div.isdigit() else int(div)
                factors.append([self.symbols().index(sym), div])
            grid.append(factors)
        return grid + [[]] * (3 - len(grid))

    # ---- binding kernel parameters ------------------------------------------------------------
    def param(self, name):
        """How the dispatcher fills the kernel parameter `name` (a non-constexpr one)."""
        names = [a.name for a in self.args]
        outs = [o.name for o in self.outputs]
        if name in names:
            a = self.args[names.index(name)]
            kind = {Tensor: "tensor", Float: "float", Bool: "bool"}[type(a)]
            return {"kind": kind, "index": names.index(name)}
        if name in outs:
            return {"kind": "output", "index": outs.index(name)}
        if name.endswith("_dtype") and name[:-6] in names:
            return {"kind": "dtype_code", "index": names.index(name[:-6])}
        if name in self.symbols():
            return {"kind": "symbol", "index": self.symbols().index(name)}
        raise ValueError(f"{self.name}: kernel parameter {name!r} matches no argument, output, "
                         f"'<tensor>_dtype' code or shape symbol")

    def params(self, constexpr_names):
        return [dict(self.param(n), name=n) for n in self.kernel.arg_names if n not in constexpr_names]

    def manifest_entry(self):
        syms = self.symbols()
        idx = self.arg_index

        def shape(s):
            return [[syms.index(n), off] for n, off in _parse_shape(s)]

        args = []
        for a in self.args:
            if isinstance(a, Tensor):
                args.append({
                    "name": a.name, "kind": "tensor", "optional": a.optional,
                    "dtypes": self.allowed_dtypes(a), "same_dtype_as": idx(a.same_dtype_as) if a.same_dtype_as else -1,
                    "shape": shape(a.shape), "transposed_if": idx(a.transposed_if) if a.transposed_if else -1,
                    "varlen": a.varlen,
                })
            else:
                args.append({"name": a.name, "kind": "float" if isinstance(a, Float) else "bool"})
        outputs = [{
            "name": o.name, "shape": shape(o.shape),
            "dtype_of": idx(o.dtype_of) if o.dtype_of else -1, "dtype": o.dtype or "",
            "when": idx(o.when) if o.when else -1,
            "transposed_if": idx(o.transposed_if) if o.transposed_if else -1,
            "zeros": o.zeros,
        } for o in self.outputs]
        constexpr_names = self.constexpr_names()
        return {
            "name": self.name, "doc": self.doc, "args": args, "outputs": outputs, "symbols": syms,
            "symbol_defaults": [[syms.index(a), syms.index(b)] for a, b in self.symbol_defaults.items()
                                if a in syms and b in syms],
            "divisible": [[syms.index(a), syms.index(b)] for a, b in self.divisible],
            "params": self.params(constexpr_names),
            "dtype_codes": DTYPE_CODES,
        }
