"""Shared by the ops: fla's **kwargs, cu_seqlens checks, the forward-only autograd guard, and two streams for
independent kernels of one op."""
import torch

# Whether ops overlap their independent kernels on two streams (Concurrent); tests and tools/tune_chunk.py switch it
# off to compare.
CONCURRENT = True
_PRIORITY_STREAMS = {}


def check_kwargs(op, kwargs):
    """fla's ops take **kwargs for deprecated options; accept only their harmless values."""
    for key, value in kwargs.items():
        if key == "head_first" and not value:
            continue
        if key == "cu_seqlens_cpu":
            continue
        raise TypeError(f"{op}: unexpected argument {key}={value!r}"
                        + (" (fla_aot takes [B, T, H, K] inputs only)" if key == "head_first" else ""))


def gated_delta_gate(op, g, A_log, dt_bias):
    """fla's use_gate_in_kernel for the gated delta rule: the log-space decay -exp(A_log) * softplus(g + dt_bias)
    (float32, [B, T, HV]) from the raw gate g [B, T, HV] and per-value-head A_log, dt_bias [HV]. Plain torch ops
    ahead of the kernels, so autograd differentiates it (g, A_log and dt_bias all get gradients)."""
    if g is None:
        raise ValueError(f"{op}: use_gate_in_kernel=True needs g, the raw gate input [B, T, HV]")
    if A_log is None:
        raise ValueError(f"{op}: use_gate_in_kernel=True needs A_log [HV]")
    HV = g.shape[-1]
    for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (HV,) or not x.is_floating_point():
            raise ValueError(f"{op}: {name} must be a float tensor [HV] = [{HV}], got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.device != g.device:
            raise ValueError(f"{op}: {name} must be on {g.device} like g, got {x.device}")
    x = g.float() if dt_bias is None else g.float() + dt_bias.float()
    return -torch.exp(A_log.float()) * torch.nn.functional.softplus(x)


def _capturing():
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_cu_seqlens(op, cu_seqlens, T, cu_seqlens_cpu=None):
    """Returns (cu_seqlens as int64, its host copy) after checking it: 1-D, starting at 0, non-decreasing,
    ending at T.

    The value checks read a host copy: `cu_seqlens_cpu` when given, else a copy of a CUDA tensor
    (one sync), skipped while a CUDA graph is captured or torch.compile traces (the copy is then None).
    """
    if cu_seqlens is None:
        return None, None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be a 1-D tensor [N+1] of sequence boundaries with N >= 1")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: cu_seqlens must be int64 (or int32), got {cu_seqlens.dtype}")
    if cu_seqlens.dtype == torch.int32:
        cu_seqlens = cu_seqlens.long()
    host = cu_seqlens_cpu
    if host is None and (not cu_seqlens.is_cuda or not _capturing()):
        host = cu_seqlens.cpu()
    if host is not None:
        if host[0] != 0 or host[-1] != T:
            raise ValueError(f"{op}: cu_seqlens must start at 0 and end at T={T}, got {host.tolist()}")
        if bool((host[1:] < host[:-1]).any()):
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {host.tolist()}")
    return cu_seqlens, host


class _ForwardOnly(torch.autograd.Function):
    """Makes outputs differentiable-looking so that backward() fails loudly instead of silently."""

    @staticmethod
    def forward(ctx, op, outputs, *inputs):
        ctx.op = op
        return tuple(o.view_as(o) for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(f"fla_aot: the backward pass of {ctx.op} is not implemented yet; "
                                  f"use fla.ops for training, or call under torch.no_grad()")


def forward_only(op, outputs, inputs):
    """Returns `outputs`, attached to a graph whose backward raises, when any input needs a gradient."""
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        return _ForwardOnly.apply(op, tuple(outputs), *[x for x in inputs if isinstance(x, torch.Tensor)])
    return outputs


class Concurrent:
    """Overlaps a latency-bound kernel chain with independent work of the same op:

        with Concurrent(device) as side:
            states = side(state_pass, ...)  # on a high-priority stream, after all work queued so far
            A = other_kernel(...)            # on the current stream, meanwhile
        # here the current stream has waited for the side stream

    A state pass walks its chunks in order on few programs; on a stream of higher priority its blocks are placed
    first and the other kernel's many short blocks fill the SMs around them where registers allow (measured in
    docs/tuning/chunk.md and chunk_delta.md: up to 4% on simple GLA's backward, 0.4-1.4% on the delta rules').
    Tensors that side() returns are marked as used by the current stream (the caching allocator then does not
    reuse their memory early). Under torch.compile tracing, or with CONCURRENT off, side(fn, ...) is fn(...) in
    order. CUDA-graph capture records the fork and the join (the side stream joins the capture through the wait)."""

    def __init__(self, device):
        self.on = CONCURRENT and device.type == "cuda" and not torch.compiler.is_compiling()
        if self.on:
            self.main = torch.cuda.current_stream(device)
            if device.index not in _PRIORITY_STREAMS:
                high = torch.cuda.Stream.priority_range()[1]
                _PRIORITY_STREAMS[device.index] = torch.cuda.Stream(device, priority=high)
            self.side = _PRIORITY_STREAMS[device.index]

    def __enter__(self):
        if self.on:
            self.side.wait_stream(self.main)
        return self

    def __call__(self, fn, *args):
        if not self.on:
            return fn(*args)
        with torch.cuda.stream(self.side):
            out = fn(*args)
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(x, torch.Tensor):
                x.record_stream(self.main)
        return out

    def __exit__(self, *exc):
        if self.on:
            self.main.wait_stream(self.side)
        return False
