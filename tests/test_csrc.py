"""The CUDA fallback sources compile for every architecture of the default list (compile only: CI
has no GPU), its host C++ passes the compiler's checks against the installed torch headers, and the
build settings follow the nvcc version."""
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from mona_kernels import _build

NVCC = shutil.which("nvcc")


def test_default_arch_list_starts_at_turing_for_cuda_13_and_reaches_back_for_older():
    assert _build.default_arch_list((13, 0))[0] == "7.5"
    assert "6.0" in _build.default_arch_list((12, 4))
    assert _build.gencode_flags(["7.5"]) == ["-gencode=arch=compute_75,code=sm_75"]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", _build.default_arch_list(_build.nvcc_version(NVCC) or (13, 0)))
@pytest.mark.parametrize("source", ["forward.cu", "backward.cu"])
def test_kernels_compile_for_architecture(source, arch, tmp_path):
    cmd = [NVCC, "-c", *_build.NVCC_FLAGS, *_build.gencode_flags([arch]), str(_build.CSRC / source),
           "-o", str(tmp_path / "kernels.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# Headers the host code reaches through torch's that a CPU machine may lack, and what stands in for
# them: the handle and status types ATen's CUDA context declares (nothing here calls the libraries).
STAND_INS = {
    "c10/cuda/impl/cuda_cmake_macros.h": "",
    "cublas_v2.h": "#include <cuda_runtime.h>\ntypedef struct cublasContext* cublasHandle_t;\n"
                   "typedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
}


def _toolkit_has(header: str) -> bool:
    return (Path(NVCC).resolve().parent.parent / "include" / header).exists() or \
        Path("/usr/local/cuda/include", header).exists()


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", ["adapter.cpp", "binding.cpp"])
def test_host_sources_pass_the_compilers_checks(source, tmp_path):
    """Syntax and types of the extension's host code (the adapter's plan, the backward's buffers, the
    operator registrations), which the GPU machine alone builds: nvcc hands it to the host compiler with its CUDA
    headers, which checks it and writes nothing. A CPU build of torch ships the CUDA headers but not
    the one its CUDA build generates, and a toolkit without the math libraries lacks the headers of
    the library handles ATen's CUDA context declares: stand-ins take their places."""
    from torch.utils.cpp_extension import include_paths
    for name, text in STAND_INS.items():
        if name.startswith("c10/") or not _toolkit_has(name):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("#pragma once\n" + text)
    cmd = [NVCC, "-std=c++17", "-Xcompiler", "-fsyntax-only", "-c", f"-I{tmp_path}",
           *(f"-I{p}" for p in include_paths()), f"-I{_build.CSRC}", f"-I{sysconfig.get_paths()['include']}",
           str(_build.CSRC / source), "-o", str(tmp_path / "host.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
