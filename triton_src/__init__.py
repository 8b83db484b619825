"""Triton kernels of fla_aot, one module per op family, each with the variant spec the build expands.

Build-time only: nothing under fla_aot imports this package, so Triton is not needed at run time.
"""

FAMILIES = ["fused_recurrent", "chunk", "chunk_gla", "chunk_delta", "flash_attn"]
