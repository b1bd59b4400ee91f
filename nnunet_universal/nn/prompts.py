"""Prompts: a modality prompt at the input (MedUniSeg's MMap) and a task prompt at the bottleneck (UniSeg's FUSE).

Both start as exact no-ops (their last linear map is zero-initialized), so a freshly built network computes
what the planned nnU-Net network computes, and the prompts grow from there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import Tensor, nn

#: Length of each slot's learnable prompt vector (MedUniSeg, paper 004 §5.8: 512 was best).
MODALITY_PROMPT_LENGTH = 512
#: Coarse grid the prompt vector is mapped to before interpolation to the input (MedUniSeg: 12x12 / 4x6x6).
MODALITY_PROMPT_GRID = {2: (12, 12), 3: (6, 6, 6)}
#: Spatial size of the learnable universal task prompt (resized to the bottleneck).
TASK_PROMPT_GRID = 4


def _interp_mode(ndim: int) -> str:
    return {1: "linear", 2: "bilinear", 3: "trilinear"}[ndim]


def derive_availability(x: Tensor, rtol: float = 1e-6) -> Tensor:
    """(B, C, *spatial) -> (B, C) bool: a channel is available unless it is constant over the patch.

    Missing slots are zero-filled in the raw data and stay constant through nnU-Net's normalization
    (zero for z-score, some constant for CT), see DESIGN §4.3.
    """
    flat = x.detach().flatten(2)
    lo, hi = flat.amin(dim=2), flat.amax(dim=2)
    scale = torch.maximum(lo.abs(), hi.abs()).clamp_min(1.0)
    return (hi - lo) > rtol * scale


class ModalityPrompt(nn.Module):
    """MedUniSeg MMap (paper 004, Eq. 2): ``input = I + MMap(F_mod[slot])`` for each available slot.

    One learnable prompt vector per modality slot, one shared linear map to a coarse grid, linear
    interpolation to the input's spatial shape; the map is added to the slot's channel only where the slot
    is available. x: (B, C, *spatial), availability: (B, C) bool.
    """

    def __init__(self, num_slots: int, ndim: int, length: int = MODALITY_PROMPT_LENGTH) -> None:
        super().__init__()
        self.grid = MODALITY_PROMPT_GRID[ndim]
        self.prompts = nn.Parameter(torch.randn(num_slots, length))
        self.mmap = nn.Linear(length, math.prod(self.grid))
        nn.init.zeros_(self.mmap.weight)
        nn.init.zeros_(self.mmap.bias)

        self._matrices: dict[tuple, list[Tensor]] = {}

    def _interpolation(self, spatial: tuple[int, ...], device: torch.device) -> list[Tensor]:
        """Per axis, the (size, grid) matrix of ``F.interpolate``'s linear interpolation (align_corners=False)."""
        key = (spatial, device)
        if key not in self._matrices:
            with torch.no_grad():
                self._matrices[key] = [
                    F.interpolate(torch.eye(g, device=device)[None], size=n, mode="linear", align_corners=False)[0].T
                    for g, n in zip(self.grid, spatial, strict=True)]
        return self._matrices[key]

    def prompt_maps(self, spatial: tuple[int, ...]) -> Tensor:
        """(1, C, *spatial) prompt maps of all slots: the coarse maps interpolated (bi/trilinearly) to ``spatial``.

        Multi-linear interpolation is separable: one small matrix per axis. ``F.interpolate`` computes the same
        values, but its backward scatters into the coarse grid with atomic adds, 9 % of a 3D training step's
        GPU time (``scripts/profile_speed.py``); matrix products are a fraction of that.
        """
        coarse = self.mmap(self.prompts).view(self.prompts.shape[0], *self.grid)
        axes = "xyz"[:len(spatial)]
        spec = f"c{axes.upper()}," + ",".join(f"{a}{a.upper()}" for a in axes) + f"->c{axes}"
        with torch.autocast(device_type=coarse.device.type, enabled=False):
            return torch.einsum(spec, coarse.float(), *self._interpolation(spatial, coarse.device))[None]

    def forward(self, x: Tensor, availability: Tensor) -> Tensor:
        maps = self.prompt_maps(tuple(x.shape[2:])).to(x.dtype)
        mask = availability.to(x.dtype).view(*availability.shape, *([1] * (x.ndim - 2)))
        return torch.addcmul(x, mask, maps)


class TaskPrompt(nn.Module):
    """UniSeg FUSE (paper 003, Eq. 1): universal prompt + bottleneck features -> one prompt per domain.

    ``{F_task_d} = Split(f(cat(F_uni, F)))``; the selected (training: the true domain's; dataset-free:
    the routing-weighted mix) prompt is injected into the bottleneck features through a zero-initialized
    1x1 convolution, ``F' = F + W F_tp``. UniSeg concatenates ``F_tp`` to the decoder input instead; the
    sum is that concatenation's first linear layer without changing the planned decoder's channel count.
    ``f`` is three conv blocks (UniSeg's best, Table 7) without normalization: the bottleneck of a planned
    network can be 1-2 voxels per axis, where instance statistics are degenerate.
    """

    def __init__(self, conv_op: type[nn.Module], channels: int, num_domains: int, prompt_channels: int,
                 nonlin: type[nn.Module] = nn.LeakyReLU, nonlin_kwargs: dict | None = None) -> None:
        super().__init__()
        ndim = convert_conv_op_to_dim(conv_op)
        nonlin_kwargs = dict(nonlin_kwargs or {"inplace": True})
        self.num_domains, self.prompt_channels = num_domains, prompt_channels
        self.universal = nn.Parameter(torch.randn(1, prompt_channels, *([TASK_PROMPT_GRID] * ndim)))
        hidden = max(num_domains * prompt_channels, 32)
        self.fuse = nn.Sequential(
            conv_op(channels + prompt_channels, hidden, 3, 1, 1), nonlin(**nonlin_kwargs),
            conv_op(hidden, hidden, 3, 1, 1), nonlin(**nonlin_kwargs),
            conv_op(hidden, num_domains * prompt_channels, 1),
        )
        self.inject = conv_op(prompt_channels, channels, 1)
        self.reset_injection()

    def reset_injection(self) -> None:
        """Zero the injection so that the prompt starts as a no-op (also after nnU-Net's He init)."""
        nn.init.zeros_(self.inject.weight)
        nn.init.zeros_(self.inject.bias)

    def domain_prompts(self, feat: Tensor) -> Tensor:
        """feat: (B, C, *s) -> per-domain prompt features (B, D, K, *s)."""
        spatial = tuple(feat.shape[2:])
        uni = F.interpolate(self.universal, size=spatial, mode=_interp_mode(len(spatial)), align_corners=False)
        uni = uni.to(feat.dtype).expand(feat.shape[0], -1, *spatial)
        out = self.fuse(torch.cat([uni, feat], dim=1))
        return out.view(feat.shape[0], self.num_domains, self.prompt_channels, *spatial)

    def forward(self, feat: Tensor, weights: Tensor) -> Tensor:
        """feat: (B, C, *s); weights: (B, D) domain weights (one-hot for a known domain) -> (B, C, *s)."""
        prompts = self.domain_prompts(feat)
        selected = torch.einsum("bd,bdk...->bk...", weights.to(prompts.dtype), prompts)
        return feat + self.inject(selected)
