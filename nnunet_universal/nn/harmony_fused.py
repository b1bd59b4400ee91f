"""Fused GPU path of the U-Harmony autograd functions (``harmony_functions.py``).

On CUDA the chunked eager arithmetic of ``harmony_functions`` costs one kernel and one sweep over the activation
per elementary operation (about 15 sweeps forward and 25 backward for J = 3), which made a training step 2.7x a
stock nnU-Net step on an H200 (``scripts/gpu_checks.sh``). Here the same equations are written as whole-tensor
functions reducing over the last axis, called on (batch, channel, voxel) tensors with per-channel parameters
(rows of (sample, channel) pairs with per-row parameters work too), and compiled with ``torch.compile``:
Inductor fuses each into a reduction and a pointwise kernel, so the intermediates are never materialized.
Compiling costs tens of seconds once per process (first training step or first prediction) and leaves the
compiler resident (a CPU process that compiled one layer pair peaked 331 MB higher,
``scripts/benchmark_harmony_kernels.py``). On CPU, fp32 tensors are served by the hand-written loops of
``harmony_cpu.py`` instead (the same sweeps without the compiler in the process); this path still serves fp16/bf16
CPU tensors, and fp32 CPU tensors when the C++ kernels cannot be built (then the compiler is resident after all;
without a C++ compiler Inductor fails as well and the eager path serves).

The functions are the math only (pure, no in-place updates): ``*_math`` runs eagerly anywhere (the tests compare
them with the chunked CPU path), ``compiled(name)`` gives the compiled version. If compiling fails (no Triton,
an unsupported setup), the eager functions of ``harmony_functions`` are used from then on, with one warning.
``NNUNET_UNIVERSAL_FUSED=0`` turns this path and the C++ kernels off (:func:`turned_off`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import Tensor

logger = logging.getLogger(__name__)
_COMPILED: dict[str, Callable] = {}
#: Largest finite fp16 value: HarmonyRestore's fp16 output saturates there.
FP16_MAX = 65504.0
_BROKEN: list[str] = []


#: The switch of both fast paths of U-Harmony's autograd functions.
ENV_VAR = "NNUNET_UNIVERSAL_FUSED"


def turned_off() -> bool:
    """Whether ``NNUNET_UNIVERSAL_FUSED`` is ``0``, ``f`` or ``false`` (any case); unset or any other value: on.

    Off, U-Harmony's autograd functions (``harmony_functions.py``) use neither fast path: not the C++ kernels of
    ``harmony_cpu.py`` (fp32 CPU tensors) nor the ``torch.compile``d functions here (CUDA tensors, fp16/bf16 CPU
    tensors, and fp32 CPU tensors when the C++ kernels are not built); every tensor goes through the chunked eager
    path, which gives the same values and gradients more slowly. Read at every call (the tests switch it).
    Nothing else reads it: ``nnUNet_compile`` (nnU-Net's compilation of the whole network) is independent.
    """
    return os.environ.get(ENV_VAR, "1").lower() in ("0", "f", "false")


def enabled(x: Tensor) -> bool:
    """Whether the fused path serves this tensor: CUDA or CPU, fp16/bf16/fp32, not turned off, not failed before.

    On CPU, ``harmony_functions`` asks :func:`harmony_cpu.serves` first: fp32 CPU tensors reach this path only when
    the C++ kernels are not built.
    """
    return x.device.type in ("cuda", "cpu") and x.dtype != torch.float64 and not _BROKEN and not turned_off()


def disable(reason: str) -> None:
    """Fall back to the eager path for the rest of the process."""
    if not _BROKEN:
        logger.warning("U-Harmony compiled kernels unavailable (%s); using the eager path", reason)
    _BROKEN.append(reason)


def _horner(u: Tensor, coef: Tensor) -> Tensor:
    """sum_k coef[:, k] u^k, lowest order first: rows u (R, N) with coef (R, K), or u (B, C, N) with coef (C, K)."""
    k = coef.shape[1]
    out = coef[:, k - 1:k] * u if k > 1 else coef[:, :1].expand_as(u)
    for i in range(k - 2, -1, -1):
        out = out + coef[:, i:i + 1]
        if i > 0:
            out = out * u
    return out


def _power_sums(t: Tensor, u: Tensor, order: int) -> Tensor:
    """(..., order + 1): sum_n t u^k for k = 0..order (sums over the last axis)."""
    sums, p = [t.sum(-1)], t
    for _ in range(order):
        p = p * u
        sums.append(p.sum(-1))
    return torch.stack(sums, -1)


def norm_forward_math(x: Tensor, w: Tensor, b: Tensor, coef: Tensor | None, eps: float, limit: float,
                      out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """HarmonyNorm forward over the last axis: (y, mean, rstd), the statistics with a trailing axis of 1.

    x (R, N) rows with w, b (R, 1), coef (R, K); or x (B, C, N) with per-channel w, b (C, 1), coef (C, K)."""
    xf = x.float() if x.dtype != torch.float64 else x
    mean = xf.mean(-1, keepdim=True)
    xc = xf - mean
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    xh = xc * rstd
    y = xh * w + b
    if coef is not None:
        y = y + _horner(xh.clamp(-limit, limit), coef)
    return y.to(out_dtype), mean, rstd


def norm_backward_math(x: Tensor, g: Tensor, mean: Tensor, rstd: Tensor, w: Tensor, dcoef: Tensor | None,
                       limit: float) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """HarmonyNorm backward: (dL/dx in x's dtype, dL/dw, dL/db, dL/dcoef or None), the parameter gradients per
    row ((R,), (R, K)) or per (sample, channel) ((B, C), (B, C, K)) as ``x`` is laid out (see the forward).

    ``dcoef`` (R or C, J): coefficients of P'(u) (k * coef_k, orders 0..J-1)."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xh = (x.to(cd) - mean) * rstd
    gf = g.to(cd)
    gb, gw = gf.sum(-1), (gf * xh).sum(-1)
    gcoef = None
    if dcoef is not None:
        u = xh.clamp(-limit, limit)
        gcoef = _power_sums(gf, u, dcoef.shape[1])
        slope = torch.where(xh.abs() >= limit, 0.0, _horner(u, dcoef))
        gxh = (slope + w) * gf
    else:
        gxh = gf * w
    m1 = gxh.mean(-1, keepdim=True)
    m2 = (gxh * xh).mean(-1, keepdim=True)
    gx = (gxh - m1 - xh * m2) * rstd
    return gx.to(x.dtype), gw, gb, gcoef


def _restore_terms(xf: Tensor, w_eps: Tensor, b: Tensor, qcoef: Tensor | None, rcoef: Tensor | None,
                   limit: float, min_den: float, bound: float) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(num, dsafe, u, tanh(R / bound)) of Eq. 3 on rows; u and t are None without the polynomial."""
    if qcoef is None or rcoef is None:
        num, den, u, t = xf - b, w_eps.expand_as(xf), None, None
    else:
        u = xf.clamp(-limit, limit)
        num = xf - b - _horner(u, qcoef)
        r = _horner(u, rcoef)
        t = torch.tanh(r / bound) if bound > 0 else None
        den = w_eps + (bound * t if t is not None else r)
    dsafe = torch.copysign(den.abs().clamp_min(min_den), den)
    return num, dsafe, u, t


def restore_forward_math(x: Tensor, mu: Tensor, sigma: Tensor, w_eps: Tensor, b: Tensor, qcoef: Tensor | None,
                         rcoef: Tensor | None, mix: Tensor | None, limit: float, min_den: float, bound: float,
                         out_dtype: torch.dtype) -> Tensor:
    """HarmonyRestore forward over the last axis: y = x + a (r - x), r = sigma (x - b - Q) / guard(w + eps + R_b) + mu.

    Rows x (R, N) with every other argument per row; or x (B, C, N) with mu, sigma (B, C, 1) and the parameters
    per channel ((C, 1), (C, K))."""
    xf = x.float() if x.dtype != torch.float64 else x
    num, dsafe, _, _ = _restore_terms(xf, w_eps, b, qcoef, rcoef, limit, min_den, bound)
    y = sigma * num / dsafe + mu
    if mix is not None:
        y = xf + mix * (y - xf)
    if out_dtype == torch.float16:  # saturate rather than overflow (see harmony._output_dtype)
        y = y.clamp(-FP16_MAX, FP16_MAX)
    return y.to(out_dtype)


def restore_backward_math(x: Tensor, g: Tensor, mu: Tensor, sigma: Tensor, w_eps: Tensor, b: Tensor,
                          qcoef: Tensor | None, rcoef: Tensor | None, mix: Tensor | None, limit: float,
                          min_den: float, bound: float) -> tuple[Tensor, ...]:
    """HarmonyRestore backward: (dx, dmu, dsigma, dw, db, dgamma, ddelta, dmix), per row ((R,), (R, K)) or per
    (sample, channel) ((B, C), (B, C, K)) as ``x`` is laid out (see the forward).

    dgamma/ddelta are None without the polynomial, dmix None without the mix."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, gf = x.to(cd), g.to(cd)
    num, dsafe, u, t = _restore_terms(xf, w_eps, b, qcoef, rcoef, limit, min_den, bound)
    ratio = num / dsafe
    scale = sigma if mix is None else sigma * mix
    e = gf * scale / dsafe  # dL/dnum
    f = -e * ratio  # dL/dden, straight through the floor
    g_mu, g_sigma = gf.sum(-1), (gf * ratio).sum(-1)
    g_w, g_b = f.sum(-1), -e.sum(-1)
    g_gamma = g_delta = None
    gx = e
    if u is not None and qcoef is not None and rcoef is not None:
        order = qcoef.shape[1] - 1
        fr = f * (1.0 - t * t) if t is not None else f  # dL/dR
        g_gamma, g_delta = -_power_sums(e, u, order), _power_sums(fr, u, order)
        k = torch.arange(1, order + 1, dtype=cd, device=x.device)
        slope = _horner(u, rcoef[:, 1:] * k) * fr - _horner(u, qcoef[:, 1:] * k) * e
        gx = gx + torch.where(xf.abs() >= limit, 0.0, slope)
    g_mix = None
    if mix is not None:
        gx = gx + (1.0 - mix) * gf
        g_mix = sigma.squeeze(-1) * g_sigma + mu.squeeze(-1) * g_mu - (gf * xf).sum(-1)
        g_mu, g_sigma = g_mu * mix.squeeze(-1), g_sigma * mix.squeeze(-1)
    return gx.to(x.dtype), g_mu, g_sigma, g_w, g_b, g_gamma, g_delta, g_mix


def _sum0(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.sum(0)


def norm_forward_nd_math(x: Tensor, w: Tensor, b: Tensor, coef: Tensor | None, eps: float, limit: float,
                         out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`norm_forward_math` on x (B, C, *spatial) with w, b (C,), coef (C, K): y in x's shape, a tensor of its
    own (the autograd function returns it as is: no copy into an output buffer, no view the in-place nonlinearity
    after it would refuse), the statistics (B, C, 1). Same operations, same values."""
    bsz, c = x.shape[:2]
    xf = x.float() if x.dtype != torch.float64 else x
    flat = xf.reshape(bsz, c, -1)
    mean = flat.mean(-1, keepdim=True)
    xc = flat - mean
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    stat, per_channel = (bsz, c, *([1] * (x.ndim - 2))), (c, *([1] * (x.ndim - 2)))
    xh = (xf - mean.view(stat)) * rstd.view(stat)
    y = xh * w.view(per_channel) + b.view(per_channel)
    if coef is not None:
        y = y + _horner(xh.clamp(-limit, limit), coef.view(c, coef.shape[1], *([1] * (x.ndim - 3))))
    return y.to(out_dtype), mean, rstd


def norm_backward_nd_math(x: Tensor, g: Tensor, mean: Tensor, rstd: Tensor, w: Tensor, dcoef: Tensor | None,
                          limit: float) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`norm_backward_math` on x, g (B, C, *spatial), statistics (B, C, 1), w (C,): dL/dx in x's shape and
    the parameter gradients summed over the batch, (C,), (C,), (C, J+1) (no reductions left to the caller)."""
    bsz, c = x.shape[:2]
    gx, gw, gb, gcoef = norm_backward_math(x.reshape(bsz, c, -1), g.reshape(bsz, c, -1), mean, rstd, w.view(c, 1),
                                           dcoef, limit)
    return gx.view(x.shape), gw.sum(0), gb.sum(0), _sum0(gcoef)


def restore_forward_nd_math(x: Tensor, mu: Tensor, sigma: Tensor, w_eps: Tensor, b: Tensor, qcoef: Tensor | None,
                            rcoef: Tensor | None, mix: Tensor | None, limit: float, min_den: float, bound: float,
                            out_dtype: torch.dtype) -> Tensor:
    """:func:`restore_forward_math` on x (B, C, *spatial) (pointwise: the same function, broadcast), mu, sigma
    (B, C, 1), w_eps, b, mix (C,), qcoef, rcoef (C, K): the output in x's shape, a tensor of its own."""
    bsz, c = x.shape[:2]
    stat, per_channel = (bsz, c, *([1] * (x.ndim - 2))), (c, *([1] * (x.ndim - 2)))
    coef = (c, -1, *([1] * (x.ndim - 3)))
    q = None if qcoef is None else qcoef.view(coef)
    r = None if rcoef is None else rcoef.view(coef)
    return restore_forward_math(x, mu.view(stat), sigma.view(stat), w_eps.view(per_channel), b.view(per_channel),
                                q, r, None if mix is None else mix.view(per_channel), limit, min_den, bound, out_dtype)


def restore_backward_nd_math(x: Tensor, g: Tensor, mu: Tensor, sigma: Tensor, w_eps: Tensor, b: Tensor,
                             qcoef: Tensor | None, rcoef: Tensor | None, mix: Tensor | None, limit: float,
                             min_den: float, bound: float) -> tuple[Tensor | None, ...]:
    """:func:`restore_backward_math` on x, g (B, C, *spatial), mu, sigma (B, C, 1), per-channel parameters (C,) /
    (C, K): dL/dx in x's shape, dL/dmu and dL/dsigma (B, C), the parameter gradients summed over the batch."""
    bsz, c = x.shape[:2]
    gx, g_mu, g_sigma, g_w, g_b, g_gamma, g_delta, g_mix = restore_backward_math(
        x.reshape(bsz, c, -1), g.reshape(bsz, c, -1), mu, sigma, w_eps.view(c, 1), b.view(c, 1), qcoef, rcoef,
        None if mix is None else mix.view(c, 1), limit, min_den, bound)
    return gx.view(x.shape), g_mu, g_sigma, g_w.sum(0), g_b.sum(0), _sum0(g_gamma), _sum0(g_delta), _sum0(g_mix)


_MATH = {"norm_forward": norm_forward_math, "norm_backward": norm_backward_math,
         "restore_forward": restore_forward_math, "restore_backward": restore_backward_math,
         "norm_forward_nd": norm_forward_nd_math, "norm_backward_nd": norm_backward_nd_math,
         "restore_forward_nd": restore_forward_nd_math, "restore_backward_nd": restore_backward_nd_math}


def compiled(name: str) -> Callable:
    """The compiled version of ``<name>_math`` (built once; dynamic shapes)."""
    fn = _COMPILED.get(name)
    if fn is None:
        fn = _COMPILED[name] = torch.compile(_MATH[name], dynamic=True, fullgraph=True)
    return fn


def run(name: str, *args, **kwargs):
    """Call the compiled function; on a compile failure disable the fused path and return None."""
    try:
        return compiled(name)(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 (any compiler failure: fall back, never fail training)
        disable(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        return None
