"""The fused adapter's kernel plans, one package or module per backend, and the parameters they
all take."""
from __future__ import annotations

from typing import NamedTuple

# Tensor only: the name ``torch`` here is the PyTorch plan's module, backends/torch.py.
from torch import Tensor


class Params(NamedTuple):
    """The adapter's sixteen parameters, in the order of the authors' state_dict."""
    w_ln: Tensor     # norm.weight (C)
    b_ln: Tensor     # norm.bias (C)
    gamma: Tensor    # (C)
    gammax: Tensor   # (C)
    W1: Tensor       # project1.weight (d, C)
    b1: Tensor       # project1.bias (d)
    w3: Tensor       # adapter_conv.conv1.weight (d, 1, 3, 3)
    b3: Tensor
    w5: Tensor       # adapter_conv.conv2.weight (d, 1, 5, 5)
    b5: Tensor
    w7: Tensor       # adapter_conv.conv3.weight (d, 1, 7, 7)
    b7: Tensor
    Wp: Tensor       # adapter_conv.projector.weight (d, d, 1, 1)
    bp: Tensor
    W2: Tensor       # project2.weight (C, d)
    b2: Tensor       # project2.bias (C)
