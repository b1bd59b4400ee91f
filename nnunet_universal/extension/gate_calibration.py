"""Calibrate a new domain's gate row on its first training samples (extension training).

``extend`` starts a new domain's gate bias ``offset + s`` nats below the old ones (``extension/weights.py``), so
that the old model's function is exact at step 0. The gate loss alone cannot lift a row that far in a short
extension schedule (measured: 0 of 10 new-domain test cases routed after 128 SGD steps), and its weights start as
the mean of the old rows, with zero weight on a new slot's availability, the feature that most often tells a new
dataset apart. So once the new domain's prototype is set and some of its training samples have been seen, the row
is set in two steps, every other row left as it is:

1. **bias**: hard routing sends a sample ``i`` to the new domain ``n`` iff ``b_n > t_i`` with

       t_i = max_{k != n} (W_k phi_i + b_k + s cos(phi_i, p_k)) - (W_n phi_i + s cos(phi_i, p_n))

   (the softmax normalization is common to all domains). The samples of ``n`` want ``b_n > t_i``, every other
   sample (old-domain training samples seen in the same steps, and the old domains' prototypes as stand-ins for
   their scans, which is all there is in no-old-data mode) wants ``b_n < t_i``. ``b_n`` is the midpoint of the
   gap between the two sets when they separate, else the threshold with the fewest errors (each set's error rate
   weighted equally; ties to the lowest, the one that takes the fewest scans from the old domains: a tie broken to
   the middle of the two sets' medians once put the bias 67 nats up, and every old-domain test case went to the new
   domain);
2. **row** (optional, ``fit_l2``; the trainers' ``gate_row_fit_l2``, off by default): from there, ``(W_n, b_n)``
   minimize the gate loss's cross-entropy of the routing log-weights on the same samples (each domain's samples
   weighted equally), plus ``l2 ||W_n - W_n^0||^2`` to stay near the start (L-BFGS, a few dozen iterations on a
   few dozen samples: milliseconds). Off by default: with ``l2 = 1e-3`` it separated the first samples but
   generalized badly (``scripts/benchmark_extension.py`` at 4a89630: the new-parts extension, whose old rows and
   similarity scale stay frozen, ended up routing every old-domain test case to the new domain).

**New-slot prior** (``slot_prior``; every extension trainer, ``gate_new_slot_margin`` its floor): the old
domains' prototypes, a handful of means, are poor stand-ins for old-domain scans, and even the old samples of the
first steps are few: a bias set between them and the new samples sent real old scans to the new domain (no-old-data
mode at add2983: all 20 old-domain test cases; new parts with the old data in a repeat at f54403d: 3 of 10
UCSF-like). One feature is exact for every old-domain scan: the availability of a slot the old model did not have
is 0 for it, whatever the encoder learns. So before step 1 the new row's weights on the new domain's new slots are
set so that a scan with them present gets ``M`` more nats (split over its new slots; phi's availability part is
L2-normalized like its other parts, so a present slot's entry is ``1 / (2 sqrt(n))`` with ``n`` slots present and
the weights are scaled by the smallest such value), and the bias is set from the new domain's samples that have
all of those slots, halfway between them and the rest. ``M`` (:func:`prior_margin`) grows with the range of the
calibration thresholds and the bound of the similarity scale, so the two sides always separate and lie hundreds of
nats from the bias. In effect the new slot decides: a scan with it goes to the new domain, a scan without it keeps
the old model's choice among the old domains (the new domain's own scans without their new slot too: the stated
price). The trainers also leave the new domain's samples without their new slots out of the gate loss (they would
teach the gate the opposite). With the saturated margins the gate loss's gradients on the row vanish, so the row
stays where the calibration put it.

History (``scripts/benchmark_extension.py`` runs): up to e9a2948 the prior's weights assumed an availability entry
of 1 and its "samples that have them" test (entry > 0.5) never held on phi's normalized entries, so the "100 nats"
were about 25 for a scan with four slots and the bias was set from all the new samples, those whose new slot was
hidden included. That routed every test case right with the old data (d05ff4c, two runs) but not without it: the
other side is then the old prototypes alone, whose thresholds the learned similarity scale (about 90) inflates
(a prototype is at cosine 1 to itself), and every old-domain test case of one of two runs went to the new domain
(the inflation is reproduced in ``tests/test_gate_calibration.py``). Setting the bias from the new samples alone
was worse (febffeb, reverted: every old-domain case of every run). A new domain without a new slot gets no prior:
its routing against old scans then rests on the calibration alone, and without the old data on the prototypes
alone (not reliable; ``extend --no-old-data`` warns).

The gate loss then trains the row as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nnunet_universal.nn.gating import DomainRouter


@dataclass(frozen=True)
class Calibration:
    """Result for one new domain: the bias before and after, and how many samples each side routes right."""

    domain: int
    bias_before: float
    bias_after: float
    own_right: int
    own_total: int
    others_right: int
    others_total: int
    separable: bool
    fitted: bool = False
    #: nats put on the new domain's new slots' availability (new-slot prior; 0: none)
    slot_margin: float = 0.0

    def describe(self, names: list[str]) -> str:
        how = "separable by the bias alone" if self.separable else "not separable by the bias alone"
        fit = "; row then fitted to the routing loss" if self.fitted else ""
        prior = (f"; new-slot prior: +{self.slot_margin:.0f} nats when its new slot(s) are present, bias set from "
                 "its samples that have them") if self.slot_margin else ""
        return (f"gate row of new domain {names[self.domain]}: bias {self.bias_before:.2f} -> {self.bias_after:.2f} "
                f"({how}{fit}{prior}); routes {self.own_right}/{self.own_total} of its "
                f"samples and {self.others_right}/{self.others_total} other samples and old prototypes correctly")


@torch.no_grad()
def routing_thresholds(router: DomainRouter, phi: Tensor, new: int) -> Tensor:
    """phi (N, F) -> (N,) the bias of domain ``new``'s gate row above which each sample routes to it."""
    score = router.gate_logits(phi) + router.scale() * router.similarity(phi)  # (N, D), before log-softmax
    own = score[:, new] - router.gate.bias[new].float()
    others = score.clone()
    others[:, new] = float("-inf")
    return others.max(dim=1).values - own


def choose_bias(own: Tensor, others: Tensor) -> tuple[float, bool]:
    """Bias from the thresholds of the new domain's samples ``own`` (N1,) and of everything else ``others`` (N2,).

    Returns (bias, separable). Separable: every own threshold below every other one; then the midpoint of the gap.
    Else the candidate (midpoints of consecutive sorted thresholds) with the lowest mean of the two error rates,
    ties broken towards the lowest bias (the fewest scans taken from the old domains).
    """
    if own.numel() == 0:
        raise ValueError("no samples of the new domain to calibrate its gate row on")
    if others.numel() == 0:
        return float(own.max()) + 1.0, True
    hi, lo = float(own.max()), float(others.min())
    if hi < lo:
        return (hi + lo) / 2.0, True
    allt = torch.cat([own, others]).double().sort().values
    cands = torch.cat([allt[:1] - 1.0, (allt[1:] + allt[:-1]) / 2.0, allt[-1:] + 1.0])
    err = (own.double()[None, :] >= cands[:, None]).double().mean(1) \
        + (others.double()[None, :] <= cands[:, None]).double().mean(1)
    return float(cands[err == err.min()].min()), False


def fit_row(router: DomainRouter, phi: Tensor, domain: Tensor, n: int, l2: float = 1e-3, iterations: int = 50) -> None:
    """Step 2 of the module docstring: row ``n`` of the gate (weight and bias) fitted to the routing cross-entropy
    of ``phi`` (N, F) with their domains (N,), balanced over domains, the other rows fixed."""
    phi, domain = phi.detach().float(), domain.detach().long()
    w0 = router.gate.weight[n].detach().float().clone()
    counts = torch.bincount(domain, minlength=router.num_domains).float()
    weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))[domain]
    weight = weight / weight.sum()
    with torch.no_grad():
        others = router.gate_logits(phi)  # (N, D)
        sim = router.scale() * router.similarity(phi)
    onehot = F.one_hot(torch.full((phi.shape[0],), n, dtype=torch.long), router.num_domains).to(phi.dtype)
    w = w0.clone().requires_grad_(True)
    b = router.gate.bias[n].detach().float().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        gate = others * (1 - onehot) + (phi @ w + b)[:, None] * onehot
        loss = (F.cross_entropy(F.log_softmax(gate, dim=1) + sim, domain, reduction="none") * weight).sum()
        loss = loss + l2 * (w - w0).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        if bool(torch.isfinite(w).all()) and bool(torch.isfinite(b)):
            router.gate.weight[n] = w.to(router.gate.weight.dtype)
            router.gate.bias[n] = b.to(router.gate.bias.dtype)


@torch.no_grad()
def set_slot_prior(router: DomainRouter, new: int, columns: list[int], margin: float,
                   present_value: float = 1.0) -> None:
    """New-slot prior (module docstring): gate row ``new`` gets ``margin / (len(columns) * present_value)`` on each
    of ``columns`` (the phi columns of its new slots' availability), so a sample with all of them present scores at
    least ``margin`` nats more for it than the same sample without. ``present_value``: the smallest value a present
    slot's column takes (phi normalizes its availability part: ``smallest_present_slot_value`` of
    ``nn/universal_unet.py``)."""
    if margin <= 0:
        raise ValueError(f"the new-slot margin must be > 0 nats, got {margin}")
    if present_value <= 0:
        raise ValueError(f"a present slot's value in phi must be > 0, got {present_value}")
    router.gate.weight[new, columns] = margin / (len(columns) * present_value)


def prior_margin(floor: float, thresholds: Tensor) -> float:
    """Nats the new-slot prior puts on a new domain's new slots: ``floor + 2 R + 8 s_max``.

    ``thresholds`` (N,): every calibration sample's and old prototype's routing threshold before the prior; ``R``
    their range; ``s_max`` the bound of the learned similarity scale. With the bias at the midpoint, the new
    domain's samples with their new slots and everything else then lie at least ``floor / 2 + R / 2 + 4 s_max`` nats
    on their side of it: the prototypes' and the new samples' thresholds are separated whatever the gate learned,
    and an unseen scan's threshold would have to leave the observed range by more than ``R / 2`` plus the largest
    change the two similarity terms can make to a threshold (``4 s``: two cosines, each moving by at most 2) before
    the routing changes sides."""
    spread = float(thresholds.max() - thresholds.min()) if thresholds.numel() else 0.0
    return float(floor) + 2.0 * spread + 8.0 * DomainRouter.SCALE_RANGE[1]


@torch.no_grad()
def calibrate_new_rows(router: DomainRouter, phi: Tensor, domain: Tensor, new_domains: list[int],
                       old_domains: list[int], fit_l2: float | None = None,
                       slot_prior: dict[int, list[int]] | None = None, margin: float = 100.0,
                       present_value: float = 1.0) -> list[Calibration]:
    """Set the gate bias of every new domain with samples in ``phi`` (N, F) / ``domain`` (N,) and an initialized
    prototype (module docstring, step 1), then with ``fit_l2`` also fit its row (step 2, that L2 weight); returns
    what was done per domain. The old domains' initialized prototypes are added as samples of their domains.

    ``slot_prior``: new domain -> phi columns of its new slots' availability (new-slot prior): the row's weights
    there are set so that a scan with all of them present gets :func:`prior_margin` nats (``margin`` its floor;
    ``present_value``: the smallest value a present slot's column of phi takes) first, and the bias is chosen on the
    domain's samples with all of them present (non-zero columns).
    """
    phi, domain = phi.detach().float(), domain.detach().long().to(phi.device)
    protos = [d for d in old_domains if bool(router.prototype_initialized[d])]
    if protos:
        idx = torch.tensor(protos, device=phi.device)
        phi = torch.cat([phi, router.prototypes[idx].float().to(phi.device)])
        domain = torch.cat([domain, idx])
    done = []
    for n in new_domains:
        mine = domain == n
        if not bool(mine.any()) or not bool(router.prototype_initialized[n]):
            continue
        before = float(router.gate.bias[n])
        columns = (slot_prior or {}).get(n) or []
        own, nats = mine, 0.0
        if columns:
            nats = prior_margin(margin, routing_thresholds(router, phi, n))
            set_slot_prior(router, n, columns, nats, present_value)
            present = mine & (phi[:, columns] > 0).all(dim=1)
            own = present if bool(present.any()) else mine
        t = routing_thresholds(router, phi, n)
        bias, separable = choose_bias(t[own], t[~mine])
        router.gate.bias[n] = bias
        if fit_l2 is not None:
            fit_row(router, phi, domain, n, l2=fit_l2)
        routed = router.route(phi, hard=True).argmax(1) == n
        done.append(Calibration(n, before, float(router.gate.bias[n]), int(routed[mine].sum()), int(mine.sum()),
                                int((~routed[~mine]).sum()), int((~mine).sum()), separable, fit_l2 is not None,
                                nats))
    return done
