"""fla_aot.ops: a drop-in for fla.ops, served from precompiled kernels.

Importing it registers the torch ops of the manifest (torch.ops.fla_aot.*) from the C++ extension.
"""
import fla_aot._registry  # noqa: F401  registers torch.ops.fla_aot.*
from fla_aot.ops.chunk import chunk_gla, chunk_linear_attn, chunk_retention, chunk_simple_gla
from fla_aot.ops.chunk_delta import chunk_delta_rule, chunk_gated_delta_rule
from fla_aot.ops.flash_attn import (
    flash_attention,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    piecewise_attention,
)
from fla_aot.ops.fused_recurrent import (
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gla,
    fused_recurrent_linear_attn,
    fused_recurrent_retention,
    fused_recurrent_simple_gla,
)

__all__ = [
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "chunk_gla",
    "chunk_linear_attn",
    "chunk_retention",
    "chunk_simple_gla",
    "flash_attention",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gla",
    "fused_recurrent_linear_attn",
    "fused_recurrent_retention",
    "fused_recurrent_simple_gla",
    "piecewise_attention",
]
