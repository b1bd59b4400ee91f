"""Encoder outputs of sliding-window tiles, kept from the routing pass for the prediction pass.

Dataset-free inference visits every tile twice: once to aggregate the gate's embedding over the case
(``inference.routing.case_routing``), once to predict with the resulting routing. The encoder (with the modality
prompt and harmonization) does not depend on the routing, so its outputs from the first visit are reusable:
``UniversalUNet.embed`` stores them while a cache is active, ``UniversalUNet.forward`` takes them back for the
identical tile. Entries are matched by exact equality of the input tile and availability (never by position),
so a miss only costs the recomputation; nnU-Net's sliding window visits tiles in the routing pass's order, so a
hit is always the oldest entry. A byte budget bounds the memory: tiles beyond it are simply encoded twice.

Deferred checking (what the predictor uses): deciding equality on the host costs a host-device synchronization
per tile, which on a GPU leaves the device idle while the host queues the next tile's work. With
:meth:`EncodingCache.expect_tile` the predictor announces that the next forward is the next sliding-window tile
itself (nnU-Net calls ``network(tile)`` before any mirrored copy); that call takes the oldest entry when its shape
matches and only queues the equality test on the device. :meth:`EncodingCache.verify` evaluates all queued tests
with one synchronization at the end of the case; if any failed, the predictor predicts the case again without
the cache, so a wrong match can cost time but never change a prediction.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

#: Default budget of the predictor's cache (skips of one 3D full-resolution tile at 128^3 and 32 base
#: features take about 350 MB in fp32; the default network's typical case needs a handful of tiles).
DEFAULT_CACHE_MB = 1024


@dataclass
class CachedEncoding:
    """One tile's encoder outputs: skips (bottleneck last), pooled embedding phi, HarmonyNorm statistics."""

    x: Tensor  # (1, C, *patch), the tile as given to the network
    availability: Tensor  # (1, C) bool
    skips: list[Tensor]
    phi: Tensor  # (1, F)
    stats: list[tuple[Tensor, Tensor] | None]  # per encoder stage, for HarmonyRestore (None: stage has none)

    @property
    def nbytes(self) -> int:
        tensors = [self.x, self.phi, *self.skips, *(t for s in self.stats if s is not None for t in s)]
        return sum(t.numel() * t.element_size() for t in tensors)


class EncodingCache:
    """FIFO of :class:`CachedEncoding` under a byte budget; counts hits and misses for tests and reports."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"encoding cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: deque[CachedEncoding] = deque()
        self._expect_tile = False
        self._deferred_mode = False  # set by the first expect_tile(): unannounced calls then miss
        self._pending: list[Tensor] = []  # deferred equality tests (0-dim bool tensors: True = mismatch)
        self._pending_availability: dict[tuple, tuple[Tensor, Tensor]] = {}  # deferred availability comparisons
        #: False: every take() misses (the predictor's second try of a case after a failed verify())
        self.enabled = True

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, entry: CachedEncoding) -> bool:
        """Keep ``entry`` if it fits the remaining budget; returns whether it was kept."""
        size = entry.nbytes
        if self.nbytes + size > self.max_bytes:
            return False
        self._entries.append(entry)
        self.nbytes += size
        return True

    def expect_tile(self) -> None:
        """The next :meth:`take` is the next sliding-window tile itself: match it by position, check it later."""
        self._expect_tile = self._deferred_mode = True

    def take(self, x: Tensor, availability: Tensor) -> CachedEncoding | None:
        """The oldest entry if it was made from exactly this tile and availability (it is removed), else None.

        After :meth:`expect_tile` the equality is only queued on the device (see :meth:`verify`); calls that
        were not announced then miss (mirrored copies of a tile)."""
        deferred, self._expect_tile = self._expect_tile, False
        if self.enabled and self._entries:
            e = self._entries[0]
            same_kind = (e.x.shape == x.shape and e.x.dtype == x.dtype and e.x.device == x.device
                         and e.availability.shape == availability.shape)
            if same_kind and deferred:
                self._pending.append(torch.ne(e.x, x).any())
                # a sliding window passes the same two availability tensors for every tile: compared once per
                # pair (by identity of storage and layout; the entry holds its tensor, so no other one can reuse
                # that storage meanwhile) when verify() runs
                key = (_layout(e.availability), _layout(availability))
                self._pending_availability.setdefault(key, (e.availability, availability))
                return self._pop()
            if (same_kind and not self._deferred_mode and torch.equal(e.availability, availability)
                    and torch.equal(e.x, x)):
                return self._pop()
        self.misses += 1
        return None

    def _pop(self) -> CachedEncoding:
        e = self._entries.popleft()
        self.nbytes -= e.nbytes  # computed from shapes only: cheap
        self.hits += 1
        return e

    def verify(self) -> bool:
        """Whether every deferred match was exact (one host synchronization); forgets the queued tests."""
        pending, self._pending = self._pending, []
        pairs, self._pending_availability = self._pending_availability, {}
        pending += [torch.ne(a, b).any() for a, b in pairs.values()]
        return not pending or not bool(torch.stack(pending).any())

    def clear(self) -> None:
        self._entries.clear()
        self._pending = []
        self._pending_availability = {}
        self._expect_tile = self._deferred_mode = False
        self.nbytes = 0


def _layout(t: Tensor) -> tuple:
    """What identifies a tensor's values while it is alive and not written to: storage, offset, shape, strides."""
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
