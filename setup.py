"""Build the optional `hessian` operator library used by curvature.py.

    python setup.py build_ext --inplace          # -> ./curvature_ext*.so beside curvature.py
    pip install -e . --no-build-isolation        # same, as an editable install

A CppExtension (CPU kernels) is built, or a CUDAExtension (CPU + CUDA kernels) when torch was built with CUDA
and nvcc is found in CUDA_HOME/bin; HESSIAN_FORCE_CPU=1 forces the CPU-only build. chained_tuning/hessian/ops.py
loads the result; without this build it JIT-compiles the same sources (torch.utils.cpp_extension.load) or falls back
to plain PyTorch.
"""
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

from chained_tuning.hessian.ops import CPU_SOURCES, CUDA_SOURCES  # the one list, shared with the JIT build


def cuda_toolchain() -> bool:
    """A CUDA build of torch and an nvcc in CUDA_HOME: only then the CUDA kernels are compiled."""
    if torch.version.cuda is None or CUDA_HOME is None or os.environ.get("HESSIAN_FORCE_CPU", "0") == "1":
        return False
    return os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


use_cuda = cuda_toolchain()
if use_cuda:
    ext = CUDAExtension(
        "curvature_ext",
        CPU_SOURCES + CUDA_SOURCES,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
else:
    ext = CppExtension("curvature_ext", CPU_SOURCES, extra_compile_args={"cxx": ["-O3"]})

setup(
    name="curvature-ext",
    version="0.1.0",
    description="Fused Hessian eigen-solver ops (hessian::*) for curvature.py",
    ext_modules=[ext],
    py_modules=[],
    packages=[],
    cmdclass={"build_ext": BuildExtension},
)
