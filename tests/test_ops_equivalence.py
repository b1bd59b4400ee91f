"""Fewer dispatched operations, same numbers (issue "host-bound GPU step").

The per-step and per-tile glue was cut down (``scripts/count_ops.py``; ``tests/test_trainer_e2e.py`` bounds the
counts). None of it may change a computed value beyond float round-off, so that the accuracy benchmark results of
the commit before it stay valid:

* ``test_step_and_prediction_match_the_commit_before``: loss, embedding, gate logits, gradients, prototypes and
  logits (gated, oracle, soft) of one training step and of inference on a small 2D network, eager and C++ paths,
  against values captured from the code before the change (8dcfba2);
* the functions that were rewritten (vectorized) against the implementations they replaced, kept here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_nn_universal_unet import DOMAINS, N_UNION, _input, _perturb, _small_net

from nnunet_universal.nn.universal_unet import gate_embedding
from nnunet_universal.trainers.losses import PartialLabelLoss, _map_to_local, deep_supervision_weights

#: captured at 8dcfba2 (before the op-count work) with tests' conftest settings (one thread); path -> values
BEFORE = {
    "eager": {"loss": 1.187216997, "phi": 40.30964515, "gate": -13.19325697, "grad_abs_sum": 101.3497191,
              "grad_w_sum": 0.8465395085, "prototypes": 30.01221322, "free": 191675.5399, "oracle": 175494.4987,
              "soft": 34152.78113, "embed": 20.21394676},
    "cpp": {"loss": 1.187216878, "phi": 40.30964536, "gate": -13.19325686, "grad_abs_sum": 101.3497388,
            "grad_w_sum": 0.8465397835, "prototypes": 30.01221321, "free": 191675.5399, "oracle": 175494.4985,
            "soft": 34152.78093, "embed": 20.21394669},
}


def _fingerprint(grads_out: dict | None = None) -> dict[str, float]:
    net = _small_net()
    _perturb(net)
    net.train()
    x = _input((4, 5, 32, 32), seed=5)
    domain = torch.tensor([0, 2, 0, 1])
    avail = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 1], [1, 0, 1, 1, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    out = net.forward_train(x, domain, avail)
    gen = torch.Generator().manual_seed(7)
    tgt = torch.zeros(4, 1, 32, 32, dtype=torch.float32)
    for b, d in enumerate(domain.tolist()):
        ids = torch.tensor([0] + DOMAINS[d], dtype=torch.float32)
        tgt[b, 0] = ids[torch.randint(len(ids), (32, 32), generator=gen)]
    n = len(out.heads)
    targets = [F.interpolate(tgt, scale_factor=0.5 ** s, mode="nearest") for s in range(n)]
    loss = PartialLabelLoss(DOMAINS, N_UNION, deep_supervision_weights(n))(out, targets, domain)
    loss.backward()
    grads = [p.grad.double() for p in net.parameters() if p.grad is not None]
    if grads_out is not None:
        grads_out.update({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    res = {"loss": loss.item(), "phi": out.embedding.double().abs().sum().item(),
           "gate": out.gate_logits.double().sum().item(),
           "grad_abs_sum": sum(g.abs().sum() for g in grads).item(),
           "grad_w_sum": sum((g * torch.cos(torch.arange(g.numel(), dtype=torch.float64)).view(g.shape)).sum()
                             for g in grads).item(),
           "prototypes": net.router.prototypes.double().abs().sum().item()}
    net.eval()
    with torch.no_grad():
        y = _input((2, 5, 32, 32), seed=9)
        res["free"] = net(y)[0].double().abs().sum().item()
        res["oracle"] = net(y, domain=torch.tensor([1, 2]))[0].double().abs().sum().item()
        res["soft"] = net(y, routing=torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]))[0].double().abs().sum().item()
        res["embed"] = net.embed(y).double().abs().sum().item()
    return res


@pytest.mark.parametrize("path", ["eager", "cpp"])
def test_step_and_prediction_match_the_commit_before(path, monkeypatch):
    monkeypatch.setenv("NNUNET_UNIVERSAL_FUSED", "1" if path == "cpp" else "0")
    if path == "cpp":
        from nnunet_universal.nn import harmony_cpu

        if harmony_cpu.extension() is None:
            pytest.skip("C++ kernels not built on this machine")
    got = _fingerprint()
    for key, want in BEFORE[path].items():
        # grad_w_sum is a signed sum with cancellation: its round-off scales with sum |g| (~101), not with itself
        tol = 1e-7 * BEFORE[path]["grad_abs_sum"] if key == "grad_w_sum" else 1e-6
        assert got[key] == pytest.approx(want, rel=2e-6, abs=tol), (key, got[key], want)


# ---- the implementations that were replaced ------------------------------------------------------------------
def _gate_embedding_before(pooled, styles, availability):
    parts = (pooled, styles[0], torch.cat([st.float() for st in styles[1:]], dim=1), availability.to(pooled.dtype))
    return torch.cat([F.normalize(p.float(), dim=1) for p in parts], dim=1) / math.sqrt(len(parts))


def _embedding_before(pooled, styles, availability):
    """phi as before the op-count work: each HarmonyNorm's (mean, sigma = 1 / rstd) as (mean, log(sigma)), then the
    per-part F.normalize."""
    def vec(st):
        if not isinstance(st, tuple):
            return st
        mean, rstd = st
        return torch.cat([mean.flatten(1), torch.log(rstd.flatten(1).reciprocal())], dim=1)

    return _gate_embedding_before(pooled, [vec(st) for st in styles], availability)


def test_harmony_gate_embedding_equals_the_per_part_normalization():
    from nnunet_universal.nn.universal_unet import harmony_gate_embedding

    gen = torch.Generator().manual_seed(1)
    pooled = torch.randn(3, 16, generator=gen, requires_grad=True)
    stats = [(torch.randn(3, c, 1, generator=gen) * s, torch.rand(3, c, 1, generator=gen) * 3 + 0.01)
             for c, s in ((4, 5.0), (4, 1.0), (8, 0.1), (16, 30.0))]
    avail = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 1]], dtype=torch.float32)
    pooled_ref = pooled.detach().clone().requires_grad_(True)
    new, ref = harmony_gate_embedding(pooled, stats, avail), _embedding_before(pooled_ref, stats, avail)
    torch.testing.assert_close(new, ref, rtol=1e-6, atol=1e-7)
    w = torch.randn(new.shape, generator=gen)
    (new * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(pooled.grad, pooled_ref.grad, rtol=1e-5, atol=1e-7)
    zero = harmony_gate_embedding(torch.zeros(2, 16), [(m[:2], r[:2]) for m, r in stats], avail[:2])
    torch.testing.assert_close(zero, _embedding_before(torch.zeros(2, 16), [(m[:2], r[:2]) for m, r in stats],
                                                       avail[:2]))


def test_gate_embedding_equals_the_per_part_normalization():
    gen = torch.Generator().manual_seed(0)
    pooled = torch.randn(3, 16, generator=gen, requires_grad=True)
    styles = [torch.randn(3, 2 * c, generator=gen) * s for c, s in ((4, 5.0), (4, 1.0), (8, 0.1), (16, 30.0))]
    avail = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    pooled_ref = pooled.detach().clone().requires_grad_(True)
    new, ref = gate_embedding(pooled, styles, avail), _gate_embedding_before(pooled_ref, styles, avail)
    torch.testing.assert_close(new, ref, rtol=1e-6, atol=1e-7)
    w = torch.randn(new.shape, generator=gen)
    (new * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(pooled.grad, pooled_ref.grad, rtol=1e-5, atol=1e-7)
    zero = gate_embedding(torch.zeros(2, 16), [s[:2] for s in styles], avail[:2])  # zero part: F.normalize's eps
    torch.testing.assert_close(zero, _gate_embedding_before(torch.zeros(2, 16), [s[:2] for s in styles], avail[:2]))


def test_training_gradients_match_the_replaced_gate_embedding(monkeypatch):
    """Every parameter's gradient of one full step (heads, Dice + CE, gate loss through phi into the encoder) with
    the segmented normalization equals the per-part one to float round-off."""
    from nnunet_universal.nn import universal_unet

    new, ref = {}, {}
    got = _fingerprint(new)
    monkeypatch.setattr(universal_unet, "_embedding", _embedding_before)
    want = _fingerprint(ref)
    assert new.keys() == ref.keys()
    for name, g in ref.items():
        if name.endswith("conv.bias"):  # a bias before an instance norm: its gradient is 0 up to round-off (1e-9)
            continue
        # 3e-5 of the parameter's largest gradient: the eager and C++ paths of the code before differ by up to 1e-5
        torch.testing.assert_close(new[name], g, rtol=0, atol=3e-5 * float(g.abs().max()), msg=name)
    for key in ("loss", "phi", "gate", "prototypes", "free", "embed"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_deep_supervision_local_ids_equal_the_checked_mapping():
    from nnunet_universal.trainers.losses import _local_ids, local_label_lut

    target = torch.tensor([0, 1, 2, 3, 5, 6, 4, 9], dtype=torch.float32).view(1, 1, 2, 4)
    for ids in DOMAINS:
        lut = local_label_lut(ids, N_UNION, ignore_label=9)
        local, _ = _map_to_local(target, lut)
        assert torch.equal(_local_ids(target, lut), local)


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore_label", [None, 7])
def test_grouped_domain_head_loss_equals_the_per_domain_loop(batch_dice, ignore_label):
    """The grouped loss (one gather, one Dice + CE over all domains, ``out.logits``) against the per-domain loop
    over nnU-Net's DC_and_CE_loss (the path outputs without ``logits`` take): value and logits' gradient, three DS
    scales (one of weight 0), domains of different sizes, one of them absent from the batch."""
    from types import SimpleNamespace

    from nnunet_universal.nn.universal_unet import DomainHeadLogits, DomainSamples

    label_ids = [[1], [2, 3, 4], [5, 6]]
    sizes = [1 + len(ids) for ids in label_ids]
    gen = torch.Generator().manual_seed(3)
    domain = torch.tensor([1, 0, 1, 1, 0])  # domain 2 absent
    shapes = [(8, 6, 4), (4, 3, 2), (2, 2, 1)]
    targets = []
    for shape in shapes:
        t = torch.zeros(5, 1, *shape)
        for b, d in enumerate(domain.tolist()):
            ids = torch.tensor([0] + label_ids[d] + ([ignore_label] if ignore_label is not None else []),
                               dtype=torch.float32)
            t[b, 0] = ids[torch.randint(len(ids), shape, generator=gen)]
        targets.append(t)
    if ignore_label is not None:
        targets[0][1] = ignore_label  # a sample with every voxel ignored
    logits = [torch.randn(5, sum(sizes), *shape, generator=gen, requires_grad=True) for shape in shapes]
    samples = DomainSamples(domain, torch.device("cpu"))
    gate = torch.randn(5, 3, generator=gen)
    grouped_out = SimpleNamespace(logits=logits, heads=DomainHeadLogits(logits, sizes, samples), samples=samples,
                                  gate_logits=gate)
    loop_out = SimpleNamespace(heads=DomainHeadLogits(logits, sizes, samples), samples=samples, gate_logits=gate)
    loss = PartialLabelLoss(label_ids, 7, [0.6, 0.4, 0.0], batch_dice=batch_dice, ignore_label=ignore_label)
    grouped = loss(grouped_out, targets, domain)
    grads = torch.autograd.grad(grouped, logits[:2])
    loop = loss(loop_out, targets, domain)
    want = torch.autograd.grad(loop, logits[:2])
    assert grouped.item() == pytest.approx(loop.item(), rel=1e-6)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)


def test_grouped_loss_names_the_case_with_a_label_its_domain_lacks():
    from types import SimpleNamespace

    from nnunet_universal.nn.universal_unet import DomainHeadLogits, DomainSamples

    label_ids = [[1], [2, 3]]
    domain = torch.tensor([0, 1])
    samples = DomainSamples(domain, torch.device("cpu"))
    logits = [torch.randn(2, 5, 4, 4)]
    target = torch.zeros(2, 1, 4, 4)
    target[1, 0, 0, 0] = 1  # domain 1 does not annotate union label 1
    out = SimpleNamespace(logits=logits, heads=DomainHeadLogits(logits, [2, 3], samples), samples=samples,
                          gate_logits=None)
    with pytest.raises(ValueError, match=r"case_b.*\[1\]"):
        PartialLabelLoss(label_ids, 4, [1.0])(out, [target], domain, ["case_a", "case_b"])
    target[1, 0, 0, 0] = 9  # beyond the label table
    with pytest.raises(ValueError, match=r"case_b.*\[9\]"):
        PartialLabelLoss(label_ids, 4, [1.0])(out, [target], domain, ["case_a", "case_b"])


def test_single_head_equals_the_one_hot_mixture():
    """Hard routing and oracle prediction use one head (``DomainHeads.single``): bit-identical to the mixture with
    one-hot weights; through the network's context too."""
    net = _small_net()
    _perturb(net)
    net.eval()
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, sum(net.heads.sizes), 6, 5, generator=gen)
    for d in range(net.num_domains):
        weights = F.one_hot(torch.tensor([d, d]), net.num_domains).float()
        assert torch.equal(net.heads.single(logits, d), net.heads.mix(logits, weights))
    x = _input((1, 5, 32, 32), seed=2)
    with torch.no_grad():
        for d in range(net.num_domains):
            one_hot = F.one_hot(torch.tensor(d), net.num_domains).float()
            want = net(x, routing=one_hot[None])
            net.set_context(routing=one_hot)
            assert net._single == d
            assert len(want) > 1 and all(map(torch.equal, net(x), want))  # every deep-supervision scale
            net.set_context(domain=d)
            assert all(map(torch.equal, net(x), want))
        net.set_context(routing=torch.tensor([0.2, 0.3, 0.5]))
        assert net._single is None
        assert all(map(torch.equal, net(x), net(x, routing=torch.tensor([[0.2, 0.3, 0.5]]))))
        net.clear_context()


def test_network_to_where_it_already_is_dispatches_nothing():
    """nnU-Net's predictor calls ``network.to(device)`` for every case: a no-op move dispatches no operation (it
    was two per tensor), a real one still moves and casts everything."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from count_ops import count_ops

    net = _small_net()
    assert net.to(torch.device("cpu")) is net
    n_tensors = len(list(net.parameters())) + len(list(net.buffers()))
    with torch.inference_mode():  # as nnU-Net's predictor runs it
        assert sum(count_ops(lambda: net.to(torch.device("cpu"))).values()) == 0
        assert sum(count_ops(lambda: net.to("cpu", torch.float32)).values()) == 0
        assert sum(count_ops(lambda: torch.nn.Module.to(net, "cpu")).values()) >= n_tensors  # what it saves
    net.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert net.router.prototype_initialized.dtype == torch.bool  # non-float buffers keep their dtype
    net.to(dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in net.parameters())
