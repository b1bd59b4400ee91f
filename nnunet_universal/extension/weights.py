"""Grow a trained universal network's state dict to an extended one (new slots, domains and classes).

The extended network is built from the extended plans, so its state dict is the target: every tensor whose shape
did not change is copied; the few that depend on the slots, domains or classes are copied where they overlap and
initialized so that the old model's function is unchanged at step 0 for old-domain inputs:

* first convolution ``(F0, C, *k)``: a column per slot; a new slot's columns are **zero** (for old-domain inputs
  the new slot is missing, i.e. zero, anyway; zero weights also keep new-domain inputs from starting with noise);
* heads ``heads.heads.{s}`` ``(sum_d (1 + K_d), F_s, 1..)``: old channels moved to their new place; a new
  domain's channels start as the old domain's whose class names overlap most (background from its background,
  each class from the class of the same name; e.g. a new metastasis dataset's ET from an old one's ET), the rest
  keep the fresh He init of the new network (a new domain's routing weight starts below ``exp(-offset)``, so this
  does not change the old model's function at step 0); a new class of an old domain copies that domain's
  background row with its bias lowered by ``offset`` (its logit is the background's minus ``offset``, so the
  domain's softmax changes by at most ``exp(-offset)``);
* gate ``router.gate`` ``(D, F)``: the gate's embedding phi ends in the slot-availability vector (one entry per
  slot, ``universal_unet.gate_embedding``), so a new slot adds a zero column; a new domain's row is the mean of
  the old rows, its bias lowered by ``offset + s`` (s: the router's similarity scale; an old domain's routing
  log-weight ``log_softmax(gate) + s cos`` is at least its gate term minus s, and the new domain's uninitialized
  prototype adds 0), so its routing weight starts below ``exp(-offset)`` for any input: hard routing of
  old-domain inputs is unchanged and soft routing changes by less than that. The extension trainer then sets
  the row's bias from the new domain's first training samples (``extension/gate_calibration.py``: the gate loss
  alone cannot climb ``offset + s`` nats in a short schedule) and the gate loss refines it; the training log
  says what the calibration did and gives the per-epoch gate accuracy;
* prototypes ``(D, F)``: old rows copied (zero in a new slot's column); a new domain's prototype is not
  initialized (``prototype_initialized`` False: similarity 0, set from its first training batch);
* prompts (``UniversalTrainer_Prompts``): per-slot and per-domain columns and rows mapped the same way, new ones
  zero (the prompts' last layer starts at zero, i.e. as the identity, anyway).

Any other tensor whose shape changed is an error naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from nnunet_universal.metadata import UniversalMeta
from nnunet_universal.nn.gating import DomainRouter

#: how far below the old logits a new domain's gate logit and a new class's head logit start (exp(-10) ~ 4.5e-5)
DEFAULT_OFFSET = 10.0


@dataclass
class GrowthMap:
    """Index maps from the old network's slots, domains and head channels to the new network's."""

    slots: list[int]  # old slot i -> new slot index
    domains: list[int]  # old domain d -> new domain index
    head_channels: list[int]  # old head channel -> new head channel
    new_class_channels: dict[int, int]  # new head channel of a new class of an old domain -> that domain's bg channel
    borrowed_channels: dict[int, int]  # new domain's head channel -> old head channel it starts from (class names)
    num_slots: tuple[int, int]
    num_domains: tuple[int, int]
    num_head_channels: tuple[int, int]

    @classmethod
    def between(cls, old: UniversalMeta, new: UniversalMeta) -> GrowthMap:
        missing = [s for s in old.slots if s not in new.slots] + [d for d in old.domains if d not in new.domains]
        if missing:
            raise ValueError(f"the extended model drops {missing} of the old model; extensions only add")
        slots = [new.slots.index(s) for s in old.slots]
        domains = [new.domain_names.index(d) for d in old.domain_names]
        offsets, start = _head_offsets(new)
        head, new_class = [], {}
        for d in old.domain_names:
            names_new = list(new.domains[d].labels)
            if [new.domains[d].labels[c] for c in old.domains[d].labels] != list(old.domains[d].labels.values()):
                raise ValueError(f"domain {d!r}: the extension changes the union ids of its classes")
            head.append(offsets[d])  # background
            head += [offsets[d] + 1 + names_new.index(c) for c in old.domains[d].labels]
            for c in names_new:
                if c not in old.domains[d].labels:
                    new_class[offsets[d] + 1 + names_new.index(c)] = offsets[d]
        borrowed = _borrowed_head_channels(old, new, offsets)
        return cls(slots, domains, head, new_class, borrowed, (len(old.slots), len(new.slots)),
                   (len(old.domains), len(new.domains)), (_head_offsets(old)[1], start))


def new_domain_slots(old: UniversalMeta, new: UniversalMeta) -> dict[str, list[str]]:
    """Each domain of ``new`` that ``old`` lacks -> its slots that ``old`` lacks (possibly none): the sequences no
    old-domain scan has, which the new-slot prior keys on (``extension/gate_calibration.py``)."""
    return {d: [s for s in info.slots if s not in old.slots] for d, info in new.domains.items() if d not in old.domains}


def _head_offsets(meta: UniversalMeta) -> tuple[dict[str, int], int]:
    """Each domain's first head channel (its background; the heads' layout: per domain 1 + K_d channels, in
    domain order) and the total number of head channels."""
    offsets, start = {}, 0
    for d in meta.domain_names:
        offsets[d] = start
        start += 1 + len(meta.domains[d].labels)
    return offsets, start


def _borrowed_head_channels(old: UniversalMeta, new: UniversalMeta, offsets: dict[str, int]) -> dict[int, int]:
    """For each new domain, the old domain whose class names overlap most (Jaccard; ties: the first) lends its
    head: new background <- its background, each class of the same name <- its channel. {new ch: old ch}."""
    old_offsets = _head_offsets(old)[0]
    out: dict[int, int] = {}
    for n in new.domain_names:
        if n in old.domains:
            continue
        names = set(new.domains[n].labels)
        score = {d: len(names & set(old.domains[d].labels)) / len(names | set(old.domains[d].labels))
                 for d in old.domain_names}
        src = max(old.domain_names, key=lambda d: score[d]) if score else None
        if src is None or score[src] == 0:
            continue
        out[offsets[n]] = old_offsets[src]
        src_names = list(old.domains[src].labels)
        for k, c in enumerate(new.domains[n].labels):
            if c in old.domains[src].labels:
                out[offsets[n] + 1 + k] = old_offsets[src] + 1 + src_names.index(c)
    return out


def _first_conv_keys(net: nn.Module) -> set[str]:
    """State-dict keys of the encoder's first convolution's weight (registered several times: nnU-Net's conv
    blocks list it twice, and the decoder holds the encoder)."""
    first = next(m for m in net.encoder.modules() if isinstance(m, _ConvNd))
    return {f"{n}.weight" for n, m in net.named_modules(remove_duplicate=False) if m is first}


def _similarity_scale(sd: dict[str, Tensor]) -> float:
    """The router's learned similarity scale s (``DomainRouter.scale``) in a state dict."""
    lo, hi = DomainRouter.SCALE_RANGE
    return float(sd["router.log_scale"].float().clamp(math.log(lo), math.log(hi)).exp())


def _scatter(new: Tensor, old: Tensor, dim: int, index: list[int]) -> Tensor:
    """Copy of ``new`` with ``old``'s slices along ``dim`` written at ``index`` (same size elsewhere)."""
    out = new.clone()
    out.index_copy_(dim, torch.tensor(index, dtype=torch.long), old.to(out.dtype))
    return out


def grow_state_dict(old_sd: dict[str, Tensor], new_net: nn.Module, old_meta: UniversalMeta, new_meta: UniversalMeta,
                    offset: float = DEFAULT_OFFSET) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The new network's state dict filled from the old one (module docstring); returns it and, per key that
    was not copied verbatim, what was done (for the extension report)."""
    g = GrowthMap.between(old_meta, new_meta)
    new_sd = {k: v.detach().clone() for k, v in new_net.state_dict().items()}
    (s_old, s_new), (d_old, d_new) = g.num_slots, g.num_domains
    first_conv = _first_conv_keys(new_net)
    done: dict[str, str] = {}
    out: dict[str, Tensor] = {}
    for key, target in new_sd.items():
        if key not in old_sd:
            out[key] = target
            done[key] = "new (fresh init)"
            continue
        src = old_sd[key].detach().cpu()
        if src.shape == target.shape:
            out[key] = src.clone()
            continue
        if key in first_conv:  # (F0, C, *k): new slots' columns zero
            out[key] = _scatter(torch.zeros_like(target), src, 1, g.slots)
            done[key] = "input channels of new slots set to zero"
        elif key.startswith("heads.heads."):  # (sum(1+K_d), F, 1..) or bias (sum(1+K_d),)
            t = _scatter(target, src, 0, g.head_channels)
            for ch, bg in g.new_class_channels.items():
                t[ch] = t[bg] - (offset if key.endswith(".bias") else 0.0)
            for ch, old_ch in g.borrowed_channels.items():
                t[ch] = src[old_ch].to(t.dtype)
            out[key] = t
            done[key] = "old heads' channels moved; new domains' heads from the old domain with the most classes of " \
                        f"the same name, else fresh; new classes of old domains start {offset} below background"
        elif key == "router.gate.weight":  # (D, F): phi ends in the availability vector (slots)
            prefix = src.shape[1] - s_old
            if target.shape[1] - s_new != prefix:
                raise ValueError(f"{key}: the gate's embedding changed beyond the slots ({src.shape} -> "
                                 f"{tuple(target.shape)}); was the architecture changed?")
            cols = list(range(prefix)) + [prefix + i for i in g.slots]
            wide = _scatter(torch.zeros(d_old, target.shape[1]), src, 1, cols)
            t = wide.mean(0, keepdim=True).repeat(d_new, 1)
            t.index_copy_(0, torch.tensor(g.domains), wide)
            out[key] = t
            done[key] = "old rows kept (zero for new slots); new domains: mean of the old rows"
        elif key == "router.gate.bias":  # below by offset + s: an old domain's similarity term is >= -s
            scale = _similarity_scale(old_sd)
            t = torch.full((d_new,), float(src.mean()) - offset - scale)
            t.index_copy_(0, torch.tensor(g.domains), src.float())
            out[key] = t.to(target.dtype)
            done[key] = f"new domains start {offset} + s = {offset + scale:.2f} below the mean old bias"
        elif key == "router.prototypes":
            prefix = src.shape[1] - s_old
            cols = list(range(prefix)) + [prefix + i for i in g.slots]
            wide = _scatter(torch.zeros(d_old, target.shape[1], dtype=target.dtype), src, 1, cols)
            out[key] = _scatter(torch.zeros_like(target), wide, 0, g.domains)
            done[key] = "old prototypes kept; new domains' not initialized"
        elif key == "router.prototype_initialized":
            out[key] = _scatter(torch.zeros_like(target), src, 0, g.domains)
        elif key.startswith("modality_prompt.film.net.0.") and key.endswith("weight"):  # (hidden, C)
            out[key] = _scatter(torch.zeros_like(target), src, 1, g.slots)
            done[key] = "new slots' columns zero"
        elif key.startswith("modality_prompt.film.net.2."):  # rows: gain (C) then shift (C)
            rows = g.slots + [s_new + i for i in g.slots]
            out[key] = _scatter(torch.zeros_like(target), src, 0, rows)
            done[key] = "new slots' gain and shift zero"
        elif key.startswith("task_prompt.film.net.0.") and key.endswith("weight"):  # (hidden, D)
            out[key] = _scatter(torch.zeros_like(target), src, 1, g.domains)
            done[key] = "new domains' columns zero"
        else:
            raise ValueError(f"cannot grow {key}: {tuple(src.shape)} in the old model, {tuple(target.shape)} in the "
                             "extended one (only slots, domains and classes may change)")
    missing = sorted(set(old_sd) - set(new_sd))
    if missing:
        raise ValueError(f"the extended network lacks weights of the old one: {missing[:5]}")
    return out, done
