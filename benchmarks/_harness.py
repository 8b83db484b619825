"""Small helpers shared by the benchmarks: GPU timing, fresh-process runs, markdown tables, plots.

Timing conventions: warm up first, time many back-to-back calls, synchronize once at the end,
divide by the number of calls, repeat and take the median. Times are in seconds.
"""

import json
import math
import statistics
import subprocess
import sys
import time

import torch


def wall_time_per_call(fn, n, repeats, warmup=20):
    """Median over `repeats` of the host wall time of `n` back-to-back fn() calls plus one
    final synchronize, divided by `n`."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / n)
    return statistics.median(times)


def event_time_per_call(fn, n, repeats, warmup=20):
    """Median over `repeats` of the CUDA-event time of `n` back-to-back fn() calls, divided
    by `n`."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / n)
    return statistics.median(times)


def capture_cuda_graph(fn, warmup=3):
    """Capture fn() in a CUDA graph, after warming it up on a side stream as the PyTorch docs show.

    Returns (graph, outputs): keep `outputs` (the tensors fn() returned during capture) alive
    while replaying; each replay rewrites them in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    torch.cuda.synchronize()
    return graph, outputs


def copy_bandwidth(nbytes=1 << 30, repeats=20, warmup=3):
    """Device-to-device copy bandwidth in bytes/s: 2 * nbytes (read + write) over the median
    CUDA-event time of one `dst.copy_(src)`."""
    src = torch.rand(nbytes // 4, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = event_time_per_call(lambda: dst.copy_(src), n=1, repeats=repeats, warmup=warmup)
    return 2 * src.numel() * src.element_size() / seconds


def tensor_bytes(*tensors):
    """Total size in bytes of the given tensors (None entries are skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def run_json_subprocess(code, env, timeout, cwd=None):
    """Run `python -c code` in a fresh process and parse the JSON object on its last stdout line.

    Never raises: returns {"ok": True, **parsed} or {"ok": False, "error": why}."""
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, timeout=timeout,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"exit code {proc.returncode}: {tail}"}
    try:
        return {"ok": True, **json.loads(lines[-1])}
    except json.JSONDecodeError:
        return {"ok": False, "error": f"unparsable last line: {lines[-1][:200]}"}


def fmt(value, scale=1.0, digits=1):
    """`value * scale` with `digits` decimals, or 'n/a' for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * scale:.{digits}f}"


def markdown_table(headers, rows):
    """A GitHub markdown table; cells are converted with str() and '|' is escaped."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(headers), line(["---"] * len(headers))] + [line(r) for r in rows])


def _bar_label(value):
    if math.isnan(value):
        return ""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def grouped_bar_chart(path, title, ylabel, categories, series, log_y=False):
    """Write a PNG bar chart: one group of bars per category, one bar per series in each group.

    `series` maps a legend label to one value per category (None or NaN: no bar).
    Returns False, with a warning, when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"warning: matplotlib is not installed, skipping {path}", file=sys.stderr)
        return False
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(categories) * len(series) + 1.5), 4.5))
    for i, (label, values) in enumerate(series.items()):
        heights = [math.nan if v is None else v for v in values]
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        bars = ax.bar(xs, heights, width, label=label)
        ax.bar_label(bars, labels=[_bar_label(v) for v in heights], fontsize=7, padding=2)
    ax.set_xticks(range(len(categories)), categories)
    ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
