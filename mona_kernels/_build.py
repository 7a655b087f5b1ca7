"""Build settings of the CUDA extension, shared by setup.py and the first-use build (no torch import)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

SOURCES = ("binding.cpp", "adapter.cpp", "forward.cu", "backward.cu")
HEADERS = ("glue.h", "mona.h", "common.cuh")
# Where an installed package keeps its copy of csrc/ (setup.py's build_py puts it there), so that a
# wheel or a non-editable install can still build the extension on first use.
PACKAGED_CSRC = "_csrc"


def _csrc() -> Path:
    """The CUDA sources: the package's own copy when installed, else the source tree's csrc/."""
    packaged = Path(__file__).resolve().parent / PACKAGED_CSRC
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "csrc"


CSRC = _csrc()
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math"]


def nvcc_version(nvcc: str | None = None) -> tuple[int, int] | None:
    """(major, minor) of ``nvcc``, or None when it is not found."""
    nvcc = nvcc or shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def default_arch_list(version: tuple[int, int]) -> list[str]:
    """Compute capabilities to build for when TORCH_CUDA_ARCH_LIST is unset: CUDA 13 starts at 7.5
    (Turing); older toolkits reach back further."""
    if version >= (13, 0):
        return ["7.5", "8.0", "8.6", "8.9", "9.0"]
    if version >= (12, 0):
        return ["6.0", "7.0", "7.5", "8.0", "8.6", "8.9", "9.0"]
    if version >= (11, 8):
        return ["6.0", "7.0", "7.5", "8.0", "8.6", "8.9", "9.0"]
    return ["6.0", "7.0", "7.5", "8.0"]


def gencode_flags(arch_list: list[str]) -> list[str]:
    flags = []
    for arch in arch_list:
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags
