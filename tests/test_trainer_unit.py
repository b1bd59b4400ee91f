"""Unit tests of the trainer's parts: sampling, partial-label losses, batch handling, logging, variants."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnunet_universal.metadata import CaseInfo, DomainInfo, NetworkOptions, UniversalMeta
from nnunet_universal.trainers.batch import batch_context, modality_dropout, zero_missing_channels
from nnunet_universal.trainers.losses import (
    PartialLabelLoss,
    deep_supervision_weights,
    local_label_lut,
    marginal_logits,
    to_local_target,
)
from nnunet_universal.trainers.online_eval import DomainLayout, dice_from_counts, domain_confusion, per_domain_mean
from nnunet_universal.trainers.sampling import domain_probabilities, domain_sampling_probabilities
from nnunet_universal.trainers.schedule import parse_schedule

SLOTS = ["T1", "T1c", "T2", "FLAIR", "CT"]


def _meta(n_a: int = 2, n_b: int = 6, n_c: int = 18) -> UniversalMeta:
    domains = {
        "mr_a": DomainInfo(source="a", slots=["T1c", "FLAIR"], labels={"ET": 1}),
        "mr_b": DomainInfo(source="b", slots=["T1", "T1c", "T2", "FLAIR"], labels={"NETC": 2, "SNFH": 3, "ET": 4}),
        "ct": DomainInfo(source="c", slots=["CT"], labels={"liver": 5, "tumor": 6}, modality="CT"),
    }
    cases = {}
    for name, n in (("mr_a", n_a), ("mr_b", n_b), ("ct", n_c)):
        for i in range(n):
            cases[f"{name}_{i:03d}"] = CaseInfo(domain=name, slots=list(domains[name].slots))
    return UniversalMeta(slots=SLOTS, domains=domains, cases=cases)


# ---- sampling -------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_sampling_frequencies_match_domain_probabilities(alpha):
    meta = _meta()
    ids = sorted(meta.cases)
    p = domain_sampling_probabilities(ids, meta, alpha)
    assert p.shape == (len(ids),) and abs(p.sum() - 1) < 1e-12
    counts = {"mr_a": 2, "mr_b": 6, "ct": 18}
    expected = {d: n**alpha / sum(m**alpha for m in counts.values()) for d, n in counts.items()}
    assert domain_probabilities(ids, meta, alpha) == pytest.approx(expected)
    # draw like batchgenerators' DataLoader.get_indices does
    rng = np.random.default_rng(0)
    draws = rng.choice(np.array(ids), 60000, replace=True, p=p)
    freq = {d: np.mean([meta.cases[k].domain == d for k in draws]) for d in counts}
    for d in counts:
        assert freq[d] == pytest.approx(expected[d], abs=0.01), (d, freq, expected)
    # inside a domain every case is equally likely
    ct = [p[i] for i, k in enumerate(ids) if k.startswith("ct")]
    assert max(ct) == pytest.approx(min(ct))


def test_sampling_rejects_negative_alpha_and_unknown_case():
    meta = _meta()
    with pytest.raises(ValueError, match="alpha"):
        domain_sampling_probabilities(sorted(meta.cases), meta, -1)
    with pytest.raises(ValueError, match="not listed"):
        domain_sampling_probabilities(["nope"], meta, 0.5)


# ---- batch ------------------------------------------------------------------------------------------

def test_batch_context_and_missing_slots_are_zero():
    meta = _meta()
    keys = np.array(["mr_a_000", "ct_003", "mr_b_001"])  # np.str_ like nnU-Net's batch['keys']
    ctx = batch_context(keys, meta, ["mr_a", "mr_b", "ct"])
    assert ctx.domain.tolist() == [0, 2, 1]
    assert ctx.availability.tolist() == [[False, True, False, True, False], [False, False, False, False, True],
                                         [True, True, True, True, False]]
    data = torch.randn(3, 5, 4, 4, 4) + 3  # noise everywhere, as after augmentation
    out = zero_missing_channels(data, ctx.availability)
    for b in range(3):
        for c in range(5):
            if ctx.availability[b, c]:
                assert torch.equal(out[b, c], data[b, c])
            else:
                assert torch.all(out[b, c] == 0)


def test_batch_context_rejects_domain_unknown_to_network():
    with pytest.raises(ValueError, match="does not know"):
        batch_context(["ct_000"], _meta(), ["mr_a", "mr_b"])


def test_modality_dropout_hides_some_slots_but_never_all():
    avail = torch.tensor([[True, True, True, True, False]] * 200 + [[False, False, False, False, True]] * 50)
    g = torch.Generator().manual_seed(0)
    out = modality_dropout(avail, 1.0, generator=g)
    assert torch.all(out <= avail)  # subset
    assert torch.all(out.sum(1) >= 1)  # never all hidden
    assert torch.equal(out[200:], avail[200:])  # single-slot samples untouched
    assert (out[:200].sum(1) < 4).float().mean() > 0.8  # p=1: nearly every multi-slot sample lost something
    assert torch.equal(modality_dropout(avail, 0.0), avail)
    rate = (modality_dropout(avail[:200], 0.3, generator=g).sum(1) < 4).float().mean().item()
    assert 0.15 < rate < 0.40  # p * P(at least one of 4 dropped) = 0.3 * 15/16


# ---- losses -----------------------------------------------------------------------------------------

def _domain_output(logits_per_domain, samples, gate=None):
    """Stand-in for the network's TrainOutput with one DS scale."""
    return SimpleNamespace(heads=[logits_per_domain], samples=samples, gate_logits=gate, union=None)


def test_deep_supervision_weights_like_nnunet():
    w = deep_supervision_weights(4)
    assert w == pytest.approx(np.array([1, 0.5, 0.25, 0]) / 1.75)
    assert deep_supervision_weights(1) == [1.0]


def test_local_target_mapping_and_error_names_the_case():
    lut = local_label_lut([2, 3, 4], num_union=7)
    t = torch.tensor([0, 2, 3, 4]).view(1, 1, 4)
    assert to_local_target(t, lut).flatten().tolist() == [0, 1, 2, 3]
    bad = torch.tensor([[0, 5]]).view(1, 1, 2)
    with pytest.raises(ValueError, match=r"mr_b_007.*\[5\].*mr_b"):
        to_local_target(bad, lut, ["mr_b_007"], "mr_b")


def test_domain_head_loss_ignores_classes_the_domain_does_not_annotate():
    """A mr_a sample is scored by mr_a's head only: nothing about other domains' classes can change its loss."""
    torch.manual_seed(0)
    label_ids = [[1], [2, 3, 4], [5, 6]]
    loss = PartialLabelLoss(label_ids, num_union=7, ds_weights=[1.0], gate_weight=0.0)
    target = torch.zeros(2, 1, 6, 6, 6, dtype=torch.int16)
    target[0, :, 1:3, 1:3, 1:3] = 1  # mr_a: ET
    target[1, :, 2:5, 2:5, 2:5] = 5  # ct: liver
    target[1, :, 3, 3, 3] = 6
    heads = {0: torch.randn(1, 2, 6, 6, 6), 2: torch.randn(1, 3, 6, 6, 6)}
    domain = torch.tensor([0, 2])
    samples = {0: torch.tensor([0]), 2: torch.tensor([1])}
    base = loss(_domain_output(heads, samples), [target], domain)
    # a head of a domain absent from the batch (mr_b) contributes nothing whatever it predicts
    with_b = {**heads, 1: torch.randn(0, 4, 6, 6, 6)}
    samples_b = {**samples, 1: torch.tensor([], dtype=torch.long)}
    assert torch.allclose(loss(_domain_output(with_b, samples_b), [target], domain), base)
    # changing the CT head does change the loss (it is not ignored), and the loss is differentiable
    heads2 = {**heads, 2: heads[2] + 1.5 * torch.randn_like(heads[2])}
    assert not torch.allclose(loss(_domain_output(heads2, samples), [target], domain), base)
    # a label of another domain in a mr_a target is a merge error, reported with the case
    bad = target.clone()
    bad[0, 0, 0, 0, 0] = 3
    with pytest.raises(ValueError, match="mr_a_000"):
        loss(_domain_output(heads, samples), [bad], domain, keys=["mr_a_000", "ct_000"])


def test_marginal_loss_ignores_unannotated_classes_naive_does_not():
    """Union head: the marginal loss of a mr_a sample is invariant to how the unannotated probability mass is
    split among unannotated classes; the naive loss (unknown = background) is not."""
    torch.manual_seed(1)
    label_ids = [[1], [2, 3, 4], [5, 6]]
    union = torch.randn(1, 7, 6, 6, 6)
    target = torch.zeros(1, 1, 6, 6, 6, dtype=torch.int16)
    target[0, :, 1:4, 1:4, 1:4] = 1
    domain = torch.tensor([0])

    def out(u):
        return SimpleNamespace(heads=None, samples=None, gate_logits=None, union=[u])

    # move mass among background and the classes mr_a does not annotate, keeping their log-sum-exp fixed
    others = [0, 2, 3, 4, 5, 6]
    shuffled = union.clone()
    lse = torch.logsumexp(union[:, others], 1, keepdim=True)
    new = torch.randn(1, len(others), 6, 6, 6)
    shuffled[:, others] = new - torch.logsumexp(new, 1, keepdim=True) + lse
    marginal = PartialLabelLoss(label_ids, 7, [1.0], objective="marginal")
    assert torch.allclose(marginal(out(union), [target], domain), marginal(out(shuffled), [target], domain),
                          atol=1e-5)
    naive = PartialLabelLoss(label_ids, 7, [1.0], objective="naive")
    assert not torch.allclose(naive(out(union), [target], domain), naive(out(shuffled), [target], domain), atol=1e-3)
    # marginal logits: softmax = union softmax with unannotated classes summed into background
    m = marginal_logits(union, [1]).softmax(1)
    p = union.softmax(1)
    assert torch.allclose(m[:, 0], p[:, others].sum(1), atol=1e-6)
    assert torch.allclose(m[:, 1], p[:, 1], atol=1e-6)


def test_gate_loss_and_deep_supervision_scales():
    label_ids = [[1], [2]]
    loss = PartialLabelLoss(label_ids, 3, [2 / 3, 1 / 3, 0.0], gate_weight=0.5)
    t0 = torch.zeros(2, 1, 8, 8, 8, dtype=torch.int16)
    t0[0, 0, :4] = 1
    t0[1, 0, 4:] = 2
    targets = [t0, t0[:, :, ::2, ::2, ::2], t0[:, :, ::4, ::4, ::4]]
    domain = torch.tensor([0, 1])
    samples = {0: torch.tensor([0]), 1: torch.tensor([1])}
    heads = [{d: torch.randn(1, 2, *t.shape[2:], requires_grad=True) for d in (0, 1)} for t in targets]
    gate = torch.randn(2, 2, requires_grad=True)
    out = SimpleNamespace(heads=heads, samples=samples, gate_logits=gate, union=None)
    total = loss(out, targets, domain)
    no_gate = PartialLabelLoss(label_ids, 3, [2 / 3, 1 / 3, 0.0], gate_weight=0.0)(out, targets, domain)
    ce = torch.nn.functional.cross_entropy(gate, domain)
    assert torch.allclose(total, no_gate + 0.5 * ce)
    total.backward()
    assert heads[2][0].grad is None  # weight 0 scale: never evaluated, like nnU-Net's wrapper
    assert heads[0][0].grad.abs().sum() > 0 and gate.grad.abs().sum() > 0


# ---- online evaluation and logging ----------------------------------------------------------------

def test_domain_confusion_and_per_domain_dice():
    logits = torch.zeros(1, 3, 4, 4, 4)
    logits[:, 1, :2] = 5  # predict class 1 in the first half
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.int16)
    target[:, :, :2] = 1
    tp, fp, fn = domain_confusion(logits, target)
    assert tp.tolist() == [32, 0] and fp.tolist() == [0, 0] and fn.tolist() == [0, 0]
    layout = DomainLayout(("a", "b"), (2, 1))
    dice = dice_from_counts(np.array([32, 0, 5]), np.array([0, 0, 10]), np.array([0, 0, 0]))
    assert math.isnan(dice[1])
    assert per_domain_mean(dice, layout) == pytest.approx([1.0, 0.5])


def test_logger_registers_plots_and_restores_extra_keys(tmp_path):
    from nnunet_universal.trainers.progress import PLOT_NAME, UniversalLocalLogger

    lg = UniversalLocalLogger(["a", "b"])
    for epoch in range(2):
        for k in ("train_losses", "val_losses", "lrs", "epoch_start_timestamps", "epoch_end_timestamps"):
            lg.log(k, float(epoch), epoch)
        lg.log("mean_fg_dice", 0.5, epoch)
        lg.log("ema_fg_dice", 0.5, epoch)
        lg.log("dice_per_class_or_region", [0.4, 0.6], epoch)
        lg.log("dice_per_domain", [0.4, 0.6], epoch)
        lg.log("gate_accuracy", 0.9, epoch)
    lg.plot_progress_png(str(tmp_path))
    assert (tmp_path / "progress.png").stat().st_size > 0 and (tmp_path / PLOT_NAME).stat().st_size > 0
    restored = UniversalLocalLogger(["a", "b"])
    restored.load_checkpoint(copy.deepcopy(lg.get_checkpoint()))
    assert restored.get_value("gate_accuracy", None) == [0.9, 0.9]
    # a stock checkpoint (no extra keys) gets NaN-padded lists of the right length
    stock = {k: v for k, v in copy.deepcopy(lg.get_checkpoint()).items() if k not in ("dice_per_domain",
                                                                                      "gate_accuracy")}
    restored.load_checkpoint(stock)
    assert len(restored.get_value("dice_per_domain", None)) == 2


def test_schedule_parsing():
    assert tuple(parse_schedule("2:3:1")) == (2, 3, 1)
    for bad in ("2:3", "a:b:c", "0:1:1", "1:1:0"):
        with pytest.raises(ValueError, match="NNUNET_UNIVERSAL_SCHEDULE"):
            parse_schedule(bad)


def test_validation_mirroring_switch(monkeypatch):
    from nnunet_universal.trainers.schedule import validation_mirroring_from_env

    monkeypatch.delenv("NNUNET_UNIVERSAL_VAL_MIRRORING", raising=False)
    assert validation_mirroring_from_env() is True
    monkeypatch.setenv("NNUNET_UNIVERSAL_VAL_MIRRORING", "0")
    assert validation_mirroring_from_env() is False
    monkeypatch.setenv("NNUNET_UNIVERSAL_VAL_MIRRORING", "maybe")
    with pytest.raises(ValueError, match="NNUNET_UNIVERSAL_VAL_MIRRORING"):
        validation_mirroring_from_env()


# ---- variants ---------------------------------------------------------------------------------------

def test_each_variant_is_one_class_attribute_away_from_the_base():
    from nnunet_universal.discovery import all_trainers
    from nnunet_universal.trainers.universal_trainer import UniversalTrainer

    for cls in all_trainers()[1:]:
        own = {k for k in vars(cls) if not k.startswith("__")}
        assert len(own) == 1, (cls.__name__, own)
        assert cls.__mro__[1] is UniversalTrainer
        assert cls.__doc__


def test_network_options_merge_plans_overrides_and_objective():
    from nnunet_universal.metadata import plans_universal_block
    from nnunet_universal.trainers.universal_trainer import UniversalTrainer
    from nnunet_universal.trainers.variants import UniversalTrainer_MarginalJoint, UniversalTrainer_Prompts

    meta = _meta()
    plans = {"universal": plans_universal_block(meta, {s: "ZScoreNormalization" for s in SLOTS},
                                                NetworkOptions(prompt_hidden=4))}
    json.dumps(plans)
    o = UniversalTrainer.network_options(plans)
    assert (o.modality_prompt, o.task_prompt, o.routing, o.head) == (False, False, "hard", "domain")
    o = UniversalTrainer_Prompts.network_options(plans)
    assert (o.modality_prompt, o.task_prompt, o.prompt_hidden, o.head) == (True, True, 4, "domain")
    o = UniversalTrainer_MarginalJoint.network_options(plans)
    assert (o.head, o.gate, o.task_prompt) == ("union", False, False)


def test_harmony_optimizer_scales_only_the_harmony_parameters():
    """UniversalTrainer (default harmony_lr_scale 0.1): nnU-Net's SGD and poly schedule, the parameters U-Harmony
    adds (HarmonyNorm polynomial, HarmonyRestore) at 0.1x the rate at every epoch; InstanceNorm's affine and the rest
    at 1x."""
    from types import SimpleNamespace

    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    from nnunet_universal.metadata import NetworkOptions
    from nnunet_universal.nn.universal_unet import UniversalUNet
    from nnunet_universal.trainers.optim import harmony_parameters
    from nnunet_universal.trainers.universal_trainer import UniversalTrainer

    backbone = PlainConvUNet(2, 3, [4, 8, 16], nn.Conv3d, 3, [1, 2, 2], 1, 3, 1, True, nn.InstanceNorm3d,
                             {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True})
    net = UniversalUNet(backbone, [[1], [2]], 3, 2, NetworkOptions())
    slow = {id(p) for p in harmony_parameters(net)}
    names = {n for n, p in net.named_parameters() if id(p) in slow}
    assert names and all("poly_weight" in n or n.startswith("restores.") for n in names)
    assert not any(n.endswith("norm.weight") for n in names)
    stub = SimpleNamespace(network=net, initial_lr=0.01, weight_decay=3e-5, num_epochs=10,
                           harmony_lr_scale=UniversalTrainer.harmony_lr_scale)
    optimizer, scheduler = UniversalTrainer.configure_optimizers(stub)
    fast_group, slow_group = optimizer.param_groups
    assert {id(p) for p in slow_group["params"]} == slow
    assert len(fast_group["params"]) + len(slow) == len(list(net.parameters()))
    for epoch in (0, 5):
        scheduler.step(epoch)
        expected = 0.01 * (1 - epoch / 10) ** 0.9
        assert fast_group["lr"] == pytest.approx(expected) and slow_group["lr"] == pytest.approx(0.1 * expected)


def test_seed_from_the_environment(monkeypatch):
    """NNUNET_UNIVERSAL_SEED seeds random, numpy and torch (same draws after the same seed) and is logged; a bad
    value is refused with the variable's name; unset, nothing is seeded."""
    import random

    import numpy as np
    import torch

    from nnunet_universal.trainers.schedule import apply_seed

    logged: list[str] = []

    class Stub:
        def print_to_log_file(self, *args, **kwargs):
            logged.append(" ".join(map(str, args)))

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    monkeypatch.delenv("NNUNET_UNIVERSAL_SEED", raising=False)
    assert apply_seed(Stub()) is None and not logged
    monkeypatch.setenv("NNUNET_UNIVERSAL_SEED", "7")
    assert apply_seed(Stub()) == 7
    first = draws()
    apply_seed(Stub())
    assert draws() == first and "NNUNET_UNIVERSAL_SEED=7" in logged[0]
    monkeypatch.setenv("NNUNET_UNIVERSAL_SEED", "-1")
    with pytest.raises(ValueError, match="NNUNET_UNIVERSAL_SEED='-1'"):
        apply_seed(Stub())
