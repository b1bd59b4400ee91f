"""CUDA checks (marked ``gpu``; skipped without a CUDA device, so CI on CPU skips them).

Run on a GPU machine with ``python -m pytest -q -m gpu tests/test_gpu.py``: HarmonyNorm/HarmonyRestore on CUDA
against a float64 CPU reference (values and gradients, clamped and unclamped activations, the residual mix),
under bf16/fp16 autocast (finite, close to fp32), and a UniversalUNet training step under autocast.
"""

from __future__ import annotations

import pytest
import torch

from nnunet_universal.metadata import NetworkOptions
from nnunet_universal.nn.harmony import HarmonyNorm, HarmonyRestore

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _fused_path_on(monkeypatch):
    """The default path on a GPU (the test session's conftest turns the compiled kernels off for CPU speed)."""
    monkeypatch.setenv("NNUNET_UNIVERSAL_FUSED", "1")


def _modules(seed: int) -> tuple[HarmonyNorm, HarmonyRestore]:
    torch.manual_seed(seed)
    hn, hr = HarmonyNorm(6), HarmonyRestore(6)
    with torch.no_grad():
        hn.weight.uniform_(0.5, 1.5)
        hn.poly_weight.normal_(0, 0.2)
        hr.mix.uniform_(0.1, 1.0)
        hr.gamma.normal_(0, 0.1)
        hr.delta.normal_(0, 0.3)
    return hn, hr


def _run(hn: HarmonyNorm, hr: HarmonyRestore, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
         g: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    for p in (*hn.parameters(), *hr.parameters()):
        p.grad = None
    y = hr(hn(x), mu, sigma)
    y.backward(g)
    return [y.detach(), x.grad] + [p.grad for p in (*hn.parameters(), *hr.parameters())]


@pytest.mark.parametrize("shape", [(2, 6, 24, 20, 16), (3, 6, 48, 40)])
def test_harmony_on_cuda_matches_a_float64_cpu_reference(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 3 + 1
    x[0, 2].view(-1)[5] = 400.0  # beyond the polynomial clamp after standardization
    mu, sigma = torch.randn(shape[:2], generator=gen), torch.rand(shape[:2], generator=gen) + 0.5
    g = torch.randn(shape, generator=gen)
    hn, hr = _modules(1)
    ref = [t.clone() for t in _run(hn.double(), hr.double(), x.double(), mu.double(), sigma.double(), g.double())]
    got = _run(hn.float().to(CUDA), hr.float().to(CUDA), *(t.to(CUDA) for t in (x, mu, sigma, g)))
    from nnunet_universal.nn import harmony_fused

    assert harmony_fused.enabled(x.to(CUDA)), f"fused GPU path fell back: {harmony_fused._BROKEN}"
    for r, o in zip(ref, got, strict=True):
        o = o.double().cpu()
        assert torch.isfinite(o).all()
        assert (o - r).norm() / r.norm().clamp_min(1e-12) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_harmony_under_cuda_autocast_is_finite_and_close_to_fp32(dtype):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 6, 20, 20, 20, generator=gen) * 50).to(CUDA)
    mu, sigma = torch.randn(2, 6).to(CUDA), (torch.rand(2, 6) + 0.5).to(CUDA)
    g = torch.randn(x.shape, generator=gen).to(CUDA)
    hn, hr = (m.to(CUDA) for m in _modules(3))
    ref = _run(hn, hr, x, mu, sigma, g)
    conv = torch.nn.Conv3d(6, 6, 1).to(CUDA)  # a low-precision producer, as in the network
    with torch.no_grad():
        conv.weight.copy_(torch.eye(6).view(6, 6, 1, 1, 1))
        conv.bias.zero_()
    xl = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        h = conv(xl)
        assert h.dtype == dtype
        y = hr(hn(h), mu, sigma)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.backward(g)
    assert torch.isfinite(xl.grad).all()
    assert (y - ref[0]).norm() / ref[0].norm() < 2e-2


def test_universal_unet_training_step_under_cuda_autocast():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_universal.nn.universal_unet import UniversalUNet

    torch.manual_seed(0)
    backbone = PlainConvUNet(5, 4, [8, 16, 32, 32], torch.nn.Conv3d, 3, [1, 2, 2, 2], 2, 7, 1, True,
                             torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                             {"inplace": True}, deep_supervision=True)
    net = UniversalUNet(backbone, [[1, 2, 3], [4], [5, 6]], 7, 5, NetworkOptions()).to(CUDA)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(2, 5, 32, 32, 32, device=CUDA)
    domain = torch.tensor([0, 1], device=CUDA)
    avail = torch.tensor([[True, True, True, True, False]] * 2, device=CUDA)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            res = net.forward_train(x, domain, avail)
            loss = sum(v.float().mean() for h in res.heads for v in h.values()) + res.gate_logits.float().sum()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        opt.step()
    net.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        out = net(x)
    assert all(torch.isfinite(o).all() for o in out)
