"""Readable PyTorch implementations of fla_aot's ops: the specification the kernels are tested against,
and what CPU tensors run."""
from fla_aot.reference.fused_recurrent import fused_recurrent_reference

__all__ = ["fused_recurrent_reference"]
