"""Gate-row calibration of a new domain (``extension/gate_calibration.py``) on a router grown like ``extend`` does."""

from __future__ import annotations

import pytest
import torch

from nnunet_universal.extension.gate_calibration import calibrate_new_rows, choose_bias, routing_thresholds
from nnunet_universal.nn.gating import DomainRouter


def _grown_router(seed: int = 0) -> tuple[DomainRouter, torch.Tensor, torch.Tensor]:
    """Three domains; 0 and 1 trained (prototypes set), 2 new: gate row = mean of the old rows, bias 20 nats down,
    prototype set from a first batch. Returns the router and 24 samples (8 per domain) around three centres."""
    torch.manual_seed(seed)  # the router's own initialization: independent of the tests run before
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 16, generator=g) * 2
    domain = torch.arange(3).repeat_interleave(8)
    phi = centres[domain] + 0.3 * torch.randn(24, 16, generator=g)
    r = DomainRouter(16, 3)
    with torch.no_grad():
        r.gate.weight[2] = r.gate.weight[:2].mean(0)
        r.gate.bias[2] = r.gate.bias[:2].mean() - 10.0 - float(r.scale())
    r.update_prototypes(phi, domain)
    return r, phi, domain


def test_new_row_starts_unroutable_and_is_calibrated_to_separate_the_domains():
    r, phi, domain = _grown_router()
    assert not bool((r.route(phi, hard=True).argmax(1) == 2).any())  # extend's start: never routed
    done = calibrate_new_rows(r, phi, domain, new_domains=[2], old_domains=[0, 1])
    assert len(done) == 1 and done[0].separable and done[0].bias_after > done[0].bias_before
    assert torch.equal(r.route(phi, hard=True).argmax(1), domain)
    assert (done[0].own_right, done[0].own_total) == (8, 8)
    assert (done[0].others_right, done[0].others_total) == (16 + 2, 16 + 2)  # old samples and old prototypes
    assert "gate row of new domain c" in done[0].describe(["a", "b", "c"])


def test_old_prototypes_stand_in_for_old_data():
    """No-old-data mode: only new-domain samples; the old prototypes keep the old domains routed."""
    r, phi, domain = _grown_router(1)
    mine = domain == 2
    calibrate_new_rows(r, phi[mine], domain[mine], new_domains=[2], old_domains=[0, 1])
    assert torch.equal(r.route(phi, hard=True).argmax(1), domain)


def test_uninitialized_prototype_or_no_samples_leave_the_row_alone():
    r, phi, domain = _grown_router()
    before = r.gate.bias.clone()
    assert calibrate_new_rows(r, phi[domain != 2], domain[domain != 2], [2], [0, 1]) == []
    r.prototype_initialized[2] = False
    assert calibrate_new_rows(r, phi, domain, [2], [0, 1]) == []
    assert torch.equal(r.gate.bias, before)


def test_threshold_is_the_bias_where_the_new_domain_takes_over():
    r, phi, _ = _grown_router()
    t = routing_thresholds(r, phi[:1], 2)
    for delta, expect in ((-1e-3, False), (1e-3, True)):
        with torch.no_grad():
            r.gate.bias[2] = float(t) + delta
        assert bool(r.route(phi[:1], hard=True).argmax(1) == 2) is expect


def test_overlapping_thresholds_take_the_fewest_errors():
    own = torch.tensor([0.0, 1.0, 2.0, 5.0])  # the new domain wants bias > each of these
    others = torch.tensor([3.0, 4.0, 6.0, 7.0])  # every other sample wants bias < each of these
    bias, separable = choose_bias(own, others)
    assert not separable and 2.0 < bias < 3.0  # one error (the own 5.0) beats every other cut
    bias, separable = choose_bias(torch.tensor([0.0, 1.0]), torch.tensor([3.0]))
    assert separable and bias == 2.0
    # a tie (one own error at 1.25, one other error at 11): the lower bias, which takes fewer old scans (the
    # middle of the medians, 10.5, would have picked 11)
    bias, separable = choose_bias(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.5, 20.0, 21.0]))
    assert not separable and bias == 1.25


def _with_slot_feature(r: DomainRouter, seed: int) -> DomainRouter:
    """``r`` (16 features) with a 17th feature, a new slot's availability, that every row weighs zero (as ``extend``
    grows the gate); prototypes not set."""
    torch.manual_seed(seed)
    r2 = DomainRouter(17, 3)
    with torch.no_grad():
        r2.gate.weight.zero_()
        r2.gate.weight[:, :16] = r.gate.weight
        r2.gate.bias.copy_(r.gate.bias)
        r2.log_scale.copy_(r.log_scale)
    return r2


def test_row_fit_uses_a_feature_the_bias_cannot():
    """New-domain samples look like domain 1 except for one feature the old rows give no weight (a new slot's
    availability): the fitted row routes every sample to its domain, domain 1 stays routed to 1, and the old rows
    are untouched. (Whether the bias alone separates them depends on the similarity term; not asserted.)"""
    r, phi, domain = _grown_router(2)
    phi = phi.clone()
    phi[domain == 2] = phi[domain == 1] + 0.01 * torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    phi = torch.cat([phi, (domain == 2).float()[:, None]], dim=1)  # (24, 17): the new slot's availability
    r2 = _with_slot_feature(r, seed=4)
    r2.update_prototypes(phi, domain)
    assert not calibrate_new_rows(r2.__class__(17, 3), phi, domain, [2], [0, 1])  # no prototype: no-op
    done = calibrate_new_rows(r2, phi, domain, new_domains=[2], old_domains=[0, 1], fit_l2=1e-3)
    assert done[0].fitted and "row then fitted" in done[0].describe(["a", "b", "c"])
    assert torch.equal(r2.route(phi, hard=True).argmax(1), domain)
    assert (done[0].own_right, done[0].others_right) == (8, 18)
    assert torch.equal(r2.gate.weight[:2], r.gate.weight.new_zeros(2, 17).index_copy(
        1, torch.arange(16), r.gate.weight[:2]))  # the old rows untouched


def _no_old_data_case() -> tuple[DomainRouter, torch.Tensor, torch.Tensor]:
    """Domain 2 (new, with a new slot) looks like domain 1 in every other feature; old samples scatter widely around
    their prototypes. Returns a grown router (17 features, the last one the new slot's availability, zero weight in
    every row), the samples (24, 17) and their domains; calibration sees only domain 2's samples and the
    prototypes, as in no-old-data mode."""
    r, phi, domain = _grown_router(5)
    g = torch.Generator().manual_seed(6)
    phi = phi.clone()
    phi[domain == 2] = phi[domain == 1] + 0.3 * torch.randn(8, 16, generator=g)
    phi[domain != 2] += 1.5 * torch.randn(16, 16, generator=g)  # old scans far from their prototypes
    phi = torch.cat([phi, (domain == 2).float()[:, None]], dim=1)
    r2 = _with_slot_feature(r, seed=7)
    with torch.no_grad():  # old prototypes: the old model's (before the scatter); the new one from its samples
        for d in range(2):
            r2.prototypes[d] = torch.cat([r.prototypes[d], torch.zeros(1)])
        r2.prototypes[2] = phi[domain == 2].mean(0)
        r2.prototype_initialized[:] = True
    return r2, phi, domain


def test_new_slot_prior_keeps_old_scans_routed_without_old_data():
    """No-old-data mode: with only the new samples and the old prototypes, the new slot's availability (0 for every
    old-domain scan) carries the decision; the old rows are untouched; a new-domain scan without its new slot is
    no longer routed to it (the stated price)."""
    r, phi, domain = _no_old_data_case()
    mine = domain == 2
    old_rows = r.gate.weight[:2].detach().clone()
    before = r.route(phi[~mine], hard=True).argmax(1)  # the old model's decisions (some 0/1 mix-ups: its own)
    assert not bool((before == 2).any())
    done = calibrate_new_rows(r, phi[mine], domain[mine], [2], [0, 1], slot_prior={2: [16]}, margin=10.0)
    nats = done[0].slot_margin
    assert nats > 10.0 + 8 * DomainRouter.SCALE_RANGE[1] and done[0].separable
    assert f"new-slot prior: +{nats:.0f} nats" in done[0].describe(["a", "b", "c"])
    assert float(r.gate.weight.detach()[2, 16]) == pytest.approx(nats) and torch.equal(r.gate.weight[:2], old_rows)
    assert torch.equal(r.route(phi[~mine], hard=True).argmax(1), before)  # every old scan: the same domain as before
    assert bool((r.route(phi[mine], hard=True).argmax(1) == 2).all())
    hidden = phi[mine].clone()
    hidden[:, 16] = 0.0
    assert not bool((r.route(hidden, hard=True).argmax(1) == 2).any())


def test_prior_holds_at_a_high_learned_similarity_scale():
    """The benchmark's failure (no-old-data, a learned scale near 90): a prototype is at cosine 1 to itself, so the
    prototypes' thresholds lie far above those of old scans that look partly like the new domain; a fixed 100-nat
    prior put the midpoint bias above such scans, and they went to the new domain (emulated here). The prior's
    margin grows with the thresholds' range and the scale bound: every old scan keeps the old model's domain, also
    scans on the way from an old prototype to the new one, and the new domain's own look without its new slot."""
    from nnunet_universal.extension.gate_calibration import set_slot_prior

    def case() -> tuple[DomainRouter, torch.Tensor, torch.Tensor]:
        r, phi, domain = _grown_router(5)
        phi = torch.cat([phi, (domain == 2).float()[:, None]], dim=1)  # the last feature: the new slot
        r2 = _with_slot_feature(r, seed=7)
        with torch.no_grad():
            for d in range(2):
                r2.prototypes[d] = torch.cat([r.prototypes[d], torch.zeros(1)])
            r2.prototypes[2] = phi[domain == 2].mean(0)
            r2.prototype_initialized[:] = True
            r2.log_scale.fill_(torch.log(torch.tensor(90.0)))
        return r2, phi, domain

    r, phi, domain = case()
    mine = domain == 2
    w = torch.linspace(0.1, 1.0, 10)[:, None]
    towards_new = torch.cat([(1 - w) * r.prototypes[d:d + 1] + w * r.prototypes[2:3] for d in (0, 1)])
    towards_new[:, 16] = 0.0  # old scans: never the new slot
    old_scans = torch.cat([phi[~mine], towards_new])
    before = r.route(old_scans)[:, :2].argmax(1)  # the old model's choice among its own domains
    # the fixed 100-nat rule: prior, then the bias halfway between the new samples and the old prototypes
    fixed, _, _ = case()
    set_slot_prior(fixed, 2, [16], 100.0)
    t_own, t_protos = routing_thresholds(fixed, phi[mine], 2), routing_thresholds(fixed, fixed.prototypes[:2], 2)
    with torch.no_grad():
        fixed.gate.bias[2] = (float(t_own.max()) + float(t_protos.min())) / 2
    assert int((fixed.route(old_scans, hard=True).argmax(1) == 2).sum()) >= 4
    done = calibrate_new_rows(r, phi[mine], domain[mine], [2], [0, 1], slot_prior={2: [16]}, margin=100.0)
    assert done[0].separable and (done[0].own_right, done[0].others_right) == (8, 2)
    assert torch.equal(r.route(old_scans, hard=True).argmax(1), before)
    assert bool((r.route(phi[mine], hard=True).argmax(1) == 2).all())


def test_prior_margin_holds_on_the_networks_normalized_availability():
    """phi's availability part is L2-normalized like every part (a present slot holds 1/(2 sqrt(n)) with n slots
    present): the prior's weights account for it, so every scan with the new slot present, however many slots it
    has, scores at least the margin more than without it. (Weights for an availability of 1, as before, gave a
    scan with all five slots a quarter-margin or less.)"""
    from nnunet_universal.extension.gate_calibration import set_slot_prior
    from nnunet_universal.nn.universal_unet import gate_embedding, smallest_present_slot_value

    g = torch.Generator().manual_seed(0)
    slots = 5
    availability = torch.tril(torch.ones(slots, slots, dtype=torch.bool)).flip(1)  # 1..5 slots, the last always
    b = availability.shape[0]

    def phi(av: torch.Tensor) -> torch.Tensor:
        return gate_embedding(torch.randn(b, 8, generator=g), [torch.randn(b, 4, generator=g),
                                                               torch.randn(b, 6, generator=g)], av)

    with_slot, without = phi(availability), phi(availability & (torch.arange(slots) < slots - 1))
    column = with_slot.shape[1] - 1
    for value, holds in ((smallest_present_slot_value(slots), True), (1.0, False)):
        r = DomainRouter(with_slot.shape[1], 2)
        with torch.no_grad():
            r.gate.weight.zero_()
        set_slot_prior(r, 1, [column], 100.0, value)
        gain = (r.gate_logits(with_slot)[:, 1] - r.gate_logits(without)[:, 1]).detach()  # slot column only
        assert bool((gain >= 100.0 - 1e-3).all()) is holds, gain
    assert float(gain.detach().min()) < 50.0


def test_without_the_prior_prototypes_alone_misroute_old_scans():
    """The same data without the prior: the bias between the new samples and the prototypes sends old scans that lie
    off their prototype to the new domain (why the prior exists)."""
    r, phi, domain = _no_old_data_case()
    mine = domain == 2
    calibrate_new_rows(r, phi[mine], domain[mine], [2], [0, 1])
    assert bool((r.route(phi[~mine], hard=True).argmax(1) == 2).any())


def test_gate_loss_ignores_the_samples_the_new_slot_prior_excludes():
    """ExtensionLoss hands its gate target to the base loss, whose gate cross-entropy is then averaged over the
    samples not marked IGNORE_GATE (a new domain's samples whose new slot was hidden); no NaN when all are."""
    from dataclasses import dataclass

    import torch.nn.functional as F

    from nnunet_universal.extension.losses import ExtensionLoss
    from nnunet_universal.trainers.losses import IGNORE_GATE, _gate_term

    @dataclass
    class Out:
        gate_logits: torch.Tensor | None

    class Base(torch.nn.Module):  # the segmentation part 1.0, the gate term as PartialLabelLoss adds it
        gate_weight = 0.5

        def forward(self, out, targets, domain, keys=(), gate_target=None):
            return 1.0 + self.gate_weight * _gate_term(out.gate_logits, domain, gate_target)

    gate = torch.randn(4, 3)
    domain = torch.tensor([0, 2, 2, 1])
    masked = torch.tensor([0, IGNORE_GATE, 2, 1])
    base = Base()
    loss = ExtensionLoss(base, None, None, gate_target=lambda d: masked)(Out(gate), [], domain)
    expect = 1.0 + 0.5 * F.cross_entropy(gate[[0, 2, 3]], domain[[0, 2, 3]])
    torch.testing.assert_close(loss, expect)
    everything = ExtensionLoss(base, None, None, gate_target=lambda d: torch.full_like(d, IGNORE_GATE))
    torch.testing.assert_close(everything(Out(gate), [], domain), torch.tensor(1.0))  # no NaN when all are ignored
    torch.testing.assert_close(ExtensionLoss(base, None)(Out(gate), [], domain),
                               1.0 + 0.5 * F.cross_entropy(gate, domain))  # no target: every sample
