"""Builds the optional CUDA extension ``lora_kernels._C`` from csrc/.

Skipped (pure-Python install) when ``LORA_KERNELS_SKIP_CUDA_BUILD=1``, or when torch has no CUDA
build or nvcc is missing. ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default "9.0a": one
arch keeps a 2-core CI build short; the H100/H200 are sm_90, and wgmma/TMA need the "a" variant).

The CUTLASS sm90 kernels (csrc/kernels/cutlass/) compile when CUTLASS's headers are found: the
``nvidia-cutlass`` wheel's ``cutlass_library/source/include`` (located, never imported), or
``CUTLASS_INCLUDE_DIR``. Without them, or without 9.0a in the arch list, the extension builds
without those kernels and says so; ``lora_kernels._C.WITH_CUTLASS`` tells which build this is.
"""

import glob
import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cutlass_include():
    """CUTLASS's include dir, or None. Found on disk; cutlass_library is never imported."""
    cands = [os.environ.get("CUTLASS_INCLUDE_DIR", "")]
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        cands += [os.path.join(d, "source", "include") for d in spec.submodule_search_locations]
    for d in cands:
        if d and os.path.isfile(os.path.join(d, "cutlass", "cutlass.h")):
            return d
    return None


def _cutlass_sources(arch_list):
    """(sources, include dir, why skipped) for the CUTLASS kernels."""
    if os.environ.get("LORA_KERNELS_SKIP_CUTLASS", "0") == "1":
        return [], None, "LORA_KERNELS_SKIP_CUTLASS=1"
    if "9.0a" not in arch_list.replace(" ", ";").split(";"):
        return [], None, f"TORCH_CUDA_ARCH_LIST={arch_list!r} lacks 9.0a (wgmma and TMA need sm_90a)"
    inc = _cutlass_include()
    if inc is None:
        return [], None, ("CUTLASS headers not found (pip install --no-deps nvidia-cutlass==4.2.0.0, "
                          "or set CUTLASS_INCLUDE_DIR)")
    srcs = sorted(glob.glob(os.path.join(HERE, "csrc", "kernels", "cutlass", "*.cu")))
    return [os.path.relpath(p, HERE) for p in srcs], inc, None


def _cuda_extension():
    if os.environ.get("LORA_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("lora-kernels: torch not importable at build time; skipping the CUDA extension",
              file=sys.stderr)
        return [], {}
    if not torch.version.cuda or not CUDA_HOME:
        print("lora-kernels: no CUDA toolkit/torch CUDA build; skipping the CUDA extension",
              file=sys.stderr)
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    sources = [os.path.relpath(p, HERE) for p in
               sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(HERE, "csrc", "kernels", "*.cu")))]
    # pip's CUDA-13 torch keeps cuBLAS/cuSPARSE headers under site-packages/nvidia/cu13/include.
    include_dirs = [os.path.join(HERE, "csrc")]
    for site in sys.path:
        cand = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(cand):
            include_dirs.append(cand)
            break
    cutlass_srcs, cutlass_inc, why_not = _cutlass_sources(os.environ["TORCH_CUDA_ARCH_LIST"])
    defines = []
    if cutlass_inc is None:
        print(f"lora-kernels: building without the CUTLASS sm90 kernels: {why_not}", file=sys.stderr)
    else:
        print(f"lora-kernels: CUTLASS sm90 kernels from {cutlass_inc}", file=sys.stderr)
        sources += cutlass_srcs
        include_dirs.append(cutlass_inc)
        defines = ["-DLK_WITH_CUTLASS=1"]
    ext = CUDAExtension(
        "lora_kernels._C",
        sources,
        include_dirs=include_dirs,
        # No -std flag: torch's build_ext adds the standard its headers need (C++20 for 2.14,
        # whatever the GPU box's 2.11 wants); csrc/ compiles as C++17 and C++20.
        extra_compile_args={
            "cxx": ["-O3", *defines],
            # NDEBUG: CuTe's device-side asserts stay out of the CUTLASS kernels' hot loops
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DNDEBUG", *defines],
        },
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass,
      options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {})
