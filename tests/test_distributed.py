"""Data-parallel training with the fused adapter: two gloo processes on the CPU, DDP and FSDP2,
adapter gradients against one process that sees the whole global batch."""
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def _worker(rank, world, port, mode, path):
    import torch.distributed as dist
    import ddp
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    err = ddp.check_gradients(mode, True, torch.float64, torch.device("cpu"), batch=8, backend="torch")
    if rank == 0:
        torch.save(err, path)
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_gradients_match_single_process(mode, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "err.pt")
    mp.spawn(_worker, args=(2, port, mode, path), nprocs=2, join=True)
    assert torch.load(path) < 1e-10
