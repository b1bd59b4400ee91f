"""The in-memory form of one synthetic case, shared by the generators, the writers and the preview."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nnunet_universal.synthetic.grid import Flips, Grid


@dataclass
class CaseData:
    """One generated case before it is written in a native layout.

    ``images`` maps the native sequence name to an (X, Y, Z) float32 volume and ``labels`` is the canonical
    label map (X, Y, Z) uint8 (MR: 0/1 necrosis/2 oedema/3 enhancing; CT: 0/1 liver/2 tumour); all arrays in
    RAS voxel order on ``grid``. ``flips`` is the on-disk orientation the writer applies.
    """

    case_id: str
    grid: Grid
    images: dict[str, np.ndarray]
    labels: np.ndarray
    flips: Flips
    extras: dict[str, object] = field(default_factory=dict)
