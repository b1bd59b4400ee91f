"""Which input channels (modality slots) hold real data: the one rule used in training and inference.

Missing slots are zero-filled in the raw data and stay constant through nnU-Net's normalization (zero for
z-score, some constant for CT), see DESIGN §4.3. A channel is therefore *missing* where its non-zero values are
constant over the region looked at (zeros are left out: nnU-Net's padding of small cases), up to a relative
tolerance (float round-off of a constant after normalization is not data): over the patch while training
(:class:`~nnunet_universal.nn.universal_unet.UniversalUNet` without a given availability), over the whole case
at inference (the predictor fixes one availability per case).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Relative tolerance: a channel whose range is at most ``RTOL * max(|min|, |max|, 1)`` counts as constant.
RTOL = 1e-6


def derive_availability(x: Tensor, start_dim: int = 2, rtol: float = RTOL) -> Tensor:
    """Channels that are not constant over the dims from ``start_dim`` on.

    Args:
        x: ``(B, C, *spatial)`` patches (``start_dim=2``, the default) or one ``(C, *spatial)`` case
            (``start_dim=1``).
        start_dim: first dim reduced over; the dims before it are kept.
        rtol: relative tolerance, see :data:`RTOL`.

    Returns:
        bool of shape ``x.shape[:start_dim]``: ``(B, C)`` or ``(C,)``.
    """
    flat = x.detach().flatten(start_dim)  # (*kept, N)
    zero = flat == 0
    # exact zeros are left out: nnU-Net pads a case smaller than the patch with zeros, which would make a missing
    # CT slot (a non-zero constant after CT normalization) look like data in a padded tile
    lo = torch.where(zero, torch.inf, flat).amin(dim=-1)
    hi = torch.where(zero, -torch.inf, flat).amax(dim=-1)
    scale = torch.maximum(lo.abs(), hi.abs()).clamp_min(1.0)
    return torch.nan_to_num(hi - lo, nan=0.0, posinf=0.0, neginf=0.0) > rtol * scale
