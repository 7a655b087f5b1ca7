"""The Triton plan: one file a kernel stage, assembled in :mod:`.adapter`."""
from .adapter import MAX_D, Params, adapter

__all__ = ["MAX_D", "Params", "adapter"]
