"""A write-after-read race that Triton 3.6's software pipeliner can leave in a loop on sm_90, found in compiled
TTGIR: an operand buffer of one slot (`local_alloc` of shape 1 x ...) refilled by the next iteration's
`async_copy_global_to_local` while an asynchronous `warp_group_dot` of this iteration that reads it may still run
(the last `warp_group_dot_wait` before the copy leaves it pending). The product then now and then reads some of
the next iteration's data, more often on a loaded GPU. tools/compile_kernels.py refuses a variant that has one.

Found in chunk_delta_bwd_dqkw with 16-bit dv_new on num_stages=2: h and dh, which also feed a register sum, got one
slot each (do, v_new and dv_new two), and dw came out wrong at T=2048 H=16 on the H200 while right at the tests'
small shapes (docs/tuning/chunk_delta.md). A load that feeds products only gets two slots; one stage does not
pipeline at all.
"""
import re

_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_VALUE = re.compile(r"%[\w.]+")


def pipeline_races(ttgir):
    """[(loop line, buffer, [products])] for each one-slot buffer refilled while a product reading it may run."""
    lines = ttgir.splitlines()
    aliases = {}  # SSA value -> the one-slot buffer it views
    for line in lines:
        m = _DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        if op == "ttg.local_alloc" and re.search(r"memdesc<1x\d+x", rest) and "mutable" in rest:
            aliases[name] = name
        elif op.startswith("ttg.memdesc_"):
            src = next((v for v in _VALUE.findall(rest) if v in aliases), None)
            if src:
                aliases[name] = aliases[src]
    found = []
    for start, line in enumerate(lines):
        if "scf.for" not in line or not line.rstrip().endswith("{"):
            continue
        body, depth = [], 1
        for inner in lines[start + 1:]:
            depth += inner.count("{") - inner.count("}")
            if depth <= 0:
                break
            body.append(inner)
        pending = []
        for sweep in range(2):  # the second sweep starts with what the first left pending (the loop's back edge)
            for inner in body:
                m = _DEF.match(inner)
                op, rest = (m.group(2), m.group(3)) if m else ("", inner)
                if op == "ttng.warp_group_dot" and "isAsync = true" in rest:
                    operands = _VALUE.findall(rest.split(":")[0])[:2]
                    pending.append((m.group(1), {aliases[v] for v in operands if v in aliases}))
                elif op == "ttng.warp_group_dot_wait":
                    keep = int(re.search(r"pendings = (\d+)", rest).group(1))
                    pending = pending[-keep:] if keep else []
                elif op == "ttg.async_copy_global_to_local" or "ttg.local_store" in inner:
                    values = _VALUE.findall(rest.split(" mask ")[0].split(":")[0])
                    dst = aliases.get(values[1] if op == "ttg.async_copy_global_to_local" else values[-1])
                    readers = [dot for dot, bufs in pending if dst in bufs]
                    if dst and readers and sweep == 1:
                        found.append((start + 1, dst, readers))
    return found
