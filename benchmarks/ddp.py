"""Data-parallel training of a small Swin-style model with Mona adapters, under DDP and FSDP2.

    torchrun --nproc_per_node=2 benchmarks/ddp.py [--mode ddp fsdp2] [--steps 20] [--device cuda]

Every rank builds the same model, takes its shard of one random global batch, and after one step the
adapter gradients (all-reduced by DDP, reduce-scattered by FSDP2 and gathered here) are compared with
a single process that saw the whole global batch. Then it times training steps, fused against the
reference adapters, and rank 0 prints a table.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import mona_kernels as mk
from mona_kernels.reference import Mona as RefMona


class Block(nn.Module):
    def __init__(self, C, fused, backend):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))
        self.my_module_1 = mk.Mona(C, bottleneck=32, dropout=0.0, backend=backend) if fused else RefMona(C, bottleneck=32, dropout=0.0)

    def forward(self, x, hw):
        return self.my_module_1(x + self.mlp(self.norm(x)), hw)


class SmallSwin(nn.Module):
    def __init__(self, C=64, depth=4, classes=10, fused=True, backend=None):
        super().__init__()
        self.embed = nn.Conv2d(3, C, 4, stride=4)
        self.blocks = nn.ModuleList(Block(C, fused, backend) for _ in range(depth))
        self.head = nn.Linear(C, classes)

    def forward(self, img):
        x = self.embed(img)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x, (H, W))
        return self.head(x.mean(1))


def make_model(fused, dtype, device, backend=None):
    torch.manual_seed(0)
    model = SmallSwin(fused=fused, backend=backend)
    with torch.no_grad():  # adapters away from their near-identity init so every path has gradient
        for name, p in model.named_parameters():
            if "my_module_" in name:
                p.normal_(0, 0.2 / (p[0].numel() ** 0.5 if p.dim() > 1 else 1))
    return model.to(device=device, dtype=dtype)


def global_batch(n, dtype, device, image=32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, image, image, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x.to(device), y.to(device)


def adapter_grads(model):
    grads = {}
    for name, p in model.named_parameters():
        if "my_module_" in name and p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.replace("module.", "")] = g.detach().clone()
    return grads


def wrap(model, mode, device):
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    # An explicit mesh on the model's device: without one, FSDP2 moves CPU models to a visible GPU.
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def check_gradients(mode, fused, dtype, device, batch, backend=None):
    """Max relative difference between the wrapped model's adapter gradients after one step and a
    single process's gradients for the same global batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = global_batch(batch, dtype, device)
    model = make_model(fused, dtype, device, backend)
    single = copy.deepcopy(model)
    nn.functional.cross_entropy(single(x), y).backward()
    expected = adapter_grads(single)
    wrapped = wrap(model, mode, device)
    shard = slice(rank * batch // world, (rank + 1) * batch // world)
    nn.functional.cross_entropy(wrapped(x[shard]), y[shard]).backward()
    got = adapter_grads(wrapped)
    assert set(got) == set(expected), "adapter parameters differ between the runs"
    return max(((got[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in expected.items())


def time_steps(mode, fused, dtype, device, batch, steps):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = wrap(make_model(fused, dtype, device), mode, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = global_batch(batch, dtype, device)
    shard = slice(rank * batch // world, (rank + 1) * batch // world)
    times = []
    for i in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", nargs="*", default=["ddp", "fsdp2"], choices=["ddp", "fsdp2"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="global batch, split over the ranks")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    dtype = torch.float32
    rows = []
    for mode in args.mode:
        for fused in (False, True):
            err = check_gradients(mode, fused, dtype, device, args.batch)
            ms = time_steps(mode, fused, dtype, device, args.batch, args.steps)
            rows.append((mode, "fused" if fused else "reference", err, ms))
    if dist.get_rank() == 0:
        print(f"\n{world} ranks on {device.type}, global batch {args.batch}, fp32")
        print("| mode | adapter | max rel. grad diff vs single process | step ms |\n|---|---|---|---|")
        for mode, label, err, ms in rows:
            print(f"| {mode} | {label} | {err:.2e} | {ms:.2f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
