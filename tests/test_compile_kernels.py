"""tools/compile_kernels.py on a machine without a GPU: cubins for sm_80 and sm_90, the manifest, the cache,
and a loud failure for a kernel that does not compile. Runs the tool as a subprocess (Triton is never
imported into the test process here)."""
import importlib
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "compile_kernels.py"
BUILD_CACHE = ROOT / "build" / "kernels" / "cache"
ARCHS = (80, 90)
ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190


def run_tool(*args, timeout=1200):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # test_interpreter sets it in-process
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    start = time.time()
    res = subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    return res, time.time() - start


def counts(stderr):
    """(total, cached, compiling) from the tool's summary line."""
    m = re.search(r"(\d+) variants for .*?, (\d+) cached, compiling (\d+)", stderr)
    assert m, stderr
    return tuple(int(x) for x in m.groups())


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """One compile for sm_80 and sm_90 into a fresh folder, seeded with the build's cache when there is one
    (keyed on source, Triton version, arch and variant, so it stays valid)."""
    out = tmp_path_factory.mktemp("kernels")
    if BUILD_CACHE.is_dir():
        shutil.copytree(BUILD_CACHE, out / "cache")
    res, seconds = run_tool("--arch", ",".join(map(str, ARCHS)), "--out", out, "--jobs", max(1, os.cpu_count() or 1))
    assert res.returncode == 0, res.stderr[-5000:]
    return out, res, seconds


def test_every_kernel_has_an_aligned_variant():
    """Without an AlignedAxis a kernel is compiled knowing nothing of its pointers' alignment (scalar loads), where
    Triton's JIT, which tools/tune_*.py time, specialises on it: the build would ship slower kernels than were
    timed (chunk_gla's forward at B=2 T=8192 lost 0.19 ms against its kernels' JIT timings while the memory-bound
    chunk_fixup had none)."""
    from tools.kernel_spec import AlignedAxis
    from triton_src import FAMILIES
    for family in FAMILIES:
        for spec in importlib.import_module(f"triton_src.{family}").SPECS:
            assert any(isinstance(a, AlignedAxis) for a in spec.axes), f"{family}.{spec.name} has no AlignedAxis"


def test_bool_axis_only_with_leaves_out_the_combination_never_asked_for():
    """The delta rules' state passes pick NARROWEST only with NARROW (fla_aot.ops.chunk_delta._slicing): the fourth
    combination is not compiled, the other three are, once per dtype, K bucket and alignment."""
    from triton_src import chunk_delta
    for spec in chunk_delta.SPECS:
        if spec.name not in ("chunk_delta_state", "chunk_delta_bwd_state"):
            continue
        combos = [(v["constexprs"]["NARROW"], v["constexprs"]["NARROWEST"]) for v in spec.variants()]
        assert set(combos) == {(False, False), (True, False), (True, True)}, spec.name
        assert len(combos) == 3 * len({v["key"].split("_NARROW", 1)[0] for v in spec.variants()}), spec.name


def test_exit_status_and_manifest_header(build):
    out, res, _ = build
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["triton_version"] == "3.6.0"
    assert manifest["archs"] == ["sm_80", "sm_90"]
    assert manifest["manifest_version"] == 1
    assert "fused_recurrent_fwd" in manifest["ops"]
    assert manifest["ops"]["fused_recurrent_fwd"]["family"] == "fused_recurrent"
    total = sum(len(vs) for op in manifest["ops"].values() for vs in op["variants"].values())
    assert counts(res.stderr)[0] == total
    assert f"wrote {total} cubins" in res.stderr


def test_every_variant_has_an_elf_cubin_for_its_arch(build):
    out, _, _ = build
    manifest = json.loads((out / "manifest.json").read_text())
    n = 0
    for op in manifest["ops"].values():
        assert sorted(op["variants"]) == ["sm_80", "sm_90"]
        for arch, variants in op["variants"].items():
            for v in variants:
                path = out / v["cubin"]
                assert path.parent.name == arch
                blob = path.read_bytes()
                assert blob[:4] == ELF_MAGIC, path
                assert blob[4] == 2, "64-bit ELF"
                assert struct.unpack_from("<H", blob, 18)[0] == EM_CUDA, path
                e_flags = struct.unpack_from("<I", blob, 48)[0]
                sm = int(arch[3:])
                assert sm in {e_flags & 0xFF, (e_flags >> 8) & 0xFF, (e_flags >> 16) & 0xFF}, (path, hex(e_flags))
                # the cache holds the same bytes under the variant's key
                assert (out / "cache" / f"{v['cache_key']}.cubin").read_bytes() == blob
                n += 1
    assert n == len(list(out.glob("sm_*/*.cubin")))


def test_variant_metadata(build):
    from tools.kernel_spec import BoolAxis
    from triton_src import FAMILIES
    specs = {s.name: s for family in FAMILIES for s in importlib.import_module(f"triton_src.{family}").SPECS}
    out, _, _ = build
    manifest = json.loads((out / "manifest.json").read_text())
    for op in manifest["ops"].values():
        spec = specs[op["name"]]
        keys = {arch: [v["key"] for v in vs] for arch, vs in op["variants"].items()}
        assert keys["sm_80"] == keys["sm_90"]
        for arch, variants in op["variants"].items():
            assert len(set(keys[arch])) == len(keys[arch]), "variant keys must be unique"
            for v in variants:
                # Triton 3.6 appends two hidden pointers (global and profile scratch) to every kernel
                assert v["num_scratch_params"] == 2, v["key"]
                assert v["kernel_name"] == "fused_recurrent_fwd_kernel" or op["name"] != "fused_recurrent_fwd"
                assert v["num_warps"] in (1, 2, 4, 8)
                assert v["shared"] >= 0 and v["global_scratch_size"] >= 0
                assert len(v["grid"]) == 3
                assert "signature" not in v and "options" not in v  # build-only fields are dropped
            # the variants are the full product of the axes: every combination of axis values once (a key
            # joins one token per axis value), less the combinations a BoolAxis(only_with=...) leaves out
            assert sorted(keys[arch]) == sorted(v["key"] for v in spec.variants())
            tokens = [tuple(k.split("_")) for k in keys[arch]]
            assert len({len(t) for t in tokens}) == 1
            per_position = [sorted(set(col)) for col in zip(*tokens)]
            if not any(isinstance(a, BoolAxis) and a.only_with for a in spec.axes):
                assert sorted(tokens) == sorted(itertools.product(*per_position))
            assert any(len(vals) > 1 for vals in per_position)  # at least one axis (chunk_gk_cumsum: the K bucket)


def test_manifest_matches_the_installed_package(build):
    """The package's manifest (fla_aot/kernels) was built from the same sources: a stale one means rebuild."""
    out, _, _ = build
    installed_path = ROOT / "fla_aot" / "kernels" / "manifest.json"
    if not installed_path.exists():
        pytest.skip("fla_aot is not built in place")
    fresh = json.loads((out / "manifest.json").read_text())
    installed = json.loads(installed_path.read_text())
    assert installed["triton_version"] == fresh["triton_version"]
    for name, entry in fresh["ops"].items():
        assert name in installed["ops"], f"{name} missing: rebuild fla_aot"
        old = installed["ops"][name]
        strip = ("variants",)
        assert {k: v for k, v in old.items() if k not in strip} == {k: v for k, v in entry.items() if k not in strip}, \
            "fla_aot/kernels/manifest.json is stale: rebuild (pip install --no-build-isolation --no-deps -e .)"
        for arch in old["variants"]:
            assert [v["cache_key"] for v in old["variants"][arch]] == [v["cache_key"] for v in entry["variants"][arch]]


def test_rerun_is_all_cached_and_fast(build):
    out, _, _ = build
    before = (out / "manifest.json").read_text()
    cubins = {p: p.read_bytes() for p in out.glob("sm_*/*.cubin")}
    res, seconds = run_tool("--arch", "80,90", "--out", out)
    assert res.returncode == 0, res.stderr[-5000:]
    total, cached, compiling = counts(res.stderr)
    assert total == cached and compiling == 0 and total == len(cubins)
    assert seconds < 20, f"a fully cached rerun took {seconds:.1f}s"
    assert (out / "manifest.json").read_text() == before
    assert {p: p.read_bytes() for p in out.glob("sm_*/*.cubin")} == cubins


def test_single_arch_output(build, tmp_path):
    out, _, _ = build
    shutil.copytree(out / "cache", tmp_path / "cache")
    res, _ = run_tool("--arch", "90", "--out", tmp_path, "--families", "fused_recurrent")
    assert res.returncode == 0, res.stderr[-5000:]
    assert counts(res.stderr)[2] == 0  # the sm_90 variants of the two-arch build are reused from the cache
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["archs"] == ["sm_90"]
    assert list(manifest["ops"]["fused_recurrent_fwd"]["variants"]) == ["sm_90"]
    assert not (tmp_path / "sm_80").exists()


def test_broken_kernel_fails_loudly(tmp_path):
    res, _ = run_tool("--arch", "90", "--out", tmp_path, "--families", "tests.broken_family", "--jobs", 1,
                      timeout=300)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "tests.broken_family.broken_copy[BLOCK64] sm_90" in last, last
    assert "1 variant(s) failed" in last
    assert "FAILED tests.broken_family.broken_copy variant BLOCK64 for sm_90" in res.stderr
    assert "broken_copy_kernel" in res.stderr and "undefined_factor" in res.stderr  # Triton's error, with source
    assert not (tmp_path / "manifest.json").exists(), "no manifest may be written when a kernel fails"


def test_broken_family_does_not_publish_a_partial_build(build, tmp_path):
    """A good family plus a broken one: non-zero exit, and the good family's cubins are not written either."""
    out, _, _ = build
    shutil.copytree(out / "cache", tmp_path / "cache")
    res, _ = run_tool("--arch", "90", "--out", tmp_path, "--families", "fused_recurrent,tests.broken_family",
                      timeout=300)
    assert res.returncode != 0
    assert "broken_copy" in res.stderr.strip().splitlines()[-1]
    assert "fused_recurrent_fwd[" not in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob("sm_*/*.cubin"))


def test_pipelining_is_lowered_to_fit_the_arch(tmp_path):
    """4 stages of 64 KB tiles do not fit sm_86's 99 KB: the build compiles fewer stages, within the limit."""
    res, _ = run_tool("--arch", "86", "--out", tmp_path, "--families", "tests.shared_memory_family", "--jobs", 1,
                      timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (variant,) = json.loads((tmp_path / "manifest.json").read_text())["ops"]["deep_matmul"]["variants"]["sm_86"]
    assert variant["num_stages"] < 4 and 48 * 1024 < variant["shared"] <= 101376, variant


def test_kernel_too_large_for_the_arch_fails_loudly(tmp_path):
    res, _ = run_tool("--arch", "90", "--out", tmp_path, "--families", "tests.oversized_family", "--jobs", 1,
                      timeout=300)
    assert res.returncode != 0
    assert "tests.oversized_family.huge_matmul[A16] sm_90" in res.stderr.strip().splitlines()[-1]
    assert "huge_matmul[A16] needs" in res.stderr and "sm_90 allows 232448" in res.stderr
    assert not (tmp_path / "manifest.json").exists()


def test_pipelining_race_fails_loudly(tmp_path):
    """A pipelined loop that refills a buffer an asynchronous product may still read (the loop shape of
    chunk_delta_bwd_dqkw on num_stages=2 while h also fed a register sum, whose dw this raced on the H200) is
    refused, naming the buffer and the products."""
    res, _ = run_tool("--arch", "90", "--out", tmp_path, "--families", "tests.racy_family", timeout=600)
    assert res.returncode != 0
    assert "tests.racy_family.pipelined_dqkw[bf16_KP128_A16] sm_90" in res.stderr, res.stderr[-3000:]
    assert "refills a one-slot buffer" in res.stderr and "%b_h_" in res.stderr and "%b_dw" in res.stderr
    assert "pipelined_dqkw[bf16_KP128] " not in res.stderr  # unaligned loads are not pipelined: no race
    assert not (tmp_path / "manifest.json").exists()


def test_cache_moves_between_machines(tmp_path):
    """--export-cache packs the entries a build used; a fresh output folder that imports them compiles nothing and
    writes the same cubins."""
    archive = tmp_path / "cache.tar.xz"
    first, fresh = tmp_path / "first", tmp_path / "fresh"
    res, _ = run_tool("--arch", "90", "--out", first, "--families", "tests.shared_memory_family", "--jobs", 1,
                      "--export-cache", archive, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    total, _, compiling = counts(res.stderr)
    assert archive.exists() and total >= 1 and compiling == total
    res, _ = run_tool("--arch", "90", "--out", fresh, "--families", "tests.shared_memory_family", "--jobs", 1,
                      "--import-cache", archive, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert counts(res.stderr) == (total, total, 0)
    for cubin in (first / "sm_90").glob("*.cubin"):
        assert (fresh / "sm_90" / cubin.name).read_bytes() == cubin.read_bytes()


def test_import_cache_refuses_other_archives(tmp_path):
    import tarfile

    archive = tmp_path / "not_a_cache.tar.xz"
    (tmp_path / "notes.txt").write_text("hello")
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    res, _ = run_tool("--arch", "90", "--out", tmp_path / "out", "--families", "tests.shared_memory_family",
                      "--import-cache", archive, timeout=300)
    assert res.returncode != 0 and "is not a kernel cache (it holds 'notes.txt')" in res.stderr
