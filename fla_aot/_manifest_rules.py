"""The argument rules of manifest ops, in Python: the statement of what the C++ dispatcher enforces.

The fake (meta) implementations and the CPU reference path use `check_args`, so every path rejects the
same inputs with the same kind of error: ValueError for shapes and devices, TypeError for dtypes,
NotImplementedError for a request no compiled variant serves. Pure Python: no extension needed.
"""
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32}


def schema(entry):
    """The torch schema of a manifest op: its arguments in order, one Tensor per output."""
    args = []
    for a in entry["args"]:
        if a["kind"] == "tensor":
            args.append(f"Tensor{'?' if a['optional'] else ''} {a['name']}")
        else:
            args.append(f"{a['kind']} {a['name']}")  # "float" and "bool" are schema types too
    outs = ", ".join("Tensor" for _ in entry["outputs"])
    if len(entry["outputs"]) > 1:
        outs = f"({outs})"  # torch writes a single return without parentheses
    return f"{entry['name']}({', '.join(args)}) -> {outs}"


def _effective(dims, transposed_if, args):
    dims = list(dims)
    if transposed_if >= 0 and args[transposed_if] and len(dims) >= 2:
        dims[-1], dims[-2] = dims[-2], dims[-1]
    return dims


def _expected(entry, dims, sym):
    names = entry["symbols"]
    parts = []
    for s, off in dims:
        p = names[s] + (f"+{off}" if off else "")
        if sym[s] is not None:
            p += f"={sym[s] + off}"
        parts.append(p)
    return "[" + ", ".join(parts) + "]"


def check_args(entry, args, arch=None):
    """Validates `args` (in schema order) like the C++ dispatcher; returns the bound shape symbols.

    Raises ValueError (shape, device), TypeError (dtype) or, when `arch` ("sm_90") is given and no
    compiled variant fits, NotImplementedError listing the compiled variants.
    """
    op = entry["name"]
    specs = entry["args"]
    sym = [int(n) if n.isdigit() else None for n in entry["symbols"]]  # a number is a fixed size
    device = None
    for a, x in zip(specs, args):
        if a["kind"] != "tensor":
            continue
        if x is None:
            if not a["optional"]:
                raise ValueError(f"{op}: {a['name']} is required")
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {a['name']} must be a tensor, got {type(x).__name__}")
        device = device or x.device
        if x.device != device:
            raise ValueError(f"{op}: {a['name']} is on {x.device}, expected {device} like {specs[0]['name']}")
        if a["same_dtype_as"] >= 0:
            ref = args[a["same_dtype_as"]]
            if x.dtype != ref.dtype:
                raise TypeError(f"{op}: {a['name']} has dtype {x.dtype}, expected {ref.dtype} "
                                f"like {specs[a['same_dtype_as']]['name']}")
        elif a["dtypes"] and x.dtype not in [DTYPES[d] for d in a["dtypes"]]:
            raise TypeError(f"{op}: {a['name']} has dtype {x.dtype}, expected one of {a['dtypes']}")
        dims = _effective(a["shape"], a["transposed_if"], args)
        if x.dim() != len(dims):
            raise ValueError(f"{op}: {a['name']} must have {len(dims)} dims {_expected(entry, dims, sym)}, "
                             f"got shape {list(x.shape)}")
        for (s, off), size in zip(dims, x.shape):
            if sym[s] is None:
                if size - off < 0:
                    raise ValueError(f"{op}: {a['name']} has shape {list(x.shape)}, expected {_expected(entry, dims, sym)}")
                sym[s] = size - off
            elif size != sym[s] + off:
                raise ValueError(f"{op}: {a['name']} must have shape {_expected(entry, dims, sym)}, got {list(x.shape)}")
    names = entry["symbols"]
    varlen = any(a["kind"] == "tensor" and a["varlen"] and x is not None for a, x in zip(specs, args))
    for s, frm in entry["symbol_defaults"]:
        if varlen:
            continue  # the varlen tensor binds s (the number of sequences)
        if sym[s] is None:
            sym[s] = sym[frm]
        elif sym[s] != sym[frm]:
            who = next(a["name"] for a, x in zip(specs, args)
                       if a["kind"] == "tensor" and x is not None and any(d == s for d, _ in a["shape"]))
            varlen_name = next((a["name"] for a in specs if a["kind"] == "tensor" and a["varlen"]), "a varlen argument")
            raise ValueError(f"{op}: {who} has {names[s]}={sym[s]}, but without {varlen_name} {names[s]} must equal "
                             f"{names[frm]}={sym[frm]}")
    for a, x in zip(specs, args):
        if a["kind"] == "tensor" and a["varlen"] and x is not None and "B" in names and sym[names.index("B")] != 1:
            raise ValueError(f"{op}: with {a['name']} the batch size B must be 1 (sequences are packed along T), "
                             f"got B={sym[names.index('B')]}")
    for a, b in entry["divisible"]:
        if not (sym[b] > 0 and sym[a] % sym[b] == 0):
            raise ValueError(f"{op}: {names[a]}={sym[a]} must be a multiple of {names[b]}={sym[b]}")
    if arch is not None:
        pick_variant(entry, args, sym, arch)
    return sym


def pick_variant(entry, args, sym, arch):
    variants = entry["variants"].get(arch)
    if not variants:
        raise NotImplementedError(f"{entry['name']}: fla_aot was built without kernels for {arch}; "
                                  f"compiled: {sorted(entry['variants'])}")
    for v in variants:
        if all(_guard_ok(g, args, sym) for g in v["guards"]):
            return v
    keys = "\n  ".join(v["key"] for v in variants)
    raise NotImplementedError(f"{entry['name']}: no compiled kernel variant for {arch} matches "
                              f"({_describe(entry, variants[0]['guards'], args, sym)}). Compiled variants:\n  {keys}")


def _guard_ok(g, args, sym):
    if g["kind"] == "dtype":
        return args[g["arg"]].dtype == DTYPES[g["dtype"]]
    if g["kind"] == "bucket":
        return g["above"] < sym[g["symbol"]] <= g["value"]
    if g["kind"] == "aligned":
        d = g["value"]
        aligned = (all(sym[s] % d == 0 for s in g["symbols"])
                   and all(x.data_ptr() % 16 == 0 for x in args if isinstance(x, torch.Tensor)))
        return aligned == g["expect"]
    return bool(args[g["arg"]]) == g["value"]


def _describe(entry, guards, args, sym):
    parts = []
    for g in guards:
        if g["kind"] == "dtype":
            parts.append(f"{entry['args'][g['arg']]['name']} dtype={args[g['arg']].dtype}")
        elif g["kind"] == "bucket":
            parts.append(f"{entry['symbols'][g['symbol']]}={sym[g['symbol']]}")
        elif g["kind"] == "aligned":
            continue
        else:
            parts.append(f"{entry['args'][g['arg']]['name']}={bool(args[g['arg']])}")
    return ", ".join(parts)


def output_shapes(entry, args, sym):
    """(shape, dtype) of each output; an output not asked for is an empty tensor."""
    out = []
    for o in entry["outputs"]:
        dtype = args[o["dtype_of"]].dtype if o["dtype_of"] >= 0 else DTYPES[o["dtype"]]
        if o["when"] >= 0 and not args[o["when"]]:
            out.append(((0,), dtype))
        else:
            out.append((tuple(sym[s] + off for s, off in _effective(o["shape"], o["transposed_if"], args)), dtype))
    return out
