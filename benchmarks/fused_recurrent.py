"""Benchmark one decode step of fused_recurrent_gated_delta_rule: fla_aot against fla (fla-core).

The step: T=1, H=HV=16, K=V=128; q, k, v, beta in bf16, g (log-space gate) and the state in
float32, use_qk_l2norm_in_kernel=True, output_final_state=True. Measured side by side for
fla_aot (precompiled cubins) and fla (JIT Triton; its rows are skipped if `import fla` fails):

(a) Time to first result in a fresh Python process. After torch and the CUDA context are up, a
    clock covers: importing the ops module, making random B=1 inputs, one call, a synchronize.
    The import alone is reported too. Two processes per library, sharing one TRITON_CACHE_DIR
    that starts empty: "cold" (first process) and "warm" (second process).
(b) Per-call cost of the step at B=1 and B=32: eager host wall time (N back-to-back calls plus one
    synchronize, divided by N, median of 5 repeats after 20 warm-up calls), and the step captured
    in a CUDA graph and replayed (host wall time and CUDA-event time per replay).
(c) Kernel time against the memory floor at B=1 and B=32. Kernel time: CUDA-event time of a graph
    of 20 captured steps, each with its own inputs and state, divided by 20. Floor: the bytes that
    must move (q, k, v, g, beta and initial_state read; o and final_state written) divided by the
    device-to-device copy bandwidth measured in the same run.

Run from the repository root, with fla_aot installed (and fla-core too, to compare):

    python benchmarks/fused_recurrent.py --out docs/benchmarks [--quick] [--only fla_aot|fla]

Writes <out>/fused_recurrent.md (also printed), <out>/fused_recurrent.json (raw numbers, seconds
and bytes) and, if matplotlib is installed, <out>/fused_recurrent_first_call.png and
<out>/fused_recurrent_decode.png.
"""

import argparse
import functools
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import _harness as h

# The environment before any library is imported (fla sets Triton variables at import time);
# the fresh processes of section (a) start from it.
BASE_ENV = dict(os.environ)

BENCH_DIR = Path(__file__).resolve().parent
LIBRARIES = {"fla_aot": "fla_aot.ops", "fla": "fla.ops"}
DISTRIBUTIONS = {"fla_aot": "fla_aot", "fla": "fla-core"}
H, K, V = 16, 128, 128
BATCHES = (1, 32)
CALLS_PER_GRAPH = 20
FIRST_CALL_TIMEOUT_S = 300

# Run in a fresh process by section (a). make_inputs and decode_step (torch only) are imported
# before the clock starts, so the clock sees the library's import and first call, not ours.
FIRST_CALL_SCRIPT = """
import importlib, json, sys, time
import torch
torch.cuda.init(); torch.empty(1, device='cuda'); torch.cuda.synchronize()
sys.path.insert(0, {bench_dir!r})
from fused_recurrent import make_inputs, decode_step
start = time.perf_counter()
ops = importlib.import_module({module!r})
imported = time.perf_counter()
o, final_state = decode_step(ops, make_inputs(1))
torch.cuda.synchronize()
done = time.perf_counter()
print(json.dumps({{"import_s": imported - start, "first_result_s": done - start}}))
"""


def make_inputs(batch):
    """Fresh random inputs of one decode step (T=1) as keyword arguments."""
    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype)
    return dict(
        q=randn(batch, 1, H, K),
        k=randn(batch, 1, H, K),
        v=randn(batch, 1, H, V),
        g=F.logsigmoid(randn(batch, 1, H, dtype=torch.float32)),
        beta=randn(batch, 1, H).sigmoid(),
        initial_state=randn(batch, H, K, V, dtype=torch.float32),
    )


def decode_step(ops, inputs):
    """One call of the op under test; returns (o, final_state)."""
    return ops.fused_recurrent_gated_delta_rule(
        **inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)


def load_libraries(only):
    """Import the selected ops modules; a library that fails to import is reported and skipped."""
    loaded = {}
    for name, module in LIBRARIES.items():
        if only not in (None, name):
            continue
        try:
            loaded[name] = importlib.import_module(module)
        except Exception as error:  # fla can fail with more than ImportError (e.g. no triton)
            print(f"{name} is absent ({type(error).__name__}: {error}); skipping its rows")
    return loaded


def library_version(name):
    try:
        return importlib.metadata.version(DISTRIBUTIONS[name])
    except importlib.metadata.PackageNotFoundError:
        return getattr(sys.modules.get(name), "__version__", "unknown")


def environment(libraries, args):
    selected = [name for name in LIBRARIES if args.only in (None, name)]
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "versions": {name: library_version(name) if name in libraries else "absent"
                     for name in selected},
        "n": args.n,
        "repeats": args.repeats,
        "quick": args.quick,
    }


def guarded(label, measure, *args):
    """measure(*args), or {"error": ...} (with the traceback on stderr) if it raises."""
    try:
        return measure(*args)
    except Exception as error:
        traceback.print_exc()
        print(f"{label} failed: {error}", file=sys.stderr)
        return {"error": f"{type(error).__name__}: {error}"}


# (a) time to first result ------------------------------------------------------------------


def measure_first_call(name):
    """Two fresh processes sharing a TRITON_CACHE_DIR that starts empty: cold, then warm."""
    script = FIRST_CALL_SCRIPT.format(bench_dir=str(BENCH_DIR), module=LIBRARIES[name])
    rows = []
    with tempfile.TemporaryDirectory(prefix="fla_bench_") as workdir:
        cache_dir = Path(workdir, "triton_cache")
        cache_dir.mkdir()
        env = dict(BASE_ENV, TRITON_CACHE_DIR=str(cache_dir))
        for run in ("cold", "warm"):
            # cwd is the temporary dir so that a source checkout cannot shadow the installed package
            result = h.run_json_subprocess(script, env, FIRST_CALL_TIMEOUT_S, cwd=workdir)
            result.update(library=name, run=run,
                          triton_cache_files=sum(p.is_file() for p in cache_dir.rglob("*")))
            outcome = result.get("first_result_s", result.get("error"))
            print(f"[{name}] time to first result, {run}: {outcome}")
            rows.append(result)
    return rows


# (b) per-call cost, eager and CUDA graph -----------------------------------------------------


def measure_decode(ops, batch, n, repeats):
    step = functools.partial(decode_step, ops, make_inputs(batch))
    eager_s = h.wall_time_per_call(step, n, repeats)
    graph, outputs = h.capture_cuda_graph(step)  # outputs stay alive while the graph replays
    return {
        "eager_wall_s": eager_s,
        "graph_wall_s": h.wall_time_per_call(graph.replay, n, repeats),
        "graph_event_s": h.event_time_per_call(graph.replay, n, repeats),
    }


# (c) kernel time against the memory floor ----------------------------------------------------


def measure_kernel(ops, batch, n, repeats, bandwidth):
    """Distinct inputs and states per captured call, so that consecutive calls do not find their
    state in L2 (at B=32 one state is 32 MiB read + 32 MiB written)."""
    input_sets = [make_inputs(batch) for _ in range(CALLS_PER_GRAPH)]
    graph, outputs = h.capture_cuda_graph(lambda: [decode_step(ops, x) for x in input_sets])
    replays = max(1, n // CALLS_PER_GRAPH)
    kernel_s = h.event_time_per_call(graph.replay, replays, repeats) / CALLS_PER_GRAPH
    o, final_state = outputs[0]
    nbytes = h.tensor_bytes(*input_sets[0].values(), o, final_state)
    floor_s = nbytes / bandwidth
    return {"bytes": nbytes, "kernel_s": kernel_s, "floor_s": floor_s, "ratio": kernel_s / floor_s,
            "same_bytes_copy_s": same_bytes_copy_s(nbytes, n, repeats)}


def same_bytes_copy_s(nbytes, n, repeats):
    """For scale: one `copy_` that moves as many bytes as the step (nbytes / 2 read, nbytes / 2 written), timed
    as the steps are (a graph of CALLS_PER_GRAPH copies, each between buffers of its own)."""
    pairs = [(torch.rand(nbytes // 8, device="cuda"), torch.empty(nbytes // 8, device="cuda"))
             for _ in range(CALLS_PER_GRAPH)]
    graph, _ = h.capture_cuda_graph(lambda: [dst.copy_(src) for src, dst in pairs])
    return h.event_time_per_call(graph.replay, max(1, n // CALLS_PER_GRAPH), repeats) / CALLS_PER_GRAPH


# report --------------------------------------------------------------------------------------


def failures(rows):
    """One markdown bullet per failed measurement."""
    def label(row):
        keys = [f"{key}={row[key]}" for key in ("run", "batch") if key in row]
        return " ".join([row["library"], *keys])
    return [f"- {label(r)}: failed: {r['error']}" for r in rows if r.get("error")]


def first_call_section(rows):
    table = h.markdown_table(
        ["library", "run", "import (ms)", "first result (ms)", "Triton cache files after"],
        [[r["library"], r["run"], h.fmt(r.get("import_s"), 1e3),
          h.fmt(r.get("first_result_s"), 1e3), r["triton_cache_files"]] for r in rows])
    return "\n".join([
        "## (a) Time to first result in a fresh process",
        "",
        "Clock started after `import torch` and CUDA context creation; it covers importing the ops "
        "module, making random B=1 inputs, one call and a synchronize. Both processes of a library "
        "share a `TRITON_CACHE_DIR` that is empty before the cold one.",
        "",
        table, "", *failures(rows)]).rstrip()


def decode_section(rows):
    table = h.markdown_table(
        ["library", "B", "eager, host wall (µs/call)", "CUDA graph, host wall (µs/replay)",
         "CUDA graph, events (µs/replay)"],
        [[r["library"], r["batch"], *(h.fmt(r.get(key), 1e6, 2) for key in
                                        ("eager_wall_s", "graph_wall_s", "graph_event_s"))]
         for r in rows])
    return "\n".join([
        "## (b) Decode step, time per call",
        "",
        "Same inputs every call. Host wall: N back-to-back calls (or replays of a one-step graph) "
        "plus one synchronize, divided by N; median of the repeats after 20 warm-up calls.",
        "",
        table, "", *failures(rows)]).rstrip()


def kernel_section(kernel):
    bandwidth = kernel["copy_bandwidth_Bps"]
    table = h.markdown_table(
        ["library", "B", "bytes moved (MB)", "floor (µs)", "kernel (µs)", "kernel / floor",
         "effective bandwidth (GB/s)", "copy of as many bytes (µs)"],
        [[r["library"], r["batch"], h.fmt(r.get("bytes"), 1e-6, 3), h.fmt(r.get("floor_s"), 1e6, 2),
          h.fmt(r.get("kernel_s"), 1e6, 2), h.fmt(r.get("ratio"), 1, 2),
          h.fmt(r["bytes"] / r["kernel_s"] if r.get("kernel_s") else None, 1e-9, 0),
          h.fmt(r.get("same_bytes_copy_s"), 1e6, 2)]
         for r in kernel["rows"]])
    return "\n".join([
        "## (c) Kernel time against the memory floor",
        "",
        f"Copy bandwidth: {bandwidth / 1e9:.0f} GB/s (1 GiB device-to-device `copy_`, "
        "2 × bytes / time, median of 20 with CUDA events). Bytes moved: q, k, v, g, beta and "
        "initial_state read, o and final_state written. Floor = bytes / copy bandwidth. Kernel: "
        f"CUDA-event time of a graph of {CALLS_PER_GRAPH} captured steps (each with its own "
        f"inputs and state) divided by {CALLS_PER_GRAPH}; this includes any other kernel the op "
        "launches and the gaps between kernels inside the graph. For scale, the last column times a `copy_` "
        "that moves as many bytes, in the same kind of graph.",
        "",
        table, "", *failures(kernel["rows"])]).rstrip()


def render_markdown(results, plots):
    env = results["environment"]
    versions = ", ".join(f"{name} {v}" for name, v in env["versions"].items()) or "no library"
    header = [
        "# fused_recurrent_gated_delta_rule: fla_aot vs fla",
        "",
        f"GPU: {env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}); Python {env['python']}; "
        f"{versions}.",
        "",
        f"Decode step: T=1, H=HV={H}, K=V={K}; q, k, v, beta bf16; g and state float32; "
        "use_qk_l2norm_in_kernel=True, output_final_state=True. "
        f"N={env['n']} calls per timing, median of {env['repeats']} repeats"
        f"{' (--quick)' if env['quick'] else ''}.",
    ]
    sections = [first_call_section(results["first_call"]), decode_section(results["decode"]),
                kernel_section(results["kernel"])]
    images = [f"![{p.stem}]({p.name})" for p in plots]
    return "\n\n".join(["\n".join(header), *sections, *images]).rstrip() + "\n"


def write_plots(results, out):
    """The two PNG charts; returns the paths written (none without matplotlib)."""
    first = results["first_call"]
    first_path = out / "fused_recurrent_first_call.png"
    decode = results["decode"]
    decode_path = out / "fused_recurrent_decode.png"
    libraries = list(dict.fromkeys(r["library"] for r in decode))

    def decode_values(library, key):
        by_batch = {r["batch"]: r.get(key) for r in decode if r["library"] == library}
        return [None if by_batch.get(b) is None else by_batch[b] * 1e6 for b in BATCHES]

    written = []
    if first and h.grouped_bar_chart(
            first_path, "fused_recurrent_gated_delta_rule: time to first result (fresh process)",
            "ms (log scale)", [f"{r['library']}\n{r['run']}" for r in first],
            {label: [None if r.get(key) is None else r[key] * 1e3 for r in first]
             for label, key in (("import", "import_s"), ("first result", "first_result_s"))},
            log_y=True):
        written.append(first_path)
    if decode and h.grouped_bar_chart(
            decode_path, f"decode step (T=1, H={H}, K=V={K}): time per call", "µs per call",
            [f"B={b}" for b in BATCHES],
            {f"{lib} {mode}": decode_values(lib, key) for lib in libraries
             for mode, key in (("eager", "eager_wall_s"), ("CUDA graph", "graph_wall_s"))}):
        written.append(decode_path)
    return written


# main ----------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"),
                        help="directory for the .md, .json and .png results")
    parser.add_argument("--only", choices=list(LIBRARIES), help="benchmark one library only")
    parser.add_argument("--quick", action="store_true", help="smoke test: N=100, 3 repeats")
    args = parser.parse_args()
    args.n, args.repeats = (100, 3) if args.quick else (2000, 5)
    return args


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    torch.set_grad_enabled(False)
    libraries = load_libraries(args.only)
    if not libraries:
        sys.exit("no library to benchmark")

    first_call = [row for name in libraries for row in measure_first_call(name)]
    bandwidth = h.copy_bandwidth()
    decode, kernel = [], []
    for name, ops in libraries.items():
        for batch in BATCHES:
            label, row = f"[{name}] B={batch}", {"library": name, "batch": batch}
            decode.append({**row, **guarded(f"{label} decode", measure_decode,
                                            ops, batch, args.n, args.repeats)})
            kernel.append({**row, **guarded(f"{label} kernel", measure_kernel,
                                            ops, batch, args.n, args.repeats, bandwidth)})
            print(f"{label}: {decode[-1]} {kernel[-1]}")

    results = {"environment": environment(libraries, args), "first_call": first_call,
               "decode": decode, "kernel": {"copy_bandwidth_Bps": bandwidth, "rows": kernel}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fused_recurrent.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render_markdown(results, write_plots(results, args.out))
    (args.out / "fused_recurrent.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
