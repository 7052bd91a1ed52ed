"""Builds the optional CUDA extension ``lora_kernels._C`` from csrc/.

Skipped (pure-Python install) when ``LORA_KERNELS_SKIP_CUDA_BUILD=1``, or when torch has no CUDA
build or nvcc is missing. ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default "9.0": one
arch keeps a 2-core CI build short; the H100/H200 are sm_90).
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


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
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
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
    ext = CUDAExtension(
        "lora_kernels._C",
        sources,
        include_dirs=include_dirs,
        # No -std flag: torch's build_ext adds the standard its headers need (C++20 for 2.14,
        # whatever the GPU box's 2.11 wants); csrc/ compiles as C++17 and C++20.
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass,
      options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {})
