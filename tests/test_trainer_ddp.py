"""DDP-specific parts on CPU with 2 gloo processes: unused domain heads and prototype all-reduce.

Rank 0 trains only on domain 0, rank 1 only on domain 1, so each rank leaves the other's head (and, as
in nnU-Net, the lowest deep-supervision output) without gradient. The trainer's DDP wrapping must
synchronize gradients anyway and keep the prototypes identical on both ranks.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_universal.metadata import DomainInfo, NetworkOptions, UniversalMeta, plans_universal_block
from nnunet_universal.trainers.ddp import forward_train, unwrap, with_all_outputs, wrap_ddp
from nnunet_universal.trainers.losses import PartialLabelLoss, deep_supervision_weights
from nnunet_universal.trainers.universal_trainer import UniversalTrainer

SLOTS = ["T1", "T1c", "CT"]
DOMAINS = {"mr": DomainInfo(source="mr", slots=["T1", "T1c"], labels={"lesion": 1}),
           "ct": DomainInfo(source="ct", slots=["CT"], labels={"liver": 2, "tumor": 3}, modality="CT")}


def tiny_plans() -> dict:
    """A 3-stage 3D PlainConvUNet in nnU-Net's plans structure (the parts the network builder reads)."""
    meta = UniversalMeta(slots=SLOTS, domains=DOMAINS)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                        "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return {"dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetUniversalPlans",
            "configurations": {"3d_fullres": {"patch_size": [8, 8, 8], "batch_size": 2, "architecture": arch}},
            "universal": plans_universal_block(meta, {s: "ZScoreNormalization" for s in SLOTS},
                                               NetworkOptions(modality_prompt=True, task_prompt=True, prompt_hidden=4))}


def _train_two_steps(rank: int, find_unused: bool) -> dict:
    pm = PlansManager(tiny_plans())
    torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
    net = UniversalTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 3, 4, True)
    ddp = wrap_ddp(net) if find_unused else DDP(net)
    # 2 decoder outputs; nnU-Net's weights (1, 0): the lowest output and its head get no gradient
    loss_fn = PartialLabelLoss([[1], [2, 3]], 4, deep_supervision_weights(2), gate_weight=0.1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    gen = torch.Generator().manual_seed(100 + rank)
    domain = torch.full((2,), rank, dtype=torch.long)  # rank r only sees domain r
    availability = torch.tensor([[True, True, False]] * 2 if rank == 0 else [[False, False, True]] * 2)
    for _ in range(2):  # the second iteration is where DDP reports unfinished reductions
        x = torch.randn(2, 3, 8, 8, 8, generator=gen) * availability[:, :, None, None, None]
        t0 = torch.randint(0, 2, (2, 1, 8, 8, 8), generator=gen) * (1 if rank == 0 else 2)
        opt.zero_grad(set_to_none=True)
        out = forward_train(ddp, x, domain, availability)
        assert set(out.samples) == {rank} and len(out.heads) == 2
        loss = loss_fn(out, [t0, t0[:, :, ::2, ::2, ::2]], domain)
        (with_all_outputs(loss, out) if find_unused else loss).backward()  # what the trainer does under DDP
        opt.step()
    core = unwrap(ddp)
    return {"grads": {n: p.grad.clone() for n, p in core.named_parameters() if p.grad is not None},
            "params": {n: p.detach().clone() for n, p in core.named_parameters()},
            "prototypes": core.router.prototypes.clone(),
            "initialized": core.router.prototype_initialized.clone(),
            "state_keys": list(core.state_dict())}


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    for key, find_unused in (("trainer", True), ("plain", False)):  # ours, then nnU-Net's own wrapping
        try:
            out[key] = _train_two_steps(rank, find_unused)
        except Exception:
            out[key] = {"error": traceback.format_exc()}
    results[rank] = out
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results() -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        # fork: the workers inherit the imported modules instead of importing torch and nnU-Net again
        mp.start_processes(_worker, args=(2, _free_port(), results), nprocs=2, join=True, start_method="fork")
        return dict(results)


def test_ddp_unused_heads_and_prototype_all_reduce(ddp_results):
    for r in (0, 1):
        assert "error" not in ddp_results[r]["trainer"], ddp_results[r]["trainer"].get("error")
    r0, r1 = ddp_results[0]["trainer"], ddp_results[1]["trainer"]
    # gradients synchronized: every gradient that exists is identical on both ranks, and so are the weights
    assert r0["grads"].keys() == r1["grads"].keys() and r0["grads"]
    for name in r0["grads"]:
        assert torch.allclose(r0["grads"][name], r1["grads"][name], atol=1e-6), name
    for name in r0["params"]:
        assert torch.allclose(r0["params"][name], r1["params"][name], atol=1e-6), name
    assert torch.all(r0["grads"]["heads.heads.1.weight"] == 0)  # the zero-weighted lowest output
    # both domains' prototypes were initialized on both ranks (each rank saw one domain) and are equal
    assert r0["initialized"].tolist() == [True, True] == r1["initialized"].tolist()
    assert torch.allclose(r0["prototypes"], r1["prototypes"]) and r0["prototypes"].abs().sum() > 0
    assert any("prototypes" in k for k in r0["state_keys"])  # checkpointed with the weights


def test_plain_ddp_fails_with_unused_outputs(ddp_results):
    """Control: nnU-Net's own wrapping (no find_unused_parameters) breaks on the parameters a step leaves unused."""
    errors = [ddp_results[r]["plain"].get("error", "") for r in (0, 1)]
    assert all("finished reduction" in e for e in errors), errors


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
