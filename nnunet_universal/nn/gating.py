"""Domain gate and prototypes of the domain-gated head (U-Harmony, paper 000 §2.2).

``G = softmax(W_G phi + B_G)``; prototypes ``p_d`` are running means of ``phi`` over domain ``d``;
routing ``r ∝ G ⊙ exp(s cos(phi, p_d))``, normalized over domains. The paper fixes ``s = 1/tau``; here ``s`` is
learned (initialised at ``1/tau``) because the trainer's gate loss is the cross-entropy of the *routing*
log-weights, not of ``G`` alone: the weights that decide a case's domain are the ones trained to be calibrated.

Prototype updates are made equal under DDP and on one process with the union of the data: per step and
per domain, the batch sum of ``phi`` and the count are all-reduced first, then
``p_d <- m p_d + (1 - m) mean_d`` for the domains seen in the step (``p_d <- mean_d`` on the first one).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def all_reduce_prototype_stats(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Sum per-domain feature sums (D, F) and counts (D,) over DDP ranks; a no-op without a process group.

    One collective for both (they are packed into one tensor). Returns new tensors.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return sums, counts
    packed = torch.cat([sums, counts.to(sums.dtype).unsqueeze(1)], dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed[:, :-1].contiguous(), packed[:, -1].round().to(counts.dtype)


class DomainRouter(nn.Module):
    """Gate ``W_G`` + domain prototypes; ``route(phi)`` gives (B, D) routing weights whose rows sum to 1.

    Args:
        num_features: F, the size of the pooled bottleneck features ``phi``.
        num_domains: D.
        temperature: initial tau of the prototype similarity term (its inverse ``s`` is learned, within
            [1, 100]).
        momentum: m of the prototypes' running mean.
    Buffers (in the state dict): ``prototypes`` (D, F), ``prototype_initialized`` (D,) bool; parameter
    ``log_scale`` (log s).
    """

    #: bounds of the learned similarity scale s = 1/tau
    SCALE_RANGE = (1.0, 100.0)

    def __init__(self, num_features: int, num_domains: int, temperature: float = 0.1,
                 momentum: float = 0.99) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"routing_temperature must be > 0, got {temperature}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"prototype_momentum must be in [0, 1), got {momentum}")
        self.num_domains = num_domains
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.gate = nn.Linear(num_features, num_domains)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.temperature)))
        self.register_buffer("prototypes", torch.zeros(num_domains, num_features))
        self.register_buffer("prototype_initialized", torch.zeros(num_domains, dtype=torch.bool))

    def gate_logits(self, phi: Tensor) -> Tensor:
        """phi: (B, F) -> gate logits (B, D) (``W_G phi + B_G``; the trainer's gate loss uses them)."""
        with torch.autocast(device_type=phi.device.type, enabled=False):
            return self.gate(phi.float())

    def similarity(self, phi: Tensor) -> Tensor:
        """Cosine similarity (B, D) to the prototypes; 0 for prototypes not yet initialized."""
        with torch.autocast(device_type=phi.device.type, enabled=False):
            cos = F.normalize(phi.float(), dim=1) @ F.normalize(self.prototypes.float(), dim=1).T
            return cos * self.prototype_initialized.to(cos.dtype)

    def scale(self) -> Tensor:
        """The learned similarity scale s = 1/tau (scalar tensor, clamped to :attr:`SCALE_RANGE`)."""
        lo, hi = self.SCALE_RANGE
        return self.log_scale.float().clamp(math.log(lo), math.log(hi)).exp()

    def routing_logits(self, phi: Tensor) -> Tensor:
        """(B, F) -> (B, D) routing log-weights (up to a constant): ``log_softmax(gate) + s cos(phi, p)``.

        The trainer's gate loss is their cross-entropy with the true domain (fp32 also under autocast)."""
        with torch.autocast(device_type=phi.device.type, enabled=False):
            return F.log_softmax(self.gate_logits(phi), dim=1) + self.scale() * self.similarity(phi)

    def route(self, phi: Tensor, hard: bool = False) -> Tensor:
        """Routing weights (B, D): softmax(gate) ⊙ exp(s cos), normalized; one-hot of its arg-max if ``hard``."""
        r = torch.softmax(self.routing_logits(phi), dim=1)
        if hard:
            r = F.one_hot(r.argmax(dim=1), self.num_domains).to(r.dtype)
        return r

    @torch.no_grad()
    def update_prototypes(self, phi: Tensor, domain: Tensor) -> None:
        """Running-mean update with one step's features phi (B, F) of domains ``domain`` (B,), DDP-synchronized."""
        phi = phi.detach().float()
        sums = torch.zeros(self.num_domains, phi.shape[1], dtype=torch.float32, device=phi.device)
        sums.index_add_(0, domain, phi)
        # index_add, not bincount: bincount sizes its output from the data (a host synchronization on GPU)
        counts = torch.zeros(self.num_domains, dtype=torch.float32, device=phi.device)
        counts.index_add_(0, domain, torch.ones_like(domain, dtype=torch.float32))
        sums, counts = all_reduce_prototype_stats(sums, counts)
        seen = counts > 0
        mean = sums / counts.clamp_min(1.0).unsqueeze(1)
        m = torch.where(self.prototype_initialized, self.momentum, 0.0).unsqueeze(1)
        new = m * self.prototypes.float() + (1.0 - m) * mean
        self.prototypes.copy_(torch.where(seen.unsqueeze(1), new, self.prototypes.float()).to(self.prototypes.dtype))
        self.prototype_initialized |= seen


def uniform_routing(batch: int, num_domains: int, device: torch.device) -> Tensor:
    """(B, D) equal weights: dataset-free routing when the network has no gate."""
    return torch.full((batch, num_domains), 1.0 / num_domains, device=device)
