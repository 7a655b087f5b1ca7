"""Installs mona_kernels; builds the CUDA fallback extension when nvcc and a CUDA build of torch are present.

Switches: MONA_KERNELS_BUILD_CUDA=0 skips the extension, =1 requires it (the build fails without
CUDA); unset builds it when possible. TORCH_CUDA_ARCH_LIST picks the architectures (default: from the
nvcc version); MAX_JOBS bounds the parallel ninja build. The torch that builds it must be importable
at build time: `pip install --no-build-isolation -e .`.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _build_settings():
    spec = importlib.util.spec_from_file_location("_build", HERE / "mona_kernels" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_settings()  # the package's build settings, read without importing the package


def cuda_extension():
    """``(ext_modules, cmdclass)`` for the CUDA extension, or empty when it is not to be built."""
    switch = os.environ.get("MONA_KERNELS_BUILD_CUDA", "")
    if switch == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if switch == "1":
            raise RuntimeError("MONA_KERNELS_BUILD_CUDA=1 but torch is not importable at build time; "
                               "use pip install --no-build-isolation")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if switch == "1":
            raise RuntimeError("MONA_KERNELS_BUILD_CUDA=1 but no CUDA build of torch or no nvcc was found")
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        version = BUILD.nvcc_version(os.path.join(CUDA_HOME, "bin", "nvcc"))
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(BUILD.default_arch_list(version or (12, 0)))
    ext = CUDAExtension("mona_kernels._C", [f"csrc/{s}" for s in BUILD.SOURCES],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": BUILD.NVCC_FLAGS})
    return [ext], {"build_ext": BuildExtension}


class BuildPyWithSources(build_py):
    """Also copies csrc/ into the built package (mona_kernels/_csrc): a wheel or a non-editable
    install without the prebuilt extension builds it from there on first use."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install builds from the source tree's csrc/
        target = Path(self.build_lib) / "mona_kernels" / BUILD.PACKAGED_CSRC
        self.mkpath(str(target))
        for name in (*BUILD.SOURCES, *BUILD.HEADERS):
            self.copy_file(str(HERE / "csrc" / name), str(target / name))


ext_modules, cmdclass = cuda_extension()
cmdclass["build_py"] = BuildPyWithSources

setup(
    name="mona_kernels",
    version="0.1.0",
    description="Fused GPU kernels for the Mona vision adapter",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mona_kernels", "mona_kernels.*"]),
    python_requires=">=3.9",
    # ninja: the first-use build of the CUDA extension (torch.utils.cpp_extension.load) needs it
    install_requires=["torch>=2.4", "triton>=3.0", "ninja"],
    # setuptools: tests/test_packaging.py builds the wheel and the sdist without build isolation
    extras_require={"test": ["pytest", "pytest-benchmark", "setuptools>=70.1"], "plot": ["matplotlib"],
                    "timm": ["timm"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
