"""Autograd functions of U-Harmony's layers (see ``harmony.py`` for the equations and the guards).

They save only their input (plus per-(sample, channel) statistics) and recompute the polynomial terms in
backward: plain autograd would keep every power of every activation alive until backward, ``J`` extra
activation tensors per layer. All arithmetic runs in fp32 (fp64 for fp64 inputs) whatever the autocast
state. Fast paths: the C++ kernels of ``harmony_cpu.py`` (fp32 on CPU) and the compiled kernels of
``harmony_fused.py`` (GPU, fp16/bf16 on CPU, and fp32 on CPU when the C++ kernels cannot be built), both off with
``NNUNET_UNIVERSAL_FUSED=0``; otherwise the work is done here on chunks of rows (one row = one (sample, channel)
pair): on CPU small, cache-resident chunks (a fresh activation-sized buffer costs more, in page faults, than the
arithmetic); on GPU larger chunks that bound the temporaries, so that peak memory stays near the plain network's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nnunet_universal.nn import harmony_cpu, harmony_fused

#: Elements per chunk of rows: on CPU 1 MiB of fp32 (cache-resident temporaries); on GPU 64 MiB, which keeps
#: kernel launches few and bounds the temporaries of a 3D full-resolution layer to a fraction of its size.
CPU_CHUNK_ELEMS = 1 << 18
GPU_CHUNK_ELEMS = 1 << 24


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(rows: int, n: int, device: torch.device) -> list[slice]:
    step = max(1, (CPU_CHUNK_ELEMS if device.type == "cpu" else GPU_CHUNK_ELEMS) // max(n, 1))
    return [slice(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _per_row(p: Tensor, batch: int, cd: torch.dtype) -> Tensor:
    """Per-channel parameters (C,) or (C, K) -> per-row (B*C, 1) or (B*C, K) in the compute dtype."""
    p = p.to(cd)
    return p.repeat(batch).unsqueeze(1) if p.ndim == 1 else p.repeat(batch, 1)


_ORDERS: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _orders(order: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``arange(1, order + 1)`` in ``dtype`` on ``device``, made once (it scales coefficients into derivatives)."""
    key = (order, dtype, device)
    t = _ORDERS.get(key)
    if t is None:
        with torch.inference_mode(False):  # a normal tensor even when first made under inference mode
            t = _ORDERS[key] = torch.arange(1, order + 1, dtype=dtype, device=device)
    return t


def _shaped(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``t.view(shape)``, or ``t`` itself when it has that shape already (no view dispatched)."""
    if len(shape) == t.ndim and all(s in (-1, d) for s, d in zip(shape, t.shape, strict=True)) \
            and shape.count(-1) <= 1:
        return t
    return t.view(shape)


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; no operation dispatched when it already is (``Tensor.to`` dispatches even then)."""
    return t if t.dtype == dtype else t.to(dtype)


def _as3(stat: Tensor, batch: int) -> Tensor:
    """Per-(sample, channel) statistics (B*C, 1) or (B, C, 1) as (B, C, 1), viewed only when needed."""
    return stat if stat.ndim == 3 else stat.view(batch, -1, 1)


def _to_basis(grad: Tensor, basis_t: Tensor) -> Tensor:
    """Gradient of monomial coefficients (C, J+1) -> of basis coefficients: ``grad @ M.T``, in the gradient's dtype
    (the forward's product ran in the caller's autocast dtype, as autograd's backward of it would)."""
    return grad.mm(_as_dtype(basis_t, grad.dtype))


def _stat3(stat: Tensor, cd: torch.dtype) -> Tensor:
    """Per-(sample, channel) statistics (B, C) or (B, C, 1) as (B, C, 1) in the compute dtype (the fused path)."""
    stat = stat.to(cd)
    return stat.unsqueeze(-1) if stat.ndim == 2 else stat


def _rows_of(x: Tensor) -> tuple[Tensor, int, int]:
    """(B, C, *spatial) -> contiguous (B*C, N) view, B, N."""
    b, c = x.shape[:2]
    return x.contiguous().view(b * c, -1), b, x.numel() // max(b * c, 1)


def _horner_into(out: Tensor, u: Tensor, coeffs: Tensor) -> Tensor:
    """out = sum_k coeffs[:, k] * u^k (rows u (r, N), coeffs (r, K), lowest order first), in place; returns out."""
    k = coeffs.shape[1]
    if k == 1:
        return out.copy_(coeffs[:, :1].expand_as(u))
    torch.mul(u, coeffs[:, k - 1:k], out=out)
    for i in range(k - 2, -1, -1):
        out.add_(coeffs[:, i:i + 1])
        if i > 0:
            out.mul_(u)
    return out


def _fold_affine(coef: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Monomial coefficients (r, K) of ``b + w * u + P(u)``: the affine added to orders 0 and 1 (K >= 2)."""
    out = coef.clone()
    out[:, :1] += b
    if out.shape[1] > 1:
        out[:, 1:2] += w
    else:
        out = torch.cat([out, w], dim=1)
    return out


def _horner(u: Tensor, coeffs: Tensor) -> Tensor:
    """sum_k coeffs[:, k] * u^k for rows u (r, N) and coeffs (r, K), lowest order first; a fresh tensor."""
    return _horner_into(torch.empty_like(u), u, coeffs)


def _clamped(t: Tensor, limit: float) -> tuple[Tensor, bool]:
    """(clamp(t, -limit, limit), whether the clamp may bind). On CPU the check is exact and the common
    no-clamp case returns ``t`` itself; on GPU it always clamps (no host sync)."""
    if t.device.type == "cpu":
        lo, hi = torch.aminmax(t)
        if -limit < float(lo) and float(hi) < limit:
            return t, False
    return t.clamp(-limit, limit), True


def _guard(den: Tensor, min_den: float) -> Tensor:
    """Sign-preserving floor of |den|: copysign(max(|den|, m), den); a fresh tensor."""
    return den.abs().clamp_min_(min_den).copysign_(den)


class HarmonyNormFunction(torch.autograd.Function):
    """y = w * xhat + b + P(clamp(xhat)),  xhat = (x - mean) / sqrt(var + eps),  P(u) = sum_k coef_k u^k.

    ``coef`` (C, J+1) holds monomial coefficients of orders 0..J (the module maps its basis onto them).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, coef: Tensor | None, eps: float,
                limit: float, out_dtype: torch.dtype, basis: tuple[Tensor, Tensor, Tensor] | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        # basis (harmony.basis_bundle): ``coef`` holds the layer's basis coefficients (C, J-1); mapped here, so that
        # backward maps the gradient back with one product (autograd's would transpose first: host time)
        ctx.basis = ctx.poly = None
        if basis is not None and coef is not None:
            ctx.basis, ctx.poly = basis, coef
            coef = coef.mm(basis[0])
        with torch.autocast(device_type=x.device.type, enabled=False):
            if out_dtype == torch.float32 and harmony_cpu.serves(x):  # one C++ operator, its own output tensor
                # the statistics stay (B, C, 1) as the kernels return them (every reader views them as it needs)
                out, mean, rstd = harmony_cpu.norm_forward(x, weight, bias, coef, eps, limit)
                ctx.save_for_backward(x, mean, rstd, weight, coef)
                ctx.limit = limit
                ctx.mark_non_differentiable(mean, rstd)
                return out, mean, rstd
            cd = _compute_dtype(x)
            if harmony_fused.enabled(x):  # x as it is, per-channel parameters: nothing to reshape or copy around
                fused = harmony_fused.run("norm_forward_nd", x, weight.to(cd), bias.to(cd),
                                          None if coef is None else coef.to(cd), eps, limit, out_dtype)
                if fused is not None:  # the output is the compiled function's own tensor (in-place users follow);
                    out, mean, rstd = fused  # the statistics (B, C, 1) as returned (readers view them as needed)
                    ctx.save_for_backward(x, mean, rstd, weight, coef)
                    ctx.limit = limit
                    ctx.mark_non_differentiable(mean, rstd)
                    return out, mean, rstd
            x2, batch, n = _rows_of(x)
            rows = x2.shape[0]
            w, b = _per_row(weight, batch, cd), _per_row(bias, batch, cd)
            c = _per_row(coef, batch, cd) if coef is not None else None  # (R, J+1)
            out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
            out2 = out.view(rows, n)
            mean = torch.empty((rows, 1), dtype=cd, device=x.device)
            rstd = torch.empty_like(mean)
            # P with the affine folded in (orders 0 and 1): one Horner pass when no activation is clamped
            cwb = _fold_affine(c, w, b) if c is not None else None
            for sl in _chunks(rows, n, x.device):
                xc = x2[sl].to(cd)
                m = xc.mean(1, keepdim=True)
                xh = torch.sub(xc, m)
                r = torch.rsqrt(torch.linalg.vecdot(xh, xh).unsqueeze(1).div_(n).add_(eps))
                xh.mul_(r)  # xhat
                oc = out2[sl] if out_dtype == cd else torch.empty_like(xc)
                if c is None:
                    torch.mul(xh, w[sl], out=oc).add_(b[sl])
                else:
                    u, clamped = _clamped(xh, limit)
                    if clamped:  # w * xhat + b + P(clamp(xhat))
                        _horner_into(oc, u, c[sl]).addcmul_(xh, w[sl]).add_(b[sl])
                    else:
                        _horner_into(oc, xh, cwb[sl])
                if out_dtype != cd:
                    out2[sl].copy_(oc)
                mean[sl], rstd[sl] = m, r
        ctx.save_for_backward(x, mean, rstd, weight, coef)
        ctx.limit = limit
        ctx.mark_non_differentiable(mean, rstd)
        return out, mean, rstd

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _gm: Tensor | None, _gr: Tensor | None):  # type: ignore[override]
        grads = HarmonyNormFunction._backward(ctx, grad_out)
        if ctx.basis is not None and grads[3] is not None:  # monomial coefficients -> basis coefficients
            grads = (*grads[:3], _to_basis(grads[3], ctx.basis[1]), *grads[4:])
        return (*grads, None)

    @staticmethod
    def _backward(ctx: Any, grad_out: Tensor) -> tuple:
        x, mean, rstd, weight, coef = ctx.saved_tensors
        limit = ctx.limit
        with torch.autocast(device_type=x.device.type, enabled=False):
            cd = _compute_dtype(x)
            order = 0 if coef is None else coef.shape[1] - 1
            # P'(u) per channel, coefficients of orders 0..J-1 (every path)
            if coef is None:
                dcoef_c = None
            elif ctx.basis is not None and coef.dtype == ctx.poly.dtype:  # (under autocast coef is the cast one)
                dcoef_c = ctx.poly.mm(ctx.basis[2]).to(cd)
            else:
                dcoef_c = coef[:, 1:].to(cd) * _orders(order, cd, x.device)
            if harmony_cpu.serves(x) and grad_out.dtype == torch.float32:  # one operator, batch sums inside
                grad_x, gw, gb, gc = harmony_cpu.norm_backward(x, grad_out, mean, rstd, weight, dcoef_c, limit)
                need = ctx.needs_input_grad
                return (grad_x, _as_dtype(gw, weight.dtype) if need[1] else None,
                        _as_dtype(gb, weight.dtype) if need[2] else None,
                        _as_dtype(gc, coef.dtype) if gc is not None and need[3] else None, None, None, None)
            if harmony_fused.enabled(x):  # x, g as they are; the batch sums inside the compiled function
                batch = x.shape[0]
                fused = harmony_fused.run("norm_backward_nd", x, grad_out, _as3(mean, batch), _as3(rstd, batch),
                                          weight.to(cd), dcoef_c, limit)
                if fused is not None:
                    need = ctx.needs_input_grad
                    return (fused[0], fused[1].to(weight.dtype) if need[1] else None,
                            fused[2].to(weight.dtype) if need[2] else None,
                            fused[3].to(coef.dtype) if coef is not None and need[3] else None, None, None, None)
            x2, batch, n = _rows_of(x)
            g2 = grad_out.contiguous().view(x2.shape)
            rows = x2.shape[0]
            if mean.ndim == 3:  # (B, C, 1) from the C++ or fused forward
                mean, rstd = mean.view(rows, 1), rstd.view(rows, 1)
            w = _per_row(weight, batch, cd)
            dcoef = None
            if coef is not None:  # P'(u) = sum_k k coef_k u^(k-1)
                dcoef = _per_row(dcoef_c, batch, cd)
                dcoef_w = dcoef.clone()
                dcoef_w[:, :1] += w  # w + P'(u): the affine's slope folded into the constant term
            grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            gx2 = grad_x.view(x2.shape)
            gw = torch.empty(rows, dtype=cd, device=x.device)
            gb = torch.empty_like(gw)
            gc_acc = torch.empty((rows, order + 1), dtype=cd, device=x.device) if coef is not None else None
            for sl in _chunks(rows, n, x.device):
                xh = torch.sub(x2[sl].to(cd), mean[sl]).mul_(rstd[sl])
                gc = g2[sl].to(cd)
                gb[sl] = gc.sum(1)
                gw[sl] = torch.linalg.vecdot(gc, xh)
                if dcoef is not None:
                    u, clamped = _clamped(xh, limit)
                    gc_acc[sl, 0] = gb[sl]
                    if order >= 1:
                        gc_acc[sl, 1] = torch.linalg.vecdot(gc, u) if clamped else gw[sl]
                    if order >= 2:
                        t = gc * u
                        for k in range(2, order + 1):  # sum g u^k
                            gc_acc[sl, k] = torch.linalg.vecdot(t, u)
                            if k < order:
                                t.mul_(u)
                    if clamped:
                        gxc = _horner(u, dcoef[sl])  # P'(u)
                        gxc.masked_fill_(xh.abs() >= limit, 0.0)  # the clamp has no slope outside
                        gxc.add_(w[sl]).mul_(gc)  # dL/dxhat
                    else:
                        gxc = _horner(u, dcoef_w[sl]).mul_(gc)  # (w + P'(u)) * g
                else:
                    gxc = gc * w[sl]
                m1 = gxc.mean(1, keepdim=True)
                m2 = torch.linalg.vecdot(gxc, xh).unsqueeze(1).div_(-n)
                # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dL/dxhat
                gxc.sub_(m1).addcmul_(xh, m2)
                if gx2.dtype == cd:
                    torch.mul(gxc, rstd[sl], out=gx2[sl])
                else:
                    gx2[sl] = gxc.mul_(rstd[sl])
            grad_w = gw.view(batch, -1).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_b = gb.view(batch, -1).sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
            grad_c = None
            if coef is not None and ctx.needs_input_grad[3]:
                grad_c = gc_acc.view(batch, -1, order + 1).sum(0).to(coef.dtype)
        return grad_x, grad_w, grad_b, grad_c, None, None, None


class HarmonyRestoreFunction(torch.autograd.Function):
    """y = x + a (r - x),  r = sigma * (x - b - Q(u)) / guard(w + eps + R(u)) + mu,  u = clamp(x),  Q, R polynomials.

    ``mix`` (C,) holds the per-channel residual mix ``a``; ``None`` gives ``y = r`` (Eq. 3 literally).

    ``qcoef``, ``rcoef`` (C, J+1) hold the monomial coefficients of Q and R, orders 0..J.
    """

    @staticmethod
    def _params(weight: Tensor, bias: Tensor, gamma: Tensor | None, delta: Tensor | None, eps: float,
                batch: int, cd: torch.dtype, min_den: float, bound: float) -> dict[str, Tensor]:
        w = _per_row(weight, batch, cd)
        p = {"w_eps": w + eps if eps else w, "b": _per_row(bias, batch, cd)}
        p["far"] = p["w_eps"].abs() > bound + min_den
        if gamma is not None and delta is not None:
            p["gamma"], p["delta"] = _per_row(gamma, batch, cd), _per_row(delta, batch, cd)
        return p

    @staticmethod
    def _nd_params(weight: Tensor, bias: Tensor, gamma: Tensor | None, delta: Tensor | None, mix: Tensor | None,
                   eps: float, cd: torch.dtype) -> tuple[Tensor | None, ...]:
        """(w + eps, b, gamma, delta, mix) per channel, (C,) / (C, K), for the fused path's (B, C, *spatial)
        functions."""
        w = weight.to(cd)
        return (w + eps if eps else w, bias.to(cd),
                None if gamma is None or delta is None else gamma.to(cd),
                None if gamma is None or delta is None else delta.to(cd),
                None if mix is None else mix.to(cd))

    @staticmethod
    def _cpp_params(weight: Tensor, bias: Tensor, gamma: Tensor | None, delta: Tensor | None, mix: Tensor | None,
                    eps: float) -> tuple[Tensor | None, ...]:
        """(w + eps, b, gamma, delta, mix) for the C++ kernels: per channel as they are ((C,), (C, K)); the kernels
        read them flat, so no (C, 1) views are made (host time per layer)."""
        f32 = torch.float32
        w = _as_dtype(weight, f32)
        return (w + eps if eps else w, bias, gamma if gamma is not None and delta is not None else None,
                delta if gamma is not None and delta is not None else None, mix)

    @staticmethod
    def _terms(xc: Tensor, sl: slice, p: dict[str, Tensor], limit: float, min_den: float, bound: float,
               keep_t: bool = False):
        """(u, clamped, num, dsafe, t) for one chunk: num = x - b - Q(u), dsafe = guard(w + eps + R_b(u)) with
        R_b = bound * tanh(R / bound) (R itself when bound <= 0); t = tanh(R / bound) when ``keep_t``."""
        if "gamma" not in p:
            return None, False, xc - p["b"][sl], _guard(p["w_eps"][sl], min_den), None  # dsafe: (r, 1)
        u, clamped = _clamped(xc, limit)
        num = _horner(u, p["gamma"][sl]).sub_(xc).add_(p["b"][sl]).neg_()
        den = _horner(u, p["delta"][sl])
        t = None
        if bound > 0:  # tanh(z) = 2 sigmoid(2z) - 1: several times faster than tanh on CPU
            den.mul_(2.0 / bound).sigmoid_().mul_(2.0).sub_(1.0)
            if keep_t:
                t, den = den, den * bound
            else:
                den.mul_(bound)
        den.add_(p["w_eps"][sl])
        # with |R_b| < bound, rows whose |w + eps| exceeds bound + min_den cannot come near zero (CPU: checked)
        if bound > 0 and xc.device.type == "cpu" and bool(p["far"][sl].all()):
            return u, clamped, num, den, t
        return u, clamped, num, _guard(den, min_den), t

    @staticmethod
    def forward(ctx: Any, x: Tensor, mu: Tensor, sigma: Tensor, weight: Tensor, bias: Tensor,
                gamma: Tensor | None, delta: Tensor | None, mix: Tensor | None, eps: float, limit: float,
                min_den: float, out_dtype: torch.dtype, bound: float,
                basis: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        # basis: gamma, delta hold basis coefficients (C, J), mapped here (see HarmonyNormFunction)
        ctx.basis = None
        if basis is not None and gamma is not None and delta is not None:
            ctx.basis = basis
            gamma, delta = gamma.mm(basis[0]), delta.mm(basis[0])
        with torch.autocast(device_type=x.device.type, enabled=False):
            if out_dtype == torch.float32 and harmony_cpu.serves(x):  # one C++ operator, its own output tensor
                out = harmony_cpu.restore_forward(
                    x, mu, sigma, *HarmonyRestoreFunction._cpp_params(weight, bias, gamma, delta, mix, eps), limit,
                    min_den, bound)
                ctx.save_for_backward(x, mu, sigma, weight, bias, gamma, delta, mix)
                ctx.consts = (eps, limit, min_den, bound)
                return out
            cd = _compute_dtype(x)
            if harmony_fused.enabled(x):  # x as it is, per-channel parameters (see HarmonyNormFunction)
                y = harmony_fused.run("restore_forward_nd", x, _stat3(mu, cd), _stat3(sigma, cd),
                                      *HarmonyRestoreFunction._nd_params(weight, bias, gamma, delta, mix, eps, cd),
                                      limit, min_den, bound, out_dtype)
                if y is not None:  # the compiled function's own tensor (in-place users follow)
                    ctx.save_for_backward(x, mu, sigma, weight, bias, gamma, delta, mix)
                    ctx.consts = (eps, limit, min_den, bound)
                    return y
            x2, batch, n = _rows_of(x)
            p = HarmonyRestoreFunction._params(weight, bias, gamma, delta, eps, batch, cd, min_den, bound)
            s, m = sigma.to(cd).reshape(-1, 1), mu.to(cd).reshape(-1, 1)
            a = None if mix is None else _per_row(mix, batch, cd)
            keep = None if a is None else 1.0 - a  # y = r + (1 - a) (x - r)
            out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
            out2 = out.view(x2.shape)
            for sl in _chunks(x2.shape[0], n, x.device):
                xc = x2[sl].to(cd)
                _, _, num, dsafe, _ = HarmonyRestoreFunction._terms(xc, sl, p, limit, min_den, bound)
                if out_dtype == cd:
                    r = torch.div(num, dsafe, out=out2[sl]).mul_(s[sl]).add_(m[sl])
                    if keep is not None:
                        r.lerp_(xc, keep[sl])
                else:
                    r = num.div_(dsafe).mul_(s[sl]).add_(m[sl])
                    r = r if keep is None else r.lerp_(xc, keep[sl])
                    if out_dtype == torch.float16:  # saturate rather than overflow (harmony._output_dtype)
                        r.clamp_(-harmony_fused.FP16_MAX, harmony_fused.FP16_MAX)
                    out2[sl] = r
        ctx.save_for_backward(x, mu, sigma, weight, bias, gamma, delta, mix)
        ctx.consts = (eps, limit, min_den, bound)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        grads = HarmonyRestoreFunction._backward(ctx, grad_out)
        if ctx.basis is not None:  # monomial coefficients -> basis coefficients
            grads = tuple(_to_basis(g, ctx.basis[1]) if i in (5, 6) and g is not None else g
                          for i, g in enumerate(grads))
        return (*grads, None)

    @staticmethod
    def _backward(ctx: Any, grad_out: Tensor) -> tuple:
        x, mu, sigma, weight, bias, gamma, delta, mix = ctx.saved_tensors
        eps, limit, min_den, bound = ctx.consts
        need = ctx.needs_input_grad
        with torch.autocast(device_type=x.device.type, enabled=False):
            cd = _compute_dtype(x)
            order = gamma.shape[1] - 1 if gamma is not None else 0
            if harmony_cpu.serves(x) and grad_out.dtype == torch.float32:  # one operator, batch sums inside
                gx, g_mu, g_sigma, g_w, g_b, g_gamma, g_delta, g_mix = harmony_cpu.restore_backward(
                    x, grad_out, mu, sigma, *HarmonyRestoreFunction._cpp_params(weight, bias, gamma, delta, mix, eps),
                    limit, min_den, bound)
                grads: list[Tensor | None] = [None] * 13
                grads[0] = gx if need[0] else None
                grads[1] = _as_dtype(_shaped(g_mu, mu.shape), mu.dtype) if need[1] else None
                grads[2] = _as_dtype(_shaped(g_sigma, sigma.shape), sigma.dtype) if need[2] else None
                grads[3] = _as_dtype(g_w, weight.dtype) if need[3] else None
                grads[4] = _as_dtype(g_b, bias.dtype) if need[4] else None
                if gamma is not None and g_gamma is not None and need[5]:
                    grads[5] = _as_dtype(g_gamma, gamma.dtype)
                if delta is not None and g_delta is not None and need[6]:
                    grads[6] = _as_dtype(g_delta, delta.dtype)
                if mix is not None and g_mix is not None and need[7]:
                    grads[7] = _as_dtype(g_mix, mix.dtype)
                return tuple(grads)
            if harmony_fused.enabled(x):  # x, g as they are; the batch sums inside the compiled function
                fused = harmony_fused.run("restore_backward_nd", x, grad_out, _stat3(mu, cd), _stat3(sigma, cd),
                                          *HarmonyRestoreFunction._nd_params(weight, bias, gamma, delta, mix, eps, cd),
                                          limit, min_den, bound)
                if fused is not None:
                    gx, g_mu, g_sigma, g_w, g_b, g_gamma, g_delta, g_mix = fused
                    grads: list[Tensor | None] = [None] * 13
                    grads[0] = gx if need[0] else None
                    grads[1] = _shaped(g_mu, mu.shape).to(mu.dtype) if need[1] else None
                    grads[2] = _shaped(g_sigma, sigma.shape).to(sigma.dtype) if need[2] else None
                    grads[3] = g_w.to(weight.dtype) if need[3] else None
                    grads[4] = g_b.to(bias.dtype) if need[4] else None
                    if gamma is not None and g_gamma is not None and need[5]:
                        grads[5] = g_gamma.to(gamma.dtype)
                    if delta is not None and g_delta is not None and need[6]:
                        grads[6] = g_delta.to(delta.dtype)
                    if mix is not None and g_mix is not None and need[7]:
                        grads[7] = g_mix.to(mix.dtype)
                    return tuple(grads)
            x2, batch, n = _rows_of(x)
            g2 = grad_out.contiguous().view(x2.shape)
            rows = x2.shape[0]
            p = HarmonyRestoreFunction._params(weight, bias, gamma, delta, eps, batch, cd, min_den, bound)
            s = sigma.to(cd).reshape(-1, 1)
            if mix is not None:  # the inner function's gradients scale with the mix a; dy/dx gains (1 - a)
                a = _per_row(mix, batch, cd)
                m, keep, s_inner = mu.to(cd).reshape(-1, 1), 1.0 - a, s * a
            else:
                s_inner = s
            poly = "gamma" in p
            if poly:
                orders = torch.arange(1, order + 1, dtype=cd, device=x.device)
                dq_coef, dr_coef = p["gamma"][:, 1:] * orders, p["delta"][:, 1:] * orders  # Q'(u), R'(u)
            grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            gx2 = grad_x.view(x2.shape)
            acc = {k: torch.empty(rows, dtype=cd, device=x.device) for k in ("mu", "sigma", "w", "b", "xg")}
            if poly:
                acc["gamma"] = torch.empty((rows, order + 1), dtype=cd, device=x.device)
                acc["delta"] = torch.empty_like(acc["gamma"])
            for sl in _chunks(rows, n, x.device):
                xc = x2[sl].to(cd)
                u, clamped, num, dsafe, t = HarmonyRestoreFunction._terms(xc, sl, p, limit, min_den, bound,
                                                                           keep_t=True)
                gc = g2[sl].to(cd)
                e = torch.div(gc, dsafe).mul_(s_inner[sl])  # dL/dnum
                ratio = num.div_(dsafe)
                f = (e * ratio).neg_()  # dL/dden (straight through the floor)
                acc["mu"][sl] = gc.sum(1)  # unscaled by the mix (scaled below)
                acc["sigma"][sl] = torch.linalg.vecdot(gc, ratio)
                acc["w"][sl] = f.sum(1)
                acc["b"][sl] = e.sum(1).neg_()
                if mix is not None:  # dL/da = sum g (r - x) = sigma sum g ratio + mu sum g - sum g x
                    acc["xg"][sl] = torch.linalg.vecdot(gc, xc)
                if not poly:
                    if mix is not None:
                        e.addcmul_(gc, keep[sl])
                    gx2[sl] = e
                    continue
                if t is not None:  # dL/dR = dL/dden * (1 - tanh^2)
                    f.mul_(t.square_().neg_().add_(1.0))
                acc["gamma"][sl, 0] = acc["b"][sl]  # dL/dq_k = -sum e u^k,  dL/dr_k = sum f u^k
                acc["delta"][sl, 0] = f.sum(1)
                te, tf = e * u, f * u
                for k in range(1, order + 1):
                    acc["gamma"][sl, k] = (te.sum(1) if k == 1 else torch.linalg.vecdot(te, u)).neg_()
                    acc["delta"][sl, k] = tf.sum(1) if k == 1 else torch.linalg.vecdot(tf, u)
                    if 2 <= k < order:
                        te.mul_(u)
                        tf.mul_(u)
                # dy/dx = e * (1 - Q'(u)) + dL/dR * R'(u), the polynomial slopes being 0 where x is clamped
                slope = _horner(u, dr_coef[sl]).mul_(f).sub_(_horner(u, dq_coef[sl]).mul_(e))
                if clamped:
                    slope.masked_fill_(xc.abs() >= limit, 0.0)
                if mix is not None:
                    slope.addcmul_(gc, keep[sl])
                if gx2.dtype == cd:
                    torch.add(slope, e, out=gx2[sl])
                else:
                    gx2[sl] = slope.add_(e)
            grads: list[Tensor | None] = [None] * 13
            if mix is not None:
                if need[7]:
                    g_mix = s.view(-1) * acc["sigma"] + m.view(-1) * acc["mu"] - acc["xg"]
                    grads[7] = g_mix.view(batch, -1).sum(0).to(mix.dtype)
                acc["mu"].mul_(a.view(-1))
                acc["sigma"].mul_(a.view(-1))
            grads[0] = grad_x if need[0] else None
            grads[1] = acc["mu"].view(mu.shape).to(mu.dtype) if need[1] else None
            grads[2] = acc["sigma"].view(sigma.shape).to(sigma.dtype) if need[2] else None
            grads[3] = acc["w"].view(batch, -1).sum(0).to(weight.dtype) if need[3] else None
            grads[4] = acc["b"].view(batch, -1).sum(0).to(bias.dtype) if need[4] else None
            if poly:
                grads[5] = acc["gamma"].view(batch, -1, order + 1).sum(0).to(gamma.dtype) if need[5] else None
                grads[6] = acc["delta"].view(batch, -1, order + 1).sum(0).to(delta.dtype) if need[6] else None
        return tuple(grads)
