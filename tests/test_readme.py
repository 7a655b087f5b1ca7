"""Every Python code block of README.md runs as written (on the CPU). A block whose first line is
``# needs: cuda`` or ``# needs: timm`` is skipped, visibly, where that is missing."""
import importlib.util
import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
AVAILABLE = {"cuda": torch.cuda.is_available(), "timm": importlib.util.find_spec("timm") is not None}


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("k", range(len(BLOCKS)), ids=lambda k: f"block{k}")
def test_readme_block_runs(k, tmp_path, monkeypatch):
    block = BLOCKS[k]
    needs = re.match(r"# needs: ([\w, ]+)", block)
    for need in (needs.group(1).replace(",", " ").split() if needs else []):
        if not AVAILABLE[need]:
            pytest.skip(f"README block {k} needs {need}")
    monkeypatch.chdir(tmp_path)  # a block may write files
    exec(compile(block, f"README.md block {k}", "exec"), {"__name__": "__readme__"})
