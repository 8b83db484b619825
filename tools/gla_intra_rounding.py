"""How much chunk_gla's intra-chunk scores A lose to the bfloat16 rounding of their factored rows, per form
(triton_src/chunk_gla.py): one reference row for the chunk, one for each 16-row block (the rest on the pairing
tree), and the pairing tree alone, each against float64; on the CPU, for the benchmark's gate and a weak one.
The pairs' rows come from tools/gla_gate_grad_rounding.py (pair_anchors, rounded), as in its replay of the backward.

    python tools/gla_intra_rounding.py [--chunks 512]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.gla_gate_grad_rounding import BF16, BT, pair_anchors, rounded  # noqa: E402


def scores(q, k, G, form, diagonal_in_product=False):
    """A [BT, BT] (no scale) of one chunk as the kernels form it: each pair j < i through the row pair_anchors(form)
    gives, its factored rows rounded to bfloat16 before the product (float64 after); the diagonal from the unrounded
    rows, or (diagonal_in_product) from the rows factored through the middle row, as the first one-reference
    kernel took it."""
    o = torch.arange(BT)
    m = pair_anchors(G, form)
    below = (o[:, None] > o[None, :])[..., None]
    qe = rounded(q[:, None] * torch.exp(torch.where(below, G[:, None] - G[m], 0.)), BF16)  # [i, j, K]
    ke = rounded(k[None] * torch.exp(torch.where(below, G[m] - G[None], 0.)), BF16)
    A = (qe * ke * below).sum(-1)
    if diagonal_in_product:
        d = G - G[BT // 2]
        return A + torch.diag((rounded(q * torch.exp(d), BF16) * rounded(k * torch.exp(-d), BF16)).sum(-1))
    return A + torch.diag((q * k).sum(-1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", type=int, default=512)
    args = p.parse_args()
    torch.manual_seed(0)
    q, k = (torch.randn(args.chunks, BT, 128).to(torch.bfloat16).double() for _ in range(2))
    forms = (("chunk", False), ("chunk", True), ("block", False), ("tree", False))
    print("| gate | max abs(G - G_mid) in a chunk | one row a chunk | the same, diagonal in the product | one row a "
          "16-row block | the tree alone |")
    print("|---|---|---|---|---|---|")
    for shift, name in ((0.0, "logsigmoid(randn) (the benchmark's)"), (3.0, "logsigmoid(randn + 3)")):
        G = F.logsigmoid(torch.randn(q.shape) + shift).double().cumsum(1)
        exact = torch.einsum("nik,njk,nijk->nij", q, k, torch.exp((G[:, :, None] - G[:, None]).clamp(max=0)))
        exact = exact * torch.ones(BT, BT).tril()
        errs = [(torch.stack([scores(q[c], k[c], G[c], f, diag) for c in range(len(q))]) - exact).norm()
                / exact.norm() for f, diag in forms]
        span = (G - G[:, BT // 2:BT // 2 + 1]).abs().amax().item()
        print(f"| {name} | {span:.1f} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")


if __name__ == "__main__":
    main()
