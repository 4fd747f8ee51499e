"""Install sgflow (python/sgflow) and sgflow_kernels (Triton).

The CUDA extension in csrc/ is built only where it can be: a CUDA build of torch and a CUDA toolkit.
SGFLOW_BUILD_CUDA=0 skips it, SGFLOW_BUILD_CUDA=1 forces it (and fails loudly if it cannot build).
A CPU install never fails because of it.
"""
import glob
import os

from setuptools import find_packages, setup


def _cuda_extensions():
    flag = os.environ.get("SGFLOW_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no"):
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:
        if flag in ("1", "true", "yes"):
            raise
        return [], {}
    can_build = bool(sources) and torch.version.cuda is not None and CUDA_HOME is not None
    if not can_build:
        if flag in ("1", "true", "yes"):
            raise RuntimeError("SGFLOW_BUILD_CUDA=1 but no CUDA build of torch / CUDA toolkit / csrc sources")
        return [], {}
    ext = CUDAExtension(
        name="sgflow._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="sgflow",
    version="0.1.0",
    description="SGFlow flow-map training with fused dual-tangent (primal + JVP) kernels",
    packages=find_packages("python") + ["sgflow_kernels"],
    package_dir={"": "python", "sgflow_kernels": "sgflow_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm", "pillow", "torchdiffeq"],
    extras_require={
        "kernels": ["triton>=3.0"],
        "test": ["triton>=3.0", "pytest", "pytest-benchmark", "scikit-learn"],
        "data": ["scikit-learn"],
    },
    entry_points={"console_scripts": ["sgflow=sgflow.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
