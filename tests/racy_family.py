"""chunk_delta_bwd_dqkw software-pipelined (num_stages=2), for tests/test_compile_kernels.py (imported only by the
tool's subprocess, as `--families tests.racy_family`): its h and dh loads get one buffer slot each, refilled while
the products reading them may still run (tools/pipeline_races.py), so the build must refuse it."""
import dataclasses

from triton_src.chunk_delta import SPECS as DELTA_SPECS

_DQKW = next(s for s in DELTA_SPECS if s.name == "chunk_delta_bwd_dqkw")
SPECS = [dataclasses.replace(_DQKW, name="pipelined_dqkw",
                             launch_config=lambda **axes: dict(_DQKW.launch_config(**axes), num_stages=2))]
