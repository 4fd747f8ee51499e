"""Install sgflow (python/sgflow), sgflow_kernels (Triton) and the C++/CUDA extension sgflow._C (csrc/).

sgflow._C is built with torch.utils.cpp_extension (ninja) wherever it can be:

- its CPU part (dual GroupNorm+SiLU kernels, the ``cpp`` backend) wherever a C++ compiler works;
- its CUDA part (the ``cuda`` backend) in the same module when torch is a CUDA build and a CUDA
  toolkit is found (CUDA_HOME).

Environment: SGFLOW_BUILD_CPP=0 skips the extension, =1 makes a failed build fail the install;
SGFLOW_BUILD_CUDA=0 builds the CPU part only, =1 requires the CUDA part. By default (auto) a failed
build does not fail the install: it prints why, and sgflow runs on its torch/Triton backends
(``sgflow.ops.cpp_ext.reason()`` says the same at run time).
"""
import os
import sys
import sysconfig

from setuptools import find_packages, setup

CPP_SOURCES = [
    "csrc/module.cpp",
    "csrc/sgflow_ops.cpp",
    "csrc/gn_silu_dual_cpu.cpp",
    "csrc/gn_silu_dual_cpu_avx2.cpp",
    "csrc/gn_silu_dual_cpu_avx512.cpp",
    "csrc/pointwise_dual_cpu.cpp",
    "csrc/scale_dual_cpu.cpp",
    "csrc/attention_dual_cpu.cpp",
    "csrc/attention_dual_cpu_blas.cpp",
]
CUDA_SOURCES = ["csrc/gn_silu_dual_cuda.cu", "csrc/gn_silu_dual_cuda_binding.cpp"]
# The extra "app" (pip install "sgflow[app]"); sgflow/_extras.py names it in its ImportErrors.
APP_REQUIRES = ["tqdm", "pillow", "matplotlib>=3.5", "torchdiffeq"]


def _mode(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "on"
    return "auto"


def _say(msg: str) -> None:
    print(f"sgflow setup: {msg}", file=sys.stderr, flush=True)


def _cxx_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags for the host compiler.

    -O3 and OpenMP: at::parallel_for in the extension is inline code from ATen's headers, without
    -fopenmp it runs serially. -fno-trapping-math: nothing reads floating-point exception flags, and
    with GCC's default -ftrapping-math the clamps in the kernels' exp stay branches, which keeps the
    AVX2 loops from vectorising (measured 7x slower). -g0: no debug info, a quicker build.
    """
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    common = ["-O3", "-fno-trapping-math", "-g0"]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; at::parallel_for then runs serially
        return common, []
    return common + ["-fopenmp"], ["-fopenmp"]


def _extensions():
    cpp_mode, cuda_mode = _mode("SGFLOW_BUILD_CPP"), _mode("SGFLOW_BUILD_CUDA")
    if cpp_mode == "off":
        _say("SGFLOW_BUILD_CPP=0: not building sgflow._C (torch/Triton backends only)")
        return [], {}, False
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001 - any failure here means: no extension
        if cpp_mode == "on":
            raise
        _say(f"not building sgflow._C: torch.utils.cpp_extension unavailable ({exc})")
        return [], {}, False
    with_cuda = cuda_mode != "off" and torch.version.cuda is not None and CUDA_HOME is not None
    if cuda_mode == "on" and not with_cuda:
        raise RuntimeError(
            f"SGFLOW_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}")
    cxx, link = _cxx_flags()
    sources = CPP_SOURCES + (CUDA_SOURCES if with_cuda else [])
    kwargs = dict(
        name="sgflow._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_link_args=link,
    )
    if with_cuda:
        ext = CUDAExtension(
            define_macros=[("SGFLOW_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            **kwargs,
        )
    else:
        ext = CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    build_ext = _optional_build_ext(BuildExtension.with_options(use_ninja=True), required=cpp_mode == "on")
    return [ext], {"build_ext": build_ext}, with_cuda


def _optional_build_ext(base, required: bool):
    """``base`` (torch's BuildExtension) whose failure, unless ``required``, is reported, not raised."""

    class OptionalBuildExt(base):
        failed = None

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - no compiler, compiler error, missing ninja...
                self._give_up(exc)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                self._give_up(exc)

        def copy_extensions_to_source(self):
            if OptionalBuildExt.failed is None:
                super().copy_extensions_to_source()

        def get_outputs(self):
            # A failed build has no library to put in the (editable) wheel.
            return [] if OptionalBuildExt.failed is not None else super().get_outputs()

        def get_output_mapping(self):
            return {} if OptionalBuildExt.failed is not None else super().get_output_mapping()

        def _give_up(self, exc):
            if required:
                raise exc
            OptionalBuildExt.failed = exc
            _say("=" * 78)
            _say(f"building the C++ extension sgflow._C FAILED: {type(exc).__name__}: {exc}")
            _say("sgflow is installed without it and runs on its torch (and Triton) backends;")
            _say("the 'cpp'/'cuda' backends are unavailable. Install a C++ compiler (g++) and reinstall")
            _say("with `pip install -v --no-build-isolation -e .` to build it and see the compiler output,")
            _say("or set SGFLOW_BUILD_CPP=0 to skip it silently.")
            _say("=" * 78)

    return OptionalBuildExt


ext_modules, cmdclass, _with_cuda = _extensions()
if ext_modules:
    _say(f"building sgflow._C: CPU kernels{' + CUDA kernels' if _with_cuda else ''} "
         f"(python {sysconfig.get_python_version()}, ninja)")

setup(
    name="sgflow",
    version="0.1.0",
    description="SGFlow flow-map training with fused dual-tangent (primal + JVP) kernels",
    packages=find_packages("python") + ["sgflow_kernels"],
    package_dir={"": "python", "sgflow_kernels": "sgflow_kernels"},
    python_requires=">=3.10",
    # The torch versions the test suite passes on (2.13: `make test`; 2.14: `make test-newest`).
    # The library (losses, dual engine, ops, networks, samplers) needs torch and numpy only; the app
    # (CLI, trainer progress bars, evaluation, quality table, figures) comes with the extra "app".
    install_requires=["torch>=2.13,<2.15", "numpy"],
    extras_require={
        "app": APP_REQUIRES,
        "kernels": ["triton>=3.0"],
        "test": APP_REQUIRES + ["triton>=3.0", "pytest", "pytest-benchmark", "scikit-learn", "diffusers"],
        "data": ["scikit-learn"],
    },
    entry_points={"console_scripts": ["sgflow=sgflow.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
