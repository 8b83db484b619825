"""Benchmark the chunk (prefill / training) ops: fla_aot against fla (fla-core) and torch SDPA.

Measured side by side in one run, for fla_aot (precompiled cubins), fla (JIT Triton; skipped if
`import fla` fails) and torch SDPA with the flash backend (causal, layout [B, H, T, D]):

(1) Chunk ops (default: chunk_simple_gla, chunk_retention, chunk_gla, chunk_gated_delta_rule, chunk_delta_rule) at
    B=8 T=2048, B=2 T=8192 and B=1 T=32768, H=16, K=V=128, q/k/v bf16, log-space gates float32.
    Forward (inputs requiring grad, as in training) and forward + backward (torch.autograd.grad of
    the output against q, k, v and the gate, with a fixed random do). Times: CUDA events, median of
    repeats, in ms. fla_aot's output and gradients are checked against fla's (relative error).
(2) The retention sweep of fla's earlier README: B=8, H=32, D=128, T = 128, 256, ..., 16384,
    chunk_retention forward and forward + backward against SDPA flash causal.
(3) Time to the first chunk_simple_gla, chunk_gla and chunk_gated_delta_rule result in a fresh Python process, after
    torch and the CUDA context are up: fla_aot, and fla with a warm Triton cache (with --fla-cold
    also with an empty one; fla's cold autotuning can take minutes).
(4) Accuracy: fla_aot's and fla's output and every input gradient against the reference (the token-by-token
    recurrence in float32 on the CPU, torch autograd) at B=1, H=16, K=V=128, T=2048 and 8192, relative error.
    Section (1) compares the two libraries with each other; this says which of them is nearer the exact result.

A failed measurement (OOM, NotImplementedError, fla refusing a backward on Hopper, ...) is recorded
in the tables instead of stopping the run. Run from the repository root on a GPU, with fla_aot
installed (and fla-core importable, to compare):

    python benchmarks/chunk.py --out docs/benchmarks [--quick] [--ops simple_gla retention] [--fla-cold]

Writes <out>/chunk.md (also printed), <out>/chunk.json (raw numbers, ms and s) and, if matplotlib
is installed, <out>/chunk.png and <out>/retention.png. The outputs are rewritten after each shape,
so a run cut short still leaves what it finished. A run of some sections keeps the other sections from an
existing <out>/chunk.json, and a run of section (1) for some ops keeps the other ops' rows, so that a
measurement too long for one command can be split over several into one page (each row is stamped with the
start of its run, and the page says when its rows come from more than one).
"""

import argparse
import functools
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import _harness as h
from fused_recurrent import LIBRARIES, library_version, load_libraries

# The environment before any library is imported (fla sets Triton variables at import time);
# the fresh processes of section (3) start from it.
BASE_ENV = dict(os.environ)

BENCH_FILE = Path(__file__).resolve()
DEVICE = "cuda"  # "cpu" lets the measuring and report code be dry-run without a GPU
# op name -> (function in fla.ops / fla_aot.ops, gate: None, "scalar" [B, T, H] or "vector" [B, T, H, K])
OPS = {
    "simple_gla": ("chunk_simple_gla", "scalar"),
    "retention": ("chunk_retention", None),
    "linear_attn": ("chunk_linear_attn", None),
    "gla": ("chunk_gla", "vector"),
    "gated_delta_rule": ("chunk_gated_delta_rule", "scalar"),
    "delta_rule": ("chunk_delta_rule", None),
}
DELTA_OPS = ("gated_delta_rule", "delta_rule")  # these also take beta, and unit-norm keys
H, D = 16, 128
SHAPES = ((8, 2048), (2, 8192), (1, 32768))  # (B, T), B * T = 16384 tokens each but the last
SWEEP_B, SWEEP_H = 8, 32
SWEEP_T = tuple(128 * 2 ** i for i in range(8))  # 128 ... 16384
QUICK_SWEEP_T = (128, 1024, 8192)
FIRST_CALL_OPS = ("simple_gla", "gla", "gated_delta_rule")
FIRST_CALL_SHAPE = (1, 2048, H, D)  # B, T, H, D
FIRST_CALL_TIMEOUT_S = 600
ACCURACY_SHAPES = ((1, 2048), (1, 8192))  # (B, T), at H=16 as in (1): fla's autotuned configs carry over
SECTIONS = ("ops", "sweep", "first_call", "accuracy")
PASSES = (("fwd", "forward"), ("fwd_bwd", "forward + backward"))

# Run in a fresh process by section (3). This file is loaded by path (a plain `import chunk` could
# find the standard library's module of that name) before the clock starts, so the clock sees the
# library's import, the inputs and the first call, as in fused_recurrent.py.
FIRST_CALL_SCRIPT = """
import importlib, importlib.util, json, sys, time
import torch
torch.cuda.init(); torch.empty(1, device='cuda'); torch.cuda.synchronize()
sys.path.insert(0, {bench_dir!r})
spec = importlib.util.spec_from_file_location('chunk_bench', {bench_file!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
start = time.perf_counter()
ops = importlib.import_module({module!r})
imported = time.perf_counter()
o = bench.call(ops, {op!r}, bench.make_inputs({op!r}, *{shape!r}))
torch.cuda.synchronize()
done = time.perf_counter()
print(json.dumps({{"import_s": imported - start, "first_result_s": done - start}}))
"""


def make_inputs(op, B, T, H, D, requires_grad=False):
    """Random inputs of one chunk op as keyword arguments: q, k, v [B, T, H, D] in bf16 and, for
    the gated ops, a log-space gate g (<= 0) in float32."""
    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=DEVICE, dtype=dtype)
    inputs = dict(q=randn(B, T, H, D), k=randn(B, T, H, D), v=randn(B, T, H, D))
    if op == "linear_attn":  # positive features (elu + 1, as fla's feature maps give): the normaliser q.z stays > 0
        inputs.update({n: (F.elu(inputs[n].float()) + 1).to(torch.bfloat16) for n in ("q", "k")})
    gate = OPS[op][1]
    if gate is not None:
        shape = (B, T, H) if gate == "scalar" else (B, T, H, D)
        inputs["g"] = F.logsigmoid(randn(*shape, dtype=torch.float32))
    if op in DELTA_OPS:
        inputs["k"] = F.normalize(inputs["k"].float(), dim=-1).to(torch.bfloat16)
        inputs["beta"] = torch.sigmoid(randn(B, T, H))
    return {name: t.requires_grad_(requires_grad) for name, t in inputs.items()}


def call(ops, op, inputs):
    """The op's output o (the final state is not requested)."""
    return getattr(ops, OPS[op][0])(**inputs)[0]


def describe(error):
    """Short text for a failed measurement; the traceback goes to stderr."""
    traceback.print_exc()
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "OOM"
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"refused ({type(error).__name__}): {first_line}"


def rel_err(a, b):
    """||a - b|| / ||b|| in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_ms(fn, args):
    """Median CUDA-event time of one fn() call in ms. Calls run back to back, so host overhead shows
    when the GPU work is shorter than the Python call; n is chosen so that one repeat lasts about
    args.target_s (long calls: n=1)."""
    once = h.event_time_per_call(fn, n=1, repeats=1, warmup=1)
    n = max(1, min(200, round(args.target_s / once)))
    return h.event_time_per_call(fn, n, args.repeats, warmup=2) * 1e3


def run_library(forward, leaves, do, args):
    """Time forward() and forward + backward. Returns (timings, o, grads); o and grads are None
    where that pass failed, and the failure text is in timings["<pass>_error"]."""
    timings = {}
    try:
        o = forward().detach()  # the first call also compiles and autotunes fla's kernels
        timings["fwd_ms"] = time_ms(forward, args)
    except Exception as error:
        timings["fwd_error"] = describe(error)
        return timings, None, None

    def step():  # autograd.grad rather than backward(): no .grad accumulation kernels to time
        return torch.autograd.grad(forward(), leaves, do)
    grads = None
    try:
        grads = step()
        timings["fwd_bwd_ms"] = time_ms(step, args)
    except Exception as error:
        timings["fwd_bwd_error"] = describe(error)
    return timings, o, grads


def measure_sdpa(B, T, H, D, args):
    """SDPA, flash backend only (no silent fallback to another kernel), causal, [B, H, T, D]."""
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        timings, _, _ = run_library(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], do, args)
    return timings


def measure_config(op, B, T, H, D, libraries, args, sdpa_cache):
    """One (op, shape): every library on the same inputs, SDPA at the same shape (measured once per
    shape), and fla_aot's output and gradients against fla's."""
    torch.cuda.empty_cache()
    config = {"op": op, "B": B, "T": T, "H": H, "D": D, "results": {}}
    inputs = make_inputs(op, B, T, H, D, requires_grad=True)
    leaves = list(inputs.values())
    do = torch.randn_like(inputs["v"])
    outputs = {}
    for name, ops in libraries.items():
        if not hasattr(ops, OPS[op][0]):
            config["results"][name] = {"fwd_error": f"absent: {LIBRARIES[name]} has no {OPS[op][0]}"}
            continue
        timings, o, grads = run_library(functools.partial(call, ops, op, inputs), leaves, do, args)
        config["results"][name] = timings
        outputs[name] = (o, grads)
    aot, fla = outputs.get("fla_aot", (None, None)), outputs.get("fla", (None, None))
    if aot[0] is not None and fla[0] is not None:
        config["rel_err_o"] = rel_err(aot[0], fla[0])
    if aot[1] is not None and fla[1] is not None:  # the worst of dq, dk, dv (and dg)
        config["rel_err_grads"] = max(rel_err(a, b) for a, b in zip(aot[1], fla[1]))
    del outputs, aot, fla
    key = (B, T, H, D)
    if key not in sdpa_cache:
        sdpa_cache[key] = measure_sdpa(B, T, H, D, args)
    config["results"]["sdpa"] = sdpa_cache[key]
    print(f"[{op} B={B} T={T} H={H} D={D}] {json.dumps(config['results'])} "
          f"rel_err o={config.get('rel_err_o')} grads={config.get('rel_err_grads')}", flush=True)
    return config


def measure_accuracy(op, B, T, libraries):
    """Each library's o and input gradients against the reference (fla_aot's CPU path: the recurrence in
    float32, differentiated by torch) on the same inputs: {library: {"o": err, "dq": err, ...}}, relative errors."""
    inputs = make_inputs(op, B, T, H, D, requires_grad=True)
    do = torch.randn_like(inputs["v"])
    ref_inputs = {name: x.detach().cpu().float().requires_grad_() for name, x in inputs.items()}
    ref_o = call(libraries["fla_aot"], op, ref_inputs)
    ref_grads = torch.autograd.grad(ref_o, list(ref_inputs.values()), do.cpu().float())
    config = {"op": op, "B": B, "T": T, "H": H, "D": D, "errors": {}}
    for name, ops in libraries.items():
        errors = config["errors"][name] = {}
        try:
            o = call(ops, op, inputs)
            errors["o"] = rel_err(o.cpu(), ref_o)
            grads = torch.autograd.grad(o, list(inputs.values()), do)
            errors.update({f"d{x}": rel_err(g.cpu(), ref) for x, g, ref in zip(inputs, grads, ref_grads)})
        except Exception as error:
            errors["error"] = describe(error)
    print(f"[accuracy {op} B={B} T={T}] {json.dumps(config['errors'])}", flush=True)
    return config


def accuracy_table(configs):
    names = [n for n in ("o", "dq", "dk", "dv", "dg", "dbeta")
             if any(n in e for c in configs for e in c["errors"].values())]
    rows = [[c["op"], f"B={c['B']} T={c['T']}", lib, *[f"{e[n]:.1e}" if n in e else "—" for n in names]]
            for c in configs for lib, e in c["errors"].items()]
    notes = [f"- {c['op']} B={c['B']} T={c['T']}, {lib}: {e['error']}"
             for c in configs for lib, e in c["errors"].items() if "error" in e]
    return "\n".join([h.markdown_table(["op", "shape", "library", *names], rows), "", *notes]).rstrip()


def guarded_config(*args):
    """measure_config, or a config holding the error if something outside one library failed."""
    op, B, T, H, D = args[:5]
    try:
        return measure_config(*args)
    except Exception as error:
        return {"op": op, "B": B, "T": T, "H": H, "D": D, "results": {}, "error": describe(error)}


# (3) time to first result ----------------------------------------------------------------------


def subprocess_env():
    """BASE_ENV with PYTHONPATH made absolute: the fresh processes run in a temporary directory
    (so that a source checkout cannot shadow the installed package)."""
    env = dict(BASE_ENV)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return env


def measure_first_call(name, op, empty_cache):
    """Two fresh processes in a row. empty_cache: they share a TRITON_CACHE_DIR that starts empty
    (runs "cold" then "warm"). Otherwise they use the Triton cache as this run left it, already
    filled by sections (1) and (2): the first process ("primer") compiles whatever is still missing
    (e.g. a B=1 specialization) and the second one is the warm measurement."""
    script = FIRST_CALL_SCRIPT.format(bench_dir=str(BENCH_FILE.parent), bench_file=str(BENCH_FILE),
                                      module=LIBRARIES[name], op=op, shape=FIRST_CALL_SHAPE)
    env, cache_dir, runs = subprocess_env(), None, ("primer", "warm")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fla_bench_") as workdir:
        if empty_cache:
            cache_dir = Path(workdir, "triton_cache")
            cache_dir.mkdir()
            env["TRITON_CACHE_DIR"], runs = str(cache_dir), ("cold", "warm")
        for run in runs:
            result = h.run_json_subprocess(script, env, FIRST_CALL_TIMEOUT_S, cwd=workdir)
            result.update(library=name, op=op, run=run, triton_cache_files=None if cache_dir is None
                          else sum(p.is_file() for p in cache_dir.rglob("*")))
            print(f"[{name} {OPS[op][0]}] time to first result, {run}: "
                  f"{result.get('first_result_s', result.get('error'))}", flush=True)
            rows.append(result)
    return rows


# report ----------------------------------------------------------------------------------------


def ms_cell(config, library, key):
    """A time in ms, or the failure's short form ('OOM', 'refused', 'absent'); '—' if not run."""
    result = config["results"].get(library)
    if result is None:
        return "—"
    if f"{key}_ms" in result:
        return h.fmt(result[f"{key}_ms"], 1, 3)
    error = result.get(f"{key}_error") or result.get("fwd_error")  # no backward without a forward
    return error.split(" ", 1)[0].rstrip(":") if error else "—"


def timing_table(configs, label_headers, label):
    """Two rows per config (forward, forward + backward); `label(config)` gives the first cells."""
    rows = []
    for config in configs:
        for key, pass_name in PASSES:
            aot, fla = (config["results"].get(lib, {}).get(f"{key}_ms") for lib in ("fla_aot", "fla"))
            err = config.get("rel_err_o" if key == "fwd" else "rel_err_grads")
            rows.append([*label(config), pass_name, ms_cell(config, "fla_aot", key),
                         ms_cell(config, "fla", key), ms_cell(config, "sdpa", key),
                         f"{fla / aot:.2f}×" if aot and fla else "—",
                         f"{err:.1e}" if err is not None else "—"])
    return h.markdown_table(
        [*label_headers, "pass", "fla_aot (ms)", "fla (ms)", "SDPA flash (ms)", "speedup vs fla",
         "rel. err vs fla"], rows)


def failures(configs):
    """One bullet per failed measurement, with its full message."""
    lines = []
    for c in configs:
        where = f"{c['op']} B={c['B']} T={c['T']} H={c['H']} D={c['D']}"
        if c.get("error"):
            lines.append(f"- {where}: {c['error']}")
        for lib, result in c["results"].items():
            lines += [f"- {where}, {lib} {key.removesuffix('_error').replace('_', '+')}: {text}"
                      for key, text in result.items() if key.endswith("_error")]
    return lines


def render_markdown(results, plots):
    env = results["environment"]
    versions = ", ".join(f"{name} {v}" for name, v in env["versions"].items())
    parts = ["\n".join([
        "# Chunk ops (prefill / training): fla_aot vs fla vs SDPA flash",
        "",
        f"GPU: {env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}); Python {env['python']}; "
        f"{versions}.",
        "",
        "q, k, v bf16 [B, T, H, D]; log-space gates float32 (`logsigmoid(randn)`: g [B, T, H] for "
        "simple_gla, [B, T, H, K] for gla). Forward: one call with inputs requiring grad. Forward + "
        "backward: `torch.autograd.grad(o, (q, k, v, g), do)` with a fixed random do. SDPA: flash "
        "backend only, causal, [B, H, T, D]. CUDA-event time of back-to-back calls divided by their "
        f"number, median of {env['repeats']} repeats after warm-up{' (--quick)' if env['quick'] else ''}"
        ". Speedup = fla / fla_aot. Rel. err = ||fla_aot - fla|| / ||fla|| of o (forward row) and "
        "the worst of the input gradients (forward + backward row)."])]
    if results.get("ops") is not None:
        configs = results["ops"]
        runs = {}
        for c in configs:
            runs.setdefault(c.get("run"), []).append(c["op"])
        split = [] if len(runs) < 2 else [
            f"Rows from {len(runs)} runs (each row's libraries timed in the same run): " + "; ".join(
                f"{', '.join(dict.fromkeys(ops))} from " + (f"the run started {run}" if run else "an earlier run")
                for run, ops in runs.items()) + ".", ""]
        parts.append("\n".join([
            f"## Chunk ops, H={H}, K=V={D}", "", *split,
            timing_table(configs, ["op", "shape"], lambda c: [c["op"], f"B={c['B']} T={c['T']}"]),
            "", *failures(configs)]).rstrip())
    if results.get("retention_sweep") is not None:
        configs = results["retention_sweep"]
        parts.append("\n".join([
            f"## chunk_retention sweep (fla's README setup: B={SWEEP_B}, H={SWEEP_H}, D={D})", "",
            timing_table(configs, ["T"], lambda c: [c["T"]]), "", *failures(configs)]).rstrip())
    if results.get("first_call") is not None:
        rows = results["first_call"]
        table = h.markdown_table(
            ["library", "op", "run", "import (ms)", "first result (ms)", "Triton cache files after"],
            [[r["library"], OPS[r["op"]][0], r["run"], h.fmt(r.get("import_s"), 1e3),
              h.fmt(r.get("first_result_s"), 1e3),
              "n/a" if r["triton_cache_files"] is None else r["triton_cache_files"]] for r in rows])
        b, t, hh, d = FIRST_CALL_SHAPE
        parts.append("\n".join([
            "## Time to first result in a fresh process", "",
            "Clock started after `import torch` and CUDA context creation; it covers importing the "
            f"ops module, making random inputs (B={b}, T={t}, H={hh}, K=V={d}), one forward call and "
            "a synchronize. cold/warm: two processes sharing a `TRITON_CACHE_DIR` that is empty before "
            "the cold one. primer/warm (fla without --fla-cold): two processes on the Triton cache "
            "this run's earlier sections filled; the primer compiles what is still missing.", "",
            table, "", *[f"- {r['library']} {OPS[r['op']][0]} {r['run']}: failed: {r['error']}"
                         for r in rows if r.get("error")]]).rstrip())
    if results.get("accuracy") is not None:
        parts.append("\n".join([
            f"## Accuracy against the reference, H={H}, K=V={D}", "",
            "||x - ref|| / ||ref|| of the output and of each input's gradient (same inputs and do as above), the "
            "reference being the token-by-token recurrence in float32 on the CPU (fla_aot's CPU path) with torch "
            "autograd.", "", accuracy_table(results["accuracy"])]))
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n\n".join(parts).rstrip() + "\n"


def plot_panels(path, title, xlabels, panels, lines=False, xlabel=None):
    """One PNG with a subplot per panel ({panel title: {series label: one value per x label}}):
    grouped bars, or lines when `lines`; log y. Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"warning: matplotlib is not installed, skipping {path}", file=sys.stderr)
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 1.2 * len(xlabels)), 3.5 * len(panels)),
                             squeeze=False)
    for ax, (name, series) in zip(axes[:, 0], panels.items()):
        width = 0.8 / max(len(series), 1)
        for i, (label, values) in enumerate(series.items()):
            ys = [math.nan if v is None else v for v in values]
            if lines:
                ax.plot(range(len(xlabels)), ys, marker="o", label=label)
            else:
                ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(xlabels))], ys, width,
                       label=label)
        ax.set_xticks(range(len(xlabels)), xlabels, fontsize=7)
        if xlabel:
            ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log scale)")
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(results, out):
    def panels(configs):
        return {pass_name: {label: [c["results"].get(lib, {}).get(f"{key}_ms") for c in configs]
                            for lib, label in (("fla_aot", "fla_aot"), ("fla", "fla"), ("sdpa", "SDPA flash"))}
                for key, pass_name in PASSES}
    written = []
    configs = results.get("ops")
    if configs and plot_panels(out / "chunk.png", f"chunk ops, H={H}, K=V={D}, bf16",
                               [f"{c['op']}\nB={c['B']} T={c['T']}" for c in configs], panels(configs)):
        written.append(out / "chunk.png")
    configs = results.get("retention_sweep")
    if configs and plot_panels(out / "retention.png",
                               f"chunk_retention vs SDPA flash causal, B={SWEEP_B}, H={SWEEP_H}, D={D}",
                               [str(c["T"]) for c in configs], panels(configs), lines=True, xlabel="T"):
        written.append(out / "retention.png")
    return written


def write_outputs(results, out):
    """Rewrite chunk.json, the plots and chunk.md from what has been measured so far."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "chunk.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render_markdown(results, write_plots(results, out))
    (out / "chunk.md").write_text(markdown)
    return markdown


# main ------------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"),
                        help="directory for chunk.md, chunk.json, chunk.png and retention.png")
    parser.add_argument("--ops", nargs="+", choices=list(OPS),
                        help="ops of section (1) (default: all of them)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="what to measure (default: all); the other sections are kept from an "
                        "existing <out>/chunk.json")
    parser.add_argument("--fla-cold", action="store_true",
                        help="also time fla's first call with an empty Triton cache (can take minutes)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: 3 repeats, shorter timings, sweep T in {QUICK_SWEEP_T}")
    args = parser.parse_args()
    args.repeats, args.target_s = (3, 0.03) if args.quick else (7, 0.1)
    args.sweep_t = QUICK_SWEEP_T if args.quick else SWEEP_T
    return args


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    libraries = load_libraries(None)
    if "fla_aot" not in libraries:
        sys.exit("fla_aot is not importable")
    if args.ops is None:
        args.ops = ["simple_gla", "retention", "linear_attn", "gla", "gated_delta_rule", "delta_rule"]

    results = {"environment": {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "versions": {name: library_version(name) if name in libraries else "absent" for name in LIBRARIES},
        "ops": args.ops, "repeats": args.repeats, "target_s": args.target_s, "quick": args.quick,
        "fla_cold": args.fla_cold}}
    previous = args.out / "chunk.json"
    old = json.loads(previous.read_text()) if previous.exists() else {}
    if set(args.sections) != set(SECTIONS):
        # a run split over several commands keeps the sections measured by the earlier ones
        results.update({key: old[key] for key in ("ops", "retention_sweep", "first_call", "accuracy") if key in old})
    run = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    sdpa_cache = {}  # SDPA does not depend on the op: measure it once per shape
    if "ops" in args.sections:
        # the other ops' rows are kept from an earlier run on the same GPU
        same_gpu = old.get("environment", {}).get("gpu") == results["environment"]["gpu"]
        results["ops"] = [c for c in (old.get("ops") or [] if same_gpu else []) if c["op"] not in args.ops]
        for op, (B, T) in itertools.product(args.ops, SHAPES):
            results["ops"].append(dict(guarded_config(op, B, T, H, D, libraries, args, sdpa_cache), run=run))
            write_outputs(results, args.out)
    if "sweep" in args.sections:
        results["retention_sweep"] = []
        for T in args.sweep_t:
            results["retention_sweep"].append(guarded_config("retention", SWEEP_B, T, SWEEP_H, D, libraries, args,
                                                             sdpa_cache))
            write_outputs(results, args.out)
    if "accuracy" in args.sections:
        results["accuracy"] = []
        for op, (B, T) in itertools.product(args.ops, ACCURACY_SHAPES):
            results["accuracy"].append(measure_accuracy(op, B, T, libraries))
            write_outputs(results, args.out)
    if "first_call" in args.sections:
        # last, so that without --fla-cold the Triton cache is already warm from the sections above
        first_call = []
        for op in [op for op in FIRST_CALL_OPS if op in args.ops]:
            for name, ops in libraries.items():
                if hasattr(ops, OPS[op][0]):
                    first_call += measure_first_call(name, op, empty_cache=name == "fla_aot" or args.fla_cold)
        results["first_call"] = first_call
    print(write_outputs(results, args.out))


if __name__ == "__main__":
    main()
