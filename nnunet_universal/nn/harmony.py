"""U-Harmony's two stages (paper 000, §2.1): HarmonyNorm (Eq. 1-2) and HarmonyRestore (Eq. 3).

The arithmetic lives in memory-lean custom autograd functions (``harmony_functions.py``) that recompute
the polynomial terms in backward instead of saving them.

Deviations from the paper's equations, all measured (``scripts/benchmark_network.py --quality``, results in
``benchmarks/results/network_micro.json``: a 2D two-domain joint-training proxy with nnU-Net's SGD, mean
Dice over 3 seeds; plain InstanceNorm 0.79, these defaults with J = 3 0.82, the paper's literal form 0.11):

* polynomial basis: the terms are ``lambda_j B_j(u)`` with ``B_j = He_j / sqrt(j!)`` (orthonormal Hermite
  polynomials) instead of ``u^j``. Together with ``w, b`` they span the same functions; raw powers get
  gradients orders of magnitude apart and trained unstably (J = 3: 0.35, seeds 0.09-0.73).
* the restoration denominator's polynomial ``R`` enters squashed, ``rho tanh(R / rho)`` (``rho = 0.5``):
  the literal rational function diverged in every seed (0.16; weights and activations blow up through
  the pole).
* J is limited to 1..3 in practice (``STABLE_MAX_ORDER``): J = 4, 5 diverged (0.28, 0.08); J = 1, 2, 3 gave
  0.81, 0.81, 0.82.

Numerical guards (no NaN/Inf for any finite input and parameters of sane magnitude, fp32/bf16/fp16):

* the polynomial terms see their input clamped to ``[-poly_limit, poly_limit]`` (default 8): standardized
  features are only bounded by ``sqrt(N)`` (hundreds in a 3D patch), and ``x^3`` of such outliers overflows
  fp16 after the next convolution's cast. The linear term is never clamped.
* the restoration denominator ``d = w + eps + R_b`` can cross zero (``w`` is learned): its magnitude is
  floored, sign kept, ``copysign(max(|d|, m), d)`` (``m = min_denominator``); its gradient is passed
  straight through the floor so that parameters caught there still learn.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from nnunet_universal.nn.harmony_functions import HarmonyNormFunction, HarmonyRestoreFunction

#: Default polynomial order J of the affine (Eq. 2) and the restoration (Eq. 3); see NetworkOptions.
DEFAULT_ORDER = 3
#: Largest J the modules accept: B_5 on the clamped input stays far inside fp16's range (He_5(8)/sqrt(5!) ~ 2.5e3).
MAX_ORDER = 5
#: Largest J that trained stably in the measured proxy (scripts/benchmark_network.py --quality: J = 4 and 5
#: diverged, J = 1..3 all beat plain InstanceNorm, J = 3 best). UniversalUNet warns above it.
STABLE_MAX_ORDER = 3
#: Clamp applied to the input of the polynomial terms (not to the linear term).
POLY_LIMIT = 8.0
#: Smallest magnitude of the restoration denominator.
MIN_DENOMINATOR = 1e-2
#: The restoration denominator's polynomial R enters squashed, DENOMINATOR_BOUND * tanh(R / DENOMINATOR_BOUND)
#: (<= 0: as is), so that it moves the denominator by less than DENOMINATOR_BOUND.
DENOMINATOR_BOUND = 0.5
#: Basis of the polynomial terms (see basis_matrix).
DEFAULT_BASIS = "hermite"
def basis_matrix(orders: list[int], kind: str) -> Tensor:
    """Monomial coefficients (rows: orders 0..max) of the basis polynomials ``B_j``, ``j in orders`` (columns).

    ``"power"``: ``B_j(u) = u^j`` (the paper's Eq. 2-3 literally). ``"hermite"``: ``B_j = He_j / sqrt(j!)``,
    the probabilists' Hermite polynomials, orthonormal under N(0, 1): together with ``w, b`` they span the
    same polynomials, but their coefficients get gradients of comparable size (see ``scripts/benchmark_network.py``).
    """
    top = max(orders)
    if kind == "power":
        mono = torch.eye(top + 1, dtype=torch.float64)
    elif kind == "hermite":  # He_0 = 1, He_1 = u, He_{n+1} = u He_n - n He_{n-1}
        mono = torch.zeros(top + 1, top + 1, dtype=torch.float64)
        mono[0, 0] = 1.0
        if top >= 1:
            mono[1, 1] = 1.0
        for n_ in range(1, top):
            mono[:, n_ + 1] = torch.roll(mono[:, n_], 1) - n_ * mono[:, n_ - 1]
        mono /= torch.tensor([float(math.factorial(j)) for j in range(top + 1)], dtype=torch.float64).sqrt()
    else:
        raise ValueError(f"polynomial basis must be 'hermite' or 'power', got {kind!r}")
    return mono[:, orders]  # float64: cast where used, after any module.to(dtype)


def _output_dtype(x: Tensor) -> torch.dtype:
    """HarmonyRestore's output: the input's dtype (fp16/bf16 under autocast, as the decoder convolution's output).

    Eq. 3 rescales by the encoder's sigma and divides by a learned denominator, so its range is not bounded
    like a normalization's: an fp16 output saturates at +-65504 instead of overflowing (the arithmetic is fp32
    either way). Writing fp32 instead took 5 % more training memory on an H200 (4255 vs 4031 MB peak;
    ``scripts/profile_speed.py``, variant ``restore_half``, ``benchmarks/results/profile_cuda_diagnosis.json``)."""
    return x.dtype


def _norm_output_dtype(x: Tensor) -> torch.dtype:
    """HarmonyNorm's output: the input's dtype, as ``instance_norm`` under autocast (fp16/bf16 in, same out).

    The output is bounded like InstanceNorm's (``|xhat| <= sqrt(N)``, the polynomial sees a clamped input);
    writing it in fp32 would double the activation memory of every normalized layer on GPU."""
    return x.dtype


_BASES: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def basis_bundle(orders: tuple[int, ...], kind: str, dtype: torch.dtype,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The basis of a layer's polynomial terms as its autograd function uses it, made once per process and
    (dtype, device) (no buffer: nothing to move with the module, nothing in the state dict):
    ``(M, M.T, D)`` with ``M`` = ``basis_matrix(orders, kind).T`` (terms x monomial orders 0..J, so that
    ``coefficients @ M`` are monomial coefficients), and ``D`` = ``M[:, 1:] * (1..J)`` (coefficients of the
    derivative: ``coefficients @ D`` = ``P'``'s monomial coefficients of orders 0..J-1)."""
    key = (orders, kind, dtype, device)
    bundle = _BASES.get(key)
    if bundle is None:
        with torch.inference_mode(False):  # normal tensors even when first made under inference mode
            m = basis_matrix(list(orders), kind).T  # float64
            deriv = m[:, 1:] * torch.arange(1, m.shape[1], dtype=m.dtype)
            bundle = _BASES[key] = tuple(t.to(dtype=dtype, device=device).contiguous() for t in (m, m.T, deriv))
    return bundle


def _derived(module: nn.Module, name: str, params: tuple[Tensor, ...], make: Any) -> Any:
    """``make()``, a value derived from ``params`` only (polynomial coefficients in the monomial basis, ``w + eps``).

    While gradients are recorded it is computed on every call (it is part of the graph); without (inference,
    validation) it is kept on the module until one of ``params`` changes (version counter, storage, dtype, device):
    a sliding window then dispatches it once per case instead of once per tile (host time on a GPU).
    """
    if torch.is_grad_enabled():
        return make()
    key = (tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params), torch.is_inference_mode_enabled())
    cache = module.__dict__.setdefault("_derived_cache", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, make())
    return hit[1]


def stats_bc1(t: Tensor, batch: int) -> Tensor:
    """Per-(sample, channel) statistics (B, C, 1), as the fast paths return them, or (B*C, 1) (eager path) as
    (B, C, 1); a view only when needed."""
    return t if t.ndim == 3 else t.view(batch, -1, 1)


def _check_order(order: int) -> None:
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"harmony order J must be in 1..{MAX_ORDER}, got {order}")


class HarmonyNorm(nn.Module):
    """U-Harmony first stage (paper Eq. 1-2): instance standardization + polynomial affine.

    ``y = w_c * xhat + b_c + sum_{j=2..J} lambda_{c,j} * B_j(clamp(xhat))`` with ``xhat`` the per-sample,
    per-channel standardized input and ``B_j`` the basis (module docstring; ``basis="power"``: ``u^j`` as in
    the paper). The paper's ``j = 1`` term duplicates ``w_c`` (the output depends only on
    ``w_c + lambda_{c,1}``), so it is folded into ``w_c``; the function class is that of Eq. 2.
    The paper puts ``eps`` outside the square root; here it is inside, as in ``nn.InstanceNorm``, so
    that with all ``lambda = 0`` this module *is* nnU-Net's ``InstanceNorm{2,3}d(C, eps, affine=True)``.

    A drop-in for ``norm_op`` of dynamic-network-architectures: ``HarmonyNorm(num_channels, **norm_op_kwargs)``.
    With ``keep_stats`` set, the last forward's statistics are kept for the matching :class:`HarmonyRestore` and
    the gate's style statistics: ``stats`` = ``(mean, rstd)`` as the autograd function returned them (non-
    differentiable; ``(B, C, 1)``, or ``(B*C, 1)`` on the eager path: see :func:`stats_bc1`), and
    ``last_stats`` = ``(mean, sigma)``, each ``(B, C)``, made from them when read (``sigma = 1 / rstd``).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, order: int = DEFAULT_ORDER,
                 polynomial: bool = True, poly_limit: float = POLY_LIMIT, basis: str = DEFAULT_BASIS,
                 **_: Any) -> None:
        super().__init__()
        if not affine:
            raise ValueError("HarmonyNorm needs affine=True: U-Harmony's affine transform is learnable (Eq. 2)")
        _check_order(order)
        self.num_channels = num_channels
        self.eps = float(eps)
        self.order = int(order)
        self.poly_limit = float(poly_limit)
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        use_poly = polynomial and order >= 2
        # (C, J-1): coefficients of B_2 .. B_J; zero so that training starts from InstanceNorm
        self.poly_weight = nn.Parameter(torch.zeros(num_channels, order - 1)) if use_poly else None
        self.basis = basis
        basis_matrix([2], basis)  # an unknown basis fails here, not at the first forward
        self.keep_stats = False
        self.stats: tuple[Tensor, Tensor] | None = None

    @property
    def last_stats(self) -> tuple[Tensor, Tensor] | None:
        """``(mean, sigma)`` of the last forward's input, each ``(B, C)`` (None before, or after clearing)."""
        if self.stats is None:
            return None
        mean, rstd = self.stats
        b = mean.shape[0] if mean.ndim == 3 else mean.shape[0] // self.num_channels
        return mean.view(b, -1), rstd.view(b, -1).reciprocal()

    @last_stats.setter
    def last_stats(self, value: tuple[Tensor, Tensor] | None) -> None:
        self.stats = None if value is None else (value[0], value[1].reciprocal())

    def extra_repr(self) -> str:
        poly = f"{self.basis} basis" if self.poly_weight is not None else "off"
        return f"{self.num_channels}, eps={self.eps}, order={self.order}, polynomial={poly}"

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, *spatial)
        if x.ndim < 3:
            raise ValueError(f"HarmonyNorm expects (B, C, *spatial), got shape {tuple(x.shape)}")
        out_dtype = _norm_output_dtype(x)
        coef, bundle = None, None
        if self.poly_weight is not None:
            pw = self.poly_weight
            bundle = basis_bundle(tuple(range(2, self.order + 1)), self.basis, pw.dtype, pw.device)
            if torch.is_grad_enabled():  # the function maps the basis itself (its gradient without a transpose)
                coef = pw
            else:
                coef, bundle = _derived(self, "coef", (pw,), lambda: pw @ bundle[0]), None
        out, mean, rstd = HarmonyNormFunction.apply(x, self.weight, self.bias, coef, self.eps, self.poly_limit,
                                                     out_dtype, bundle)
        if self.keep_stats:  # kept as returned: readers view them as they need (host time per layer)
            self.stats = (mean, rstd)
        return out


class HarmonyRestore(nn.Module):
    """U-Harmony second stage (paper Eq. 3), placed after a decoder stage.

    ``y = sigma * (x - b_c - Q(u)) / (w_c + eps + R_b(u)) + mu``, ``Q = sum_{j=1..J} gamma_{c,j} B_j``,
    ``R = sum_{j=1..J} delta_{c,j} B_j``, ``R_b = rho tanh(R / rho)``, ``u = clamp(x)`` (module docstring;
    ``basis="power", denominator_bound=0`` is the paper's equation literally), with ``(mu, sigma)``, each
    ``(B, C)``, kept by the last HarmonyNorm of the matching encoder stage.
    ``w_c, b_c`` are this layer's own parameters (initialized to 1, 0), not the encoder norm's: the decoder
    features are not that norm's output, and ResEnc U-Nets zero-initialize the last norm of every residual
    block, which would put the denominator at ``eps``. The statistics are detached (as in RevIN).
    The denominator's magnitude is floored at ``min_denominator`` (module docstring).

    Residual mix (a departure, measured in ``scripts/benchmark_accuracy.py``): the layer outputs
    ``x + a_c (y - x)`` with a learned per-channel ``a`` initialized to ``mix_init`` (0: the layer starts as
    the identity, ReZero-style). Eq. 3 alone multiplies the decoder features by the encoder's per-case
    ``sigma`` and shifts them by ``mu`` from the first step on; in the multi-domain benchmark that scaled the
    last decoder stage's features (and so the logits) per case and training collapsed to Dice ~ 0.
    ``mix_init=None`` drops the mix (``y`` as in Eq. 3).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, order: int = DEFAULT_ORDER, polynomial: bool = True,
                 poly_limit: float = POLY_LIMIT, min_denominator: float = MIN_DENOMINATOR,
                 basis: str = DEFAULT_BASIS, denominator_bound: float = DENOMINATOR_BOUND,
                 mix_init: float | None = 0.0) -> None:
        super().__init__()
        if min_denominator <= 0:
            raise ValueError("min_denominator must be > 0")
        _check_order(order)
        self.num_channels = num_channels
        self.eps = float(eps)
        self.order = int(order)
        self.poly_limit = float(poly_limit)
        self.min_denominator = float(min_denominator)
        self.denominator_bound = float(denominator_bound)
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.mix = None if mix_init is None else nn.Parameter(torch.full((num_channels,), float(mix_init)))
        use_poly = polynomial and order >= 1
        self.gamma = nn.Parameter(torch.zeros(num_channels, order)) if use_poly else None
        self.delta = nn.Parameter(torch.zeros(num_channels, order)) if use_poly else None
        self.basis = basis
        basis_matrix([1], basis)  # an unknown basis fails here, not at the first forward

    def extra_repr(self) -> str:
        poly = f"{self.basis} basis" if self.gamma is not None else "off"
        mix = "off" if self.mix is None else "residual"
        return f"{self.num_channels}, eps={self.eps}, order={self.order}, polynomial={poly}, mix={mix}"

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints written before the residual mix existed computed y itself: a = 1 reproduces them
        if self.mix is not None and prefix + "mix" not in state_dict and prefix + "weight" in state_dict:
            state_dict[prefix + "mix"] = torch.ones_like(self.mix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
        """x: (B, C, *spatial); mu, sigma: (B, C) (or (B, C, 1)) statistics of the matching encoder stage."""
        if tuple(mu.shape) not in (tuple(x.shape[:2]), (*x.shape[:2], 1)) or sigma.shape != mu.shape:
            raise ValueError(f"HarmonyRestore: statistics {tuple(mu.shape)} do not match features {tuple(x.shape)}")
        return self._restore(x, mu, sigma)

    def from_stats(self, x: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
        """:meth:`forward` with a :class:`HarmonyNorm`'s ``stats`` ``(mean, rstd)`` (``sigma = 1 / rstd``)."""
        b = x.shape[0]
        mean, rstd = (stats_bc1(t, b) for t in stats)
        if mean.shape[:2] != x.shape[:2]:
            raise ValueError(f"HarmonyRestore: statistics {tuple(mean.shape)} do not match features "
                             f"{tuple(x.shape)}")
        return self._restore(x, mean, rstd.reciprocal())

    def _restore(self, x: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
        out_dtype = _output_dtype(x)
        qcoef = rcoef = bundle = None
        if self.gamma is not None:
            bundle = basis_bundle(tuple(range(1, self.order + 1)), self.basis, self.gamma.dtype, self.gamma.device)
            if torch.is_grad_enabled():  # the function maps the basis itself (see HarmonyNorm)
                qcoef, rcoef = self.gamma, self.delta
            else:
                qcoef, rcoef = _derived(self, "coef", (self.gamma, self.delta),
                                        lambda: (self.gamma @ bundle[0], self.delta @ bundle[0]))
                bundle = None
        # w + eps made here (once per case at inference): the function gets eps = 0 and adds nothing
        w_eps = _derived(self, "w_eps", (self.weight,), lambda: self.weight + self.eps)
        # the statistics enter detached (HarmonyNorm's are non-differentiable already: no detach dispatched then)
        mu, sigma = (t.detach() if t.requires_grad else t for t in (mu, sigma))
        return HarmonyRestoreFunction.apply(x, mu, sigma, w_eps, self.bias, qcoef, rcoef,
                                             self.mix, 0.0, self.poly_limit, self.min_denominator, out_dtype,
                                             self.denominator_bound, bundle)
