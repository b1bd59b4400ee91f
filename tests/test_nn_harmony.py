"""HarmonyNorm / HarmonyRestore (U-Harmony Eq. 1-3): InstanceNorm equivalence, exact gradients, guards."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch.autograd import gradcheck

from nnunet_universal.nn.harmony import MAX_ORDER, POLY_LIMIT, HarmonyNorm, HarmonyRestore, basis_matrix
from nnunet_universal.nn.harmony_functions import HarmonyNormFunction, HarmonyRestoreFunction
from nnunet_universal.nn.injection import inject_harmony

F64 = torch.float64


@pytest.mark.parametrize("shape", [(2, 4, 9, 7), (2, 3, 5, 6, 4)])
def test_harmony_norm_with_zero_polynomial_is_instance_norm(shape):
    torch.manual_seed(0)
    norm_cls = torch.nn.InstanceNorm2d if len(shape) == 4 else torch.nn.InstanceNorm3d
    ref = norm_cls(shape[1], eps=1e-5, affine=True)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.normal_()
    hn = HarmonyNorm(shape[1], eps=1e-5, affine=True, order=3)
    hn.load_state_dict({**ref.state_dict(), "poly_weight": torch.zeros(shape[1], 2)})
    x = torch.randn(*shape) * 3 + 2
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = hn(x1), ref(x2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hn.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hn.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    assert hn.poly_weight.grad is not None and hn.poly_weight.grad.abs().sum() > 0  # the polynomial can learn


def _small_unet(kind: str, conv=torch.nn.Conv2d, norm=torch.nn.InstanceNorm2d):
    common = dict(input_channels=2, n_stages=3, features_per_stage=[4, 8, 16], conv_op=conv, kernel_sizes=3,
                  strides=[1, 2, 2], num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True, norm_op=norm,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=True)
    if kind == "plain":
        return PlainConvUNet(n_conv_per_stage=2, **common)
    return ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2], **common)


@pytest.mark.parametrize("kind", ["plain", "resenc"])
def test_injected_network_computes_the_planned_network(kind):
    """Injection swaps every InstanceNorm (both references of each) and copies the affine, so with zero
    polynomial terms the harmonized network is the planned one; the kept norm is the stage's last."""
    torch.manual_seed(0)
    net = _small_unet(kind)
    net.apply(net.initialize)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    harmonized = copy.deepcopy(net)
    kept = inject_harmony(harmonized.encoder, harmonized.decoder, "all", order=3, polynomial=True)
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in harmonized.modules())
    assert all(isinstance(k, HarmonyNorm) and k.keep_stats for k in kept)
    names = {id(m): n for n, m in harmonized.named_modules()}
    last = names[id(kept[1])]
    assert last.endswith("convs.1.norm") if kind == "plain" else last.endswith("blocks.1.conv2.norm")
    x = torch.randn(2, 2, 16, 16)
    for a, b in zip(net(x), harmonized(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    mu, sigma = kept[0].last_stats
    assert mu.shape == sigma.shape == (2, 4) and bool((sigma > 0).all())


def test_first_stage_only_harmonizes_stage_zero():
    net = _small_unet("resenc")
    kept = inject_harmony(net.encoder, net.decoder, "first", order=2, polynomial=True)
    assert kept[0] is not None and kept[1] is None and kept[2] is None
    harmony = [n for n, m in net.named_modules() if isinstance(m, HarmonyNorm)]
    assert harmony and all(n.startswith(("encoder.stem", "encoder.stages.0")) for n in harmony)
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in net.decoder.stages.modules())


def test_gradients_are_exact_float64():
    torch.manual_seed(1)
    x = (torch.randn(2, 3, 4, 5, dtype=F64) * 2).requires_grad_()
    with torch.no_grad():
        x[0, 0, 0, 0] = 40.0  # beyond the polynomial clamp after standardization
    w = (torch.rand(3, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=F64, requires_grad=True)
    coef = torch.randn(3, 4, dtype=F64, requires_grad=True)  # monomial coefficients, orders 0..3

    def norm(x, w, b, coef):
        return HarmonyNormFunction.apply(x, w, b, coef, 1e-5, 2.5, F64)[0]

    assert gradcheck(norm, (x, w, b, coef), eps=1e-6, atol=1e-5)
    # no activation clamped (|xhat| <= sqrt(N - 1) < 10): the path with the affine folded into the polynomial
    assert gradcheck(lambda *a: HarmonyNormFunction.apply(*a, 1e-5, 10.0, F64)[0], (x.detach().clamp(-5, 5)
                     .requires_grad_(), w, b, coef), eps=1e-6, atol=1e-5)
    xr = (torch.randn(2, 3, 4, 5, dtype=F64) * 2).requires_grad_()
    with torch.no_grad():
        xr[1, 2, 0, 0] = 9.0  # clamped polynomial input
    mu = torch.randn(2, 3, dtype=F64, requires_grad=True)
    sigma = (torch.rand(2, 3, dtype=F64) + 0.5).requires_grad_()
    q = (torch.randn(3, 4, dtype=F64) * 0.1).requires_grad_()
    r = (torch.randn(3, 4, dtype=F64) * 0.02).requires_grad_()
    mix = (torch.rand(3, dtype=F64) * 1.5 - 0.25).requires_grad_()
    for bound in (0.0, 0.5):
        def restore(x, mu, sigma, w, b, q, r, bound=bound):
            return HarmonyRestoreFunction.apply(x, mu, sigma, w, b, q, r, None, 1e-5, 3.0, 0.05, F64, bound)

        def restore_mixed(x, mu, sigma, w, b, q, r, mix, bound=bound):
            return HarmonyRestoreFunction.apply(x, mu, sigma, w, b, q, r, mix, 1e-5, 3.0, 0.05, F64, bound)

        assert gradcheck(restore, (xr, mu, sigma, w, b, q, r), eps=1e-6, atol=1e-5)
        assert gradcheck(restore_mixed, (xr, mu, sigma, w, b, q, r, mix), eps=1e-6, atol=1e-5)
    no_poly = lambda x, mu, sigma, w, b, mix: HarmonyRestoreFunction.apply(  # noqa: E731
        x, mu, sigma, w, b, None, None, mix, 1e-5, 3.0, 0.05, F64, 0.5)
    assert gradcheck(no_poly, (xr, mu, sigma, w, b, mix), eps=1e-6, atol=1e-5)
    # and through the modules' basis maps, norm feeding restoration
    hn, hr = HarmonyNorm(3).double(), HarmonyRestore(3).double()
    with torch.no_grad():
        hn.poly_weight.normal_(0, 0.3)
        hr.mix.uniform_(0.2, 1.0)
        hr.gamma.normal_(0, 0.1)
        hr.delta.normal_(0, 0.3)
    xs = torch.randn(2, 3, 5, 5, dtype=F64, requires_grad=True)
    assert gradcheck(lambda t: hr(hn(t), mu.detach(), sigma.detach()), (xs,), eps=1e-6, atol=1e-5)


def _hermite(u: torch.Tensor, j: int) -> torch.Tensor:
    """He_j(u) / sqrt(j!) written out."""
    he = {1: u, 2: u**2 - 1, 3: u**3 - 3 * u, 4: u**4 - 6 * u**2 + 3}[j]
    return he / math.sqrt(math.factorial(j))


def test_polynomial_affine_is_equation_2_in_either_basis():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 7, 7, dtype=F64) * 3 + 1
    with torch.no_grad():
        x[0, 1, 0, 0] = 80.0  # standardized beyond the clamp
    xhat = (x - x.mean((2, 3), keepdim=True)) / (x.var((2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    u = xhat.clamp(-POLY_LIMIT, POLY_LIMIT)
    for basis, b_j in (("power", lambda t, j: t**j), ("hermite", _hermite)):
        hn = HarmonyNorm(3, order=4, basis=basis).double()
        with torch.no_grad():
            hn.weight.uniform_(0.5, 1.5)
            hn.bias.normal_()
            hn.poly_weight.normal_(0, 0.2)
        expected = hn.weight.view(1, 3, 1, 1) * xhat + hn.bias.view(1, 3, 1, 1)
        expected = expected + sum(hn.poly_weight[:, j - 2].view(1, 3, 1, 1) * b_j(u, j) for j in range(2, 5))
        torch.testing.assert_close(hn(x), expected, rtol=1e-10, atol=1e-9)
    assert torch.equal(basis_matrix([1, 2, 3], "power"), torch.eye(4, dtype=F64)[:, 1:])


@pytest.mark.parametrize(("basis", "bound"), [("power", 0.0), ("hermite", 0.5)])
def test_restore_is_equation_3_with_a_guarded_denominator(basis, bound):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 6, 6, dtype=F64) * 4
    mu, sigma = torch.randn(2, 3, dtype=F64), torch.rand(2, 3, dtype=F64) + 0.1
    r = HarmonyRestore(3, order=2, basis=basis, denominator_bound=bound, mix_init=None).double()
    with torch.no_grad():
        r.weight.copy_(torch.tensor([1.5, -1e-5, -0.3]))  # channel 1: w + eps = 0 exactly at delta = 0
        r.bias.normal_()
        r.gamma.normal_(0, 0.1)
        r.delta.normal_(0, 0.05)
        r.delta[1].zero_()
    b_j = (lambda t, j: t**j) if basis == "power" else _hermite
    u = x.clamp(-POLY_LIMIT, POLY_LIMIT)
    per = dict(w=r.weight.view(1, 3, 1, 1), b=r.bias.view(1, 3, 1, 1))
    num = x - per["b"] - sum(r.gamma[:, j - 1].view(1, 3, 1, 1) * b_j(u, j) for j in (1, 2))
    rpoly = sum(r.delta[:, j - 1].view(1, 3, 1, 1) * b_j(u, j) for j in (1, 2))
    if bound > 0:
        rpoly = bound * torch.tanh(rpoly / bound)
    den = per["w"] + 1e-5 + rpoly
    den = torch.copysign(den.abs().clamp_min(r.min_denominator), den)
    expected = sigma.view(2, 3, 1, 1) * num / den + mu.view(2, 3, 1, 1)
    got = r(x, mu, sigma)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)
    assert torch.isfinite(got).all()
    assert got[:, 1].abs().max() <= (sigma[:, 1].max() * num[:, 1].abs().max() / r.min_denominator
                                     + mu[:, 1].abs().max()) + 1e-6


def _log_uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return 10 ** (torch.rand(n, generator=gen) * (hi - lo) + lo)


def _signed(t: torch.Tensor, gen: torch.Generator, zero_frac: float = 0.1) -> torch.Tensor:
    sign = torch.where(torch.rand(t.shape, generator=gen) < 0.5, -1.0, 1.0)
    return torch.where(torch.rand(t.shape, generator=gen) < zero_frac, 0.0, t * sign)


def _extreme_activations(draws: int, gen: torch.Generator) -> torch.Tensor:
    """(2, draws, 8, 8): one draw per channel; scales 1e-8..1e8, offsets up to 1e8, constant channels,
    single spikes, heavy tails, exact zeros."""
    z = torch.randn(2, draws, 8, 8, generator=gen)
    kind = torch.randint(0, 5, (draws,), generator=gen)
    z[:, kind == 1] = 0.0  # constant channel
    spike = kind == 2
    z[:, spike] = 0.0
    z[:, spike, 3, 4] = 1e4  # one outlier voxel
    heavy = kind == 3
    z[:, heavy] = torch.tan((torch.rand(2, int(heavy.sum()), 8, 8, generator=gen) - 0.5) * 3.1)  # Cauchy-like
    scale = _log_uniform(draws, -8, 8, gen).view(1, -1, 1, 1)
    offset = _signed(_log_uniform(draws, -8, 8, gen), gen).view(1, -1, 1, 1)
    x = offset + scale * z
    x[:, kind == 4] = 0.0
    return x


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_ten_thousand_extreme_draws_stay_finite(autocast):
    """10^4 random draws of extreme activations and parameters (one per channel): no NaN/Inf anywhere."""
    draws = 10_000
    gen = torch.Generator().manual_seed(3)
    x = _extreme_activations(draws, gen)
    norm = HarmonyNorm(draws, order=3)
    restore = HarmonyRestore(draws, order=3)
    with torch.no_grad():
        norm.weight.copy_(_signed(_log_uniform(draws, -6, 3, gen), gen))
        norm.bias.copy_(_signed(_log_uniform(draws, -6, 3, gen), gen))
        norm.poly_weight.copy_(_signed(_log_uniform(2 * draws, -6, 3, gen), gen).view(draws, 2))
        w = _signed(_log_uniform(draws, -6, 3, gen), gen)
        near_pole = torch.rand(draws, generator=gen) < 0.2  # w + eps ~ 0: the denominator crosses zero
        jitter = 1e-9 * torch.randn(draws, generator=gen)
        pole = torch.where(torch.rand(draws, generator=gen) < 0.5, -1e-5, -1e-5 + jitter)  # exactly 0 or tiny
        restore.weight.copy_(torch.where(near_pole, pole, w))
        restore.bias.copy_(_signed(_log_uniform(draws, -6, 3, gen), gen))
        restore.gamma.copy_(_signed(_log_uniform(3 * draws, -6, 3, gen), gen).view(draws, 3))
        restore.delta.copy_(_signed(_log_uniform(3 * draws, -6, 3, gen), gen).view(draws, 3))
        restore.mix.copy_(_signed(_log_uniform(draws, -6, 1, gen), gen))
    mu = _signed(_log_uniform(2 * draws, -8, 8, gen), gen).view(2, draws)
    sigma = _log_uniform(2 * draws, -2.5, 8, gen).view(2, draws)
    xr = _extreme_activations(draws, gen)
    if autocast:
        x, xr = x.bfloat16(), xr.bfloat16()
    x.requires_grad_()
    xr.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = norm(x)
        z = restore(xr, mu, sigma)
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)  # as instance_norm
    assert z.dtype == y.dtype  # the autocast dtype, as the decoder convolution's output
    for out in (y, z):
        assert torch.isfinite(out).all()
    torch.autograd.backward([y, z], [torch.randn(y.shape, generator=gen), torch.randn(z.shape, generator=gen)])
    grads = [x.grad, xr.grad] + [p.grad for p in (*norm.parameters(), *restore.parameters())]
    for g in grads:
        assert g is not None and torch.isfinite(g).all()


def test_norm_keeps_statistics_only_when_asked():
    hn = HarmonyNorm(3)
    x = torch.randn(2, 3, 5, 5) * 2 + 1
    hn(x)
    assert hn.last_stats is None
    hn.keep_stats = True
    hn(x)
    mu, sigma = hn.last_stats
    torch.testing.assert_close(mu, x.mean(dim=(2, 3)))
    torch.testing.assert_close(sigma, (x.var(dim=(2, 3), unbiased=False) + 1e-5).sqrt())
    assert not mu.requires_grad


def test_norm_rejects_non_affine_and_bad_order():
    with pytest.raises(ValueError, match="affine"):
        HarmonyNorm(4, affine=False)
    with pytest.raises(ValueError, match="order"):
        HarmonyNorm(4, order=0)
    with pytest.raises(ValueError, match="order"):
        HarmonyRestore(4, order=MAX_ORDER + 1)
    with pytest.raises(ValueError, match="basis"):
        HarmonyNorm(4, basis="legendre")
    assert HarmonyNorm(4, polynomial=False).poly_weight is None
    assert HarmonyRestore(4, polynomial=False).gamma is None


def _moved_from_init(hn: HarmonyNorm, hr: HarmonyRestore, mix: bool = False) -> None:
    """Polynomial (and mix) coefficients away from their zero initialization, as training would move them."""
    with torch.no_grad():
        hn.poly_weight.normal_(0, 0.2)
        hr.gamma.normal_(0, 0.1)
        hr.delta.normal_(0, 0.3)
        if mix:
            hr.mix.uniform_(0.2, 0.9)


def test_chunked_evaluation_equals_one_chunk(monkeypatch):
    """The CPU path works on chunks of (sample, channel) rows; any chunking gives the same values and grads."""
    from nnunet_universal.nn import harmony_functions

    torch.manual_seed(5)
    hn, hr = HarmonyNorm(3), HarmonyRestore(3)
    _moved_from_init(hn, hr, mix=True)  # mix 0 would make the restoration the identity
    x = torch.randn(2, 3, 6, 5)
    x[1, 2, 0, 0] = 50.0  # one chunk clamps, the others do not
    mu, sigma = torch.randn(2, 3), torch.rand(2, 3) + 0.5

    def run():
        xi = x.clone().requires_grad_()
        y = hr(hn(xi), mu, sigma)
        y.backward(torch.ones_like(y))
        grads = [xi.grad] + [p.grad.clone() for p in (*hn.parameters(), *hr.parameters())]
        hn.zero_grad()
        hr.zero_grad()
        return y.detach(), grads

    y_one, g_one = run()
    monkeypatch.setattr(harmony_functions, "CPU_CHUNK_ELEMS", 1)  # one row per chunk
    y_rows, g_rows = run()
    torch.testing.assert_close(y_rows, y_one)
    for a, b in zip(g_rows, g_one, strict=True):
        torch.testing.assert_close(a, b)


def test_restore_starts_as_identity_and_mixes_towards_equation_3():
    """The residual mix a (init 0) makes the layer the identity at init; a = 1 is Eq. 3 exactly, and the mix
    learns from the first step while Eq. 3's own parameters wait for it."""
    torch.manual_seed(6)
    x = torch.randn(2, 3, 6, 6, dtype=F64) * 3
    mu, sigma = torch.randn(2, 3, dtype=F64), torch.rand(2, 3, dtype=F64) + 0.1
    mixed = HarmonyRestore(3).double()
    literal = HarmonyRestore(3, mix_init=None).double()
    with torch.no_grad():
        for name in ("weight", "bias", "gamma", "delta"):
            getattr(mixed, name).normal_(0.5, 0.1)
    literal.load_state_dict({k: v for k, v in mixed.state_dict().items() if k != "mix"})
    x.requires_grad_()
    y = mixed(x, mu, sigma)
    assert torch.equal(y, x)
    y.square().sum().backward()
    assert mixed.mix.grad.abs().min() > 0
    assert mixed.weight.grad.abs().max() == 0 and mixed.gamma.grad.abs().max() == 0
    torch.testing.assert_close(x.grad, 2 * x.detach())
    with torch.no_grad():
        mixed.mix.fill_(1.0)
        torch.testing.assert_close(mixed(x, mu, sigma), literal(x, mu, sigma), rtol=1e-12, atol=1e-12)
        mixed.mix.fill_(0.25)
        expected = x + 0.25 * (literal(x, mu, sigma) - x)
        torch.testing.assert_close(mixed(x, mu, sigma), expected, rtol=1e-12, atol=1e-12)


def test_restore_fp16_output_saturates_instead_of_overflowing():
    """An fp16 input gives an fp16 output (as under autocast); values beyond fp16's range saturate at +-65504
    in both the chunked and the fused arithmetic, and values inside it match the fp32 computation."""
    from nnunet_universal.nn import harmony_fused

    restore = HarmonyRestore(2, mix_init=1.0)
    x = torch.randn(1, 2, 4, 4)
    mu, sigma = torch.tensor([[0.0, 0.0]]), torch.tensor([[1e6, 1.0]])  # channel 0 far beyond fp16's range
    ref = restore(x, mu, sigma)
    y = restore(x.half(), mu, sigma)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert y[0, 0].abs().max() == harmony_fused.FP16_MAX and ref[0, 0].abs().max() > 1e5
    torch.testing.assert_close(y[0, 1].float(), ref[0, 1], rtol=2e-3, atol=2e-3)
    fused = harmony_fused.restore_forward_math(x.half().view(2, -1), mu.view(2, 1), sigma.view(2, 1),
                                               restore.weight.view(2, 1) + restore.eps, restore.bias.view(2, 1),
                                               None, None, restore.mix.view(2, 1), POLY_LIMIT, 1e-2, 0.5,
                                               torch.float16)
    assert torch.isfinite(fused).all() and fused[0].abs().max() == harmony_fused.FP16_MAX


def test_restore_loads_checkpoints_from_before_the_mix():
    """A state dict without ``mix`` (written before the residual mix) loads with a = 1: same outputs as then."""
    old = HarmonyRestore(4, mix_init=None)
    with torch.no_grad():
        old.weight.uniform_(0.5, 1.5)
        old.gamma.normal_(0, 0.1)
    new = HarmonyRestore(4)
    new.load_state_dict(old.state_dict())
    assert torch.equal(new.mix.detach(), torch.ones(4))
    x, mu, sigma = torch.randn(1, 4, 5, 5), torch.randn(1, 4), torch.rand(1, 4) + 0.5
    torch.testing.assert_close(new(x, mu, sigma), old(x, mu, sigma))


@pytest.mark.parametrize("poly", [True, False])
@pytest.mark.parametrize("mix", [True, False])
def test_fused_gpu_math_equals_the_chunked_path(monkeypatch, poly, mix):
    """The whole-tensor functions that run compiled on CUDA (``harmony_fused``) give the chunked path's values
    and gradients (run eagerly here on CPU), clamped activations and both denominator forms included."""
    from nnunet_universal.nn import harmony_fused

    torch.manual_seed(7)
    hn = HarmonyNorm(3, polynomial=poly).double()
    hrs = [HarmonyRestore(3, polynomial=poly, denominator_bound=bound, mix_init=0.0 if mix else None).double()
           for bound in (0.0, 0.5)]
    with torch.no_grad():
        if poly:
            hn.poly_weight.normal_(0, 0.3)
        for hr in hrs:
            hr.weight.uniform_(0.5, 1.5)
            if poly:
                hr.gamma.normal_(0, 0.1)
                hr.delta.normal_(0, 0.3)
            if mix:
                hr.mix.uniform_(0.2, 0.9)
    x = torch.randn(2, 3, 7, 6, dtype=F64) * 2
    x[1, 0, 0, 0] = 60.0  # clamped after standardization
    mu, sigma = torch.randn(2, 3, dtype=F64), torch.rand(2, 3, dtype=F64) + 0.5

    def run(fused: bool):
        monkeypatch.setattr(harmony_fused, "enabled", lambda t: fused)
        monkeypatch.setattr(harmony_fused, "compiled", lambda name: harmony_fused._MATH[name])
        xi = x.clone().requires_grad_()
        y = sum(hr(hn(xi), mu, sigma) for hr in hrs)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=F64)).view(y.shape))
        params = [*hn.parameters(), *(p for hr in hrs for p in hr.parameters())]
        out = [y.detach(), xi.grad] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def _pair_values_and_grads(hn: HarmonyNorm, hr: HarmonyRestore, x, mu, sigma, g) -> list:
    """HarmonyNorm -> HarmonyRestore on ``x`` with upstream gradient ``g``: [output, dL/dx, every parameter's
    gradient] (gradients reset afterwards), on whichever path the environment selects."""
    xi = x.clone().requires_grad_()
    y = hr(hn(xi), mu, sigma)
    y.backward(g)
    params = [*hn.parameters(), *hr.parameters()]
    out = [y.detach(), xi.grad] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


def test_compiled_fused_path_on_cpu_matches_the_chunked_path(monkeypatch):
    """The GPU's default path, torch.compile'd fused functions, here compiled for the CPU (the test session turns
    them off elsewhere: compiling costs tens of seconds per process; on CPU fp32 the C++ kernels normally serve).
    Values and gradients equal the chunked path."""
    from nnunet_universal.nn import harmony_cpu, harmony_fused

    monkeypatch.setattr(harmony_cpu, "serves", lambda t: False)

    torch.manual_seed(8)
    hn, hr = HarmonyNorm(4), HarmonyRestore(4)
    _moved_from_init(hn, hr, mix=True)
    x = torch.randn(2, 4, 9, 8, 7) * 3
    x[0, 1, 0, 0, 0] = 90.0  # clamped
    mu, sigma = torch.randn(2, 4), torch.rand(2, 4) + 0.5
    g = torch.randn(x.shape)

    def run(fused: bool):
        monkeypatch.setenv("NNUNET_UNIVERSAL_FUSED", "1" if fused else "0")
        return _pair_values_and_grads(hn, hr, x, mu, sigma, g)

    harmony_fused._COMPILED.clear()
    eager, fused = run(False), run(True)
    assert not harmony_fused._BROKEN, harmony_fused._BROKEN
    assert set(harmony_fused._COMPILED) == {"norm_forward_nd", "norm_backward_nd", "restore_forward_nd",
                                            "restore_backward_nd"}
    for a, b in zip(eager, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("poly", [True, False])
@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("bound", [0.0, 0.5])
def test_cpu_kernels_match_the_chunked_path(monkeypatch, poly, mix, bound):
    """The default fp32 CPU path, the C++ kernels of ``harmony_cpu`` (built on first use): values and gradients of
    HarmonyNorm -> HarmonyRestore equal the chunked eager path's, clamped activations, both denominator forms,
    with and without polynomial and residual mix; no compiled function is involved."""
    from nnunet_universal.nn import harmony_cpu, harmony_fused

    torch.manual_seed(9)
    hn = HarmonyNorm(4, polynomial=poly)
    hr = HarmonyRestore(4, polynomial=poly, denominator_bound=bound, mix_init=0.0 if mix else None)
    with torch.no_grad():
        if poly:
            hn.poly_weight.normal_(0, 0.3)
            hr.gamma.normal_(0, 0.1)
            hr.delta.normal_(0, 0.3)
        hr.weight.uniform_(0.5, 1.5)
        if mix:
            hr.mix.uniform_(0.2, 0.9)
    x = torch.randn(2, 4, 11, 9, 13) * 3 + 5  # rows longer than one 512-voxel block, mean far from 0
    x[0, 1, 0, 0, 0] = 300.0  # clamped after standardization
    mu, sigma = torch.randn(2, 4), torch.rand(2, 4) + 0.5
    g = torch.randn(x.shape)

    monkeypatch.setenv("NNUNET_UNIVERSAL_FUSED", "0")
    eager = _pair_values_and_grads(hn, hr, x, mu, sigma, g)
    monkeypatch.setattr(harmony_fused, "run", lambda *a, **k: pytest.fail("compiled path used"))
    monkeypatch.setenv("NNUNET_UNIVERSAL_FUSED", "1")
    assert harmony_cpu.serves(x), "the C++ kernels did not build (see the warning above)"
    kernels = _pair_values_and_grads(hn, hr, x, mu, sigma, g)
    for a, b in zip(eager, kernels, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-4)


def test_fused_path_output_takes_an_in_place_nonlinearity(monkeypatch):
    """The fused path returns the compiled function's own output tensor (no copy into a buffer): nnU-Net's
    in-place LeakyReLU after the norm must work on it, with the chunked path's values and gradients."""
    from nnunet_universal.nn import harmony_cpu, harmony_fused

    monkeypatch.setattr(harmony_cpu, "serves", lambda t: False)
    monkeypatch.setattr(harmony_fused, "compiled", lambda name: harmony_fused._MATH[name])
    torch.manual_seed(9)
    hn = HarmonyNorm(3)
    with torch.no_grad():
        hn.poly_weight.normal_(0, 0.3)
    x = torch.randn(2, 3, 5, 4, 3) * 2

    def run(fused: bool):
        monkeypatch.setattr(harmony_fused, "enabled", lambda t: fused)
        xi = x.clone().requires_grad_()
        y = torch.nn.functional.leaky_relu(hn(xi), 0.01, inplace=True)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view(y.shape))
        out = [y.detach(), xi.grad] + [p.grad.clone() for p in hn.parameters()]
        hn.zero_grad(set_to_none=True)
        return out

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
