"""Domain-balanced case sampling for nnU-Net's data loader.

nnU-Net draws training cases with ``np.random.choice(identifiers, p=sampling_probabilities)``
(batchgenerators ``DataLoader.get_indices``), then oversamples foreground *within* the drawn case.
We only supply the probability vector: p(domain) ∝ n_domain^α and, inside a domain, every case is
equally likely, so p(case) = p(domain) / n_domain.

α = 1 is nnU-Net's uniform sampling over cases (large domains dominate), α = 0 gives every domain the
same share however small it is (small domains are seen over and over and overfit). α = 0.5 is
MultiTalent's choice (Ulrich et al. 2023: p(case) ∝ 1/sqrt(n_domain), hence p(domain) ∝ sqrt(n_domain)),
the usual square-root compromise between the two.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from nnunet_universal.metadata import UniversalMeta

#: Default exponent α of p(domain) ∝ n_domain^α (MultiTalent's square-root balancing).
DEFAULT_DOMAIN_ALPHA = 0.5


def domain_sampling_probabilities(identifiers: Sequence[str], meta: UniversalMeta, alpha: float) -> np.ndarray:
    """Per-case sampling probabilities aligned to ``identifiers`` (nnU-Net's sorted dataset identifiers).

    Args:
        identifiers: case ids in the order the data loader samples them (``dataset.identifiers``).
        meta: the dataset's universal block; every identifier must be one of ``meta.cases``.
        alpha: exponent of p(domain) ∝ n_domain^α, counted over ``identifiers`` only (the fold's cases).

    Returns:
        float64 array of shape ``(len(identifiers),)`` summing to 1.
    """
    if alpha < 0:
        raise ValueError(f"domain sampling exponent alpha must be >= 0, got {alpha}")
    if len(identifiers) == 0:
        raise ValueError("cannot compute sampling probabilities for an empty list of cases")
    domains = [meta.case(str(k)).domain for k in identifiers]
    counts = Counter(domains)
    weight = {d: float(n) ** alpha for d, n in counts.items()}
    total = sum(weight.values())
    p = np.array([weight[d] / total / counts[d] for d in domains], dtype=np.float64)
    return p / p.sum()  # remove rounding drift: np.random.choice checks the sum


def domain_probabilities(identifiers: Sequence[str], meta: UniversalMeta, alpha: float) -> dict[str, float]:
    """p(domain) implied by :func:`domain_sampling_probabilities` (for the training log and tests)."""
    p = domain_sampling_probabilities(identifiers, meta, alpha)
    out: dict[str, float] = {}
    for k, pk in zip(identifiers, p, strict=True):
        d = meta.case(str(k)).domain
        out[d] = out.get(d, 0.0) + float(pk)
    return out
