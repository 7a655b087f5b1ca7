"""The Triton plan: one file a kernel stage, assembled in :mod:`.adapter`."""
from .. import make_differentiable
from .adapter import MAX_D, adapter_bwd, adapter_fwd, backward
from .common import dropout_scale

make_differentiable(adapter_fwd, backward)

__all__ = ["MAX_D", "adapter_bwd", "adapter_fwd", "backward", "dropout_scale"]
