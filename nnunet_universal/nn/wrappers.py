"""The network behind nnU-Net's wrappers, for training (DDP) and inference (``torch.compile``) alike."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def unwrap(network: nn.Module) -> nn.Module:
    """The module behind DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, in any nesting."""
    while True:
        if isinstance(network, DistributedDataParallel):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network
