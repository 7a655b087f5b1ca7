"""The benchmark's CPU mode, as the README's command runs it on a machine without a GPU, and the
script that turns its CSV into BENCHMARKS.md's tables."""
import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICE_BACKENDS, needs_cuda
from mona_kernels import benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the default run is the full GPU benchmark")
def test_cpu_run_checks_times_and_writes_every_op(tmp_path, capsys):
    rows = benchmark.main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "No GPU found" in printed and "| adapter |" in printed
    assert "nan" not in printed and f"wrote {tmp_path / 'benchmark.csv'}" in printed
    with open(tmp_path / "benchmark.csv") as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == len(rows)
    assert {r["op"] for r in saved} == {"adapter", "multiscale_dwconv", "ln_scale"}
    for r in saved:
        for key in ("fwd_ms", "fwd_bwd_ms", "floor_fwd_ms", "floor_fwd_bwd_ms"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (r["op"], r["variant"], key)
        if r["variant"].startswith("fused"):
            assert float(r["err_out"]) < 1e-5, (r["op"], r["variant"])
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "csv_to_markdown.py"),
                            str(tmp_path / "benchmark.csv")], capture_output=True, text=True, check=True).stdout
    for op in ("adapter", "multiscale_dwconv", "ln_scale"):
        assert f"#### {op}" in table
    assert table.count("| fused[torch] |") == 3 * len(benchmark.CPU_SHAPES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the default run is the full GPU benchmark")
def test_ops_in_any_order_write_every_column(tmp_path):
    """The ops time different things (the adapter alone has an eval-mode forward): with another op
    first, the CSV still gets the adapter's columns."""
    rows = benchmark.main(["--out", str(tmp_path), "--ops", "ln_scale", "adapter"])
    with open(tmp_path / "benchmark.csv") as f:
        saved = list(csv.DictReader(f))
    assert [r["op"] for r in saved] == [r["op"] for r in rows] and saved[0]["op"] == "ln_scale"
    adapter = [r for r in saved if r["op"] == "adapter"]
    assert adapter and all(float(r["eval_fwd_ms"]) > 0 for r in adapter)
    assert all(r["eval_fwd_ms"] == "" for r in saved if r["op"] == "ln_scale")


def test_graph_columns_are_nan_without_a_gpu():
    """With --graphs on the CPU every op still runs its checks and timings; the graph columns say
    NaN instead of timing anything."""
    cpu = torch.device("cpu")
    rows = (benchmark.bench_dwconv((1, 5, 6, 16), torch.float32, cpu, 1, ["torch"], graphs=True)
            + benchmark.bench_ln_scale((1, 5, 6, 16), torch.float32, cpu, 1, ["torch"], graphs=True)
            + benchmark.bench_adapter((1, 5, 6, 16), torch.float32, cpu, 1, (), ["torch"], graphs=True))
    assert len(rows) == 3 + 2 + 2
    for r in rows:
        assert math.isnan(r["graph_fwd_ms"]) and math.isnan(r["graph_fwd_bwd_ms"])
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0


@needs_cuda
def test_benchmark_times_the_compiled_reference_beside_the_fused_adapter():
    """The benchmark's default run includes torch.compile(reference), whose backward is timed alone by
    replaying a retained graph; every variant must come back with times and small errors."""
    import math
    from mona_kernels.benchmark import bench_adapter
    rows = bench_adapter((2, 8, 8, 64), torch.bfloat16, torch.device("cuda"), reps=5, variants=("compiled",),
                         backends=["triton"], graphs=True)
    assert [r["variant"] for r in rows] == ["reference", "compiled", "fused[triton]"]
    for r in rows:
        for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "peak_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["variant"], key)
        assert r["err_out"] < 2e-2 and r["err_grad"] < 2e-2, r["variant"]
    assert math.isnan(rows[1]["graph_fwd_bwd_ms"])  # the compiled variant is not graph-timed
    assert all(r["graph_fwd_ms"] > 0 and r["graph_fwd_bwd_ms"] > r["graph_fwd_ms"] for r in (rows[0], rows[2]))


@needs_cuda
def test_benchmark_graph_times_every_depthwise_variant():
    """Every variant of the depthwise op's table captures its forward and its forward+backward, the
    module's weights included (a live autograd graph over them once made the fwd+bwd capture fail)."""
    import math
    from mona_kernels.benchmark import bench_dwconv
    rows = bench_dwconv((2, 13, 9, 64), torch.bfloat16, torch.device("cuda"), reps=5, backends=DEVICE_BACKENDS,
                        graphs=True)
    assert [r["variant"] for r in rows] == ["reference", "single_7x7_conv"] + [f"fused[{b}]" for b in DEVICE_BACKENDS]
    for r in rows:
        assert math.isfinite(r["graph_fwd_ms"]) and r["graph_fwd_ms"] > 0, r["variant"]
        assert math.isfinite(r["graph_fwd_bwd_ms"]) and r["graph_fwd_bwd_ms"] > r["graph_fwd_ms"], r["variant"]
        if r["variant"] != "single_7x7_conv":
            assert r["err_out"] < 2e-2, r["variant"]
