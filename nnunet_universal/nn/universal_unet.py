"""UniversalUNet: nnU-Net's planned U-Net with U-Harmony, prompts and the domain-gated head (DESIGN §5).

The planned network (PlainConvUNet or ResidualEncoderUNet from dynamic-network-architectures, 2D or 3D,
as ``get_network_from_plans`` builds it) is used as is: its ``encoder`` and ``decoder`` become this
module's ``encoder`` and ``decoder`` (so state-dict keys and ``decoder.deep_supervision`` stay nnU-Net's),
its InstanceNorms are swapped for HarmonyNorm, HarmonyRestore runs as a forward hook after each decoder
stage, and (domain heads) the decoder's ``seg_layers`` become identities so that the decoder returns its
features, which the per-domain heads turn into union-space log-probabilities.

Forward contract::

    net(x)                                  # union log-probs (B, U, *patch), or a list (deep supervision)
    net(x, domain=d, availability=a)        # oracle: that domain's head mapped to union space
    net(x, routing=r)                       # fixed (case-level) routing weights (B, D)
    net.forward_train(x, domain, availability) -> TrainOutput
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from nnunet_universal.metadata import NetworkOptions, read_plans_universal
from nnunet_universal.nn.availability import derive_availability
from nnunet_universal.nn.case_embedding import CaseEmbedding
from nnunet_universal.nn.encoding_cache import CachedEncoding, EncodingCache
from nnunet_universal.nn.gating import DomainRouter, uniform_routing
from nnunet_universal.nn.harmony import MAX_ORDER, STABLE_MAX_ORDER, HarmonyNorm, HarmonyRestore, stats_bc1
from nnunet_universal.nn.heads import DomainHeads, validate_domains
from nnunet_universal.nn.injection import encoder_stage_scopes, inject_harmony
from nnunet_universal.nn.prompts import ModalityPrompt, TaskPrompt

logger = logging.getLogger(__name__)


@dataclass
class TrainOutput:
    """What :meth:`UniversalUNet.forward_train` returns to the trainer's loss."""

    heads: Sequence[Mapping[int, Tensor]]  # per DS scale (highest res first): domain -> (n_d, 1+K_d, *s) logits
    samples: Mapping[int, Tensor]  # domain -> (n_d,) long indices of the batch samples of that domain
    gate_logits: Tensor | None  # (B, D), None without gate
    embedding: Tensor  # (B, F) the gate's embedding phi (pooled bottleneck features when there is no gate)
    union: list[Tensor] | None  # per-scale union logits (head == "union"; heads is empty then)
    #: per DS scale, every domain head's logits of every sample (B, sum_d (1 + K_d), *s) (domain heads); ``heads``
    #: selects from them when first read (the grouped loss reads these instead: no per-domain operations)
    logits: list[Tensor] | None = None


class DomainSamples(Mapping):
    """domain -> (n_d,) long indices of its samples on the device, from a host copy of the batch's domains; each
    index tensor is made when first read (nothing is dispatched for a step whose loss does not read them)."""

    def __init__(self, domain_host: Tensor, device: torch.device) -> None:
        import numpy as np

        values = domain_host.numpy()
        self._host = {int(d): np.flatnonzero(values == d) for d in np.unique(values)}
        self._device = device
        self._made: dict[int, Tensor] = {}

    def __getitem__(self, d: int) -> Tensor:
        t = self._made.get(d)
        if t is None:
            t = self._made[d] = torch.from_numpy(self._host[d]).to(self._device, non_blocking=True)
        return t

    def __iter__(self) -> Iterator[int]:
        return iter(self._host)

    def __len__(self) -> int:
        return len(self._host)


class DomainHeadLogits(Sequence):
    """``TrainOutput.heads``: per DS scale, domain -> its head's logits of its samples, selected from the full head
    outputs when a scale is first read."""

    def __init__(self, logits: list[Tensor], sizes: list[int], samples: Mapping[int, Tensor]) -> None:
        self._logits, self._sizes, self._samples = logits, sizes, samples
        self._made: dict[int, dict[int, Tensor]] = {}

    def __len__(self) -> int:
        return len(self._logits)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        i = range(len(self))[i]
        made = self._made.get(i)
        if made is None:
            per_domain = torch.split(self._logits[i], self._sizes, dim=1)
            made = self._made[i] = {d: per_domain[d][idx] for d, idx in self._samples.items()}
        return made


def _check_options(options: NetworkOptions) -> None:
    if options.head not in ("domain", "union"):
        raise ValueError(f"NetworkOptions.head must be 'domain' or 'union', got {options.head!r}")
    if options.routing not in ("soft", "hard"):
        raise ValueError(f"NetworkOptions.routing must be 'soft' or 'hard', got {options.routing!r}")
    if not 0.0 < options.routing_confidence <= 1.0:
        raise ValueError(f"NetworkOptions.routing_confidence must be in (0, 1], got {options.routing_confidence}")
    if options.harmony_stages not in ("all", "first"):
        raise ValueError(f"NetworkOptions.harmony_stages must be 'all' or 'first', got {options.harmony_stages!r}")
    if not 1 <= options.harmony_order <= MAX_ORDER:
        raise ValueError(f"NetworkOptions.harmony_order must be in 1..{MAX_ORDER}, got {options.harmony_order}")
    if options.prompt_hidden < 1:
        raise ValueError(f"NetworkOptions.prompt_hidden must be >= 1, got {options.prompt_hidden}")
    if options.harmony and options.polynomial and options.harmony_order > STABLE_MAX_ORDER:
        logger.warning("harmony_order=%d is above %d, the largest order that trained stably in the measured proxy "
                       "(scripts/benchmark_network.py --quality); expect divergence", options.harmony_order,
                       STABLE_MAX_ORDER)


def first_norm(encoder: nn.Module) -> nn.Module:
    """The encoder's first normalization layer (HarmonyNorm after injection, else the planned norm_op)."""
    kinds = tuple(k for k in (HarmonyNorm, getattr(encoder, "norm_op", None)) if isinstance(k, type))
    for m in encoder.modules():
        if isinstance(m, kinds):
            return m
    raise TypeError("the planned encoder has no normalization layer to take the gate's style statistics from")


def style_norms(encoder: nn.Module) -> list[nn.Module]:
    """The normalizations whose input statistics describe a case's appearance (DESIGN §5.3): the encoder's first
    one, then the last one of every encoder stage (outside residual shortcuts), in execution order."""
    kinds = tuple(k for k in (HarmonyNorm, getattr(encoder, "norm_op", None)) if isinstance(k, type))
    norms = [first_norm(encoder)]
    for scope in encoder_stage_scopes(encoder):
        last = None
        for name, m in scope.named_modules():
            if isinstance(m, kinds) and "skip" not in name.split("."):
                last = m
        if last is None:
            raise TypeError("an encoder stage of the planned network has no normalization layer")
        norms.append(last)
    return norms


def embedding_size(encoder: nn.Module, num_slots: int) -> int:
    """F of :func:`gate_embedding` for a planned encoder: bottleneck channels + 2 x the channels of every style
    normalization (:func:`style_norms`: first norm, then each stage's last) + slots."""
    stage_channels = [int(c) for c in encoder.output_channels]
    return stage_channels[-1] + 2 * stage_channels[0] + 2 * sum(stage_channels) + num_slots


#: parts of phi, each L2-normalized and scaled by 1 / sqrt(parts): pooled, first style, stage styles, slots
EMBEDDING_PARTS = 4


def smallest_present_slot_value(num_slots: int) -> float:
    """The smallest value a present slot's availability entry of phi takes: ``1 / sqrt(parts * C)``, when all C
    slots are present (the availability part is normalized like every part, so each of ``n`` present slots holds
    ``1 / sqrt(parts * n)``)."""
    return 1.0 / math.sqrt(EMBEDDING_PARTS * num_slots)


def gate_embedding(pooled: Tensor, styles: list[Tensor | None], availability: Tensor) -> Tensor:
    """The gate's embedding phi (B, F): pooled bottleneck features, the style statistics of the first
    normalization's input, those of every encoder stage's last normalization, and the slots present; each part
    L2-normalized so that each weighs equally in the prototypes' cosine similarity.

    Pooled features alone are nearly input-independent: every stage ends in an instance normalization, which
    removes each channel's mean and scale, exactly where the domain's appearance lives (the demo's gate stayed
    at chance with them). The per-channel mean and log-std of the normalizations' *inputs* keep that appearance,
    at every scale (the feature statistics style-transfer and domain-classification work use), so that datasets
    with the same sequences but another scanner, contrast or resolution can still be told apart.
    styles: (B, 2 C) per style normalization, in :func:`style_norms` order.
    """
    if not styles or any(st is None for st in styles):
        raise RuntimeError("the gate's style statistics were not recorded; call the encoder through UniversalUNet")
    # one concatenation and one segmented normalization instead of one F.normalize per part (host time): the same
    # p / max(||p||, 1e-12) per part up to float round-off; the norm's floor is applied to its square, so that a
    # zero part has a zero (not NaN) gradient through its norm, as with F.normalize
    sizes = (pooled.shape[1], styles[0].shape[1], sum(st.shape[1] for st in styles[1:]), availability.shape[1])
    member, index = _segments(sizes, pooled.device)
    v = torch.cat([_float(pooled), *(_float(st) for st in styles), availability.to(torch.float32)], dim=1)
    norms = torch.mm(v * v, member).clamp_min(1e-24).sqrt()  # (B, parts)
    return v / norms.index_select(1, index) / math.sqrt(EMBEDDING_PARTS)  # sizes: the four parts


def harmony_gate_embedding(pooled: Tensor, stats: list[tuple[Tensor, Tensor]], availability: Tensor) -> Tensor:
    """:func:`gate_embedding` from HarmonyNorm statistics: ``stats`` = ``(mean, rstd)`` (B, C_i, 1) per style
    normalization (log-std = -log(rstd)); availability (B, C) float. The same phi to float round-off in a dozen
    operations whatever the number of stages (host time): one concatenation of the statistics, one log selected
    where the rstd are, one concatenation with the rest, and the per-part normalization as two matrix products
    (sums of squares per part; each part's norm back onto its entries, with the log-std's sign and the 1/2 of
    the four parts folded in: exact, every column has one entry +-2).
    """
    b = pooled.shape[0]
    layout = _harmony_layout(tuple(int(m.shape[1]) for m, _ in stats), int(pooled.shape[1]),
                             int(availability.shape[1]), pooled.device)
    raw = torch.cat([t for pair in stats for t in pair], dim=1)  # (B, S, 1): mean_0, rstd_0, mean_1, rstd_1, ...
    styles = torch.where(layout[0], raw.log(), raw).view(b, -1)  # log(rstd) = -log-std: the sign is in layout[2]
    v = torch.cat([_float(pooled), styles, _float(availability)], dim=1)
    norms = torch.mm(v * v, layout[1]).clamp_min(1e-24).sqrt()  # (B, 4)
    return v / torch.mm(norms, layout[2])


_HARMONY_LAYOUTS: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def _harmony_layout(style_channels: tuple[int, ...], pooled: int, slots: int,
                    device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(rstd entries (S, 1) bool, part membership (F, 4), signed part expansion (4, F)) of
    :func:`harmony_gate_embedding`, made once per layout."""
    key = (style_channels, pooled, slots, device)
    layout = _HARMONY_LAYOUTS.get(key)
    if layout is None:
        with torch.inference_mode(False):  # normal tensors even when first made under inference mode
            is_log = torch.cat([torch.arange(2 * c) >= c for c in style_channels]).unsqueeze(1)
            sizes = (pooled, 2 * style_channels[0], 2 * sum(style_channels[1:]), slots)
            member, _ = _segments(sizes, device)
            sign = torch.cat([torch.ones(pooled), torch.where(is_log[:, 0], -1.0, 1.0), torch.ones(slots)])
            expand = member.T.cpu() * (sign * math.sqrt(EMBEDDING_PARTS))  # sqrt(4) = 2: exact
            layout = _HARMONY_LAYOUTS[key] = (is_log.to(device), member, expand.contiguous().to(device))
    return layout


def _embedding(pooled: Tensor, styles: list[Any], availability: Tensor) -> Tensor:
    """phi from the recorded styles: HarmonyNorm statistics (tuples) or InstanceNorm style vectors (B, 2 C)."""
    if styles and all(isinstance(st, tuple) for st in styles):
        return harmony_gate_embedding(pooled, styles, availability)
    return gate_embedding(pooled, [style_vector(st) for st in styles], availability)


def style_vector(style: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """A recorded style as (B, 2 C) (mean, log-std): HarmonyNorm statistics (mean, rstd) are converted."""
    if isinstance(style, tuple):
        return torch.cat([style[0].flatten(1), style[1].log().neg().flatten(1)], dim=1)
    return style


_SEGMENT_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


def _segments(sizes: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """(membership (F, P) float, part index (F,) long) of consecutive parts of ``sizes``; made once per layout."""
    key = (sizes, device)
    seg = _SEGMENT_CACHE.get(key)
    if seg is None:
        with torch.inference_mode(False):  # normal tensors even when first made under inference mode
            index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)
            seg = _SEGMENT_CACHE[key] = (F.one_hot(index, len(sizes)).float(), index)
    return seg


def _float(t: Tensor) -> Tensor:
    """``t.float()`` without dispatching a no-op cast (inference mode dispatches one)."""
    return t if t.dtype == torch.float32 else t.float()


def _plain(t: Tensor) -> Tensor:
    """``t.detach().float()``, dispatching only what changes something."""
    return _float(t.detach() if t.requires_grad else t)



def _fit(t: Tensor, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """``t.to(device, dtype).reshape(-1, *shape[1:]).expand(shape)``, each step only when it changes something."""
    if t.device != device or t.dtype != dtype:
        t = t.to(device=device, dtype=dtype)
    if t.ndim != len(shape) or t.shape[1:] != shape[1:]:
        t = t.reshape(-1, *shape[1:])
    return t if t.shape == shape else t.expand(shape)


class UniversalUNet(nn.Module):
    """One segmentation network for many partially labelled domains, wrapped around a planned nnU-Net U-Net.

    Args:
        backbone: the planned PlainConvUNet/ResidualEncoderUNet, built with ``num_classes = num_union_labels``.
        domains: ``domains[d]`` = union label ids of domain ``d``'s classes in head-channel order
            (head channel ``k + 1`` -> ``domains[d][k]``; channel 0 is background).
        num_union_labels: U, union labels including background.
        num_slots: C, input channels (modality slots).
        options: which modules are on (ablations switch them off one by one).
        harmony_kwargs: extra HarmonyNorm/HarmonyRestore settings for experiments (``basis``, ``poly_limit``;
            ``denominator_bound``, ``min_denominator`` go to HarmonyRestore only); defaults are the measured ones.
    """

    def __init__(self, backbone: nn.Module, domains: list[list[int]], num_union_labels: int, num_slots: int,
                 options: NetworkOptions, harmony_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        _check_options(options)
        encoder, decoder = getattr(backbone, "encoder", None), getattr(backbone, "decoder", None)
        if encoder is None or decoder is None or not hasattr(decoder, "seg_layers"):
            raise TypeError(f"UniversalUNet wraps dynamic-network-architectures U-Nets (PlainConvUNet, "
                            f"ResidualEncoderUNet); got {type(backbone).__name__}")
        first_conv = next(m for m in encoder.modules() if isinstance(m, _ConvNd))
        if first_conv.in_channels != num_slots:
            raise ValueError(f"the planned network takes {first_conv.in_channels} input channels but the plans "
                             f"list {num_slots} modality slots")
        if decoder.seg_layers[0].out_channels != num_union_labels:
            raise ValueError(f"the planned network predicts {decoder.seg_layers[0].out_channels} classes; build it "
                             f"with num_classes = num_union_labels = {num_union_labels}")
        self.options = options
        self.domains = validate_domains(domains, num_union_labels)
        self.num_domains = len(self.domains)
        self.num_union_labels = num_union_labels
        self.num_slots = num_slots
        self.union_head = options.head == "union"
        self.encoder = encoder
        self.decoder = decoder
        conv_op = encoder.conv_op
        n_stages = len(encoder.output_channels)

        # U-Harmony: HarmonyNorm everywhere (or in stage 0), HarmonyRestore after the matching decoder stages
        hk = dict(harmony_kwargs or {})
        restore_only = {k: hk.pop(k) for k in ("denominator_bound", "min_denominator") if k in hk}
        self._stat_norms: list[HarmonyNorm | None] = [None] * n_stages
        if options.harmony:
            self._stat_norms = inject_harmony(encoder, decoder, options.harmony_stages, options.harmony_order,
                                              options.polynomial, **hk)
        elif options.restore:
            logger.info("harmony is off: HarmonyRestore needs HarmonyNorm's statistics and is off too")
        self.restores = nn.ModuleDict()
        if options.harmony and options.restore:
            for s in range(len(decoder.stages)):
                k = n_stages - 2 - s  # decoder stage s merges the skip of encoder stage k
                if self._stat_norms[k] is not None:
                    self.restores[str(s)] = HarmonyRestore(encoder.output_channels[k], order=options.harmony_order,
                                                           polynomial=options.polynomial, **hk, **restore_only)
                    decoder.stages[s].register_forward_hook(functools.partial(self._restore_hook, s, k))

        self.modality_prompt = ModalityPrompt(num_slots, options.prompt_hidden) if options.modality_prompt else None
        self.heads: DomainHeads | None = None
        self.router: DomainRouter | None = None
        self.task_prompt: TaskPrompt | None = None
        if self.union_head:
            if options.gate or options.task_prompt:
                logger.info("head='union': one plain head on the union labels, no gate and no task prompt")
        else:
            decoder.seg_layers = nn.ModuleList([nn.Identity() for _ in decoder.seg_layers])
            self.heads = DomainHeads(conv_op, list(encoder.output_channels[:-1]), self.domains, num_union_labels)
            if options.gate:
                self.router = DomainRouter(embedding_size(encoder, num_slots), self.num_domains,
                                           options.routing_temperature, options.prototype_momentum)
            if options.task_prompt:
                self.task_prompt = TaskPrompt(encoder.output_channels[-1], self.num_domains, options.prompt_hidden)
            self.heads.apply(InitWeights_He(1e-2))
        self._context: dict[str, Any] = {}
        self._fitted: dict[tuple, Tensor] = {}  # the context's tensors as forward(x) uses them, per batch size
        self._single: int | None = None  # the context routes every sample to this one domain (host-side)
        self._mask_memo: tuple | None = None
        self._encoding_cache: EncodingCache | None = None
        self._case_pass: CaseEmbedding | None = None
        # style statistics of the style normalizations' inputs, for the gate's embedding (gated nets only: HarmonyNorm
        # computes them anyway, an InstanceNorm needs an extra reduction per forward that nothing else needs)
        self._styles: list[Tensor | None] = []
        self._record_styles = True  # off while encoding for a forward whose routing is given (phi unused)
        if self.router is not None:
            norms = style_norms(encoder)
            self._styles = [None] * len(norms)
            for i, norm in enumerate(norms):
                if isinstance(norm, HarmonyNorm):  # it computes these statistics anyway: keep them
                    norm.keep_stats = True
                    norm.register_forward_hook(functools.partial(self._style_from_norm, i))
                else:
                    norm.register_forward_pre_hook(functools.partial(self._style_hook, i))

    # ---- nnU-Net integration ---------------------------------------------------------------------------
    def _restore_hook(self, stage: int, enc_stage: int, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        stats = self._stat_norms[enc_stage].stats
        if stats is None or stats_bc1(stats[0], output.shape[0]).shape[:2] != output.shape[:2]:
            raise RuntimeError("HarmonyRestore found no encoder statistics for this batch; call the decoder "
                               "through UniversalUNet.forward / forward_train")
        return self.restores[str(stage)].from_stats(output, stats)

    def _style_hook(self, index: int, module: nn.Module, args: Any) -> None:
        """Per-channel mean and log-std of a style normalization's input (B, 2 C): the appearance that instance
        normalization removes, so that the gate still sees it. Std as InstanceNorm's, sqrt(var + eps)."""
        if not self._record_styles:
            return
        flat = args[0].detach().float().flatten(2)
        mean = flat.mean(2, keepdim=True)
        centred = flat - mean  # two passes: exact where the mean dwarfs the spread (torch.std_mean is ~7x slower)
        var = torch.linalg.vecdot(centred, centred) / flat.shape[2]
        self._styles[index] = torch.cat([mean.squeeze(2), 0.5 * torch.log(var + 1e-5)], dim=1)

    def _style_from_norm(self, index: int, module: nn.Module, args: Any, output: Tensor) -> None:
        """The same statistics, as a HarmonyNorm computed them: (mean, 1 / sqrt(var + eps)) of its input, kept as
        they are; :func:`harmony_gate_embedding` turns all of them into (mean, log-std) at once."""
        if not self._record_styles:
            return
        b = args[0].shape[0]
        self._styles[index] = tuple(_plain(stats_bc1(t, b)) for t in module.stats)

    def _clear_stats(self) -> None:
        for norm in self._stat_norms:
            if norm is not None:
                norm.stats = None

    # ---- device moves ----------------------------------------------------------------------------------
    def to(self, *args: Any, **kwargs: Any) -> UniversalUNet:
        """``nn.Module.to``, returning at once when every parameter and buffer already is where (and, for floating
        point ones, in the dtype) it asks: nnU-Net's predictor calls ``network.to(device)`` for every case, which
        otherwise dispatches two operations per tensor (about 750 here, host time per case)."""
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if memory_format is None and (device is not None or dtype is not None) and self._placed(device, dtype):
            return self
        return super().to(*args, **kwargs)

    def _placed(self, device: torch.device | None, dtype: torch.dtype | None) -> bool:
        if device is not None and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        for t in itertools.chain(self.parameters(), self.buffers()):
            if device is not None and t.device != device:
                return False
            if dtype is not None and (t.is_floating_point() or t.is_complex()) and t.dtype != dtype:
                return False
        return True

    # ---- context for nnU-Net's predictor, which calls network(x) -------------------------------------
    def set_context(self, domain: int | None = None, routing: Tensor | None = None,
                    availability: Tensor | None = None) -> None:
        """Fix the domain (oracle), routing weights (D,) or (B, D), and/or availability (C,) or (B, C) for the
        following ``forward(x)`` calls (nnU-Net's sliding window calls ``network(x)`` with nothing else)."""
        if domain is not None and routing is not None:
            raise ValueError("set_context: give either a domain (oracle) or routing weights, not both")
        if domain is not None and not 0 <= int(domain) < self.num_domains:
            raise ValueError(f"set_context: domain {domain} out of range (this network has {self.num_domains})")
        if routing is not None and routing.shape[-1] != self.num_domains:
            raise ValueError(f"set_context: routing has {routing.shape[-1]} weights, expected {self.num_domains}")
        if availability is not None and availability.shape[-1] != self.num_slots:
            raise ValueError(f"set_context: availability has {availability.shape[-1]} slots, "
                             f"expected {self.num_slots}")
        self._context = {"domain": None if domain is None else int(domain), "routing": routing,
                         "availability": availability}
        self._fitted = {}
        self._single = None if domain is None else int(domain)
        if routing is not None:  # one-hot for every sample (hard routing): that head alone (one look per case)
            rows = routing.detach().reshape(-1, self.num_domains).tolist()
            if all(r == rows[0] for r in rows) and sorted(rows[0]) == [0.0] * (self.num_domains - 1) + [1.0]:
                self._single = rows[0].index(1.0)

    def clear_context(self) -> None:
        """Back to dataset-free inference with availability derived from the input."""
        self._context = {}
        self._fitted = {}
        self._single = None

    @property
    def context(self) -> dict[str, Any]:
        return dict(self._context)

    @contextlib.contextmanager
    def encoding_cache(self, max_bytes: int) -> Iterator[EncodingCache]:
        """While active (inference only), :meth:`embed` keeps each tile's encoder outputs and :meth:`forward`
        reuses them for the identical tile: the routing pass and the prediction pass share one encoder pass."""
        self._encoding_cache = EncodingCache(max_bytes)
        try:
            yield self._encoding_cache
        finally:
            self._encoding_cache.clear()
            self._encoding_cache = None

    @property
    def supports_case_pass(self) -> bool:
        """Whether :meth:`case_pass` applies: a gate, per-domain heads, and a decoder that does not depend on the
        routing (no task prompt)."""
        return self.router is not None and not self.union_head and self.task_prompt is None

    @contextlib.contextmanager
    def case_pass(self) -> Iterator[CaseEmbedding]:
        """One-pass dataset-free inference (``nn/case_embedding.py``): while active, ``forward(x)`` without a domain
        or routing (in the context or given) returns every head's log-probabilities (B, sum(1+K_d) + 1, *spatial)
        (:meth:`DomainHeads.all_log_probs`) and adds the ``phi`` of the tiles announced on the yielded
        :class:`CaseEmbedding`."""
        if not self.supports_case_pass:
            raise ValueError("case_pass needs a gated network with per-domain heads and no task prompt")
        self._case_pass = CaseEmbedding()
        try:
            yield self._case_pass
        finally:
            self._case_pass = None

    def _forward_case_pass(self, x: Tensor, availability: Tensor | None) -> Tensor | list[Tensor]:
        _, _, availability = self._resolve(x, None, None, availability, context_weights=False)
        collect = self._case_pass.take_expect()
        skips, phi = self._encode(x, availability, need_phi=collect)
        if collect:
            self._case_pass.add(phi)
        outs = [self.heads.all_log_probs(self.heads.logits(f, i)) for i, f in enumerate(self._decode(skips))]
        return outs if self.decoder.deep_supervision else outs[0]

    def _caching(self) -> bool:
        return self._encoding_cache is not None and not self.training and not torch.is_grad_enabled()

    def _resolve(self, x: Tensor, domain: Tensor | None, routing: Tensor | None, availability: Tensor | None,
                 context_weights: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor]:
        b = x.shape[0]
        if x.ndim < 3 or x.shape[1] != self.num_slots:
            raise ValueError(
                f"the input has shape {tuple(x.shape)} but this universal model takes (B, {self.num_slots}, "
                f"*spatial): one channel per modality slot. With stock nnUNetv2_predict every case needs all "
                f"{self.num_slots} files CASE_0000 ... CASE_{self.num_slots - 1:04d} (a missing sequence as an "
                f"all-zero image on the case's grid); 'nnunet-universal predict' fills missing slots itself")
        if domain is not None and routing is not None:
            raise ValueError("forward: give either domain (oracle) or routing, not both")
        if domain is None and routing is None and context_weights:
            if self._context.get("domain") is not None:
                domain = self._from_context("domain", b, x.device)
            elif self._context.get("routing") is not None:
                routing = self._from_context("routing", b, x.device)
        # each step only when it changes something (the context's tensors are fitted once per batch size)
        if routing is not None:
            routing = _fit(routing, x.device, torch.float32, (b, self.num_domains))
        if domain is not None:
            domain = _fit(torch.as_tensor(domain, device=x.device), x.device, torch.long, (b,))
        if availability is None:
            availability = self._from_context("availability", b, x.device)
        if availability is None:
            availability = derive_availability(x)
        availability = _fit(availability, x.device, torch.bool, (b, self.num_slots))
        return domain, routing, availability

    def _from_context(self, name: str, b: int, device: torch.device) -> Tensor | None:
        """The context's ``name`` as ``forward`` uses it for a batch of ``b`` on ``device``, made once."""
        value = self._context.get(name)
        if value is None:
            return None
        key = (name, b, device, torch.is_inference_mode_enabled())
        fitted = self._fitted.get(key)
        if fitted is None:
            if name == "domain":
                fitted = torch.full((b,), value, dtype=torch.long, device=device)
            elif name == "routing":
                fitted = _fit(value, device, torch.float32, (b, self.num_domains))
            else:
                fitted = _fit(value, device, torch.bool, (b, self.num_slots))
            self._fitted[key] = fitted
        return fitted

    # ---- building blocks -----------------------------------------------------------------------------
    def _encode(self, x: Tensor, availability: Tensor, need_phi: bool = True) -> tuple[list[Tensor], Tensor | None]:
        """x: (B, C, *spatial) -> encoder skips (bottleneck last) and the gate's embedding phi (B, F); phi is None
        when not ``need_phi`` (a forward whose domain or routing is given: neither styles nor phi are computed)."""
        avail_f, mask = self._slot_mask(availability, x)
        x = x * mask  # missing slots are zero inside the network, whatever preprocessing made of them
        if self.modality_prompt is not None:
            x = self.modality_prompt(x, availability)
        self._styles = [None] * len(self._styles)
        self._record_styles = need_phi
        try:
            skips = list(self.encoder(x))
        finally:
            self._record_styles = True
        phi = None
        if need_phi:
            pooled = _float(skips[-1]).mean(dim=tuple(range(2, x.ndim)))
            phi = _embedding(pooled, self._styles, avail_f) if self.router is not None else pooled
        self._styles = [None] * len(self._styles)
        return skips, phi

    def _slot_mask(self, availability: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(availability (B, C) as float32, as x's dtype viewed (B, C, 1, ...)); without gradients made once per
        availability tensor (a sliding window passes the same one for every tile)."""
        key = None
        if not torch.is_grad_enabled():  # the memo holds the tensor: its storage cannot be reused by another
            key = (availability.data_ptr(), tuple(availability.shape), availability.stride(), availability.device,
                   x.dtype, x.ndim, torch.is_inference_mode_enabled())
            memo = self._mask_memo
            if memo is not None and memo[0] == key:
                return memo[2], memo[3]
        avail_f = availability.to(torch.float32)
        mask = avail_f if x.dtype == torch.float32 else availability.to(x.dtype)
        mask = mask.view(*availability.shape, *([1] * (x.ndim - 2)))
        if key is not None:
            self._mask_memo = (key, availability, avail_f, mask)
        return avail_f, mask

    def _decode(self, skips: list[Tensor]) -> list[Tensor]:
        """Decoder outputs as a list, highest resolution first (one entry when deep supervision is off)."""
        try:
            out = self.decoder(skips)
        finally:
            self._clear_stats()
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def _weights(self, phi: Tensor, domain: Tensor | None, routing: Tensor | None) -> Tensor:
        """(B, D) head weights: one-hot of the known domain, given routing, the gate's routing, or uniform."""
        if domain is not None:
            return F.one_hot(domain, self.num_domains).float()
        if routing is not None:
            return routing
        if self.router is None:  # no gate (ablation): mix all heads equally
            return uniform_routing(phi.shape[0], self.num_domains, phi.device)
        return self.router.route(phi, hard=self.options.routing == "hard")

    # ---- public API ----------------------------------------------------------------------------------
    def embed(self, x: Tensor, availability: Tensor | None = None) -> Tensor:
        """(B, F) pooled bottleneck features phi (after zeroing missing slots and the modality prompt)."""
        _, _, availability = self._resolve(x, None, None, availability)
        try:
            skips, phi = self._encode(x, availability)
            if self._caching() and x.shape[0] == 1:
                stats = [None if n is None else n.stats for n in self._stat_norms]
                self._encoding_cache.store(CachedEncoding(x, availability, skips, phi, stats))
        finally:
            self._clear_stats()
        return phi

    def route(self, phi: Tensor) -> Tensor:
        """(B, F) -> (B, D) head weights under the network's rule (rows sum to 1; one-hot with routing='hard';
        uniform without gate): what a tile routed on its own uses (stock ``nnUNetv2_predict``)."""
        return self._weights(phi, None, None)

    def routing_weights(self, phi: Tensor) -> Tensor:
        """(B, F) -> (B, D) the gate's calibrated routing weights before any decision rule (uniform without gate)."""
        if self.router is None:
            return uniform_routing(phi.shape[0], self.num_domains, phi.device)
        return self.router.route(phi, hard=False)

    def forward(self, x: Tensor, domain: Tensor | None = None, availability: Tensor | None = None,
                routing: Tensor | None = None, *, train: bool = False) -> Tensor | list[Tensor] | TrainOutput:
        """x: (B, C, *spatial) -> union-space logits (log-probabilities of the heads' mixture) (B, U, *spatial),
        or a list highest-resolution-first when ``decoder.deep_supervision`` is True.

        domain: (B,) long, oracle; routing: (B, D) fixed weights; availability: (B, C) bool (None: derived,
        a channel constant over the patch is missing). Without domain/routing the context
        (:meth:`set_context`) applies, else the gate routes (uniform mixture without gate).
        ``train=True`` returns :meth:`forward_train`'s TrainOutput instead (``domain`` required): the way to
        train through a DDP or compile wrapper, which only wrap ``forward``.
        """
        if train:
            if domain is None:
                raise ValueError("forward(train=True) needs the true domain of every sample")
            return self._forward_train(x, domain, availability)
        if self._case_pass is not None and domain is None and routing is None:
            return self._forward_case_pass(x, availability)
        # the context routes every sample to one domain (oracle, hard routing): that head alone, no weights
        single = None
        if domain is None and routing is None and not self.union_head and self.task_prompt is None:
            single = self._single
        domain, routing, availability = self._resolve(x, domain, routing, availability,
                                                      context_weights=single is None)
        hit = self._encoding_cache.take(x, availability) if self._caching() else None
        if hit is not None:
            skips, phi = list(hit.skips), hit.phi
            for norm, st in zip(self._stat_norms, hit.stats, strict=True):
                if norm is not None:
                    norm.stats = st
        else:  # phi only serves the gate's routing: unused when the domain or the routing is given
            need_phi = domain is None and routing is None and single is None and not self.union_head
            skips, phi = self._encode(x, availability, need_phi=need_phi)
        if self.union_head:
            out = self._decode(skips)
            return out if self.decoder.deep_supervision else out[0]
        if single is not None:
            outs = [self.heads.single(self.heads.logits(f, i), single) for i, f in enumerate(self._decode(skips))]
            return outs if self.decoder.deep_supervision else outs[0]
        weights = self._weights(phi, domain, routing)
        if self.task_prompt is not None:
            skips[-1] = self.task_prompt(skips[-1], weights)
        feats = self._decode(skips)
        outs = [self.heads.mix(self.heads.logits(f, i), weights) for i, f in enumerate(feats)]
        return outs if self.decoder.deep_supervision else outs[0]

    def forward_train(self, x: Tensor, domain: Tensor, availability: Tensor | None) -> TrainOutput:
        """Training forward with the true domains (B,): each sample through its own domain's heads.

        Also updates the prototypes (no grad, DDP-synchronized) when ``self.training``. Under DDP call
        ``network(x, domain=..., availability=..., train=True)`` instead: DDP synchronizes gradients only for
        what runs through its ``forward``.
        """
        return self._forward_train(x, domain, availability)

    def _forward_train(self, x: Tensor, domain: Tensor, availability: Tensor | None) -> TrainOutput:
        # grouping by domain needs the host to see the domains: do it before any kernel is queued, so that the
        # GPU is not left idle while the host waits for the encoder (a synchronization mid-forward)
        # (host-side bookkeeping: numpy, nothing dispatched; the index tensors are made when first read)
        domain_host = domain.detach() if domain.requires_grad else domain
        domain_host = domain_host if domain_host.device.type == "cpu" else domain_host.to("cpu")
        samples = DomainSamples(domain_host.reshape(-1), x.device)
        if domain.device != x.device:
            domain = domain.to(x.device)
        domain = domain if domain.dtype == torch.long else domain.long()
        domain = domain if domain.ndim == 1 else domain.reshape(-1)
        _, _, availability = self._resolve(x, domain, None, availability)
        skips, phi = self._encode(x, availability)
        if self.union_head:
            return TrainOutput(heads=[], samples=samples, gate_logits=None, embedding=phi,
                               union=self._decode(skips))
        gate_logits = None
        if self.router is not None:  # the routing log-weights (before this step's prototype update)
            gate_logits = self.router.routing_logits(phi)
            if self.training:
                self.router.update_prototypes(phi, domain)
        if self.task_prompt is not None:
            skips[-1] = self.task_prompt(skips[-1], F.one_hot(domain, self.num_domains).float())
        logits = [self.heads.logits(feat, i) for i, feat in enumerate(self._decode(skips))]
        return TrainOutput(heads=DomainHeadLogits(logits, self.heads.sizes, samples), samples=samples,
                           gate_logits=gate_logits, embedding=phi, union=None, logits=logits)


def build_universal_network(plans_manager: Any, configuration_manager: Any, num_input_channels: int,
                            num_output_channels: int, enable_deep_supervision: bool = True,
                            options: NetworkOptions | None = None) -> UniversalUNet:
    """Build nnU-Net's planned U-Net for ``configuration_manager`` and wrap it in a :class:`UniversalUNet`.

    Domains and slots come from the plans' ``universal`` block (``read_plans_universal``); ``options``
    defaults to that block's modules and, when given, replaces them (trainer variants).
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    where = f"plans {getattr(plans_manager, 'plans_name', '')!r}"
    meta, planned = read_plans_universal(plans_manager.plans, where=where)
    options = options or planned
    domains = [meta.domain_label_ids(name) for name in meta.domain_names]
    num_union = meta.num_union_labels()
    if num_output_channels != num_union:
        raise ValueError(f"{where}: nnU-Net asks for {num_output_channels} output channels but the universal block's "
                         f"domains span {num_union} union labels (background included); the dataset.json 'labels' "
                         "and the plans' universal block disagree: re-plan the dataset with 'nnunet-universal plan'")
    if num_input_channels != len(meta.slots):
        raise ValueError(f"{where}: {num_input_channels} input channels but {len(meta.slots)} slots {meta.slots} "
                         "in the universal block; re-plan the dataset with 'nnunet-universal plan'")
    backbone = get_network_from_plans(
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
        allow_init=True, deep_supervision=enable_deep_supervision)
    return UniversalUNet(backbone, domains, num_union, len(meta.slots), options)
