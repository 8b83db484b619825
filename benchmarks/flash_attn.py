"""Benchmark exact attention: fla_aot's flash_attn_func against torch SDPA's flash backend, in one run.

Shapes (FlashAttention's benchmark convention): seqlen T = 512, 1024, ..., 32768, batch B = 32768 / T, hidden
2048 (H = 2048 / D), head dim D = 64 and 128, causal and not, bf16, layout [B, T, H, D] for fla_aot and
[B, H, T, D] views of the same tensors for SDPA. Forward, and forward + backward (torch.autograd.grad against q, k,
v with a fixed do). TFLOP/s = 4 B H T^2 D (forward; halved when causal) and 3.5x that for forward + backward.
Times: CUDA events, warm-up, median of repeats. fla_aot's output is checked against SDPA's (relative error).
Also the time to the first result in a fresh process after `import torch` and CUDA init.

    python benchmarks/flash_attn.py --out docs/benchmarks [--quick]

Writes <out>/flash_attn.md (also printed), <out>/flash_attn.json and, if matplotlib is installed,
<out>/flash_attn.png. A failed measurement is recorded in the table instead of stopping the run.
"""
import argparse
import json
import os
import platform
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = 2048
TOKENS = 32768

FIRST_RESULT = """
import json, time, torch
torch.zeros(1, device="cuda"); torch.cuda.synchronize()
start = time.perf_counter()
import fla_aot.ops as ops
q = torch.randn(1, 1024, 16, 128, device="cuda", dtype=torch.bfloat16)
o = ops.flash_attn_func(q, q, q, causal=True); torch.cuda.synchronize()
print(json.dumps({"first_result_s": time.perf_counter() - start}))
"""


def flops(B, T, H, D, causal, mode):
    f = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)  # the backward does 2.5x the forward's products


def measure(fn, repeats, n):
    return h.event_time_per_call(fn, n=n, repeats=repeats, warmup=3)


def bench_shape(ops, T, D, causal, repeats):
    B, H = TOKENS // T, HIDDEN // D
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    qs, ks, vs, dos = (x.transpose(1, 2) for x in (q, k, v, do))  # [B, H, T, D] views for SDPA

    def ours():
        return ops.flash_attn_func(q, k, v, causal=causal)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)

    def ours_bwd():
        torch.autograd.grad(ours(), (q, k, v), do)

    def sdpa_bwd():
        torch.autograd.grad(sdpa(), (qs, ks, vs), dos)

    row = {"T": T, "B": B, "H": H, "D": D, "causal": causal}
    with torch.no_grad():
        try:
            row["rel_err_vs_sdpa"] = h_rel(ours(), sdpa().transpose(1, 2))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    n = max(1, min(20, int(2e10 / flops(B, T, H, D, causal, "fwd"))))
    runs = (("fla_aot_fwd", ours), ("sdpa_fwd", sdpa), ("fla_aot_fwdbwd", ours_bwd), ("sdpa_fwdbwd", sdpa_bwd))
    for name, fn in runs:
        try:
            if name.endswith("fwd"):
                with torch.no_grad():
                    t = measure(fn, repeats, n)
            else:
                t = measure(fn, repeats, n)
            row[name + "_ms"] = t * 1e3
            mode = "fwd" if name.endswith("_fwd") else "fwd+bwd"
            row[name + "_tflops"] = flops(B, T, H, D, causal, mode) / t / 1e12
        except Exception as e:  # noqa: BLE001
            row[name + "_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            traceback.print_exc()
    return row


def h_rel(x, ref):
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm()).item()


def write(out, rows, first):
    out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version()}
    (out / "flash_attn.json").write_text(json.dumps({"meta": meta, "rows": rows, "first_result": first}, indent=1))
    lines = ["# Exact attention: fla_aot flash_attn_func vs torch SDPA (flash backend)", "",
             f"{meta['gpu']}, torch {meta['torch']}, bf16, hidden {HIDDEN} (H = {HIDDEN} / D), batch = {TOKENS} / T. "
             "TFLOP/s (higher is better); ratio = SDPA time / fla_aot time (>= 1: fla_aot faster). "
             "Made by `python benchmarks/flash_attn.py`.", ""]
    headers = ["D", "causal", "T", "B", "fwd fla_aot", "fwd SDPA", "fwd ratio", "fwd+bwd fla_aot", "fwd+bwd SDPA",
               "fwd+bwd ratio", "rel err vs SDPA"]
    table = []
    for r in rows:
        def ratio(a, b):
            return h.fmt(r[b] / r[a], digits=2) if a in r and b in r else "n/a"
        table.append([r["D"], r["causal"], r["T"], r["B"], h.fmt(r.get("fla_aot_fwd_tflops")),
                      h.fmt(r.get("sdpa_fwd_tflops")), ratio("fla_aot_fwd_ms", "sdpa_fwd_ms"),
                      h.fmt(r.get("fla_aot_fwdbwd_tflops")), h.fmt(r.get("sdpa_fwdbwd_tflops")),
                      ratio("fla_aot_fwdbwd_ms", "sdpa_fwdbwd_ms"),
                      h.fmt(r.get("rel_err_vs_sdpa"), digits=4) if "rel_err_vs_sdpa" in r else r.get("error", "n/a")])
    lines.append(h.markdown_table(headers, table))
    errors = [(r, k, v) for r in rows for k, v in r.items() if k.endswith("_error")]
    if errors:
        lines += ["", "Failed measurements:", ""] + [f"- D={r['D']} causal={r['causal']} T={r['T']} {k}: {v}"
                                                      for r, k, v in errors]
    if first:
        lines += ["", f"Time to the first flash_attn_func result in a fresh process after `import torch` and CUDA "
                  f"init: {h.fmt(first.get('first_result_s'), 1e3)} ms" + ("" if first.get("ok") else
                                                                            f" ({first.get('error')})")]
    text = "\n".join(lines) + "\n"
    (out / "flash_attn.md").write_text(text)
    cats = [f"D{r['D']}{' c' if r['causal'] else ''} T{r['T']}" for r in rows]
    h.grouped_bar_chart(out / "flash_attn.png", "flash_attn_func vs SDPA flash (bf16), TFLOP/s", "TFLOP/s", cats, {
        "fla_aot fwd": [r.get("fla_aot_fwd_tflops") for r in rows],
        "SDPA fwd": [r.get("sdpa_fwd_tflops") for r in rows],
        "fla_aot fwd+bwd": [r.get("fla_aot_fwdbwd_tflops") for r in rows],
        "SDPA fwd+bwd": [r.get("sdpa_fwdbwd_tflops") for r in rows]})
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    p.add_argument("--quick", action="store_true", help="T = 1024 and 8192 only, fewer repeats")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    import fla_aot.ops as ops
    seqlens = [1024, 8192] if args.quick else [512 << i for i in range(7)]
    repeats = 3 if args.quick else args.repeats
    rows, first = [], None
    out = Path(args.out)
    for D in (64, 128):
        for causal in (False, True):
            for T in seqlens:
                row = bench_shape(ops, T, D, causal, repeats)
                rows.append(row)
                print(json.dumps(row), flush=True)
                write(out, rows, first)
                torch.cuda.empty_cache()
    env = dict(os.environ)
    first = h.run_json_subprocess(FIRST_RESULT, env, timeout=120, cwd=str(ROOT))
    print(write(out, rows, first))


if __name__ == "__main__":
    main()
