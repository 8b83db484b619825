#!/usr/bin/env python3
"""Where chunk_gla's gate gradient loses its digits: the backward's arithmetic replayed in float64 on the CPU, with
chosen operands rounded to fewer mantissa bits, against the exact gradient.

    python tools/gla_gate_grad_rounding.py [--T 2048] [--K 128] [--V 128]

One head, bf16-valued random q, k, v, do and the benchmark's gate (logsigmoid(randn), float32). The exact dg comes from
the token-by-token recurrence; the replay follows triton_src/chunk_gla.py chunk by chunk: the states' shares of dq and
dk from the chunk's starting state h and its end gradient dh, the intra-chunk sums on the pairing tree (a pair i > j
meets at the level of the highest bit where i and j differ, through the gate at its anchor row m), and dg as the sum
of q.dq - k.dk inside the chunk plus sum_v h_L dh_L after it. Each row of the table rounds some operands: the states
(stored 16-bit between kernels), the tree's factored rows (q e, k e) and dA as the tree's products take them; the
other forms take every pair of a chunk through its middle row where the gate allows (the kernels' chunk form), or
only the pairs of different 16-row blocks.
"""
import argparse

import torch
import torch.nn.functional as F

BT = 64
BF16, TF32 = 7, 10  # explicit mantissa bits


def rounded(x, bits):
    """x rounded to `bits` explicit mantissa bits (None: unchanged); the exponent stays float64's."""
    if bits is None:
        return x
    m, e = torch.frexp(x)
    return torch.ldexp(torch.round(m * 2 ** (bits + 1)) / 2 ** (bits + 1), e)


def exact(q, k, v, do, g, scale):
    """dg by the recurrence, plus each token's state before it and the gradient of the state after it from later
    tokens."""
    T, K = q.shape
    S = q.new_zeros(K, v.shape[1])
    before = []
    for t in range(T):
        before.append(S)
        S = torch.exp(g[t])[:, None] * S + k[t][:, None] * v[t][None, :]
    dg, later = torch.empty_like(q), [None] * T
    nxt = torch.zeros_like(S)
    for t in reversed(range(T)):
        later[t] = nxt
        dS = nxt + scale * q[t][:, None] * do[t][None, :]
        dg[t] = (before[t] * torch.exp(g[t])[:, None] * dS).sum(1)
        nxt = torch.exp(g[t])[:, None] * dS
    return dg, before, later


# how far a chunk's gate sums may stray from its middle row for the one-row form: triton_src/chunk_gla.py's _span for
# bfloat16 (tests/test_interpreter_chunk.py holds the two equal; importing the kernels here would build them before
# the interpreter tests can ask for interpreted ones)
SPAN = 40.0


FORMS = {"tree": "the tree's anchors", "chunk": "the chunk's middle row",
         "across": "the middle row across 16-row blocks, the tree inside them"}


def pair_anchors(G, form="tree"):
    """The row m [n, n] that each pair (i, j), j < i, of a chunk with gate sums G [n, K] goes through. "tree": the
    pairing tree's anchor (the first later row of the block where i and j fall in different halves); "chunk": where
    the sums stay within SPAN of the chunk's middle row, that row for every pair (the kernels' chunk form), else
    the tree's; "across": the middle row only for pairs of different 16-row blocks; "block": each 16-row block's
    middle row for the pairs inside it where all blocks stay within SPAN of theirs (the kernels' block form), the
    tree's across blocks."""
    n = G.shape[0]
    o = torch.arange(n)
    level = torch.where(o[None, :] < o[:, None], (o[:, None] ^ o[None, :]).float().log2().floor().long(), 0)
    m = ((o[:, None] // (2 << level)) * (2 << level) + (1 << level)).clamp(max=n - 1)
    same = o[:, None] // 16 == o[None, :] // 16
    mid = min(BT // 2, n - 1)
    if form in ("chunk", "across") and (G - G[mid]).abs().max() <= SPAN:
        m = torch.where(same & (form == "across"), m, mid)
    block_mid = (o // 16 * 16 + 8).clamp(max=n - 1)
    if form == "block" and (G - G[block_mid]).abs().max() <= SPAN:
        m = torch.where(same, block_mid[:, None], m)
    return m


def replay(q, k, v, do, g, scale, before, later, tree_bits, state_bits, da_bits, form="tree"):
    """dg as the kernels take it, with the tree's rows, dA and the states rounded as asked, each pair through the
    row pair_anchors(form) gives."""
    o = torch.arange(BT)
    low = o[None, :] < o[:, None]
    dg = torch.empty_like(q)
    for c0 in range(0, q.shape[0], BT):
        c1 = min(c0 + BT, q.shape[0])
        n = c1 - c0
        G = g[c0:c1].cumsum(0)
        qc, kc, vc, doc = q[c0:c1], k[c0:c1], v[c0:c1], do[c0:c1]
        h, dh = rounded(before[c0], state_bits), rounded(later[c1 - 1], state_bits)
        dq = scale * torch.exp(G) * (doc @ h.T)
        dk_state = torch.exp(G[-1] - G) * (vc @ dh.T)
        dA = scale * (doc @ vc.T) * (o[:n, None] >= o[None, :n])
        lo, m = low[:n, :n, None], pair_anchors(G, form)
        e_later = torch.exp(torch.where(lo, G[:, None] - G[m], 0.))  # [i, j, K], rows i vs the anchor
        e_earlier = torch.exp(torch.where(lo, G[m] - G[None], 0.))  # the anchor vs rows j
        dA_tree = rounded(dA, da_bits)[..., None] * lo
        dq = dq + dA.diagonal()[:, None] * kc + (e_later * dA_tree * rounded(kc[None] * e_earlier, tree_bits)).sum(1)
        dk = dk_state + dA.diagonal()[:, None] * qc + (e_earlier * dA_tree * rounded(qc[:, None] * e_later,
                                                                                      tree_bits)).sum(0)
        after = torch.exp(G[-1]) * (h * dh).sum(1) + (kc * dk_state).sum(0)
        dg[c0:c1] = (qc * dq - kc * dk).flip(0).cumsum(0).flip(0) + after
    return dg


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    as_bf16 = lambda *shape: torch.randn(*shape).to(torch.bfloat16).double()  # noqa: E731
    q, k, v, do = as_bf16(args.T, args.K), as_bf16(args.T, args.K), as_bf16(args.T, args.V), as_bf16(args.T, args.V)
    g = F.logsigmoid(torch.randn(args.T, args.K)).double()
    scale = args.K ** -0.5
    dg, before, later = exact(q, k, v, do, g, scale)
    print(f"T={args.T} K={args.K} V={args.V}: ||dg - exact|| / ||exact|| of the replay with")
    print("| pairs through | factored rows | dA in the products | states | dg rel. err |\n|---|---|---|---|---|")
    bits = {None: "exact", BF16: "bf16", TF32: "tf32"}
    for form in FORMS:
        for tree, da, state in [(None, None, None), (BF16, BF16, BF16), (BF16, BF16, None), (BF16, None, BF16),
                                (None, BF16, BF16), (TF32, TF32, BF16), (None, None, BF16)]:
            err = (replay(q, k, v, do, g, scale, before, later, tree, state, da, form) - dg).norm() / dg.norm()
            print(f"| {FORMS[form]} | {bits[tree]} | {bits[da]} | {bits[state]} | {err:.1e} |")


if __name__ == "__main__":
    main()
