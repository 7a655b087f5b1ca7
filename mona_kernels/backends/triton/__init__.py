"""The Triton plan: one file a kernel stage, assembled in :mod:`.adapter`."""
from .. import Params
from .adapter import MAX_D, adapter

__all__ = ["MAX_D", "Params", "adapter"]
