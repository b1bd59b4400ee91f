"""Per-case information of a training batch and the channel-level augmentation that needs it.

nnU-Net's transforms never see the case key (``nnUNetDataLoader.generate_train_batch`` calls them
with image and segmentation only), so everything that depends on the case's domain or slots happens
here, on the collated batch, right before the network: the trainer looks the keys up in the dataset's
``universal`` block, re-zeroes the missing slots (intensity augmentations such as Gaussian noise
would otherwise fill them) and applies modality dropout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from nnunet_universal.metadata import UniversalMeta


@dataclass
class BatchContext:
    """Domain and slot availability of the samples of one batch.

    Attributes:
        domain: ``(B,)`` long, index of each sample's domain in ``domain_order`` (the network's head order).
        availability: ``(B, C)`` bool, True where the channel holds real data for that sample.
        keys: the case ids, for error messages.
    """

    domain: Tensor
    availability: Tensor
    keys: list[str]

    def to(self, device: torch.device) -> BatchContext:
        return BatchContext(self.domain.to(device), self.availability.to(device), self.keys)


def batch_context(keys: Sequence[str], meta: UniversalMeta, domain_order: Sequence[str]) -> BatchContext:
    """Look up domain and available slots of every case in ``keys`` (``batch['keys']``, np.str_ allowed)."""
    order = {d: i for i, d in enumerate(domain_order)}
    domain, avail, names = [], [], []
    for k in keys:
        case = meta.case(str(k))
        if case.domain not in order:
            raise ValueError(f"case {k!r} belongs to domain {case.domain!r}, which the network (plans) does not "
                             f"know ({list(domain_order)}); re-run 'nnunet-universal plan' for this dataset")
        domain.append(order[case.domain])
        avail.append(meta.slot_mask(case.slots))
        names.append(str(k))
    return BatchContext(torch.tensor(domain, dtype=torch.long), torch.tensor(avail, dtype=torch.bool), names)


def zero_missing_channels(data: Tensor, availability: Tensor) -> Tensor:
    """Set every unavailable channel to 0. ``data``: ``(B, C, *spatial)``; ``availability``: ``(B, C)`` bool."""
    if availability.shape != data.shape[:2]:
        raise ValueError(f"availability {tuple(availability.shape)} does not match data {tuple(data.shape[:2])}")
    mask = availability.to(device=data.device, dtype=data.dtype)
    return data * mask.view(*mask.shape, *([1] * (data.ndim - 2)))


def modality_dropout(availability: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Randomly hide available slots (modality dropout), never all of a sample's slots.

    With probability ``p`` a sample that has at least two available slots loses each of them
    independently with probability 1/2; if that would hide all of them, one of them (chosen uniformly)
    is kept. Samples with a single slot are never changed.

    Args:
        availability: ``(B, C)`` bool.
        p: per-sample probability of applying the dropout.
        generator: optional CPU generator (tests).

    Returns:
        A new ``(B, C)`` bool tensor, a subset of ``availability``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"modality dropout probability must be in [0, 1], got {p}")
    out = availability.detach().to("cpu", copy=True)
    if p == 0.0:
        return out.to(availability.device)
    for b in range(out.shape[0]):
        present = torch.nonzero(out[b]).flatten()
        if present.numel() < 2 or torch.rand((), generator=generator).item() >= p:
            continue
        keep = torch.rand(present.numel(), generator=generator) >= 0.5
        if not keep.any():
            keep[torch.randint(present.numel(), (), generator=generator)] = True
        out[b, present[~keep]] = False
    return out.to(availability.device)
