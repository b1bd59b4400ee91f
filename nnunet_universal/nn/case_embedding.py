"""The gate's case embedding collected during the prediction pass itself (one-pass dataset-free inference).

Dataset-free prediction needs the case's routing, from ``phi`` averaged over its sliding-window tiles, before it
knows which head to use. Under hard routing (the default) the prediction needs only one head, so the tiles can be
visited once: each tile's every head is computed (:meth:`DomainHeads.all_log_probs`, a few channels more than the
union), nnU-Net's sliding window aggregates them, and :class:`CaseEmbedding` sums the tiles' ``phi`` on the way;
the routing is decided at the end and the chosen head's channels are picked from the aggregate
(:meth:`DomainHeads.union_from_all`). The result equals the two-pass prediction (routing pass, then the sliding
window with that head) exactly, at the cost of one encoder pass less and without keeping any encoder output.

Only the tile itself adds its ``phi`` (not nnU-Net's mirrored copies, as in the routing pass):
:meth:`CaseEmbedding.expect_tile` announces it, as the predictor does before each tile.
"""

from __future__ import annotations

from torch import Tensor


class CaseEmbedding:
    """Sum and count of ``phi`` (F,) over the announced tiles; the same arithmetic as ``case_routing``."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.count = 0
        self._expect = False

    def expect_tile(self) -> None:
        """The next forward is the next sliding-window tile itself: add its ``phi``."""
        self._expect = True

    def take_expect(self) -> bool:
        """Whether the current forward is an announced tile (resets the announcement)."""
        expect, self._expect = self._expect, False
        return expect

    def add(self, phi: Tensor) -> None:
        """Add a batch of tile embeddings (B, F)."""
        s = phi.float().sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.count += phi.shape[0]

    def mean(self) -> Tensor:
        """(F,) the case's embedding: the mean over the announced tiles."""
        if self.sum is None or self.count == 0:
            raise RuntimeError("no sliding-window tile was announced (expect_tile) during the case pass: the case's "
                               "embedding is empty")
        return self.sum / self.count
