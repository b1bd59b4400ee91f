"""Fingerprint of a no-old-data extension: the availability-aware extractor, accepting slots without cases.

In no-old-data mode the extended dataset holds only the new data, so old slots the new data lack have no case.
Their normalization and intensity statistics are the old plans' (``api.extended_plans`` keeps them); the
placeholder statistics computed here for them are never used. Every other slot is fingerprinted as by
:class:`UniversalFingerprintExtractor`.
"""

from __future__ import annotations

import numpy as np
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter

from nnunet_universal.planners.fingerprint import UniversalFingerprintExtractor


class NoOldDataFingerprintExtractor(UniversalFingerprintExtractor):
    """:class:`UniversalFingerprintExtractor` that gives slots without cases a placeholder instead of an error."""

    def _slot_counts(self) -> np.ndarray:
        return np.sum([self.availability[k] for k in self.dataset], axis=0)

    def samples_per_channel(self) -> list[int]:
        return [int(self.num_foreground_voxels_for_intensitystats // n) if n else 0 for n in self._slot_counts()]

    def _analyze_all(self, reader_writer_class: type[BaseReaderWriter]) -> dict:
        results = super()._analyze_all(reader_writer_class)
        first = next(iter(results.values()))
        for c, n in enumerate(self._slot_counts()):
            if n == 0:  # placeholder: the old plans' statistics are used for this slot
                first["samples"][c] = np.zeros(1, dtype=np.float32)
        return results
