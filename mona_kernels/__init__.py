"""Fused GPU kernels for the Mona vision adapter.

>>> import mona_kernels
>>> adapter = mona_kernels.Mona(in_dim=128)       # same parameters as the authors' module
>>> model, n = mona_kernels.convert(model)        # or swap every Mona inside a model
"""
from . import backends, reference
from .backends import resolve as resolve_backend
from .functional import MAX_BOTTLENECK, ln_scale, mona, multiscale_dwconv
from .integrations import convert, is_mona
from .modules import Mona

__version__ = "0.1.0"
__all__ = ["Mona", "convert", "is_mona", "ln_scale", "multiscale_dwconv", "mona", "reference",
           "resolve_backend", "MAX_BOTTLENECK", "__version__"]
