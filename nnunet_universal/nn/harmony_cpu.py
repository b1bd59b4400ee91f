"""U-Harmony's kernels for fp32 CPU tensors, a small C++ extension (``csrc/harmony_cpu.cpp``).

On CPU the compiled kernels of ``harmony_fused.py`` met the speed goals but kept the compiler resident, which put a
training process at 1.17x the peak memory of a stock nnU-Net one; the chunked eager path has the memory but not
the speed (1.11x a stock step). ``scripts/benchmark_harmony_kernels.py`` compares the three paths. These
hand-written loops do what Inductor's generated code did (a reduction sweep and a pointwise sweep per function,
temporaries in L1) without the compiler in the process. They are built once per machine with
``torch.utils.cpp_extension`` on first use (a C++ compiler and ninja are needed, as for ``torch.compile`` on CPU;
the build is cached under ``TORCH_EXTENSIONS_DIR``). If building fails (one warning), fp32 CPU tensors go to the
``torch.compile``d functions of ``harmony_fused.py``, and to the eager path of ``harmony_functions.py`` if compiling
fails too (it does without a C++ compiler; a second warning). ``NNUNET_UNIVERSAL_FUSED=0`` turns off this path and
the compiled one (:func:`~nnunet_universal.nn.harmony_fused.turned_off`).

Arguments are the fused path's: (B, C, N) tensors with per-channel parameters; the outputs are written into
caller-provided tensors (no copy of the activation).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nnunet_universal.nn import harmony_fused

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "harmony_cpu.cpp"
_STATE: dict[str, Any] = {}


def _flags() -> list[str]:
    """Optimization flags for this CPU's vector unit (also part of the build's name, so caches never mix)."""
    cap = torch.backends.cpu.get_cpu_capability()
    isa = {"AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
           "AVX2": ["-mavx2", "-mfma"]}.get(cap, [])
    return ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", *isa]


def extension() -> Any | None:
    """The built extension module, or None when it cannot be built (warned once)."""
    if "module" not in _STATE:
        _STATE["module"] = None
        quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found": irrelevant here
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load

            cap = torch.backends.cpu.get_cpu_capability().lower()
            _STATE["module"] = load(name=f"nnunet_universal_harmony_cpu_{cap}", sources=[str(_SOURCE)],
                                    extra_cflags=_flags(), verbose=False)
        except Exception as err:  # noqa: BLE001 (no compiler, no ninja, a failed build: fall back, never fail)
            logger.warning("U-Harmony C++ CPU kernels unavailable (%s: %s); fp32 CPU tensors use the torch.compile "
                           "path (harmony_fused), or the eager path if that fails too", type(err).__name__,
                           str(err).splitlines()[0] if str(err) else "")
        finally:
            quiet.setLevel(level)
    return _STATE["module"]


def serves(x: Tensor) -> bool:
    """Whether these kernels serve ``x``: an fp32 CPU tensor, not turned off, the extension built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not harmony_fused.turned_off()
            and extension() is not None)


#: What stands for None (the kernels only read its size); one tensor instead of an allocation per call.
_NONE = torch.empty(0)


def _f32(t: Tensor | None) -> Tensor:
    """A contiguous fp32 tensor for the extension; an empty one stands for None. Tensors that already are contiguous
    fp32 are passed as they are (no ``to``/``contiguous`` dispatched: host time per layer)."""
    if t is None:
        return _NONE
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _vec(t: Tensor) -> Tensor:
    """Per-channel parameters (C,) or (C, 1) as a flat contiguous fp32 vector."""
    t = _f32(t)
    return t if t.ndim == 1 else t.view(-1)


def norm_forward(x: Tensor, w: Tensor, b: Tensor, coef: Tensor | None, eps: float, limit: float,
                 out: Tensor) -> tuple[Tensor, Tensor]:
    """HarmonyNorm forward of x (B, C, N) into ``out`` (B, C, N); returns (mean, rstd), each (B, C, 1)."""
    mean, rstd = extension().norm_forward(x, _vec(w), _vec(b), _f32(coef), eps, limit, out)
    return mean, rstd


def norm_backward(x: Tensor, g: Tensor, mean: Tensor, rstd: Tensor, w: Tensor, dcoef: Tensor | None, limit: float,
                  grad_x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """HarmonyNorm backward into ``grad_x``; returns (dw, db) per (B, C) and the power sums (B, C, J+1) or None."""
    gw, gb, gc = extension().norm_backward(x, g, _f32(mean), _f32(rstd), _vec(w), _f32(dcoef), limit, grad_x)
    return gw, gb, (gc if dcoef is not None else None)


def restore_forward(x: Tensor, mu: Tensor, sigma: Tensor, w_eps: Tensor, b: Tensor, qcoef: Tensor | None,
                    rcoef: Tensor | None, mix: Tensor | None, limit: float, min_den: float, bound: float,
                    out: Tensor) -> None:
    """HarmonyRestore forward of x (B, C, N) into ``out``; mu, sigma (B, C); parameters per channel."""
    extension().restore_forward(x, _f32(mu), _f32(sigma), _vec(w_eps), _vec(b), _f32(qcoef), _f32(rcoef),
                                _f32(mix), limit, min_den, bound, out)


def restore_backward(x: Tensor, g: Tensor, mu: Tensor, sigma: Tensor, w_eps: Tensor, b: Tensor,
                     qcoef: Tensor | None, rcoef: Tensor | None, mix: Tensor | None, limit: float, min_den: float,
                     bound: float, grad_x: Tensor) -> tuple[Tensor | None, ...]:
    """HarmonyRestore backward into ``grad_x``; returns (dmu, dsigma, dw, db, dgamma, ddelta, dmix) per (B, C)
    ((B, C, J+1) for dgamma/ddelta; None where the layer has no polynomial or mix)."""
    gmu, gsig, gw, gb, ggam, gdel, gmix = extension().restore_backward(
        x, g, _f32(mu), _f32(sigma), _vec(w_eps), _vec(b), _f32(qcoef), _f32(rcoef), _f32(mix), limit, min_den, bound,
        grad_x)
    poly = qcoef is not None and rcoef is not None
    return gmu, gsig, gw, gb, ggam if poly else None, gdel if poly else None, gmix if mix is not None else None
