"""Per-domain segmentation heads and their mixture into the union label space (U-Harmony §2.2).

Also the two maps from union logits to one domain's labels that training (marginal loss) and inference (oracle
mode of union-head models) share: :func:`marginal_logits` and :func:`restrict_to_domain`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: Probability floor of the union mixture: classes no routed head predicts get log(1e-8) ~ -18.4, a finite
#: logit, so that nnU-Net's softmax/argmax and fp16 accumulators never see -inf.
MIN_PROBABILITY = 1e-8


def validate_domains(domains: list[list[int]], num_union_labels: int) -> list[list[int]]:
    """Check that each domain lists distinct union ids in 1..num_union_labels-1; return them as ints."""
    if not domains:
        raise ValueError("the universal network needs at least one domain")
    out = []
    for d, ids in enumerate(domains):
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError(f"domain {d} has no labels; every domain needs at least one foreground class")
        bad = [i for i in ids if not 0 < i < num_union_labels]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"domain {d}: union label ids {ids} must be distinct and in 1..{num_union_labels - 1}")
        out.append(ids)
    return out


class DomainHeads(nn.Module):
    """One light 1x1 head per domain and per deep-supervision scale (domain ``d``: background + its K_d classes).

    The heads of one scale are stored as one convolution with ``sum_d (1 + K_d)`` output channels: one pass
    over the features, and every head takes part in every step's graph (DDP needs no
    ``find_unused_parameters``). ``domains[d][k]`` is the union id of head channel ``k + 1`` of domain ``d``.
    """

    def __init__(self, conv_op: type[nn.Module], scale_channels: list[int], domains: list[list[int]],
                 num_union_labels: int) -> None:
        super().__init__()
        self.domains = validate_domains(domains, num_union_labels)
        self.sizes = [1 + len(ids) for ids in self.domains]
        total = sum(self.sizes)
        self.heads = nn.ModuleList([conv_op(c, total, 1, 1, 0, bias=True) for c in scale_channels])
        union_map = torch.zeros(num_union_labels, total)
        channel_domain = torch.zeros(total, dtype=torch.long)
        offset = 0
        for d, ids in enumerate(self.domains):
            union_map[0, offset] = 1.0
            for k, uid in enumerate(ids):
                union_map[uid, offset + 1 + k] = 1.0
            channel_domain[offset:offset + self.sizes[d]] = d
            offset += self.sizes[d]
        # derived from the constructor arguments: not part of the state dict
        self.register_buffer("union_map", union_map, persistent=False)
        self.register_buffer("channel_domain", channel_domain, persistent=False)
        self.offsets = [sum(self.sizes[:d]) for d in range(len(self.sizes))]
        self._single_maps: dict[tuple[int, torch.device], Tensor] = {}

    def logits(self, feat: Tensor, scale: int) -> Tensor:
        """feat: (B, C_s, *s) decoder features of DS scale ``scale`` (0 = highest resolution) -> (B, sum(1+K_d), *s)."""
        return self.heads[scale](feat)

    def split(self, logits: Tensor) -> list[Tensor]:
        """(B, sum(1+K_d), *s) -> per domain (B, 1+K_d, *s) logits."""
        return list(torch.split(logits, self.sizes, dim=1))

    def mix(self, logits: Tensor, weights: Tensor) -> Tensor:
        """Union-space log-probabilities (B, U, *s) of the heads' mixture with weights (B, D).

        ``p[0] = sum_d r_d p_d[0]``; ``p[id] = sum_{d: id in d} r_d p_d[k]``; returns ``log(max(p, 1e-8))``.
        Computed in fp32 (also under autocast).
        """
        with torch.autocast(device_type=logits.device.type, enabled=False):
            probs = torch.cat([torch.softmax(part.float(), dim=1) for part in self.split(logits)], dim=1)
            w = weights.float()[:, self.channel_domain]  # (B, S)
            probs.mul_(w.view(*w.shape, *([1] * (logits.ndim - 2))))
            union = torch.matmul(self.union_map, probs.flatten(2))  # (U, S) @ (B, S, N) -> (B, U, N)
            return union.clamp_min_(MIN_PROBABILITY).log_().view(logits.shape[0], -1, *logits.shape[2:])


    def single(self, logits: Tensor, domain: int) -> Tensor:
        """:meth:`mix` with all weight on ``domain`` (hard routing, oracle): that head alone, the same values
        (every union channel of the mixture is one head probability times 1, or 0) with a third of the operations.
        """
        with torch.autocast(device_type=logits.device.type, enabled=False):
            part = logits.narrow(1, self.offsets[domain], self.sizes[domain])
            probs = torch.softmax(part if part.dtype == torch.float32 else part.float(), dim=1)
            union = torch.matmul(self._single_map(domain, logits.device), probs.flatten(2))  # (B, U, N)
            return union.clamp_min_(MIN_PROBABILITY).log_().view(logits.shape[0], -1, *logits.shape[2:])

    @property
    def num_pass_channels(self) -> int:
        """Channels of :meth:`all_log_probs`: every head's channels and one constant channel."""
        return sum(self.sizes) + 1

    def all_log_probs(self, logits: Tensor) -> Tensor:
        """(B, sum(1+K_d), *s) -> (B, sum(1+K_d) + 1, *s): every head's log-probabilities (floored at
        ``MIN_PROBABILITY`` like :meth:`single`) and a last channel ``log(MIN_PROBABILITY)``.

        What the one-pass dataset-free prediction aggregates over the tiles before the case's domain is known:
        :meth:`union_from_all` then picks one head. Every channel holds the same values as :meth:`single` gives
        that head's union channels (softmax of the same view, floor, log; the union map only copies), and the
        constant channel the value :meth:`single` gives the union channels the domain does not annotate.
        """
        with torch.autocast(device_type=logits.device.type, enabled=False):
            parts = [torch.softmax(p if p.dtype == torch.float32 else p.float(), dim=1) for p in self.split(logits)]
            floor = parts[0].new_full((logits.shape[0], 1, *logits.shape[2:]), MIN_PROBABILITY)
            return torch.cat([*parts, floor], dim=1).clamp_min_(MIN_PROBABILITY).log_()

    def union_from_all(self, aggregated: Tensor, domain: int) -> Tensor:
        """(sum(1+K_d) + 1, *s) channels of :meth:`all_log_probs` (aggregated over tiles by any per-channel linear
        rule) -> (U, *s) union channels of ``domain``'s head, as :meth:`single` would have given them: its channel
        ``k`` goes to its union id, background to 0, every other union channel takes the constant channel."""
        index = torch.full((self.union_map.shape[0],), self.num_pass_channels - 1, dtype=torch.long)
        index[0] = self.offsets[domain]
        for k, uid in enumerate(self.domains[domain]):
            index[uid] = self.offsets[domain] + 1 + k
        return aggregated.index_select(0, index.to(aggregated.device))

    def _single_map(self, domain: int, device: torch.device) -> Tensor:
        """The (U, 1 + K_d) columns of ``union_map`` of one domain, made once per device."""
        key = (domain, device)
        m = self._single_maps.get(key)
        if m is None:
            with torch.inference_mode(False):  # a normal tensor even when first made under inference mode
                m = self._single_maps[key] = self.union_map.narrow(1, self.offsets[domain],
                                                                   self.sizes[domain]).to(device).contiguous()
        return m


def marginal_logits(union_logits: Tensor, label_ids: Sequence[int]) -> Tensor:
    """Union logits ``(n, U, *spatial)`` -> marginal logits ``(n, 1 + K, *spatial)`` of one domain.

    Channel 0 is the log-sum-exp of background and every union class the domain does not annotate, channel
    k+1 the logit of ``label_ids[k]``; their softmax equals the union softmax with the unannotated
    probabilities summed into background (the marginal distribution).
    """
    ids = [int(i) for i in label_ids]
    others = [c for c in range(union_logits.shape[1]) if c not in set(ids)]  # includes background 0
    bg = torch.logsumexp(union_logits[:, others], dim=1, keepdim=True)
    return torch.cat([bg, union_logits[:, ids]], dim=1)


def restrict_to_domain(logits: Tensor, label_ids: Sequence[int]) -> Tensor:
    """Union logits ``(U, *spatial)`` -> union logits whose argmax only yields background or ``label_ids``.

    Background becomes the log-sum-exp of background and every class outside ``label_ids`` (the marginal
    distribution of the domain), every class outside ``label_ids`` gets -inf.
    """
    merged = marginal_logits(logits[None].float(), label_ids)[0]  # (1 + K, *spatial)
    out = torch.full_like(logits, float("-inf"), dtype=torch.float32)
    out[0] = merged[0]
    out[[int(i) for i in label_ids]] = merged[1:]
    return out
