#!/usr/bin/env python3
"""Compile every kernel variant of triton_src/ to cubins plus a manifest, on a machine with or without a GPU.

    python tools/compile_kernels.py --arch 80,90 --out build/kernels

Writes <out>/sm_<arch>/<op>.<variant>.cubin and <out>/manifest.json (op schemas, argument shapes,
kernel parameter bindings and, per arch, each variant's guards, grid and launch metadata). Compiled
variants are cached in <out>/cache keyed on the family's source (and the triton_src modules it imports), the
Triton version, the arch and the variant, so a rerun with nothing changed takes seconds. Exits non-zero naming the kernel that failed.

The cache moves between machines with the same pinned Triton: `--export-cache FILE.tar.xz` packs the entries this
build used, `--import-cache FILE.tar.xz` unpacks them before compiling (entries whose sources changed since are
simply not found and compile again). A GPU machine that builds the package can so start from cubins compiled
elsewhere: tools/gpu_session.sh imports `.kernel_cache/sm_<arch>.tar.xz` when it is present.
"""
import argparse
import concurrent.futures as cf
import hashlib
import importlib
import json
import os
import re
import shutil
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.kernel_spec import TRITON_VERSION  # noqa: E402
from tools.pipeline_races import pipeline_races  # noqa: E402

MANIFEST_VERSION = 1

# The most shared memory one program may opt in to, in bytes, by compute capability (CUDA's programming guide);
# a variant that needs more could never launch there. sm_80 cubins also serve sm_86/89 GPUs (99 KB): the
# dispatcher checks the device's own limit and names the kernel when it is smaller.
SHARED_LIMITS = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448,
                 110: 232448, 120: 101376, 121: 101376}
DEFAULT_SHARED_LIMIT = 101376  # an arch not in the table: the smallest of the recent ones


def _family_module(family):
    """A family of triton_src/ by name, or any importable module with SPECS by dotted path."""
    return importlib.import_module(family if "." in family else f"triton_src.{family}")


def _family_specs(family):
    return _family_module(family).SPECS


def _source_files(module, seen=None):
    """The module's file and those of the triton_src modules it imports, transitively (kernels call helpers
    across families). The spec machinery is not among them: what it decides is in the variant, part of the key."""
    seen = seen if seen is not None else {}
    path = Path(module.__file__)
    if path not in seen:
        seen[path] = None
        for name in sorted(set(re.findall(r"^\s*(?:from|import)\s+(triton_src\.\w+)", path.read_text(), re.M))):
            _source_files(importlib.import_module(name), seen)
    return list(seen)


def _source_hash(family):
    h = hashlib.sha256()
    for path in _source_files(_family_module(family)):
        h.update(path.read_bytes())
    return h.hexdigest()


def _cache_key(family, arch, op, variant, triton_version):
    blob = json.dumps([_source_hash(family), triton_version, arch, op, variant], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _compile_one(job):
    """Worker: compile one (family, op, variant, arch); returns (job, metadata) or raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    family, op_name, variant, arch, cache_dir, key = job
    spec = next(s for s in _family_specs(family) if s.name == op_name)
    attrs = {(int(i),): [["tt.divisibility", d]] for i, d in variant["attrs"].items()}
    options = dict(variant["options"])
    limit = SHARED_LIMITS.get(arch, DEFAULT_SHARED_LIMIT)
    while True:
        src = ASTSource(spec.kernel, signature=variant["signature"], constexprs=variant["constexprs"], attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        md = compiled.metadata
        if md.shared <= limit:
            break
        # The spec's pipelining depth is tuned where memory allows; an arch with less shared memory gets a
        # shallower pipeline rather than a kernel that cannot launch (as Triton's autotuner prunes such configs).
        if options["num_stages"] <= 1:
            raise RuntimeError(f"{op_name}[{variant['key']}] needs {md.shared} bytes of shared memory with "
                               f"num_stages=1; sm_{arch} allows {limit}: choose smaller blocks in its launch config")
        options["num_stages"] -= 1
    races = pipeline_races(compiled.asm["ttgir"])
    if races:
        raise RuntimeError(f"{op_name}[{variant['key']}] sm_{arch}: the pipelined loop (num_stages="
                           f"{options['num_stages']}) refills a one-slot buffer that an asynchronous product may "
                           f"still read (tools/pipeline_races.py): "
                           + "; ".join(f"{buf} while {', '.join(dots)}" for _, buf, dots in races)
                           + ". Use num_stages=1, or feed that load to products only")
    meta = {
        "kernel_name": md.name,
        "num_warps": md.num_warps,
        "shared": md.shared,
        "num_stages": options["num_stages"],
        "global_scratch_size": md.global_scratch_size,
        "global_scratch_align": md.global_scratch_align,
        "profile_scratch_size": getattr(md, "profile_scratch_size", 0),
        "profile_scratch_align": getattr(md, "profile_scratch_align", 1),
        # Triton appends these hidden pointer parameters after the kernel's own (3.6: global, profile).
        "num_scratch_params": _count_scratch_params(compiled.asm["ptx"], md.name, variant),
        "arch": arch,
    }
    (cache_dir / f"{key}.cubin").write_bytes(compiled.asm["cubin"])
    (cache_dir / f"{key}.json").write_text(json.dumps(meta))
    return meta


def _cached(cache_dir, key, arch):
    """Whether the variant is in the cache, compiled within the arch's shared-memory limit (entries from before
    that limit was enforced may exceed it)."""
    meta, cubin = cache_dir / f"{key}.json", cache_dir / f"{key}.cubin"
    if not (meta.exists() and cubin.exists()):
        return False
    return json.loads(meta.read_text())["shared"] <= SHARED_LIMITS.get(arch, DEFAULT_SHARED_LIMIT)


def _count_scratch_params(ptx, name, variant):
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    n_ptx = len(re.findall(r"\.param\s", m.group(1))) if m else 0
    n_own = sum(1 for t in variant["signature"].values() if t != "constexpr")
    return n_ptx - n_own


def _prune_cache(cache_dir, archs, keep):
    """Drops cached variants of these archs that this build no longer uses (older sources)."""
    for meta in cache_dir.glob("*.json"):
        key = meta.stem
        if key not in keep and json.loads(meta.read_text()).get("arch") in archs:
            meta.unlink()
            (cache_dir / f"{key}.cubin").unlink(missing_ok=True)


def _import_cache(archive, cache_dir):
    """Unpacks cache entries (<key>.json + <key>.cubin, nothing else) into cache_dir; returns how many."""
    n = 0
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():
            name = member.name
            if not (member.isfile() and re.fullmatch(r"[0-9a-f]{32}\.(json|cubin)", name)):
                raise SystemExit(f"compile_kernels: {archive} is not a kernel cache (it holds {name!r})")
            (cache_dir / name).write_bytes(tar.extractfile(member).read())
            n += name.endswith(".json")
    return n


def _export_cache(archive, cache_dir, keys):
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:xz") as tar:
        for key in sorted(keys):
            for ext in ("json", "cubin"):
                tar.add(cache_dir / f"{key}.{ext}", arcname=f"{key}.{ext}")


def _progress(done, total, failed, start):
    if not sys.stderr.isatty() and done not in (total, 1) and done % max(1, total // 10):
        return  # in logs, about ten lines rather than one per variant
    width = 30
    filled = int(width * done / max(total, 1))
    bar = "#" * filled + "-" * (width - filled)
    msg = f"\r[{bar}] {done}/{total} variants  {time.time() - start:5.1f}s" + (f"  {failed} FAILED" if failed else "")
    print(msg if sys.stderr.isatty() else msg.lstrip("\r") + "\n", end="", file=sys.stderr, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default: 80,90)")
    p.add_argument("--out", default=str(ROOT / "build" / "kernels"), help="output folder")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles (default: all cores)")
    p.add_argument("--families", default=None,
                   help="comma-separated families of triton_src, or dotted module paths (default: all of triton_src)")
    p.add_argument("--allow-other-triton", action="store_true",
                   help=f"compile with a Triton other than the pinned {TRITON_VERSION} (for experiments only)")
    p.add_argument("--import-cache", metavar="FILE", help="unpack cache entries from a --export-cache archive first")
    p.add_argument("--export-cache", metavar="FILE", help="pack this build's cache entries into FILE (.tar.xz)")
    args = p.parse_args(argv)

    import triton
    if triton.__version__ != TRITON_VERSION and not args.allow_other_triton:
        sys.exit(f"compile_kernels: Triton {TRITON_VERSION} is pinned, found {triton.__version__} "
                 f"(pip install triton=={TRITON_VERSION})")
    from triton_src import FAMILIES

    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    families = args.families.split(",") if args.families else FAMILIES
    out = Path(args.out)
    cache_dir = out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    if args.import_cache:
        print(f"compile_kernels: {_import_cache(args.import_cache, cache_dir)} cached variants imported from "
              f"{args.import_cache}", file=sys.stderr)

    manifest = {"manifest_version": MANIFEST_VERSION, "triton_version": triton.__version__,
                "archs": [f"sm_{a}" for a in archs], "ops": {}}
    jobs, todo = [], []
    for family in families:
        for spec in _family_specs(family):
            entry = spec.manifest_entry()
            entry["family"] = family
            entry["variants"] = {}
            manifest["ops"][spec.name] = entry
            for arch in archs:
                vlist = entry["variants"].setdefault(f"sm_{arch}", [])
                for v in spec.variants():
                    key = _cache_key(family, arch, spec.name, v, triton.__version__)
                    vlist.append(dict(v, cache_key=key, cubin=f"sm_{arch}/{spec.name}.{v['key']}.cubin"))
                    job = (family, spec.name, v, arch, cache_dir, key)
                    jobs.append((job, vlist[-1]))
                    if not _cached(cache_dir, key, arch):
                        todo.append(job)

    start = time.time()
    failures = []
    print(f"compile_kernels: {len(jobs)} variants for {', '.join(manifest['archs'])}, "
          f"{len(jobs) - len(todo)} cached, compiling {len(todo)} on {args.jobs} processes", file=sys.stderr)
    if todo:
        with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(_compile_one, job): job for job in todo}
            for i, fut in enumerate(cf.as_completed(futures), 1):
                job = futures[fut]
                try:
                    fut.result()
                except Exception:
                    failures.append((job, traceback.format_exc()))
                _progress(i, len(todo), len(failures), start)
        print(file=sys.stderr)
    if failures:
        for (family, op, v, arch, _, _), tb in failures:
            print(f"\ncompile_kernels: FAILED {family}.{op} variant {v['key']} for sm_{arch}:\n{tb}", file=sys.stderr)
        names = sorted({f"{f}.{o}[{v['key']}] sm_{a}" for (f, o, v, a, _, _), _ in failures})
        sys.exit(f"compile_kernels: {len(failures)} variant(s) failed: {', '.join(names[:10])}")

    for arch in archs:
        d = out / f"sm_{arch}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    for job, ventry in jobs:
        key = ventry["cache_key"]
        ventry.update({k: v for k, v in json.loads((cache_dir / f"{key}.json").read_text()).items() if k != "arch"})
        shutil.copyfile(cache_dir / f"{key}.cubin", out / ventry["cubin"])
        del ventry["signature"], ventry["options"], ventry["attrs"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    used = {ventry["cache_key"] for _, ventry in jobs}
    _prune_cache(cache_dir, archs, used)
    if args.export_cache:
        _export_cache(args.export_cache, cache_dir, used)
        print(f"compile_kernels: packed {len(used)} cached variants into {args.export_cache}", file=sys.stderr)
    print(f"compile_kernels: wrote {len(jobs)} cubins and {out / 'manifest.json'} in {time.time() - start:.1f}s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
