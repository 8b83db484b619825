"""Random inputs and float64 references for the chunk ops (chunk_simple_gla, chunk_retention,
chunk_linear_attn, chunk_gla), shared by the GPU and CPU tests.

The chunk ops compute exactly the recurrences of the fused_recurrent ops (only the schedule differs), so
the reference is fla_aot.reference.fused_recurrent_reference, plus fla's output normalisation for
chunk_linear_attn(normalize=True).
"""
import torch
import torch.nn.functional as F

import fla_aot.ops as ops
from fla_aot.ops.fused_recurrent import retention_log_decay
from fla_aot.reference import fused_recurrent_reference
from tests.fused_recurrent_cases import rel_err  # noqa: F401  (re-exported for the chunk tests)

# name -> public function
OPS = {
    "simple_gla": ops.chunk_simple_gla,
    "retention": ops.chunk_retention,
    "linear_attn": ops.chunk_linear_attn,
    "gla": ops.chunk_gla,
}
# ops whose signature takes cu_seqlens_cpu (chunk_simple_gla and chunk_gla by name, chunk_retention through **kwargs)
TAKES_CU_SEQLENS_CPU = ("simple_gla", "retention", "gla")

# chunk kernels run matmuls (tensor cores, tf32 for fp32) and cast intermediates to the input dtype,
# so they are looser than the fused_recurrent TOL
TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}
GRAD_TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 1e-2}
# dg sums differences (q dq - k dk) over the rest of the sequence: cancellation makes it less accurate than dq, dk
G_GRAD_TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def make_inputs(op, B=2, T=65, H=2, K=32, V=48, dtype=torch.bfloat16, gate_dtype=torch.float32, device="cpu",
                cu_seqlens=None, initial_state=True, state_v_first=False, strong_gates=False, gates=("g",),
                normalize=True, z_init=True, cu_seqlens_cpu=True, generator=None):
    """Fresh random inputs (never zeros) as keyword arguments of the public op.

    simple_gla: `gates` picks g [B, T, H] and/or g_gamma [H]; strong gates forget within a few steps,
    weak ones barely decay. linear_attn: `normalize` is passed explicitly; with normalize=True q and k are
    positive features (elu + 1, as fla's feature maps give), so that the normaliser q.z stays away from 0,
    and initial_state is the tuple (kv [N, H, K, V], z [N, 1, H, K]) when z_init.
    """
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    r = dict(generator=generator, device=device)

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float32, **r)

    q, k = randn(B, T, H, K), randn(B, T, H, K)
    if op == "linear_attn" and normalize:
        q, k = F.elu(q) + 1, F.elu(k) + 1
    kw = dict(q=q.to(dtype), k=k.to(dtype), v=randn(B, T, H, V).to(dtype))
    lo = 4.0 if strong_gates else 0.1
    if op == "simple_gla":
        if "g" in gates:
            # -lo * U(0, 1], never exactly 0
            kw["g"] = (-lo * (1 - torch.rand(B, T, H, **r))).to(gate_dtype)
        if "g_gamma" in gates:
            kw["g_gamma"] = -lo * (1 - torch.rand(H, **r))
    if op == "gla":
        # per-key gate: logsigmoid(x - 2) forgets fast (exp(G_i - G_j) spans ~e^-140 in a chunk), +3 barely decays
        kw["g"] = F.logsigmoid(randn(B, T, H, K) + (-2.0 if strong_gates else 3.0)).to(gate_dtype)
    if initial_state:
        shape = (N, H, V, K) if state_v_first else (N, H, K, V)
        kw["initial_state"] = randn(*shape)
        if op == "linear_attn" and normalize and z_init:
            # a running sum of earlier (positive) keys
            kw["initial_state"] = (kw["initial_state"], 8 * torch.rand(N, 1, H, K, **r) + 0.5)
    if state_v_first:
        kw["state_v_first"] = True
    if op == "linear_attn":
        kw["normalize"] = normalize
    if cu_seqlens is not None:
        kw["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int64, device=device)
        if cu_seqlens_cpu and op in TAKES_CU_SEQLENS_CPU:
            kw["cu_seqlens_cpu"] = torch.tensor(cu_seqlens, dtype=torch.int64)
    return kw


def to_f64(x):
    """A detached float64 CPU copy; CPU float64 tensors pass as they are (autograd leaves of the reference)."""
    if isinstance(x, tuple):
        return tuple(to_f64(y) for y in x)
    if isinstance(x, torch.Tensor) and not (x.dtype == torch.float64 and x.device.type == "cpu"):
        x = x.detach().cpu()
        return x.double() if x.is_floating_point() else x
    return x


def linear_attn_reference(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                          cu_seqlens=None):
    """fla's chunk_linear_attn: linear attention, then (normalize) o_t / (scale q_t . z_t + 1e-10) with
    z_t = z_init + k_bos + ... + k_t per sequence; the final state is then (kv [N, H, K, V], z [N, 1, H, K])."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    kv0, z0 = initial_state if isinstance(initial_state, tuple) else (initial_state, None)
    o, ht = fused_recurrent_reference(q, k, v, scale=scale, initial_state=kv0,
                                      output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if not normalize:
        return o, ht
    if z0 is None:
        z0 = torch.zeros(B if cu_seqlens is None else len(cu_seqlens) - 1, 1, H, K, dtype=k.dtype)
    if cu_seqlens is None:
        z = z0 + k.cumsum(1)                      # z0 [B, 1, H, K] broadcasts over T
        z_final = z[:, -1:] if T > 0 else z0
    else:
        bounds = cu_seqlens.tolist()
        z = torch.cat([z0[n] + k[0, s:e].cumsum(0) for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))])[None]
        # an empty sequence keeps z_init
        z_final = torch.stack([z[0, e - 1:e] if e > s else z0[n] for n, (s, e) in
                               enumerate(zip(bounds[:-1], bounds[1:]))])
    o = o / ((q * scale * z).sum(-1, keepdim=True) + 1e-10)
    if not output_final_state:
        return o, None
    return o, (ht, z_final)


def reference(op, kw):
    """The float64 result (o, final_state) of the public call `op(**kw)`, on the CPU."""
    r = {n: to_f64(x) for n, x in kw.items() if n != "cu_seqlens_cpu"}
    if op == "linear_attn":
        return linear_attn_reference(**r)
    if op == "retention":
        r["g_gamma"] = retention_log_decay(r["q"].shape[2], "cpu").double()
    if op == "gla":
        r["gk"] = r.pop("g")
    return fused_recurrent_reference(**r)


def flat_states(ht):
    """A final state as a tuple of tensors (linear_attn with normalize gives (kv, z))."""
    return () if ht is None else (ht if isinstance(ht, tuple) else (ht,))


# chunk_gla's intra-chunk products by how far the gate sums stray within a chunk (triton_src/chunk_gla.py: SPAN):
# per-step log gate sizes, by dtype's SPAN, that put whole chunks on one reference row ("chunk"), 16-row blocks
# but not their chunk on one ("block"), and the blocks themselves past SPAN (the pairing tree, "tree")
GLA_PATH_STEPS = {40.0: {"chunk": 0.05, "block": 2.0, "tree": 8.0}, 2.0: {"chunk": 0.02, "block": 0.1, "tree": 0.5}}


def gla_gate_by_chunk(B, T, H, K, paths, span, generator=None, device="cpu"):
    """A per-key log gate whose chunk c (64 tokens from the sequence's start) takes the path paths[c % len]:
    steps of -size * U[0.5, 1.5)."""
    steps = torch.tensor([GLA_PATH_STEPS[span][paths[(t // 64) % len(paths)]] for t in range(T)], device=device)
    u = torch.rand(B, T, H, K, generator=generator, device=device)
    return -(steps[None, :, None, None] * (0.5 + u))


def gla_intra_paths(g, span, cu_seqlens=None):
    """How many (chunk, head) blocks chunk_gla's intra kernels take on each path for the gate g [B, T, H, K],
    counted over all keys at once (a slice of K takes a faster path where the whole does): {"chunk": chunks on
    one reference row, "block": 16-row blocks on one where their chunk is not, "tree": 16-row blocks past SPAN}."""
    bounds = ([(b, 0, g.shape[1]) for b in range(g.shape[0])] if cu_seqlens is None else
              [(0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])])
    counts = {"chunk": 0, "block": 0, "tree": 0}
    for b, s, e in bounds:
        for t0 in range(s, e, 64):
            G = g[b, t0:min(t0 + 64, e)].float().cumsum(0)  # [n, H, K]
            n = G.shape[0]
            if (G - G[min(32, n - 1)]).abs().amax() <= span:
                counts["chunk"] += G.shape[1]
                continue
            for r0 in range(0, n, 16):
                fits = (G[r0:r0 + 16] - G[min(r0 + 8, n - 1)]).abs().amax((0, 2)) <= span  # [H]
                counts["block"] += int(fits.sum())
                counts["tree"] += int((~fits).sum())
    return counts
