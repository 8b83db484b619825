"""How much chunk_gla's intra-chunk scores A lose to the bfloat16 rounding of their factored rows, per form
(triton_src/chunk_gla.py): one reference row for the chunk, one for each 16-row block (the rest on the pairing
tree), and the pairing tree alone, each against float64; on the CPU, for the benchmark's gate and a weak one.

    python tools/gla_intra_rounding.py [--chunks 512]
"""
import argparse

import torch
import torch.nn.functional as F

BT = 64


def _bf16(x):
    return x.to(torch.bfloat16).double()


def scores(q, k, G, form):
    """A [N, BT, BT] (no scale) as the kernels form it, the factored rows rounded to bfloat16 before each product
    (float64 after), the diagonal from the unrounded rows (form "chunk, diagonal in the product": from the rounded
    rows, as the first one-reference kernel took it)."""
    idx = torch.arange(BT)
    below = idx[:, None] > idx[None, :]
    tree = torch.zeros(q.shape[0], BT, BT, dtype=torch.float64)
    for lvl in range(6):  # level s = 2^lvl: in each block of 2s rows the later s pair with the earlier s
        s = 1 << lvl
        later = (idx % (2 * s)) >= s
        dm = G - G[:, idx // (2 * s) * (2 * s) + s]
        e = torch.exp(torch.where(later[None, :, None], dm, -dm))
        pairs = (idx[:, None] // (2 * s) == idx[None, :] // (2 * s)) & later[:, None] & ~later[None, :]
        tree += (_bf16(q * e) @ _bf16(k * e).transpose(1, 2)) * pairs
    if form.startswith("chunk"):
        d = G - G[:, BT // 2:BT // 2 + 1]
        A = _bf16(q * torch.exp(d)) @ _bf16(k * torch.exp(-d)).transpose(1, 2)
        if form != "chunk":
            return A * (below | (idx[:, None] == idx[None, :]))
        A = A * below
    elif form == "block":
        d = G - G[:, idx // 16 * 16 + 8]
        same = (idx[:, None] // 16) == (idx[None, :] // 16)
        A = torch.where(same & below, _bf16(q * torch.exp(d)) @ _bf16(k * torch.exp(-d)).transpose(1, 2), tree)
    else:
        A = tree
    return A + torch.diag_embed((q * k).sum(-1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", type=int, default=512)
    args = p.parse_args()
    torch.manual_seed(0)
    q, k = (_bf16(torch.randn(args.chunks, BT, 128)) for _ in range(2))
    forms = ("chunk", "chunk, diagonal in the product", "block", "tree")
    print("| gate | max abs(G - G_mid) in a chunk | one row a chunk | the same, diagonal in the product | one row a "
          "16-row block | the tree alone |")
    print("|---|---|---|---|---|---|")
    for shift, name in ((0.0, "logsigmoid(randn) (the benchmark's)"), (3.0, "logsigmoid(randn + 3)")):
        G = F.logsigmoid(torch.randn(q.shape) + shift).double().cumsum(1)
        exact = torch.einsum("nik,njk,nijk->nij", q, k, torch.exp((G[:, :, None] - G[:, None]).clamp(max=0)))
        exact = exact * torch.ones(BT, BT).tril()
        errs = [((scores(q, k, G, f) - exact).norm() / exact.norm()).item() for f in forms]
        span = (G - G[:, BT // 2:BT // 2 + 1]).abs().amax().item()
        print(f"| {name} | {span:.1f} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")


if __name__ == "__main__":
    main()
