"""Loss terms of the extension trainers, around the universal trainer's :class:`PartialLabelLoss`.

* **Old cases of a domain that gained classes** (``extend`` with new data of an old domain bringing a new label):
  those cases do not annotate the new classes, which are then *unknown*, not background. Their samples are scored
  on the marginal of their domain's head (the new classes' probabilities summed into background, as the marginal
  loss of Shi et al. 2021 does across datasets) against their old labels: a pseudo-domain per such domain, with
  its own label table, inside the stock loss.
* **Distillation** (no-old-data mode, Li & Hoiem's "Learning without Forgetting"): the old model's head outputs
  on the new scans are soft targets for the old domains' heads, ``T^2 KL(softmax(t/T) || softmax(s/T))`` averaged
  over voxels, samples of other domains and old domains (full resolution only).
* **Prototype replay** (no-old-data mode): the old domains' prototypes (running means of the gate's embedding phi
  over their training cases, stored in the model) stand in for their inputs in the gate loss, so that the gate
  does not learn to send every case to the new domain when it only sees new data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_universal.nn.heads import marginal_logits
from nnunet_universal.trainers.losses import local_label_lut


class PartialCases:
    """Per domain that gained classes: its old class ids and the cases annotated with those only."""

    def __init__(self, num_domains: int, domain_ids: dict[int, list[int]], old_ids: dict[int, list[int]],
                 cases: dict[int, set[str]]) -> None:
        self.num_domains = num_domains
        self.cases = cases
        #: head-channel positions (1-based, domain-local) of each such domain's old classes, in old order
        self.positions = {d: [1 + domain_ids[d].index(u) for u in old_ids[d]] for d in old_ids}
        self.old_ids = old_ids

    def key(self, d: int) -> int:
        """Loss key of domain ``d``'s partially annotated samples (beyond the real domains)."""
        return self.num_domains + d

    def split(self, out: Any, keys: Sequence[str]) -> Any:
        """``out`` (TrainOutput) with each partially annotated sample moved to its pseudo-domain, scored on the
        marginal of its domain's head; a shallow copy, ``out`` itself is unchanged."""
        if not self.cases or not keys:
            return out
        samples, heads = dict(out.samples), [dict(h) for h in out.heads]
        for d, cases in self.cases.items():
            if d not in samples:
                continue
            idx = samples[d]
            part = torch.tensor([str(keys[i]) in cases for i in idx.tolist()], device=idx.device)
            if not bool(part.any()):
                continue
            samples[d], samples[self.key(d)] = idx[~part], idx[part]
            for h, per_scale in zip(heads, out.heads, strict=True):
                logits = per_scale[d]
                h[d] = logits[~part.to(logits.device)]
                h[self.key(d)] = marginal_logits(logits[part.to(logits.device)], self.positions[d])
        return type(out)(heads=heads, samples=samples, gate_logits=out.gate_logits, embedding=out.embedding,
                         union=out.union)


def register_partial_luts(loss: nn.Module, partial: PartialCases, num_union: int,
                          ignore_label: int | None) -> None:
    """Give the stock loss a label table (union id -> local id) and a name for each pseudo-domain."""
    for d, ids in partial.old_ids.items():
        loss.register_buffer(f"lut_{partial.key(d)}", local_label_lut(ids, num_union, ignore_label), persistent=False)
    names = list(loss.domain_names)[:partial.num_domains]
    loss.domain_names = names + [f"{n} (cases annotating its old classes only)" for n in names]


def distillation_term(student: Tensor, teacher: Tensor, domain: Tensor, old_domains: Sequence[int],
                      sizes: Sequence[int], temperature: float = 2.0) -> Tensor:
    """Mean over old domains d of ``T^2 KL(teacher_d || student_d)`` on the samples whose domain is not d.

    student, teacher: (B, sum_d (1 + K_d), *spatial) full head logits (every domain's channels); domain: (B,).
    """
    offsets = [sum(sizes[:d]) for d in range(len(sizes))]
    terms = []
    for d in old_domains:
        rows = domain != d
        if not bool(rows.any()):
            continue
        sl = slice(offsets[d], offsets[d] + sizes[d])
        s = F.log_softmax(student[rows, sl].float() / temperature, dim=1)
        t = F.log_softmax(teacher[rows, sl].float() / temperature, dim=1)
        kl = F.kl_div(s, t, log_target=True, reduction="none").sum(1)  # (n, *spatial)
        terms.append(kl.mean() * temperature**2)
    return torch.stack(terms).mean() if terms else student.new_zeros((), dtype=torch.float32)


def prototype_replay_term(router: nn.Module, old_domains: Sequence[int]) -> Tensor:
    """Cross-entropy of the routing log-weights of the old domains' (initialized) prototypes with those domains."""
    rows = [d for d in old_domains if bool(router.prototype_initialized[d])]
    if not rows:
        return router.prototypes.new_zeros(())
    idx = torch.tensor(rows, device=router.prototypes.device)
    phi = router.prototypes[idx].detach().float()
    return F.cross_entropy(router.routing_logits(phi), idx)


class ExtensionLoss(nn.Module):
    """The universal trainer's loss plus the extension terms (module docstring); called like it.

    ``base``: the trainer's :class:`PartialLabelLoss` (its ``domain_logits``/``lut``/``groups`` serve the
    validation step, unchanged). ``extra``: a callable ``(out, domain) -> Tensor`` adding distillation and prototype
    replay (None: no extra term). ``gate_target``: a callable ``domain (B,) -> (B,)`` giving the gate loss's targets,
    ``IGNORE_GATE`` for samples the gate must not learn from (a new domain's samples whose new slots were hidden:
    the new-slot prior says such a scan is not routed to it), passed to the base loss (None: every sample).
    """

    def __init__(self, base: nn.Module, partial: PartialCases | None,
                 extra: Callable[[Any, Tensor], Tensor] | None = None,
                 gate_target: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.base = base
        self.partial = partial
        self.extra = extra
        self.gate_target = gate_target

    # the validation step's view of the stock loss
    def domain_logits(self, out: Any, scale: int, domain: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
        return self.base.domain_logits(out, scale, domain)

    def lut(self, d: int) -> Tensor:
        return self.base.lut(d)

    def groups(self, out: Any, domain: Tensor) -> dict[int, Tensor]:
        return self.base.groups(out, domain)

    def forward(self, out: Any, targets: Sequence[Tensor], domain: Tensor, keys: Sequence[str] = ()) -> Tensor:
        scored = self.partial.split(out, keys) if self.partial is not None else out
        if self.gate_target is None:
            total = self.base(scored, targets, domain, keys)
        else:
            total = self.base(scored, targets, domain, keys, gate_target=self.gate_target(domain))
        if self.extra is not None:
            total = total + self.extra(out, domain)
        return total
