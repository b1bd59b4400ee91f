"""UniversalUNet: real nnU-Net plans (2D/3D, PlainConvUNet/ResidualEncoderUNet), routing, state dict, switches."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_universal.metadata import MetadataError, NetworkOptions, read_plans_universal
from nnunet_universal.nn.availability import derive_availability
from nnunet_universal.nn.gating import DomainRouter, all_reduce_prototype_stats
from nnunet_universal.nn.harmony import HarmonyNorm
from nnunet_universal.nn.heads import MIN_PROBABILITY
from nnunet_universal.nn.universal_unet import TrainOutput, UniversalUNet, build_universal_network, style_vector

DATA = Path(__file__).parent / "data"
# fixture domains (tests/data/plans_*.json): brats_mets -> [1, 2, 3], ucsf_bmsr -> [4], lits -> [5, 6]
DOMAINS = [[1, 2, 3], [4], [5, 6]]
N_UNION, N_SLOTS = 7, 5


def _plans(kind: str) -> PlansManager:
    return PlansManager(json.loads((DATA / f"plans_{kind}_unet.json").read_text()))


def _input(shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[:, 4] = 3.7  # CT slot missing in MR cases: a non-zero constant after CT normalization
    return x


@pytest.mark.parametrize(("kind", "cfg", "shape", "train"), [
    ("plain", "2d", (2, 5, 64, 64), True),
    ("plain", "3d_fullres", (1, 5, 32, 32, 32), True),
    ("resenc", "2d", (2, 5, 64, 64), True),
    ("resenc", "3d_fullres", (1, 5, 32, 32, 32), False),
])
def test_shapes_from_real_plans(kind, cfg, shape, train):
    torch.manual_seed(0)
    pm = _plans(kind)
    cm = pm.get_configuration(cfg)
    if (kind, cfg) == ("plain", "2d"):
        net = build_universal_network(pm, cm, N_SLOTS, N_UNION, enable_deep_supervision=True)
    else:  # same wrapping, nnU-Net's He init skipped to keep the test fast
        backbone = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                          cm.network_arch_init_kwargs_req_import, N_SLOTS, N_UNION,
                                          allow_init=False, deep_supervision=True)
        net = UniversalUNet(backbone, DOMAINS, N_UNION, N_SLOTS, read_plans_universal(pm.plans)[1])
    n_scales = len(cm.pool_op_kernel_sizes) - 1
    x = _input(shape)
    with torch.no_grad():
        out = net(x)
    assert len(out) == n_scales
    for s, o in enumerate(out):
        assert o.shape == (shape[0], N_UNION, *[d // 2 ** s for d in shape[2:]])
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.exp().sum(1), torch.ones_like(o[:, 0]), rtol=1e-4, atol=1e-4)
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
    with torch.no_grad():
        assert net(x).shape == (shape[0], N_UNION, *shape[2:])
    net.decoder.deep_supervision = True
    if not train:
        return
    domain = torch.arange(shape[0]) % 2
    avail = torch.tensor([[True, True, True, True, False]]).expand(shape[0], -1)
    res = net.forward_train(x, domain, avail)
    assert isinstance(res, TrainOutput) and res.union is None and len(res.heads) == n_scales
    assert res.gate_logits.shape == (shape[0], 3)
    chans = list(net.encoder.output_channels)
    width = chans[-1] + 2 * chans[0] + 2 * sum(chans) + N_SLOTS  # bottleneck, first-norm and stage styles, slots
    assert res.embedding.shape == (shape[0], width)
    for d, idx in res.samples.items():
        assert torch.equal(domain[idx], torch.full_like(idx, d))
        assert res.heads[0][d].shape == (len(idx), 1 + len(DOMAINS[d]), *shape[2:])
    loss = sum(v.mean() for h in res.heads for v in h.values()) + res.gate_logits.sum()
    loss.backward()
    assert all(p.grad is not None for p in net.heads.parameters())
    assert any(isinstance(m, HarmonyNorm) for m in net.modules())


def _small_net(options: NetworkOptions | None = None, ds: bool = True, seed: int = 0) -> UniversalUNet:
    torch.manual_seed(seed)
    backbone = PlainConvUNet(N_SLOTS, 4, [8, 16, 32, 32], torch.nn.Conv2d, 3, [1, 2, 2, 2], 2, N_UNION, 1, True,
                             torch.nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                             {"inplace": True}, deep_supervision=ds)
    backbone.apply(backbone.initialize)
    return UniversalUNet(backbone, DOMAINS, N_UNION, N_SLOTS, options or NetworkOptions())


def _perturb(net: torch.nn.Module, seed: int = 1) -> None:
    """Move every parameter away from its (often zero) initialization, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_routing_sums_to_one_and_finds_the_domain_with_separated_prototypes():
    router = DomainRouter(num_features=6, num_domains=3, temperature=0.1, momentum=0.9)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.bias.zero_()  # a gate that knows nothing: the prototypes must decide
    protos = torch.eye(3, 6) * 4
    gen = torch.Generator().manual_seed(0)
    for d in range(3):  # two steps per domain: initialization, then the running mean
        router.update_prototypes(protos[d] + 0.1 * torch.randn(4, 6, generator=gen), torch.full((4,), d))
        router.update_prototypes(protos[d] + 0.1 * torch.randn(4, 6, generator=gen), torch.full((4,), d))
    assert bool(router.prototype_initialized.all())
    truth = torch.arange(3).repeat(5)
    phi = protos[truth] + 0.3 * torch.randn(15, 6, generator=gen)
    r = router.route(phi)
    torch.testing.assert_close(r.sum(1), torch.ones(15))
    assert torch.equal(r.argmax(1), truth)
    hard = router.route(phi, hard=True)
    assert torch.equal(hard, torch.nn.functional.one_hot(truth, 3).float())
    # an uninitialized prototype contributes nothing (cos term 0): the gate alone decides
    fresh = DomainRouter(6, 3)
    with torch.no_grad():
        fresh.gate.weight.zero_()
        fresh.gate.bias.copy_(torch.tensor([0.0, 2.0, 0.0]))
    torch.testing.assert_close(fresh.route(phi), torch.softmax(fresh.gate.bias, 0).expand(15, -1))


def test_prototypes_initialize_then_follow_a_running_mean():
    router = DomainRouter(2, 2, momentum=0.75)
    router.update_prototypes(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0]))
    torch.testing.assert_close(router.prototypes[0], torch.tensor([2.0, 0.0]))
    assert router.prototype_initialized.tolist() == [True, False]
    router.update_prototypes(torch.tensor([[6.0, 4.0], [0.0, 8.0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(router.prototypes, torch.tensor([[0.75 * 2 + 0.25 * 6, 1.0], [0.0, 8.0]]))
    s, c = torch.ones(2, 2), torch.tensor([1.0, 2.0])
    assert all_reduce_prototype_stats(s, c) == (s, c)  # no process group: no-op


def test_state_dict_round_trip_reproduces_outputs_exactly():
    net = _small_net()
    _perturb(net)
    x = _input((2, 5, 32, 32))
    net.train()
    net.forward_train(x, torch.tensor([0, 2]), torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 1]]).bool())
    assert bool(net.router.prototype_initialized[[0, 2]].all())
    state = net.state_dict()
    assert {"router.prototypes", "router.prototype_initialized"} <= set(state)
    other = _small_net(seed=5)
    other.load_state_dict(state)
    net.eval()
    other.eval()
    clone = copy.deepcopy(net)  # the restoration hooks follow the copy
    with torch.no_grad():
        for kwargs in ({}, {"domain": torch.tensor([1, 2])}, {"routing": torch.tensor([[0.2, 0.3, 0.5]] * 2)}):
            for a, b, c in zip(net(x, **kwargs), other(x, **kwargs), clone(x, **kwargs), strict=True):
                assert torch.equal(a, b) and torch.equal(a, c)
        clone.restores["2"].weight.mul_(2.0)
        assert not torch.equal(clone(x)[0], net(x)[0])
        train_out = net(x, domain=torch.tensor([0, 2]), availability=torch.ones(2, 5, dtype=torch.bool), train=True)
        direct = net.forward_train(x, torch.tensor([0, 2]), torch.ones(2, 5, dtype=torch.bool))
        assert torch.equal(train_out.heads[0][2], direct.heads[0][2])


def test_oracle_output_is_the_domain_head_in_union_space():
    net = _small_net(ds=False)
    _perturb(net)
    x = _input((2, 5, 32, 32))
    with torch.no_grad():
        out = net(x, domain=torch.tensor([2, 2]))
    p = out.exp()
    torch.testing.assert_close(p.sum(1), torch.ones_like(p[:, 0]), rtol=1e-5, atol=1e-5)
    others = [1, 2, 3, 4]  # union ids outside domain 2 ([5, 6])
    floor = torch.log(torch.tensor(MIN_PROBABILITY))
    torch.testing.assert_close(out[:, others], torch.full_like(out[:, others], floor))
    assert set(out.argmax(1).unique().tolist()) <= {0, 5, 6}
    assert torch.isfinite(torch.softmax(out.half().float(), 1)).all()


def test_missing_slot_is_zeroed_and_availability_is_derived():
    net = _small_net(ds=False)
    _perturb(net)
    net.eval()
    x = _input((2, 5, 32, 32))
    x_zero = x.clone()
    x_zero[:, 4] = 0.0
    avail = torch.tensor([[True, True, True, True, False]] * 2)
    with torch.no_grad():
        derived = net(x, domain=torch.tensor([0, 1]))  # channel 4 constant -> missing -> zeroed
        given = net(x_zero, domain=torch.tensor([0, 1]), availability=avail)
        with_const_given = net(x, domain=torch.tensor([0, 1]), availability=avail)
    torch.testing.assert_close(derived, given)
    torch.testing.assert_close(with_const_given, given)


def test_one_availability_rule_for_patches_and_cases():
    """Training (per patch) and inference (per case) use the same rule and tolerance: a channel is missing where it
    is constant up to float round-off (exact zeros, nnU-Net's padding, left out); varying voxels make it available."""
    from nnunet_universal.inference.routing import case_availability

    x = torch.zeros(2, 4, 3, 5, 5)
    x[0, 0, 1, 2, 2] = 1.0  # two real voxels with different values (zeros are left out: padding)
    x[0, 0, 2, 2, 2] = 0.5
    x[:, 1] = -0.7  # a zero-filled CT slot after CT normalization: constant but non-zero
    x[:, 2] = 1000.0
    x[1, 2, 0, 0, 0] += 1e-4  # round-off of a normalized constant (1e-7 relative): still missing
    x[:, 3] = torch.randn(2, 3, 5, 5)
    patches = derive_availability(x)
    assert patches.tolist() == [[True, False, False, True], [False, False, False, True]]
    for b in range(2):
        assert derive_availability(x[b], start_dim=1).tolist() == patches[b].tolist()
        assert case_availability(x[b]).tolist() == patches[b].tolist()
    x[1, 2, 0, 0, 0] += 1.0  # a real difference (1e-3 relative)
    assert derive_availability(x)[1, 2] and case_availability(x[1])[2]


def test_context_drives_plain_forward_calls():
    net = _small_net(ds=False)
    _perturb(net)
    net.eval()
    x = _input((1, 5, 32, 32))
    with torch.no_grad():
        oracle = net(x, domain=torch.tensor([1]))
        routed = net(x, routing=torch.tensor([[0.1, 0.1, 0.8]]))
        free = net(x)
        net.set_context(domain=1)
        torch.testing.assert_close(net(x), oracle)
        net.set_context(routing=torch.tensor([0.1, 0.1, 0.8]))
        torch.testing.assert_close(net(x), routed)
        net.clear_context()
        torch.testing.assert_close(net(x), free)
        phi = net.embed(x)
        torch.testing.assert_close(net(x, routing=net.route(phi)), free)
    with pytest.raises(ValueError, match="domain"):
        net.set_context(domain=7)
    with pytest.raises(ValueError, match="either"):
        net.set_context(domain=0, routing=torch.ones(3) / 3)


SWITCHES = {
    "default": {},
    "no_harmony": {"harmony": False},
    "first_stage_only": {"harmony_stages": "first"},
    "no_polynomial": {"polynomial": False},
    "no_restore": {"restore": False},
    "no_gate": {"gate": False},
    "prompts": {"modality_prompt": True, "task_prompt": True},
    "soft_routing": {"routing": "soft"},
    "union_head": {"head": "union"},
    "order_1": {"harmony_order": 1},
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_every_component_switches_off_independently(name):
    opts = dataclasses.replace(NetworkOptions(), **SWITCHES[name])
    net = _small_net(opts)
    _perturb(net)
    mods = list(net.modules())
    n_harmony = sum(isinstance(m, HarmonyNorm) for m in mods)
    has_poly = any(isinstance(m, HarmonyNorm) and m.poly_weight is not None for m in mods)
    assert (n_harmony > 0) == opts.harmony
    assert has_poly == (opts.harmony and opts.polynomial and opts.harmony_order > 1)
    if not opts.harmony:
        assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in mods)
    expected_restores = 0 if not (opts.harmony and opts.restore) else (1 if opts.harmony_stages == "first" else 3)
    assert len(net.restores) == expected_restores
    union = opts.head == "union"
    assert (net.router is not None) == (opts.gate and not union)
    assert (net.task_prompt is not None) == (opts.task_prompt and not union)
    assert (net.modality_prompt is not None) == opts.modality_prompt
    x = _input((2, 5, 32, 32))
    res = net.forward_train(x, torch.tensor([0, 1]), torch.ones(2, 5, dtype=torch.bool))
    if union:
        assert res.heads == [] and [u.shape[1] for u in res.union] == [N_UNION] * 3
        loss = sum(u.mean() for u in res.union)
    else:
        loss = sum(v.mean() for h in res.heads for v in h.values())
    loss.backward()
    net.eval()
    with torch.no_grad():
        out = net(x)
        r = net.route(net.embed(x)) if not union else None
    assert [o.shape for o in out] == [(2, N_UNION, 32 // 2 ** s, 32 // 2 ** s) for s in range(3)]
    assert all(torch.isfinite(o).all() for o in out)
    if r is not None:
        torch.testing.assert_close(r.sum(1), torch.ones(2))
        if not opts.gate:
            torch.testing.assert_close(r, torch.full((2, 3), 1 / 3))
        if opts.routing == "hard" and opts.gate:
            assert set(r.unique().tolist()) <= {0.0, 1.0}
        elif opts.gate:
            torch.testing.assert_close(r, net.routing_weights(net.embed(x)))


@pytest.mark.parametrize("name", list(SWITCHES))
def test_print_network_works_for_every_variant(name):
    """``print(network)`` (nnU-Net prints it at training start) must not raise for any module combination."""
    opts = dataclasses.replace(NetworkOptions(), **SWITCHES[name])
    text = repr(_small_net(opts))
    assert text.startswith("UniversalUNet(")
    assert ("BoundedFiLM(" in text and "bound=0.5" in text) == opts.modality_prompt
    assert ("HarmonyNorm(" in text) == opts.harmony
    assert ("HarmonyRestore(" in text) == (opts.harmony and opts.restore)


def test_prompts_start_as_no_ops_and_stay_bounded_under_sgd():
    """The failure the spatial prompts showed (maps growing to +-50 on z-scored inputs within a few hundred SGD
    steps): a bounded FiLM prompt pushed by a loss that rewards growth for 300 steps at nnU-Net's learning rate
    keeps the modulated input within (1 +- bound) x +- bound."""
    from nnunet_universal.nn.prompts import PROMPT_BOUND, ModalityPrompt, TaskPrompt

    torch.manual_seed(0)
    x = torch.randn(4, 5, 8, 8)
    avail = torch.tensor([[True, True, True, True, False]] * 4)
    prompt = ModalityPrompt(5)
    torch.testing.assert_close(prompt(x, avail), x * avail[..., None, None].float())  # exact no-op at init
    opt = torch.optim.SGD(prompt.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    for _ in range(300):
        loss = -(prompt(x, avail) ** 2).mean()  # rewards an ever larger input scale
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = prompt(x, avail)
    bound = (1 + PROMPT_BOUND) * x.abs() + PROMPT_BOUND
    assert (out.abs() <= bound + 1e-5).all()
    assert out[:, 4].abs().max() == 0  # a missing slot stays zero
    assert out.abs().max() > x.abs().max() * 1.2  # the prompt did learn (within its bound)
    task = TaskPrompt(16, 3)
    feat = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(task(feat, torch.eye(3)[:2]), feat)
    g, b = prompt.film.gain_shift(avail.float())  # translation invariant: one gain and shift per channel
    assert g.shape == (4, 5) and b.shape == (4, 5)


def test_build_checks_plans_against_the_requested_network(tmp_path):
    pm = _plans("plain")
    cm = pm.get_configuration("2d")
    with pytest.raises(ValueError, match="union labels"):
        build_universal_network(pm, cm, N_SLOTS, 4)
    with pytest.raises(ValueError, match="slots"):
        build_universal_network(pm, cm, 3, N_UNION)
    bare = PlansManager({k: v for k, v in pm.plans.items() if k != "universal"})
    with pytest.raises(MetadataError, match="universal"):
        build_universal_network(bare, cm, N_SLOTS, N_UNION)
    net = build_universal_network(pm, cm, N_SLOTS, N_UNION, enable_deep_supervision=False,
                                  options=dataclasses.replace(NetworkOptions(), head="union", harmony=False))
    assert net.union_head and not net.decoder.deep_supervision


def _styled(domain: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 5, 32, 32) z-scored per channel: domain 0 smooth (low-pass) texture, domain 1 white noise. Same slots,
    same mean and std per channel: only the appearance tells the domains apart, as after nnU-Net's z-scoring."""
    x = torch.randn(n, 5, 32, 32, generator=gen)
    if domain == 0:
        x = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2)
    x = (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)
    x[:, 4] = 0.0  # a missing slot
    return x


def test_gate_learns_the_domain_from_appearance_alone():
    """Instance normalization removes each channel's mean and scale, so pooled bottleneck features hardly depend
    on the input; the gate's embedding also carries the normalizations' input statistics and learns to
    tell apart two domains that differ only in texture (same slots, same per-channel mean and std)."""
    net = _small_net(seed=3)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(net.router.parameters(), lr=0.5, momentum=0.9)
    for _ in range(40):
        x = torch.cat([_styled(0, 4, gen), _styled(1, 4, gen)])
        domain = torch.tensor([0] * 4 + [1] * 4)
        out = net.forward_train(x, domain, None)
        loss = torch.nn.functional.cross_entropy(out.gate_logits, domain)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        x = torch.cat([_styled(0, 16, gen), _styled(1, 16, gen)])
        truth = torch.tensor([0] * 16 + [1] * 16)
        gate_acc = (net.router.routing_logits(net.embed(x)).argmax(1) == truth).float().mean()
        route_acc = (net.route(net.embed(x)).argmax(1) == truth).float().mean()
    assert gate_acc >= 0.95 and route_acc >= 0.95, (gate_acc, route_acc)


def test_gate_style_statistics_from_harmony_norm_equal_the_direct_computation():
    """Gated nets take the first HarmonyNorm's own (mean, sqrt(var + eps)) as style statistics; networks whose
    first norm is a plain InstanceNorm compute the same numbers in a pre-hook."""
    net = _small_net()
    norm0 = next(m for m in net.encoder.modules() if isinstance(m, HarmonyNorm))
    assert norm0.keep_stats
    x = torch.randn(2, 8, 12, 12) * 3 + 5
    norm0(x)
    net._style_from_norm(0, norm0, (x,), None)
    from_norm = style_vector(net._styles[0]).clone()  # HarmonyNorm's (mean, rstd) as (mean, log-std)
    net._style_hook(0, norm0, (x,))
    torch.testing.assert_close(net._styles[0], from_norm, rtol=1e-5, atol=1e-5)
    flat = x.flatten(2)
    expected = torch.cat([flat.mean(2), 0.5 * torch.log(flat.var(2, unbiased=False) + 1e-5)], dim=1)
    torch.testing.assert_close(from_norm, expected, rtol=1e-5, atol=1e-5)
