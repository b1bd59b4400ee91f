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

The kernels are PyTorch operators (``torch.ops.nnunet_universal_harmony.*``, CPU kernels registered by the C++
file): a layer's forward or backward is one dispatched operation on the activation in its own (B, C, ...) shape,
which allocates its outputs and sums the parameters' gradients over the batch itself, as an ATen kernel would
(``scripts/count_ops.py`` counts dispatched operations: the Python binding this replaced cost about a dozen per
layer in views, allocations and sums around it).
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
    """The operators' namespace (``torch.ops.nnunet_universal_harmony``), or None when the library cannot be built
    (warned once)."""
    if "module" not in _STATE:
        _STATE["module"] = None
        quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found": irrelevant here
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load

            cap = torch.backends.cpu.get_cpu_capability().lower()
            load(name=f"nnunet_universal_harmony_ops_{cap}", sources=[str(_SOURCE)], extra_cflags=_flags(),
                 is_python_module=False, verbose=False)
            _STATE["module"] = torch.ops.nnunet_universal_harmony
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


def _none_if_empty(t: Tensor) -> Tensor | None:
    return t if t.numel() else None


def norm_forward(x: Tensor, w: Tensor, b: Tensor, coef: Tensor | None, eps: float,
                 limit: float) -> tuple[Tensor, Tensor, Tensor]:
    """HarmonyNorm forward of x (B, C, ...): (out like x, mean (B, C, 1), rstd (B, C, 1)); w, b (C,) or (C, 1),
    coef (C, J+1) monomial coefficients or None."""
    return extension().norm_forward(x, w, b, coef, eps, limit)


def norm_backward(x: Tensor, g: Tensor, mean: Tensor, rstd: Tensor, w: Tensor, dcoef: Tensor | None,
                  limit: float) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """HarmonyNorm backward: (grad_x like x, dw (C,), db (C,), power sums (C, J+1) or None), the parameters'
    gradients summed over the batch; dcoef (C, J): P' coefficients or None."""
    gx, gw, gb, gc = extension().norm_backward(x, g, mean, rstd, w, dcoef, limit)
    return gx, gw, gb, _none_if_empty(gc)


def restore_forward(x: Tensor, mu: Tensor, sigma: Tensor, w_eps: Tensor, b: Tensor, qcoef: Tensor | None,
                    rcoef: Tensor | None, mix: Tensor | None, limit: float, min_den: float, bound: float) -> Tensor:
    """HarmonyRestore forward of x (B, C, ...) (a new tensor like x); mu, sigma per (B, C); parameters per
    channel."""
    return extension().restore_forward(x, mu, sigma, w_eps, b, qcoef, rcoef, mix, limit, min_den, bound)


def restore_backward(x: Tensor, g: Tensor, mu: Tensor, sigma: Tensor, w_eps: Tensor, b: Tensor,
                     qcoef: Tensor | None, rcoef: Tensor | None, mix: Tensor | None, limit: float, min_den: float,
                     bound: float) -> tuple[Tensor | None, ...]:
    """HarmonyRestore backward: (grad_x like x, dmu, dsigma per (B, C), dw, db (C,), dgamma, ddelta (C, J+1), dmix
    (C,)); the parameters' gradients summed over the batch, None where the layer has no polynomial or mix."""
    gx, gmu, gsig, gw, gb, ggam, gdel, gmix = extension().restore_backward(
        x, g, mu, sigma, w_eps, b, qcoef, rcoef, mix, limit, min_den, bound)
    poly = qcoef is not None and rcoef is not None
    return gx, gmu, gsig, gw, gb, ggam if poly else None, gdel if poly else None, gmix if mix is not None else None
