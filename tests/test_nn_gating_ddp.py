"""Domain prototypes under DDP: 2 gloo processes give the prototypes of one process on the union of the data."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch.nn.parallel import DistributedDataParallel

from nnunet_universal.metadata import NetworkOptions
from nnunet_universal.nn.gating import DomainRouter, all_reduce_prototype_stats
from nnunet_universal.nn.universal_unet import UniversalUNet

STEPS, PER_RANK, FEATURES, DOMAINS = 4, 3, 5, 3


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank-specific steps; rank 1 never sees domain 0 and domain 2 first appears at step 2 on rank 0 only."""
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for step in range(STEPS):
        phi = torch.randn(PER_RANK, FEATURES, generator=gen) * (rank + 1) + step
        if rank == 0:
            domain = torch.tensor([0, 1, 2]) if step >= 2 else torch.tensor([0, 0, 1])
        else:
            domain = torch.tensor([1, 1, 1])
        out.append((phi, domain))
    return out


def _worker(rank: int, world: int, store: str, result: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        router = DomainRouter(FEATURES, DOMAINS, momentum=0.9)
        for phi, domain in _batches(rank):
            router.update_prototypes(phi, domain)
        sums, counts = all_reduce_prototype_stats(torch.full((2, 2), float(rank + 1)), torch.tensor([rank, 1.0]))
        grads, protos = _ddp_steps(rank)
        torch.save({"state": router.state_dict(), "sums": sums, "counts": counts, "grads": grads,
                    "net_prototypes": protos}, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


def _ddp_steps(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two training steps of a small UniversalUNet under DDP without find_unused_parameters (nnU-Net's
    setting), each rank with other domains; returns the flat gradient of the last step and the prototypes."""
    torch.manual_seed(0)
    backbone = PlainConvUNet(3, 3, [4, 8, 8], torch.nn.Conv2d, 3, [1, 2, 2], 1, 5, 1, True, torch.nn.InstanceNorm2d,
                             {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                             deep_supervision=True)
    net = DistributedDataParallel(UniversalUNet(backbone, [[1, 2], [3], [4]], 5, 3, NetworkOptions()))
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):
        net.zero_grad()
        x = torch.randn(2, 3, 16, 16, generator=gen)
        domain = torch.tensor([0, 0]) if rank == 0 else torch.tensor([1, 2])
        out = net(x, domain=domain, availability=torch.ones(2, 3, dtype=torch.bool), train=True)
        loss = sum(v.mean() for h in out.heads for v in h.values())
        loss = loss + torch.nn.functional.cross_entropy(out.gate_logits, domain)
        loss.backward()
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    return grads, net.module.router.prototypes.clone()


def test_prototype_all_reduce_matches_single_process_on_the_union(tmp_path):
    world = 2
    result = str(tmp_path / "result")
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), result), nprocs=world, join=True)
    ranks = [torch.load(f"{result}.{r}") for r in range(world)]

    single = DomainRouter(FEATURES, DOMAINS, momentum=0.9)
    for step_batches in zip(*[_batches(r) for r in range(world)], strict=True):
        single.update_prototypes(torch.cat([b[0] for b in step_batches]), torch.cat([b[1] for b in step_batches]))
    for r in ranks:
        torch.testing.assert_close(r["state"]["prototypes"], single.prototypes, rtol=1e-6, atol=1e-6)
        assert torch.equal(r["state"]["prototype_initialized"], single.prototype_initialized)
        torch.testing.assert_close(r["sums"], torch.full((2, 2), 3.0))
        torch.testing.assert_close(r["counts"], torch.tensor([1.0, 2.0]))
    # a whole UniversalUNet trains under DDP with nnU-Net's settings: every parameter gets a gradient each
    # step (no unused-parameter error) and gradients and prototypes agree across ranks
    torch.testing.assert_close(ranks[0]["grads"], ranks[1]["grads"])
    torch.testing.assert_close(ranks[0]["net_prototypes"], ranks[1]["net_prototypes"])
    assert ranks[0]["grads"].abs().sum() > 0
    # and the data really differed between ranks: a rank alone would have other prototypes
    alone = DomainRouter(FEATURES, DOMAINS, momentum=0.9)
    for phi, domain in _batches(0):
        alone.update_prototypes(phi, domain)
    assert not torch.allclose(alone.prototypes, single.prototypes)
