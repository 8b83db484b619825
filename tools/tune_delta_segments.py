#!/usr/bin/env python3
"""An experiment for the delta rules at small batch (issue 3): the chunk state pass split into segments that run
in parallel, timed against the single pass, with the compiled ops of the installed package (no JIT).

    python tools/tune_delta_segments.py [--out table.md] [--segments 2,4,8,16]   # on a GPU
    python tools/tune_delta_segments.py --check                                # anywhere: the algebra, in torch

At B=1 (T=32768, H=16, K=V=128) the state pass runs 512 chunks one after another in each of 16 heads x 8 V-slices;
each chunk waits on the last, so the pass is latency bound (1.28 ms on an H100, about 90 % of the forward; the
backward's pass another 1.7 ms). Unlike GLA's diagonal decay, the delta rule's chunk transition is a full K x K
matrix, h' = A_c h + B_c with A_c = exp(G_L) I - K_d^T W and B_c = K_d^T U (K_d the decayed keys), so a segment
cannot start before the previous one ends - unless its transition is known. The split:

1. pass A, every segment at once: the same state kernel over a state of width V + K, started from [0 | I] with
   u widened by K zero columns, ends each segment s with [B_s | P_s]: its own contribution from a zero state and
   the product P_s of its transitions;
2. combine, over the segments in order (a few batched matmuls): start_{s+1} = P_s start_s + B_s;
3. pass B, every segment at once from its true start: the states, v_new and the final state of the single pass.

Three passes of the work of one, but S times the programs to overlap the latency. Pass A here also writes the
widened states and v_new the split does not need (a flag in the kernel would skip them): its time is an upper
bound. The backward's pass is affine in dh the same way (dh <- (exp(G_L) I - W^T K_d) dh + ...) and splits
likewise, the combine running from the last segment. The table gives each part's time, the total against the
single pass, and the error of the split's states (state gradients) against the single pass's.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHUNK = 64


def segment_table(lengths, seg_chunks, device):
    """(sequence, first token, end token, first chunk) per segment of seg_chunks chunks, as the kernels read them."""
    from fla_aot.ops.chunk import _Tables
    return _Tables(lengths, seg_chunks, device)


def combine(aug, first, V, segs_per_seq, reverse=False):
    """Each segment's true starting state from pass A's [B_s | P_s] (the state after the segment = P_s start_s +
    B_s): start_0 = first, start_{s+1} = P_s start_s + B_s; reverse (the backward's pass, which runs the
    segments from the last), start_{S-1} = first, start_{s-1} = P_s start_s + B_s."""
    NS, HV, K, _ = aug.shape
    N = NS // segs_per_seq
    contrib = aug[..., :V].view(N, segs_per_seq, HV, K, V)
    trans = aug[..., V:].view(N, segs_per_seq, HV, K, K)
    order = range(segs_per_seq - 1, 0, -1) if reverse else range(segs_per_seq - 1)
    starts = [first.view(N, HV, K, V)]
    for s in order:
        starts.append(trans[:, s] @ starts[-1] + contrib[:, s])
    if reverse:
        starts.reverse()
    return torch.stack(starts, 1).reshape(NS, HV, K, V)


def widen(x, K):
    """x [B, T, HV, V] with K zero columns more: the inputs of the identity columns of pass A."""
    return torch.cat([x, x.new_zeros(*x.shape[:3], K)], -1)


def identity_start(N, HV, K, V, device):
    """[0 | I] per segment: pass A's start."""
    start = torch.zeros(N, HV, K, V + K, device=device)
    start[..., V:] = torch.eye(K, device=device)
    return start


def split_pass(state_pass, k, w, u, gcum, h0, tabs, V, segs_per_seq):
    """The forward's state pass through segments (passes A and B and the combine): (states, v_new, final state)."""
    N, HV, K = h0.shape[0], w.shape[2], w.shape[3]
    _, _, ht_aug = state_pass(k, w, widen(u, K), gcum, identity_start(N * segs_per_seq, HV, K, V, u.device), tabs)
    starts = combine(ht_aug, h0, V, segs_per_seq)
    states, v_new, ht = state_pass(k, w, u, gcum, starts, tabs)
    return states, v_new, ht.view(N, segs_per_seq, HV, K, V)[:, -1]


def split_bwd_pass(bwd_pass, q, k, w, gcum, do, dv_local, dht, tabs, V, segs_per_seq):
    """The backward's state pass through segments: dh steps back over chunk c as
    dh <- (exp(G_L) I - W^T K_d) dh + (Q_d^T do - W^T dv_local), affine in dh as the forward is in h.
    Returns (dstates, dv_new, dh0)."""
    N, HV, K = dht.shape[0], w.shape[2], w.shape[3]
    _, _, dh0_aug = bwd_pass(q, k, w, gcum, widen(do, K), widen(dv_local, K),
                             identity_start(N * segs_per_seq, HV, K, V, do.device), tabs)
    starts = combine(dh0_aug, dht, V, segs_per_seq, reverse=True)
    dstates, dv_new, dh0 = bwd_pass(q, k, w, gcum, do, dv_local, starts, tabs)
    return dstates, dv_new, dh0.view(N, segs_per_seq, HV, K, V)[:, 0]


def state_pass_reference(k, w, u, gcum, h0, tabs):
    """What chunk_delta_state computes, in float32 torch (HV == H): per segment row of tabs.segments, from h0[row],
    (states at chunk starts, v_new, the state at the segment's end)."""
    B, T, HV, K = w.shape
    V = u.shape[-1]
    flat = [x.reshape(B * T, HV, -1).float() for x in (k, w, u)] + [gcum.reshape(B * T, HV).float()]
    kf, wf, uf, gf = flat
    C = tabs.chunks.shape[0]
    states = torch.zeros(C, HV, K, V)
    v_new = torch.zeros(B * T, HV, V)
    ht = torch.zeros(tabs.segments.shape[0], HV, K, V)
    for row, (_, bos, eos, c0) in enumerate(tabs.segments.tolist()):
        h = h0[row].float().clone()
        for i, t0 in enumerate(range(bos, eos, CHUNK)):
            t1 = min(t0 + CHUNK, eos)
            states[c0 + i] = h
            vn = uf[t0:t1] - torch.einsum("thk,hkv->thv", wf[t0:t1], h)
            v_new[t0:t1] = vn
            decay = torch.exp(gf[t1 - 1] - gf[t0:t1])  # [t, HV]
            h = h * torch.exp(gf[t1 - 1])[:, None, None] + torch.einsum("thk,thv->hkv", kf[t0:t1],
                                                                         vn * decay[..., None])
        ht[row] = h
    return states, v_new.view(B, T, HV, V), ht


def bwd_state_pass_reference(q, k, w, gcum, do, dv_local, dht, tabs, scale=0.5):
    """What chunk_delta_bwd_state computes, in float32 torch (HV == H): per segment row, from dht[row] at its end,
    (state gradients at chunk ends, dv_new, the gradient at the segment's start)."""
    B, T, HV, K = w.shape
    V = do.shape[-1]
    qf, kf, wf, dof, dvf = (x.reshape(B * T, HV, -1).float() for x in (q, k, w, do, dv_local))
    gf = gcum.reshape(B * T, HV).float()
    dstates = torch.zeros(tabs.chunks.shape[0], HV, K, V)
    dv_new = torch.zeros(B * T, HV, V)
    dh0 = torch.zeros(tabs.segments.shape[0], HV, K, V)
    for row, (_, bos, eos, c0) in enumerate(tabs.segments.tolist()):
        dh = dht[row].float().clone()
        starts = list(range(bos, eos, CHUNK))
        for i in reversed(range(len(starts))):
            t0, t1 = starts[i], min(starts[i] + CHUNK, eos)
            dstates[c0 + i] = dh
            kd = kf[t0:t1] * torch.exp(gf[t1 - 1] - gf[t0:t1])[..., None]
            dvn = dvf[t0:t1] + torch.einsum("thk,hkv->thv", kd, dh)
            dv_new[t0:t1] = dvn
            qd = qf[t0:t1] * (torch.exp(gf[t0:t1]) * scale)[..., None]
            dh = (dh * torch.exp(gf[t1 - 1])[:, None, None] + torch.einsum("thk,thv->hkv", qd, dof[t0:t1])
                  - torch.einsum("thk,thv->hkv", wf[t0:t1], dvn))
        dh0[row] = dh
    return dstates, dv_new.view(B, T, HV, V), dh0


def inputs(B, T, H, K, device, dtype=torch.bfloat16):
    gen = torch.Generator(device=device).manual_seed(0)
    k = F.normalize(torch.randn(B, T, H, K, device=device, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, H, K, device=device, generator=gen).to(dtype)
    beta = torch.rand(B, T, H, device=device, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=device, generator=gen)) / 16
    h0 = torch.randn(B, H, K, K, device=device, generator=gen)
    return k, v, beta, g, h0


def check():
    """The split against the single pass in torch, forward and backward, on any inputs (both recurrences are affine
    in the state whatever they are): two sequences of uneven length, segments that do not divide them."""
    torch.manual_seed(0)
    lengths, H, K, V = [300, 290], 2, 16, 12
    T = sum(lengths)
    k = F.normalize(torch.randn(1, T, H, K), dim=-1)
    w = 0.5 * k + 0.05 * torch.randn(1, T, H, K)
    u = torch.randn(1, T, H, V)
    g = F.logsigmoid(torch.randn(1, T, H)) / 8
    gcum = torch.cat([c.cumsum(1) for c in g.split(CHUNK, 1)], 1)  # the gate summed within each chunk
    h0 = torch.randn(len(lengths), H, K, V)
    single = segment_table(lengths, 1 << 30, "cpu")
    want = state_pass_reference(k, w, u, gcum, h0, single)
    q, do, dv_local = torch.randn(1, T, H, K), torch.randn(1, T, H, V), torch.randn(1, T, H, V)
    dht = torch.randn(len(lengths), H, K, V)
    want_bwd = bwd_state_pass_reference(q, k, w, gcum, do, dv_local, dht, single)
    for seg_chunks in (1, 2, 3):
        tabs = segment_table(lengths, seg_chunks, "cpu")
        per_seq = tabs.segments.shape[0] // len(lengths)
        assert per_seq * len(lengths) == tabs.segments.shape[0]  # the combine takes one count for every sequence
        got = split_pass(state_pass_reference, k, w, u, gcum, h0, tabs, V, per_seq)
        got_bwd = split_bwd_pass(bwd_state_pass_reference, q, k, w, gcum, do, dv_local, dht, tabs, V, per_seq)
        for name, a, b in zip(("states", "v_new", "final state", "dstates", "dv_new", "dh0"), got + got_bwd,
                              want + want_bwd):
            err = ((a - b).norm() / b.norm()).item()
            print(f"segments of {seg_chunks} chunks ({per_seq} a sequence): {name} {err:.1e}")
            assert err < 1e-5, (seg_chunks, name, err)
    print("check passed")


def event_ms(fn, repeats=10):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_split(label, B, T, t_single, pass_a, combine_, pass_b, err):
    t_a, t_c, t_b = event_ms(pass_a), event_ms(combine_), event_ms(pass_b)
    total = t_a + t_c + t_b
    return (f"| {B} | {T} | {label} | {t_a:.3f} | {t_c:.3f} | {t_b:.3f} | {total:.3f} | {t_single / total:.2f} | "
            f"{err:.1e} |")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="check the split's algebra in torch (no GPU) and stop")
    p.add_argument("--out", default=None)
    p.add_argument("--segments", default="2,4,8,16", help="segments per sequence to try")
    p.add_argument("--shapes", default="1x32768,2x8192", help="BxT, comma-separated")
    args = p.parse_args()
    if args.check:
        return check()
    from fla_aot.ops.chunk import _tables
    from fla_aot.ops.chunk_delta import _narrow, _ops
    H, K = 16, 128
    scale = K ** -0.5
    rows = ["| B | T | pass | pass A (ms) | combine (ms) | pass B (ms) | total (ms) | single / total | "
            "rel. err of the state (gradients) |", "|---|---|---|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        B, T = map(int, shape.split("x"))
        k, v, beta, g, h0 = inputs(B, T, H, K, "cuda")
        q, do = torch.randn_like(k), torch.randn_like(v)
        single = _tables((T,) * B, H, k.device, split=False)
        narrow = _narrow(single, v)
        Ai, gcum = _ops["chunk_delta_solve"](k, beta, g, single.chunks)
        w, u = _ops["chunk_delta_wu"](k, v, beta, gcum, Ai, single.chunks)
        (dv_local,) = _ops["chunk_delta_bwd_dv_local"](q, k, gcum, do, single.chunks, scale)
        dht = torch.randn_like(h0)

        def fwd(k_, w_, u_, gcum_, h0_, tabs):
            return _ops["chunk_delta_state"](k_, w_, u_, gcum_, h0_, tabs.segments, tabs.chunks, False, True, narrow)

        def bwd(q_, k_, w_, gcum_, do_, dv_local_, dht_, tabs):
            return _ops["chunk_delta_bwd_state"](q_, k_, w_, gcum_, do_, dv_local_, dht_, tabs.segments, tabs.chunks,
                                                 scale, False, True, narrow)

        want = fwd(k, w, u, gcum, h0, single)
        want_bwd = bwd(q, k, w, gcum, do, dv_local, dht, single)
        t_fwd = event_ms(lambda: fwd(k, w, u, gcum, h0, single))
        t_bwd = event_ms(lambda: bwd(q, k, w, gcum, do, dv_local, dht, single))
        rows.append(f"| {B} | {T} | forward, single | - | - | - | {t_fwd:.3f} | 1.00 | - |")
        rows.append(f"| {B} | {T} | backward, single | - | - | - | {t_bwd:.3f} | 1.00 | - |")
        nt = -(-T // CHUNK)
        for per_seq in map(int, args.segments.split(",")):
            tabs = segment_table((T,) * B, -(-nt // per_seq), k.device)
            S = tabs.segments.shape[0] // B
            start = identity_start(B * S, H, K, K, k.device)
            u_w, do_w, dvl_w = widen(u, K), widen(do, K), widen(dv_local, K)
            err = rel(split_pass(fwd, k, w, u, gcum, h0, tabs, K, S)[0], want[0])
            aug = fwd(k, w, u_w, gcum, start, tabs)[2]
            starts = combine(aug, h0, K, S)
            rows.append(time_split(f"forward, {S} segments", B, T, t_fwd, lambda: fwd(k, w, u_w, gcum, start, tabs),
                                   lambda: combine(aug, h0, K, S), lambda: fwd(k, w, u, gcum, starts, tabs), err))
            print(rows[-1], flush=True)
            err = rel(split_bwd_pass(bwd, q, k, w, gcum, do, dv_local, dht, tabs, K, S)[0], want_bwd[0])
            aug = bwd(q, k, w, gcum, do_w, dvl_w, start, tabs)[2]
            starts_b = combine(aug, dht, K, S, reverse=True)
            rows.append(time_split(f"backward, {S} segments", B, T, t_bwd,
                                   lambda: bwd(q, k, w, gcum, do_w, dvl_w, start, tabs),
                                   lambda: combine(aug, dht, K, S, reverse=True),
                                   lambda: bwd(q, k, w, gcum, do, dv_local, starts_b, tabs), err))
            print(rows[-1], flush=True)
    text = "\n".join(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
