"""fla_aot: flash-linear-attention's kernels compiled ahead of time.

`import fla_aot.ops` serves the ops of `fla.ops` from cubins built at install time and launched from
C++: no Triton, no JIT and no autotuning at run time.
"""
__version__ = "0.1.0"
