"""Prompts as bounded, translation-invariant feature modulation (off in the default model, DESIGN §5.4).

The first design (MedUniSeg's MMap at the input, UniSeg's FUSE at the bottleneck) added *spatial maps* in patch
coordinates: the maps grew to +-50 on z-scored inputs within a few hundred SGD steps and gave the network an
absolute-position cue ("lesion at the patch centre", which nnU-Net's foreground-centred patches reward and
sliding-window inference breaks); it cost 4-31 Dice points in the accuracy suite. Here both prompts are
channel-wise FiLM (``x' = x (1 + g) + b``) computed from a *vector*, so they:

* cannot act as a position cue (the same modulation at every voxel);
* cannot swamp the signal: ``g, b = bound * tanh(.)`` with ``bound`` = :data:`PROMPT_BOUND`, so the modulated
  channel stays within ``[(1 - bound) x - bound, (1 + bound) x + bound]`` whatever the optimizer does;
* start as exact no-ops (zero-initialised last layer).

ModalityPrompt conditions each input slot on the slot-availability vector (which sequences were acquired with
it: the modality context MedUniSeg's prompt encodes). TaskPrompt conditions the bottleneck on the domain
weights; training feeds one-hot true domains and dataset-free inference feeds the (hard, by default) routing,
so both see the same kind of input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Largest relative gain/shift a prompt can apply (tanh-bounded): x' in [(1-B) x - B, (1+B) x + B].
PROMPT_BOUND = 0.5


class BoundedFiLM(nn.Module):
    """Condition vector (B, K) -> per-channel gain and shift (B, C) each, both in (-bound, bound).

    A hidden layer with LeakyReLU, then a zero-initialised linear map: the modulation is exactly the identity at
    initialisation. ``modulate(x, cond)``: x (B, C, *spatial) -> ``x (1 + g) + b``.
    """

    def __init__(self, cond_features: int, channels: int, hidden: int = 32, bound: float = PROMPT_BOUND) -> None:
        super().__init__()
        if not 0 < bound < 1:
            raise ValueError(f"prompt bound must be in (0, 1), got {bound}")
        self.channels, self.bound = channels, float(bound)
        self.net = nn.Sequential(nn.Linear(cond_features, hidden), nn.LeakyReLU(0.01),
                                 nn.Linear(hidden, 2 * channels))
        self.reset_output()

    def reset_output(self) -> None:
        """Zero the last layer: the modulation becomes the identity (also after nnU-Net's He init)."""
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def gain_shift(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """cond (B, K) -> (gain (B, C), shift (B, C)) in fp32, each in (-bound, bound)."""
        with torch.autocast(device_type=cond.device.type, enabled=False):
            out = self.bound * torch.tanh(self.net(cond.float()))
        return out[:, :self.channels], out[:, self.channels:]

    def modulate(self, x: Tensor, cond: Tensor) -> Tensor:
        gain, shift = self.gain_shift(cond)
        view = (*gain.shape, *([1] * (x.ndim - 2)))
        return torch.addcmul(shift.view(view).to(x.dtype), x, (1.0 + gain).view(view).to(x.dtype))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, bound={self.bound}"


class ModalityPrompt(nn.Module):
    """Per-slot gain/shift from the availability vector, applied to available slots only.

    x: (B, C, *spatial), availability: (B, C) bool -> (B, C, *spatial); missing slots stay zero.
    """

    def __init__(self, num_slots: int, hidden: int = 32, bound: float = PROMPT_BOUND) -> None:
        super().__init__()
        self.film = BoundedFiLM(num_slots, num_slots, hidden, bound)

    def forward(self, x: Tensor, availability: Tensor) -> Tensor:
        avail = availability.to(x.dtype)
        out = self.film.modulate(x, avail)
        return out * avail.view(*avail.shape, *([1] * (x.ndim - 2)))


class TaskPrompt(nn.Module):
    """Bottleneck gain/shift from the domain weights (B, D): one-hot true domains in training, the routing at
    inference. feat: (B, C, *s) -> (B, C, *s)."""

    def __init__(self, channels: int, num_domains: int, hidden: int = 32, bound: float = PROMPT_BOUND) -> None:
        super().__init__()
        self.num_domains = num_domains
        self.film = BoundedFiLM(num_domains, channels, hidden, bound)

    def forward(self, feat: Tensor, weights: Tensor) -> Tensor:
        return self.film.modulate(feat, weights)
