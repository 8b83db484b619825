"""Builds fla_aot: compiles the Triton kernels to cubins (tools/compile_kernels.py), ships them with the
package, and builds the C++ dispatcher extension (csrc/). Works on a machine without a GPU.

    pip install --no-build-isolation .          # cubins for sm_80 and sm_90
    FLA_AOT_ARCHS=90 pip install --no-build-isolation .
    FLA_AOT_IMPORT_CACHE=sm_90.tar.xz ...   # start from kernels compiled elsewhere (compile_kernels --export-cache)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
ARCHS = os.environ.get("FLA_AOT_ARCHS", "80,90")
KERNELS_BUILD = ROOT / "build" / "kernels"
KERNELS_PACKAGE = ROOT / "fla_aot" / "kernels"

# torch's cpp_extension guesses CUDA_HOME from nvcc on PATH or a GPU; point it at the toolkit if unset.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/include/cuda.h").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(f"{a[:-1]}.{a[-1]}" for a in ARCHS.split(",")))

from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: E402


def compile_kernels():
    """Runs the kernel compiler (cached under build/kernels) and copies cubins + manifest into the package."""
    # FLA_AOT_IMPORT_CACHE: a `compile_kernels.py --export-cache` archive from another machine to start from
    imported = ["--import-cache", os.environ["FLA_AOT_IMPORT_CACHE"]] if os.environ.get("FLA_AOT_IMPORT_CACHE") else []
    subprocess.check_call([sys.executable, str(ROOT / "tools" / "compile_kernels.py"), "--arch", ARCHS,
                           "--out", str(KERNELS_BUILD), *imported])
    if KERNELS_PACKAGE.exists():
        shutil.rmtree(KERNELS_PACKAGE)
    KERNELS_PACKAGE.mkdir(parents=True)
    shutil.copyfile(KERNELS_BUILD / "manifest.json", KERNELS_PACKAGE / "manifest.json")
    for arch in ARCHS.split(","):
        shutil.copytree(KERNELS_BUILD / f"sm_{arch.strip()}", KERNELS_PACKAGE / f"sm_{arch.strip()}")


if any(cmd in sys.argv for cmd in ("build", "build_py", "build_ext", "bdist_wheel", "install", "develop",
                                   "editable_wheel", "egg_info")) and not os.environ.get("FLA_AOT_SKIP_KERNELS"):
    compile_kernels()

setup(
    packages=["fla_aot", "fla_aot.ops", "fla_aot.reference", "fla_aot.layers", "fla_aot.models"],
    package_data={"fla_aot": ["kernels/manifest.json", "kernels/sm_*/*.cubin"]},
    ext_modules=[
        CUDAExtension(
            name="fla_aot._C",
            sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")),
            extra_compile_args={"cxx": ["-O2"]},
            libraries=["dl"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
