"""The dispatcher: which backend ``auto`` picks on each kind of device."""
import pytest
import torch


def test_auto_takes_cuda_extension_on_gpus_triton_cannot_run(monkeypatch):
    from mona_kernels import backends as backend
    monkeypatch.delenv("MONA_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setattr(backend, "_triton_runs_on", lambda index: False)  # a Turing card
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(backend, "_cuda_extension_error", lambda: None)
    assert backend.resolve(gpu) == "cuda"
    monkeypatch.setattr(backend, "_cuda_extension_error", lambda: "nvcc was not found")
    assert backend.resolve(gpu) == "torch"
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: nvcc was not found"):
        backend.resolve(gpu, "cuda")
    monkeypatch.setattr(backend, "_triton_runs_on", lambda index: True)
    assert backend.resolve(gpu) == "triton"
    assert backend.resolve(torch.device("cpu"), "torch") == "torch"
