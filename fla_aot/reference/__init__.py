"""Readable PyTorch implementations of fla_aot's ops: the specification the kernels are tested against,
and what CPU tensors run."""
from fla_aot.reference.attention import attention_reference
from fla_aot.reference.fused_recurrent import fused_recurrent_reference

__all__ = ["attention_reference", "fused_recurrent_reference"]
