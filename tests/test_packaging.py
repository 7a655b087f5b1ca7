"""What a user installs carries the CUDA fallback's sources: the sdist (so setup.py can build the
extension where CUDA is present) and the wheel (so an install without the prebuilt extension builds it
on first use). Each test builds from a copy of the source tree, without build isolation."""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from mona_kernels import _build

ROOT = Path(__file__).resolve().parent.parent
CUDA_FILES = (*_build.SOURCES, *_build.HEADERS)


def _source_copy(tmp_path: Path) -> Path:
    """The files a build reads, copied without build outputs (a built extension would hide the
    first-use build)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", _build.PACKAGED_CSRC)
    shutil.copytree(ROOT / "mona_kernels", src / "mona_kernels", ignore=ignore)
    shutil.copytree(ROOT / "csrc", src / "csrc", ignore=ignore)
    return src


def _run(cmd, cwd, **env):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "MONA_KERNELS_BUILD_CUDA": "0", **env})
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


def _wheel(tmp_path: Path) -> Path:
    src = _source_copy(tmp_path)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "dist"), str(src)], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("mona_kernels-*.whl")
    return wheel


def _installed(tmp_path: Path) -> Path:
    """The wheel unpacked as site-packages would hold it."""
    site = tmp_path / "site"
    with zipfile.ZipFile(_wheel(tmp_path)) as z:
        z.extractall(site)
    return site


def test_the_source_lists_name_every_file_of_csrc():
    assert sorted(p.name for p in (ROOT / "csrc").iterdir() if p.is_file()) == sorted(CUDA_FILES)


def test_sdist_carries_the_cuda_sources(tmp_path):
    src = _source_copy(tmp_path)
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src)
    (sdist,) = (tmp_path / "dist").glob("mona_kernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        for name in CUDA_FILES:
            assert f"csrc/{name}" in members, f"the sdist lacks csrc/{name}"
            assert tar.extractfile(members[f"csrc/{name}"]).read() == (ROOT / "csrc" / name).read_bytes()


def test_an_installed_wheel_finds_its_own_copy_of_the_cuda_sources(tmp_path):
    site = _installed(tmp_path)
    probe = ("from mona_kernels import _build; print(_build.CSRC); "
             "print(all((_build.CSRC / s).is_file() for s in _build.SOURCES + _build.HEADERS))")
    out = _run([sys.executable, "-c", probe], cwd=tmp_path, PYTHONPATH=str(site)).stdout.split()
    assert Path(out[0]) == (site / "mona_kernels" / _build.PACKAGED_CSRC).resolve()
    assert out[1] == "True"
    for name in CUDA_FILES:
        assert Path(out[0], name).read_bytes() == (ROOT / "csrc" / name).read_bytes()


# Run from an installed wheel with no prebuilt extension: the first use builds it (into an empty
# extensions folder), and the CUDA backend's fp32 output and gradients match the reference's.
FIRST_USE = """
import torch
import mona_kernels as mk
from mona_kernels import reference
from mona_kernels.backends import cuda
assert "{site}" in mk.__file__, mk.__file__
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
ref = reference.Mona(96, dropout=0.0).cuda()
with torch.no_grad():
    for p in ref.parameters():
        p.normal_(0, 0.2)
fused = mk.Mona(96, dropout=0.0, backend="cuda").cuda()
fused.load_state_dict(ref.state_dict())
x = torch.randn(2, 7 * 9, 96, device="cuda", requires_grad=True)
g = torch.randn_like(x)
outs, grads = [], []
for m in (ref, fused):
    out = m(x, (7, 9))
    outs.append(out)
    grads.append(torch.autograd.grad(out, [x, *m.parameters()], g))
assert cuda.load().__name__ == "mona_kernels_cuda", cuda.load().__name__
err = max([((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads[1], grads[0])]
          + [((outs[1] - outs[0]).abs().max() / outs[0].abs().max()).item()])
print("max relative error", err)
assert err < 1e-4, err
"""


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None or shutil.which("nvcc") is None,
                    reason="needs a GPU, a CUDA build of torch and nvcc")
def test_an_installed_wheel_builds_the_extension_on_first_use(tmp_path):
    site = _installed(tmp_path)
    result = _run([sys.executable, "-c", FIRST_USE.format(site=site)], cwd=tmp_path, PYTHONPATH=str(site),
                  TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"), MONA_KERNELS_BACKEND="cuda")
    assert "building the CUDA extension on first use" in result.stderr
    assert "max relative error" in result.stdout
