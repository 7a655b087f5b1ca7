"""The CUDA fallback sources compile for every architecture of the default list (compile only: CI
has no GPU), and the build settings follow the nvcc version."""
import shutil
import subprocess

import pytest

from mona_kernels import _build

NVCC = shutil.which("nvcc")


def test_default_arch_list_starts_at_turing_for_cuda_13_and_reaches_back_for_older():
    assert _build.default_arch_list((13, 0))[0] == "7.5"
    assert "6.0" in _build.default_arch_list((12, 4))
    assert _build.gencode_flags(["7.5"]) == ["-gencode=arch=compute_75,code=sm_75"]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", _build.default_arch_list(_build.nvcc_version(NVCC) or (13, 0)))
def test_kernels_compile_for_architecture(arch, tmp_path):
    cmd = [NVCC, "-c", *_build.NVCC_FLAGS, *_build.gencode_flags([arch]), str(_build.CSRC / "mona_kernels.cu"),
           "-o", str(tmp_path / "kernels.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("bad", [-1, 2.0, True, "8"])
def test_graph_cache_capacity_is_checked_before_the_extension_loads(bad):
    from mona_kernels.ops import cuda_ext
    with pytest.raises(ValueError, match="capacity"):
        cuda_ext.graph_cache(bad)
