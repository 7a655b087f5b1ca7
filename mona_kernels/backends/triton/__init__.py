"""The Triton plan: one file a kernel stage, assembled in :mod:`.adapter`."""
from .adapter import Params, adapter

__all__ = ["Params", "adapter"]
