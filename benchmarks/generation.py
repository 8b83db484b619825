"""Generation with the Hugging Face models: fla_aot.models against fla's models, each in a fresh process.

For each model shape (GLA 340M: hidden 1024, and GLA 1.3B: hidden 2048; 24 layers, random weights, bf16)
and library, a new Python process builds the model on the GPU, prefills a B=1 prompt of 512 tokens and
generates 64 tokens greedily through the recurrent cache. Reported per process:

- first token: wall time from the process launch (the parent's clock, before `subprocess` starts Python)
  to the first generated token on the host; includes interpreter start, imports, CUDA init, building
  the model and, for fla, Triton's JIT compiling its kernels. fla runs twice with one TRITON_CACHE_DIR
  that starts empty: "cold" (empty cache) then "warm".
- prefill: the median of 3 more prefills of the prompt (after the first).
- decode: ms per generated token of a greedy loop of 64 steps (model forward with the cache + argmax),
  eager, after one warm-up loop; and for fla_aot (not RetNet), the step replayed from a CUDA graph.

Writes <out>/generation.md, <out>/generation.json and, with matplotlib, <out>/generation.png.
Usage: python benchmarks/generation.py [--out docs/benchmarks] [--shapes 340M,1.3B] [--models gla]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

SHAPES = {"340M": dict(hidden_size=1024, num_hidden_layers=24), "1.3B": dict(hidden_size=2048, num_hidden_layers=24)}
MODELS = {  # model -> (config class, causal-LM class, config arguments besides the shape)
    "gla": ("GLAConfig", "GLAForCausalLM", dict(num_heads=4)),
    "retnet": ("RetNetConfig", "RetNetForCausalLM", dict(num_heads=8)),
    "delta_net": ("DeltaNetConfig", "DeltaNetForCausalLM", dict(num_heads=16)),
    "gated_deltanet": ("GatedDeltaNetConfig", "GatedDeltaNetForCausalLM", dict(num_heads=6, head_dim=128)),
}
LIBRARIES = {"fla_aot": "fla_aot.models", "fla": "fla.models"}
PROMPT, NEW_TOKENS, TIMEOUT_S = 512, 64, 1800


def worker(args):
    """Runs in the fresh process: measure and print one JSON line."""
    import importlib

    import torch

    lib = importlib.import_module(LIBRARIES[args.library])
    config_name, lm_name, extra = MODELS[args.model]
    config = getattr(lib, config_name)(vocab_size=32000, **SHAPES[args.shape], **extra)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(lib, lm_name)(config).to(torch.bfloat16).eval()
    prompt = torch.randint(3, 32000, (1, PROMPT), device="cuda")

    def prefill():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

    def decode(token, cache):
        for _ in range(NEW_TOKENS):
            out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token, cache = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
        return token

    with torch.no_grad():
        token, cache = prefill()
        first_token = int(token.item())  # the host has the token: synchronised
        first_token_s = time.time() - args.launched_at
        prefill_s = []
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            token, cache = prefill()
            token.item()
            prefill_s.append(time.perf_counter() - start)
        decode(token, cache).item()  # warm-up loop
        token, cache = prefill()
        torch.cuda.synchronize()
        start = time.perf_counter()
        decode(token, cache).item()
        decode_s = (time.perf_counter() - start) / NEW_TOKENS
        graph_ms = None
        if args.library == "fla_aot" and args.model in ("gla", "delta_net", "gated_deltanet"):
            try:  # (RetNet's rotary positions are host-side counters: not graph-safe)
                graph_ms = decode_graph_ms(model, prefill, torch)
            except Exception as error:  # optional: report and go on
                print(f"CUDA graph decode failed: {type(error).__name__}: {error}", file=sys.stderr)
    print(json.dumps({"first_token_s": first_token_s, "prefill_s": statistics.median(prefill_s),
                      "decode_ms_per_token": decode_s * 1e3, "decode_graph_ms_per_token": graph_ms,
                      "first_token_id": first_token, "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__}))


def decode_graph_ms(model, prefill, torch):
    """ms per token of fla_aot's decode step replayed from a CUDA graph: the step reads the cache's states
    from fixed tensors and copies its new states back into them, so each replay advances one token."""
    import _harness as h
    token, cache = prefill()
    def fixed_copy(value):
        if value is None or torch.is_tensor(value):
            return None if value is None else value.clone()
        return tuple(x.clone() for x in value)

    static = [{k: fixed_copy(v) for k, v in layer.items()} for layer in cache.states]
    token = token.clone()

    def step():
        for layer, fixed in zip(cache.states, static):
            layer.update(fixed)
        out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for layer, fixed in zip(cache.states, static):
            fixed["recurrent_state"].copy_(layer["recurrent_state"])
            for dst, src in zip(fixed["conv_state"] or (), layer["conv_state"] or ()):
                dst.copy_(src)
        token.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        return token

    graph, _ = h.capture_cuda_graph(step)
    return h.wall_time_per_call(graph.replay, NEW_TOKENS, 5, warmup=3) * 1e3


def run(library, model, shape, env):
    import _harness as h
    code = ("import sys, time; t = {t!r}; sys.argv = ['generation.py', '--worker', '--library', {lib!r}, "
            "'--model', {model!r}, '--shape', {shape!r}, '--launched-at', repr(t)]; "
            "sys.path.insert(0, {bench!r}); import generation; generation.main()")
    launched = time.time()
    script = code.format(t=launched, lib=library, model=model, shape=shape, bench=str(BENCH_DIR))
    with tempfile.TemporaryDirectory(prefix="fla_gen_") as workdir:  # cwd: a checkout cannot shadow the install
        return h.run_json_subprocess(script, env, TIMEOUT_S, cwd=workdir)


def report(results, out):
    import _harness as h
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = []
    for r in results:
        rows.append([r["model"], r["shape"], r["library"], r.get("run", ""),
                     h.fmt(r.get("first_token_s"), 1, 2) if r["ok"] else r.get("error", "failed"),
                     h.fmt(r.get("prefill_s"), 1e3, 1), h.fmt(r.get("decode_ms_per_token"), 1, 2),
                     h.fmt(r.get("decode_graph_ms_per_token"), 1, 3)])
    gpu = next((r["gpu"] for r in results if r.get("gpu")), "unknown GPU")
    text = ["# Generation: fla_aot.models vs fla's models", "",
            f"Made by `python benchmarks/generation.py` on {gpu}. B=1, a {PROMPT}-token prompt, {NEW_TOKENS} "
            "greedy tokens, random weights, bf16, each row a fresh process. First token: from the process "
            "launch to the first generated token on the host (imports, CUDA init, model build, prefill; for fla "
            "also Triton's JIT: 'cold' starts with an empty TRITON_CACHE_DIR, 'warm' reuses it). Prefill: "
            "median of 3 later prefills. Decode: ms per token of an eager greedy loop through the cache; CUDA graph: "
            "fla_aot's decode step (forward + argmax + state copies) replayed from a graph.", "",
            h.markdown_table(["model", "shape", "library", "Triton cache", "first token (s)", "prefill (ms)",
                              "decode (ms/token)",
                              "decode, CUDA graph (ms/token)"], rows), ""]
    (out / "generation.md").write_text("\n".join(text))
    labels = [f"{r['model']} {r['shape']}" for r in results if r["library"] == "fla_aot"]
    for key, title, unit, log in (("first_token_s", "Process launch to first token", "s", True),
                                  ("decode_ms_per_token", "Decode, eager", "ms / token", False)):
        series = {}
        for lib, run_name in (("fla_aot", ""), ("fla", "cold"), ("fla", "warm")):
            name = lib if not run_name else f"{lib} ({run_name} Triton cache)"
            series[name] = [next((r.get(key) for r in results if r["library"] == lib and r.get("run", "") == run_name
                                  and f"{r['model']} {r['shape']}" == label), None) for label in labels]
        h.grouped_bar_chart(out / f"generation_{key.split('_')[0]}.png", title, unit, labels, series, log_y=log)
    print("\n".join(text))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--shapes", default="340M,1.3B")
    parser.add_argument("--models", default="gla", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--only", choices=list(LIBRARIES), help="one library only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--launched-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results = []
    libraries = [args.only] if args.only else list(LIBRARIES)
    for model in args.models.split(","):
        for shape in args.shapes.split(","):
            for library in libraries:
                if library == "fla":
                    with tempfile.TemporaryDirectory(prefix="fla_triton_cache_") as cache_dir:
                        env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
                        for run_name in ("cold", "warm"):
                            r = run(library, model, shape, env)
                            results.append(dict(r, library=library, model=model, shape=shape, run=run_name))
                            print(f"[{library} {model} {shape} {run_name}] {results[-1]}", flush=True)
                else:
                    r = run(library, model, shape, dict(os.environ))
                    results.append(dict(r, library=library, model=model, shape=shape, run=""))
                    print(f"[{library} {model} {shape}] {results[-1]}", flush=True)
    report(results, args.out)


if __name__ == "__main__":
    main()
