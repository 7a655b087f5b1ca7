"""The Triton plan: one file a kernel stage, assembled in :mod:`.adapter`; the standalone ops' kernels in
:mod:`.ln_scale` and :mod:`.dwconv`."""
from .. import make_differentiable
from .adapter import MAX_D, adapter_bwd, adapter_fwd, backward, forward
from .common import dropout_scale
from .dwconv import dwconv7_fwd, dwconv7_wgrad
from .ln_scale import ln_scale_bwd, ln_scale_fwd

ADAPTER = make_differentiable(adapter_fwd, backward, forward)

__all__ = ["ADAPTER", "MAX_D", "adapter_bwd", "adapter_fwd", "backward", "dropout_scale", "dwconv7_fwd",
           "dwconv7_wgrad", "ln_scale_bwd", "ln_scale_fwd"]
