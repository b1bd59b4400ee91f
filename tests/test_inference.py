"""Inference: slot inputs, geometry checks, case-level routing, and both prediction routes through their CLIs.

Unit tests use a toy routed network (``_ToyRoutedNet``) whose gate depends only on a tile's mean intensity,
so per-tile and case-level routing provably differ. The end-to-end tests train a tiny universal model with the
real ``nnUNetv2_train`` once per module and drive ``nnUNetv2_predict``, ``nnunet-universal predict`` and the
model zip export/install through their console scripts.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_universal.inference.api import check_model_folder
from nnunet_universal.inference.inputs import (
    CaseInput,
    cases_from_folder,
    cases_from_images,
    check_geometry,
    read_case,
)
from nnunet_universal.inference.predictor import UniversalPredictor
from nnunet_universal.inference.routing import case_availability, case_routing, sliding_window_slicers
from nnunet_universal.metadata import (
    PLANS_NAME,
    DomainInfo,
    MetadataError,
    NetworkOptions,
    UniversalMeta,
    plans_universal_block,
)
from nnunet_universal.nn.universal_unet import UniversalUNet
from nnunet_universal.trainers.schedule import ENV_VAR as SCHEDULE_ENV

SLOTS = ["T1", "T1c", "T2", "FLAIR", "CT"]


def _write(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


# ---- inputs -------------------------------------------------------------------------------------

def test_cases_from_images_maps_slots_and_rejects_unknown(tmp_path):
    a = _write(tmp_path / "a.nii.gz", np.ones((4, 5, 6)))
    b = _write(tmp_path / "b.nii.gz", np.ones((4, 5, 6)))
    (case,) = cases_from_images({"flair": str(b), "T1c": str(a)}, SLOTS, "p1")
    assert case.files == {1: a, 3: b} and case.slots(SLOTS) == ["T1c", "FLAIR"] and case.case_id == "p1"
    with pytest.raises(ValueError, match=r"unknown slot 'T1ce'.*T1, T1c, T2, FLAIR, CT"):
        cases_from_images({"T1ce": str(a)}, SLOTS)
    with pytest.raises(FileNotFoundError, match="slot T2"):
        cases_from_images({"T2": str(tmp_path / "nope.nii.gz")}, SLOTS)


def test_cases_from_folder_allows_missing_channels_and_rejects_bad_names(tmp_path):
    for name in ("c1_0001", "c1_0003", "c2_0004"):
        _write(tmp_path / f"{name}.nii.gz", np.ones((3, 3, 3)))
    (tmp_path / "notes.txt").write_text("ignored: other ending")
    cases = cases_from_folder(tmp_path, 5, ".nii.gz")
    assert [(c.case_id, sorted(c.files)) for c in cases] == [("c1", [1, 3]), ("c2", [4])]
    _write(tmp_path / "c3_0005.nii.gz", np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match=r"c3_0005.nii.gz names channel 5, but this model has 5 channels"):
        cases_from_folder(tmp_path, 5, ".nii.gz")
    (tmp_path / "c3_0005.nii.gz").unlink()
    _write(tmp_path / "badname.nii.gz", np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="does not follow nnU-Net naming"):
        cases_from_folder(tmp_path, 5, ".nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images named CASE_XXXX.nii.gz in"):
        cases_from_folder(tmp_path / "empty", 5, ".nii.gz")


@pytest.mark.parametrize("what,kwargs", [("spacing", {"spacing": (1.0, 1.0, 2.0)}),
                                          ("origin", {"origin": (0.0, 5.0, 0.0)}),
                                          ("size", {"shape": (4, 5, 7)})])
def test_check_geometry_names_both_files(tmp_path, what, kwargs):
    a = _write(tmp_path / "a.nii.gz", np.ones((4, 5, 6)))
    shape = kwargs.pop("shape", (4, 5, 6))
    b = _write(tmp_path / "b.nii.gz", np.ones(shape), **kwargs)
    case = CaseInput("x", {1: a, 3: b})
    with pytest.raises(ValueError, match=rf"geometry mismatch \({what}\) between .*a.nii.gz .*and .*b.nii.gz"):
        check_geometry(case, SLOTS)
    check_geometry(CaseInput("x", {1: a, 3: _write(tmp_path / "c.nii.gz", np.zeros((4, 5, 6)))}), SLOTS)


def test_read_case_zero_fills_missing_slots(tmp_path):
    rng = np.random.default_rng(0)
    t1c, flair = rng.normal(size=(4, 5, 6)), rng.normal(size=(4, 5, 6))
    case = CaseInput("x", {1: _write(tmp_path / "a.nii.gz", t1c), 3: _write(tmp_path / "b.nii.gz", flair)})
    pm = PlansManager({"image_reader_writer": "SimpleITKIO"})
    data, props = read_case(case, pm, 5)
    assert data.shape == (5, 4, 5, 6) and data.dtype == np.float32
    np.testing.assert_allclose(data[1], t1c, rtol=1e-6)
    np.testing.assert_allclose(data[3], flair, rtol=1e-6)
    assert not data[[0, 2, 4]].any()
    assert list(props["spacing"]) == [1.0, 1.0, 1.0]


# ---- routing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("image,patch", [((20, 33, 40), (16, 16, 24)), ((3, 30, 17), (16, 16))])
def test_slicers_equal_nnunets(image, patch):
    ours = sliding_window_slicers(image, patch, 0.5)
    pred = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    pred.configuration_manager = type("CM", (), {"patch_size": list(patch)})()
    assert ours == pred._internal_get_sliding_window_slicers(image)


def test_case_availability_marks_constant_channels_missing():
    data = torch.zeros(3, 4, 4, 4)
    data[0, 1, 1, 1] = 1.0
    data[0, 2, 1, 1] = 0.3
    data[2] = -0.7  # a zero-filled CT slot after CT normalization: constant but non-zero
    assert case_availability(data).tolist() == [True, False, False]


def test_zero_filled_slots_of_a_merged_folder_are_not_warned_about(tmp_path, caplog):
    """A merged dataset's imagesTs holds zero-filled files for the slots a case lacks (stock nnUNetv2_predict needs
    every channel): no "constant" warning for those (the dataset.json beside the folder says they are missing),
    but one for a constant image in a slot the case claims to have."""
    from types import SimpleNamespace

    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    images = tmp_path / "imagesTs"
    images.mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T1c", "2": "FLAIR"}, "file_ending": ".nii.gz",
        "universal": {"cases": {"c1": {"domain": "d", "slots": ["T1", "T1c"]}}}}))
    _write(images / "c1_0000.nii.gz", np.random.default_rng(0).random((4, 5, 6)))
    _write(images / "c1_0001.nii.gz", np.full((4, 5, 6), 3.0))  # claimed slot, constant: suspicious
    _write(images / "c1_0002.nii.gz", np.zeros((4, 5, 6)))  # zero-filled by merge: known missing
    (case,) = cases_from_folder(images, 3, ".nii.gz")
    assert case.known_missing == frozenset({2})
    with caplog.at_level("WARNING", logger="nnunet_universal.inference.inputs"):
        read_case(case, SimpleNamespace(image_reader_writer_class=SimpleITKIO), 3)
    warned = [r.getMessage() for r in caplog.records if "is constant" in r.getMessage()]
    assert len(warned) == 1 and "c1_0001" in warned[0]


def test_a_missing_ct_slot_stays_missing_in_a_zero_padded_tile():
    """nnU-Net pads a case smaller than the patch with zeros: a missing CT slot (a non-zero constant after CT
    normalization) must not look like data because of the padding; real data with zeros stays available."""
    from nnunet_universal.nn.availability import derive_availability

    tile = torch.zeros(1, 3, 6, 6, 6)
    tile[0, 0, :4] = torch.randn(4, 6, 6)  # real MR data, padded
    tile[0, 1, :4] = -0.7  # missing CT slot: constant, padded with zeros
    tile[0, 2] = 0.0  # missing MR slot
    assert derive_availability(tile).tolist() == [[True, False, False]]


class _ToyRoutedNet(nn.Module):
    """Routed network with a transparent gate: phi = mean of channel 0 over the tile (B, 1);
    hard routing to domain 0 (union label 1) if phi < 0, else domain 1 (union label 2).
    ``forward(x)`` routes per tile unless a context is set, like ``UniversalUNet``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.router = nn.Identity()  # like UniversalUNet: a gate exists, so dataset-free routing is inferred
        self.options = NetworkOptions()  # hard routing, the default rule
        self.context: dict = {}
        self.contexts_seen: list[dict] = []

    def embed(self, x, availability=None):
        return x[:, :1].flatten(2).mean(2) * self.scale  # (B, 1)

    def route(self, phi):
        return torch.cat([(phi < 0).float(), (phi >= 0).float()], dim=1)  # (B, 2)

    routing_weights = route

    def set_context(self, domain=None, routing=None, availability=None):
        self.context = {"domain": domain, "routing": routing, "availability": availability}
        self.contexts_seen.append(self.context)

    def clear_context(self):
        self.context = {}

    def forward(self, x):
        if self.context.get("domain") is not None:
            r = torch.nn.functional.one_hot(torch.tensor([self.context["domain"]]), 2).float().expand(len(x), -1)
        elif self.context.get("routing") is not None:
            r = self.context["routing"].reshape(1, -1).expand(len(x), -1)
        else:
            r = self.route(self.embed(x))
        logits = torch.full((x.shape[0], 3, *x.shape[2:]), -5.0)
        logits[:, 1:] = 10 * r[:, :, None, None, None] - 5  # (B, 3, *patch): the routed domain's label wins
        return logits


def _toy_universal_plans() -> tuple[dict, dict]:
    meta = UniversalMeta(slots=["T1c", "CT"], domains={
        "mr": DomainInfo(source="toy", slots=["T1c"], labels={"lesion": 1}),
        "ct": DomainInfo(source="toy", slots=["CT"], labels={"organ": 2}, modality="CT")})
    plans = {"configurations": {"3d_fullres": {"patch_size": [16, 16, 16], "architecture": {}}},
             "image_reader_writer": "SimpleITKIO", "universal": plans_universal_block(meta, {"T1c": "zscore",
                                                                                            "CT": "CT"})}
    dataset_json = {"labels": {"background": 0, "mr.lesion": 1, "ct.organ": 2}, "channel_names": {"0": "T1c",
                                                                                                    "1": "CT"},
                    "file_ending": ".nii.gz"}
    return plans, dataset_json


def _toy_case() -> torch.Tensor:
    """(2, 16, 16, 32): channel 0 is -1 on the first half along the last axis, +2 on the second (mean +0.5);
    channel 1 is a missing (constant) slot. Tiles of step 0.5 start at 0, 8, 16: means -1, +0.5, +2."""
    data = torch.zeros(2, 16, 16, 32)
    data[0, ..., :16] = -1.0
    data[0, ..., 16:] = 2.0
    data[1] = 0.3
    return data


def _predictor(cls, net: nn.Module, **kwargs) -> nnUNetPredictor:
    plans, dataset_json = _toy_universal_plans()
    pm = PlansManager(plans)
    pred = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=torch.device("cpu"),
               perform_everything_on_device=False, allow_tqdm=False, **kwargs)
    pred.manual_initialization(net, pm, pm.get_configuration("3d_fullres"), [net.state_dict()], dataset_json,
                               "ToyTrainer", None)
    return pred


def test_case_routing_averages_phi_over_the_cases_tiles():
    net = _ToyRoutedNet()
    routing, availability = case_routing(net, _toy_case(), (16, 16, 16), 0.5)
    # tiles: means -1, 0.5, 2 -> mean phi 0.5 -> domain 1; a per-tile gate would route tile 0 to domain 0
    assert routing.tolist() == [0.0, 1.0] and availability.tolist() == [True, False]
    assert net.route(net.embed(_toy_case()[None, :, :, :, :16])).tolist() == [[1.0, 0.0]]


def test_case_level_routing_never_mixes_domains_within_a_case():
    """Stock nnU-Net sliding window routes per tile and paints two domains' labels into one case;
    UniversalPredictor fixes the case's routing, so the case gets one domain's labels only."""
    case = _toy_case()
    stock = _predictor(nnUNetPredictor, _ToyRoutedNet())
    per_tile = stock.predict_logits_from_preprocessed_data(case).argmax(0)
    assert set(per_tile.unique().tolist()) == {1, 2}  # the mixing this test guards against

    net = _ToyRoutedNet()
    pred = _predictor(UniversalPredictor, net)
    case_level = pred.predict_logits_from_preprocessed_data(case).argmax(0)
    assert set(case_level.unique().tolist()) == {2}
    assert pred.last_routing.tolist() == [0.0, 1.0]
    assert net.context == {}  # cleared after the case
    (ctx,) = net.contexts_seen
    assert ctx["domain"] is None and ctx["availability"].tolist() == [True, False]

    pred.oracle_domain = "mr"
    oracle = pred.predict_logits_from_preprocessed_data(case).argmax(0)
    assert set(oracle.unique().tolist()) == {1} and pred.last_routing.tolist() == [1.0, 0.0]
    assert set(pred.predict_logits_for_domain(case, "ct").argmax(0).unique().tolist()) == {2}
    assert pred.oracle_domain == "mr"


def test_case_routing_is_computed_per_fold_and_averaged():
    net = _ToyRoutedNet()
    pred = _predictor(UniversalPredictor, net)
    flipped = {"scale": -torch.ones(1)}  # second fold's gate sees the negated phi -> domain 0
    pred.list_of_parameters = [net.state_dict(), flipped]
    pred.predict_logits_from_preprocessed_data(_toy_case())
    assert [c["routing"].tolist() for c in net.contexts_seen] == [[0.0, 1.0], [1.0, 0.0]]
    assert pred.last_routing.tolist() == [0.5, 0.5]


def test_network_without_gate_mixes_heads_uniformly():
    net = _ToyRoutedNet()
    net.router = None  # ablation gate=False: nothing to infer the domain with
    pred = _predictor(UniversalPredictor, net)
    pred.predict_logits_from_preprocessed_data(_toy_case())
    assert not pred.gated and pred.last_routing.tolist() == [0.5, 0.5]
    assert net.contexts_seen[0]["routing"].tolist() == [0.5, 0.5]


def _tiny_net(options: NetworkOptions | None = None, perturbed: bool = False) -> UniversalUNet:
    """A tiny gated UniversalUNet on 2 slots, domains [[1], [2]] (seeded); ``perturbed``: He-initialized, then every
    weight nudged, so that the heads and the gate differ from their initialization."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    backbone = PlainConvUNet(2, 3, [4, 8, 16], nn.Conv3d, 3, [1, 2, 2], 1, 3, 1, True, nn.InstanceNorm3d,
                             {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                             deep_supervision=False)
    if perturbed:
        backbone.apply(backbone.initialize)
    net = UniversalUNet(backbone, [[1], [2]], 3, 2, options or NetworkOptions())
    if perturbed:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape))
    return net


@pytest.mark.parametrize("mirroring", [False, True])
def test_dataset_free_prediction_reuses_the_routing_pass_encodings(mirroring):
    """The routing pass's encoder outputs serve the prediction pass: each unmirrored tile is encoded once, and
    the logits are bit-identical to encoding every tile twice (cache off)."""
    net = _tiny_net(perturbed=True)
    encoded = []
    net.encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    case = _toy_case()
    case[0] += 0.3 * torch.randn(case.shape[1:])
    pred = _predictor(UniversalPredictor, net)
    pred.one_pass = False  # the two-pass path (soft routing, or NNUNET_UNIVERSAL_ONE_PASS=0)
    pred.use_mirroring, pred.allowed_mirroring_axes = mirroring, (0, 1, 2)
    passes = 1 + 7 * mirroring  # network calls per tile in the prediction pass

    cached = pred.predict_logits_from_preprocessed_data(case)
    assert encoded == [1] * (3 + 3 * (passes - 1))  # 3 tiles: routing pass, then mirrored passes only
    encoded.clear()
    pred.encoding_cache_mb = 0
    plain = pred.predict_logits_from_preprocessed_data(case)
    assert len(encoded) == 3 + 3 * passes
    assert torch.equal(cached, plain)
    assert net._encoding_cache is None  # released after the case


@pytest.mark.parametrize("mirroring", [False, True])
def test_one_pass_prediction_equals_the_two_pass_one(mirroring):
    """Hard routing (the default) in one sliding window: every tile is encoded once per network call (no routing
    pass), the routing and the logits are bit-identical to the two-pass prediction (with and without the encoding
    cache), nothing is kept after the case; the gate's bias sends the case to either domain in turn."""
    net = _tiny_net(perturbed=True)
    encoded = []
    net.encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    passes = 1 + 7 * mirroring
    two = _predictor(UniversalPredictor, net)
    two.one_pass = False
    one = _predictor(UniversalPredictor, net)
    assert one.one_pass and net.options.routing == "hard"
    case = _toy_case()
    case[0] += 0.3 * torch.randn(case.shape[1:])
    inferred = set()
    for bias in (-20.0, 20.0):
        with torch.no_grad():  # route the case to domain 0, then to domain 1
            net.router.gate.bias[1] = bias
        for p in (one, two):
            p.use_mirroring, p.allowed_mirroring_axes = mirroring, (0, 1, 2)
        encoded.clear()
        a = one.predict_logits_from_preprocessed_data(case)
        assert len(encoded) == 3 * passes  # 3 tiles, no routing pass
        assert net._case_pass is None and net._encoding_cache is None
        for cache_mb in (1024, 0):
            two.encoding_cache_mb = cache_mb
            b = two.predict_logits_from_preprocessed_data(case)
            assert torch.equal(a, b) and a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(one.last_routing, two.last_routing)
            assert torch.equal(one.last_applied, two.last_applied)
        inferred.add(int(one.last_applied.argmax()))
        assert one.routing_record("toy")["rule"] == "hard"
    assert inferred == {0, 1}


def test_one_pass_recomputes_the_routing_when_nnunet_restarts_the_sliding_window(caplog):
    """nnU-Net retries a case's sliding window with its results on the CPU when the device runs out of memory: the
    case's embedding then holds the tiles of both tries; the routing is computed in a separate pass instead, and
    the logits equal the two-pass ones."""
    net = _tiny_net()
    case = _toy_case()
    case[0] += 0.3 * torch.randn(case.shape[1:])
    two = _predictor(UniversalPredictor, net)
    two.one_pass = False
    expected = two.predict_logits_from_preprocessed_data(case)
    one = _predictor(UniversalPredictor, net)
    first_try = one._internal_predict_sliding_window_return_logits

    def retried(*args, **kwargs):  # a first try whose result is dropped, as after nnU-Net's out-of-memory fallback
        first_try(*args, **kwargs)
        return first_try(*args, **kwargs)

    one._internal_predict_sliding_window_return_logits = retried
    with caplog.at_level("WARNING"):
        got = one.predict_logits_from_preprocessed_data(case)
    assert "saw 6 tiles for 3" in caplog.text
    assert torch.equal(got, expected) and torch.equal(one.last_routing, two.last_routing)


def test_soft_routing_keeps_the_two_pass_prediction():
    """Soft routing mixes the heads by the case's weights: it needs them before the tiles, so no one pass."""
    net = _tiny_net(NetworkOptions(routing="soft"))
    encoded = []
    net.encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    pred = _predictor(UniversalPredictor, net)
    pred.encoding_cache_mb = 0
    out = pred.predict_logits_from_preprocessed_data(_toy_case())
    assert out.shape[0] == 3 and len(encoded) == 3 + 3  # routing pass + prediction pass


def test_encoding_cache_mismatch_is_caught_and_the_case_predicted_again(monkeypatch, caplog):
    """Tiles are matched by position and checked once per case: a wrong match (here: the routing pass's
    encodings reversed) is detected and the case predicted again without them, with the same logits."""
    import nnunet_universal.inference.predictor as predictor_module

    net = _tiny_net()
    case = _toy_case()
    case[0] += 0.3 * torch.randn(case.shape[1:])
    pred = _predictor(UniversalPredictor, net)
    plain_pred = _predictor(UniversalPredictor, net)
    pred.one_pass = plain_pred.one_pass = False  # the two-pass path
    plain_pred.encoding_cache_mb = 0
    plain = plain_pred.predict_logits_from_preprocessed_data(case)
    real_routing = predictor_module.case_routing

    def reversed_routing(network, *args, **kwargs):
        out = real_routing(network, *args, **kwargs)
        network._encoding_cache._entries.reverse()
        return out

    monkeypatch.setattr(predictor_module, "case_routing", reversed_routing)
    with caplog.at_level("WARNING"):
        again = pred.predict_logits_from_preprocessed_data(case)
    assert "did not match" in caplog.text
    assert torch.equal(again, plain)


def test_predictor_rejects_a_network_without_routing():
    with pytest.raises(MetadataError, match="not a universal model.*built a Conv3d, which has no domain routing"):
        _predictor(UniversalPredictor, nn.Conv3d(2, 3, 1))


# ---- model folder checks ------------------------------------------------------------------------

def test_check_model_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected a model folder"):
        check_model_folder(tmp_path / "missing", None, "checkpoint_final.pth")
    with pytest.raises(FileNotFoundError, match="not an nnU-Net model folder: no plans.json"):
        check_model_folder(tmp_path, None, "checkpoint_final.pth")
    plans, dataset_json = _toy_universal_plans()
    (tmp_path / "dataset.json").write_text(json.dumps(dataset_json))
    (tmp_path / "plans.json").write_text(json.dumps({k: v for k, v in plans.items() if k != "universal"}))
    with pytest.raises(MetadataError, match="is not a universal model.*no 'universal' block"):
        check_model_folder(tmp_path, None, "checkpoint_final.pth")
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(FileNotFoundError, match="has no fold_X/checkpoint_final.pth"):
        check_model_folder(tmp_path, None, "checkpoint_final.pth")
    for f in ("1", "0", "all"):
        (tmp_path / f"fold_{f}").mkdir()
        (tmp_path / f"fold_{f}" / "checkpoint_final.pth").write_bytes(b"")
    folds, meta, _ = check_model_folder(tmp_path, None, "checkpoint_final.pth")
    assert folds == ["0", "1"] and meta.domain_names == ["mr", "ct"]
    with pytest.raises(FileNotFoundError, match="fold 3 has no checkpoint_best.pth"):
        check_model_folder(tmp_path, ["3"], "checkpoint_best.pth")


# ---- end to end: a tiny model trained with the real nnUNetv2_train ------------------------------

DATASET_ID = 990
CASES = ("mr_a_001", "mr_b_001", "ct_001")
SCHEDULE = "1:3:1"  # epochs : train iterations : val iterations (NNUNET_UNIVERSAL_SCHEDULE)
TINY_FEATURES = [8, 16, 32]  # the planned 32-64-128 U-Net, narrowed for a 2-core CPU (plans edited before training)


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else shutil.which(name)


def _run(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _labels(path: Path) -> set[int]:
    return set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist())


def _same_image(a: Path, b: Path) -> None:
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ia.GetSize() == ib.GetSize() and np.allclose(ia.GetSpacing(), ib.GetSpacing())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Fixture dataset (2 cases per domain) planned by ``nnunet-universal plan`` and trained for one short epoch
    by the real ``nnUNetv2_train ... -tr UniversalTrainer`` on the CPU (fold 0). The plans' U-Net is narrowed to
    ``TINY_FEATURES`` before training so that the module stays fast; everything else is as planned."""
    from merged_fixture import make_merged_dataset

    from nnunet_universal.planners.fingerprint import SAMPLES_ENV
    from nnunet_universal.trainers.discovery import ext_trainer_value

    root = tmp_path_factory.mktemp("inference")
    dirs = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for d in dirs.values():
        d.mkdir()
    raw = make_merged_dataset(dirs["nnUNet_raw"], DATASET_ID, cases_per_domain=2)
    base = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env = {**base, **{k: str(v) for k, v in dirs.items()}, "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1",
           "nnUNet_compile": "f", SAMPLES_ENV: "20000"}
    _ok(_run([_bin("nnunet-universal"), "plan", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"], env))
    plans_file = dirs["nnUNet_preprocessed"] / raw.name / f"{PLANS_NAME}.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = TINY_FEATURES
    plans_file.write_text(json.dumps(plans, indent=2))
    stock_env = {**env, "nnUNet_extTrainer": ext_trainer_value("")}  # what 'eval "$(nnunet-universal env)"' sets
    _ok(_run([_bin("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", "UniversalTrainer", "-p", PLANS_NAME,
              "-device", "cpu"], {**stock_env, "nnUNet_n_proc_DA": "0", SCHEDULE_ENV: SCHEDULE}, timeout=600))
    model_dir = dirs["nnUNet_results"] / raw.name / f"UniversalTrainer__{PLANS_NAME}__3d_fullres"
    assert (model_dir / "fold_0" / "checkpoint_final.pth").is_file()

    full, partial = root / "inputs_full", root / "inputs_partial"  # all channel files / only the domain's slots
    full.mkdir()
    partial.mkdir()
    meta = json.loads((raw / "dataset.json").read_text())["universal"]
    for case in CASES:
        slots = meta["cases"][case]["slots"]
        for ch, slot in enumerate(SLOTS):
            src = raw / "imagesTr" / f"{case}_{ch:04d}.nii.gz"
            shutil.copy(src, full / src.name)
            if slot in slots:
                shutil.copy(src, partial / src.name)
    return {"root": root, "raw": raw, "env": env, "stock_env": stock_env, "model_dir": model_dir, "full": full,
            "partial": partial, "meta": meta}


@pytest.fixture(scope="module")
def free_run(model):
    """``nnunet-universal predict`` (subprocess, no nnUNet_extTrainer set) on a folder whose cases lack the slots
    their domain does not have; dataset-free, with per-domain maps."""
    out = model["root"] / "pred_free"
    proc = _run([_bin("nnunet-universal"), "predict", "-m", str(model["model_dir"]), "-i", str(model["partial"]),
                 "-o", str(out), "-device", "cpu", "--save-domain-maps", "--disable-tta"], model["env"])
    _ok(proc)
    return out


def _domain_ids(meta: dict, domain: str) -> set[int]:
    return set(meta["domains"][domain]["labels"].values())


def test_stock_nnunetv2_predict_writes_union_label_maps(model):
    out = model["root"] / "pred_stock"
    _ok(_run([_bin("nnUNetv2_predict"), "-i", str(model["full"]), "-o", str(out), "-d", str(DATASET_ID), "-c",
              "3d_fullres", "-f", "0", "-tr", "UniversalTrainer", "-p", PLANS_NAME, "-device", "cpu", "-npp", "0",
              "-nps", "0", "--disable_tta"], model["stock_env"]))
    for case in CASES:
        pred = out / f"{case}.nii.gz"
        ref = sitk.ReadImage(str(model["full"] / f"{case}_0000.nii.gz"))
        img = sitk.ReadImage(str(pred))
        assert img.GetSize() == ref.GetSize() and np.allclose(img.GetSpacing(), ref.GetSpacing())
        assert _labels(pred) <= set(range(7))  # union ids of the fixture: 0..6
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(pred)))
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(model["raw"] / "labelsTr" / f"{case}.nii.gz")))
        assert (seg[gt > 0] > 0).any(), f"{case}: stock prediction has no foreground where the ground truth has some"


def test_universal_predict_dataset_free_routing_json_and_domain_maps(model, free_run):
    meta = model["meta"]
    for case in CASES:
        pred = free_run / f"{case}.nii.gz"
        ref = sitk.ReadImage(str(model["full"] / f"{case}_0000.nii.gz"))
        assert sitk.ReadImage(str(pred)).GetSize() == ref.GetSize()
        rec = json.loads((free_run / f"{case}.routing.json").read_text())
        alternative = {"alternative"} if rec["uncertain"] and rec["conflicting"] else set()
        assert set(rec) == {"case", "mode", "rule", "given_domain", "inferred_domain", "confidence",
                            "confidence_threshold", "runner_up", "uncertain", "conflicting", "action", "routing",
                            "applied", "slots"} | alternative
        assert rec["case"] == case and rec["mode"] == "dataset-free" and rec["rule"] == "hard"
        assert rec["given_domain"] is None
        assert rec["slots"] == meta["cases"][case]["slots"]  # the slots given, not the zero-filled ones
        assert list(rec["routing"]) == ["mr_a", "mr_b", "ct"]
        assert sum(rec["routing"].values()) == pytest.approx(1.0, abs=1e-4)
        assert rec["inferred_domain"] == max(rec["routing"], key=rec["routing"].get)
        assert rec["confidence"] == pytest.approx(max(rec["routing"].values()), abs=1e-6)
        assert rec["uncertain"] == (rec["confidence"] < rec["confidence_threshold"])
        assert rec["runner_up"] in meta["domains"] and rec["runner_up"] != rec["inferred_domain"]
        # the default (hard) rule: only the inferred domain's head, so dataset-free equals that domain's oracle map
        assert rec["applied"] == {d: float(d == rec["inferred_domain"]) for d in rec["routing"]}
        _same_image(pred, free_run / "domain_maps" / rec["inferred_domain"] / f"{case}.nii.gz")
        for domain in meta["domains"]:  # each head's oracle map holds only that domain's union ids
            assert _labels(free_run / "domain_maps" / domain / f"{case}.nii.gz") <= {0} | _domain_ids(meta, domain)
    assert not list(free_run.glob(".export_*"))  # temp folders of the atomic export are gone


def test_routing_report_lists_only_slots_with_data(model):
    """A folder with every channel file (zero-filled ones included, like a merged imagesTs): the report's slots
    are the case's real slots, not the zero-filled channels."""
    out = model["root"] / "pred_full"
    _ok(_run([_bin("nnunet-universal"), "predict", "-m", str(model["model_dir"]), "-i", str(model["full"]),
              "-o", str(out), "-device", "cpu", "--disable-tta"], model["env"]))
    for case in CASES:
        rec = json.loads((out / f"{case}.routing.json").read_text())
        assert rec["slots"] == model["meta"]["cases"][case]["slots"]


def test_universal_predict_slot_images_oracle_equals_domain_map(model, free_run):
    """``--image SLOT=FILE`` with missing slots + ``--domain``: the same zero-filled input as the folder run,
    so the oracle map equals that run's ``domain_maps/mr_a`` map exactly."""
    out = model["root"] / "pred_oracle"
    img = model["raw"] / "imagesTr"
    _ok(_run([_bin("nnunet-universal"), "predict", "-m", str(model["model_dir"]), "--image",
              f"FLAIR={img / 'mr_a_001_0003.nii.gz'}", "--image", f"T1c={img / 'mr_a_001_0001.nii.gz'}",
              "--domain", "mr_a", "--case-id", "p1", "-o", str(out), "-device", "cpu", "--disable-tta"],
             model["env"]))
    rec = json.loads((out / "p1.routing.json").read_text())
    assert rec == {"case": "p1", "mode": "oracle", "rule": "oracle", "given_domain": "mr_a", "inferred_domain": None,
                   "routing": {"mr_a": 1.0, "mr_b": 0.0, "ct": 0.0}, "applied": {"mr_a": 1.0, "mr_b": 0.0, "ct": 0.0},
                   "slots": ["T1c", "FLAIR"]}
    _same_image(out / "p1.nii.gz", free_run / "domain_maps" / "mr_a" / "mr_a_001.nii.gz")


def test_export_zip_round_trip_predicts_identically(model, free_run, monkeypatch):
    from nnunet_universal.inference.api import predict

    archive = model["root"] / "model.zip"
    _ok(_run([_bin("nnUNetv2_export_model_to_zip"), "-d", str(DATASET_ID), "-o", str(archive), "-c", "3d_fullres",
              "-tr", "UniversalTrainer", "-p", PLANS_NAME, "-f", "0"], model["env"]))
    installed_root = model["root"] / "installed_results"
    installed_root.mkdir()
    _ok(_run([_bin("nnUNetv2_install_pretrained_model_from_zip"), str(archive)],
             {**model["env"], "nnUNet_results": str(installed_root)}))
    installed = installed_root / model["model_dir"].relative_to(model["model_dir"].parents[1])
    monkeypatch.setenv("nnUNet_extTrainer", "")  # restored afterwards; predict() adds our folder itself
    out = model["root"] / "pred_installed"
    written = predict(installed, out, input_dir=model["partial"], device="cpu", mirroring=False)
    assert sorted(p.name for p in written) == sorted(f"{c}.nii.gz" for c in CASES)
    for case in CASES:
        _same_image(out / f"{case}.nii.gz", free_run / f"{case}.nii.gz")
        rec, ref = (json.loads((d / f"{case}.routing.json").read_text()) for d in (out, free_run))
        # the runner-up's map of an uncertain case lies in domain_maps/ when the reference run saved those
        for r in (rec, ref):
            r.pop("action", None)
            if "alternative" in r:
                r["alternative"] = Path(r.pop("alternative")).parent.name
        assert rec == ref


def _model_with_modules(model: dict, name: str, **modules) -> Path:
    """A copy of the trained test model whose plans' ``universal.modules`` get ``modules``."""
    folder = model["root"] / name
    shutil.copytree(model["model_dir"], folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["universal"]["modules"].update(modules)
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


def test_uncertain_conflicting_cases_are_flagged_and_get_the_runner_ups_map(model, free_run, monkeypatch):
    """With ``routing_confidence`` 1.0 every case is uncertain: each is predicted with its top domain's head only
    (never mixed), flagged, and the runner-up domain's label map is written beside it and named in the report."""
    from nnunet_universal.inference.api import ALTERNATIVES, predict

    monkeypatch.setenv("nnUNet_extTrainer", "")
    out = model["root"] / "pred_strict"
    predict(_model_with_modules(model, "model_strict", routing_confidence=1.0), out, input_dir=model["partial"],
            device="cpu", mirroring=False)
    for case in CASES:
        rec = json.loads((out / f"{case}.routing.json").read_text())
        assert rec["uncertain"] and rec["conflicting"] and rec["rule"] == "hard"
        assert rec["applied"] == {d: float(d == rec["inferred_domain"]) for d in rec["routing"]}
        assert rec["alternative"] == f"{ALTERNATIVES}/{rec['runner_up']}/{case}.nii.gz"
        assert "runner-up's label map" in rec["action"] and "--domain" in rec["action"]
        _same_image(out / f"{case}.nii.gz", free_run / "domain_maps" / rec["inferred_domain"] / f"{case}.nii.gz")
        _same_image(out / rec["alternative"], free_run / "domain_maps" / rec["runner_up"] / f"{case}.nii.gz")


def test_soft_routing_in_the_plans_mixes_the_heads_by_the_routing_weights(model, free_run, monkeypatch):
    """The trained model with ``routing: soft`` in its plans (U-Harmony's rule): the same routing weights as the
    default (hard) run, applied as they are, and the report says so."""
    from nnunet_universal.inference.api import predict

    monkeypatch.setenv("nnUNet_extTrainer", "")
    out = model["root"] / "pred_soft"
    predict(_model_with_modules(model, "model_soft", routing="soft"), out, input_dir=model["partial"], device="cpu",
            mirroring=False)
    for case in CASES:
        hard = json.loads((free_run / f"{case}.routing.json").read_text())
        rec = json.loads((out / f"{case}.routing.json").read_text())
        assert rec["rule"] == "soft" and rec["applied"] == rec["routing"]
        assert rec["routing"] == pytest.approx(hard["routing"], abs=1e-5)
        assert rec["inferred_domain"] == hard["inferred_domain"]


def test_predict_routing_soft_flag_overrides_the_plans(model, free_run):
    """``nnunet-universal predict --routing soft`` on the default (hard) model: the report records the soft rule
    and the raw weights as applied; uncertain cases carry the soft rule's warning."""
    out = model["root"] / "pred_cli_soft"
    _ok(_run([_bin("nnunet-universal"), "predict", "-m", str(model["model_dir"]), "-i", str(model["partial"]),
              "-o", str(out), "-device", "cpu", "--disable-tta", "--routing", "soft"], model["env"]))
    for case in CASES:
        hard = json.loads((free_run / f"{case}.routing.json").read_text())
        rec = json.loads((out / f"{case}.routing.json").read_text())
        assert set(rec) == set(hard) - {"alternative"} and rec["mode"] == "dataset-free"
        assert rec["given_domain"] is None
        assert rec["rule"] == "soft" and rec["applied"] == rec["routing"]
        assert rec["inferred_domain"] == hard["inferred_domain"]
        assert rec["confidence"] == pytest.approx(max(rec["routing"].values()), abs=1e-6)
        assert rec["runner_up"] == sorted(rec["routing"], key=rec["routing"].get)[-2]
        assert rec["uncertain"] == (rec["confidence"] < rec["confidence_threshold"])
        assert ("soft routing" in rec["action"]) == rec["uncertain"]
        assert (rec["action"] == "confident") == (not rec["uncertain"])


def _probabilities(folder: Path, case: str) -> np.ndarray:
    with np.load(folder / f"{case}.npz") as npz:
        assert list(npz.keys()) == ["probabilities"]
        return npz["probabilities"]


def _component_sizes(mask: np.ndarray) -> list[int]:
    """Sizes of the 26-connected components of ``mask`` (nnU-Net's connectivity for "largest component")."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    return np.bincount(lab.ravel(), minlength=n + 1)[1:].tolist()


def _only_largest_kept(before: np.ndarray, after: np.ndarray) -> bool:
    """``after`` keeps only the largest component(s) of ``before`` (nnU-Net keeps every component of maximal size)."""
    sizes, kept = _component_sizes(before), _component_sizes(after)
    return not sizes or (set(kept) == {max(sizes)} and len(kept) == sizes.count(max(sizes)))


@pytest.fixture(scope="module")
def prob_runs(model, free_run):
    """Two ``nnunet-universal predict --save_probabilities`` runs: the model selected nnU-Net's way
    (``-d -c -tr -p -f``, default hard routing) and by ``-m`` with ``--routing soft``."""
    cli, runs = _bin("nnunet-universal"), {}
    common = ["-i", str(model["partial"]), "-device", "cpu", "--disable_tta", "--save_probabilities"]
    runs["hard"] = model["root"] / "pred_prob_hard"
    _ok(_run([cli, "predict", "-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", "UniversalTrainer", "-p", PLANS_NAME,
              "-f", "0", "-o", str(runs["hard"]), *common], model["env"]))
    runs["soft"] = model["root"] / "pred_prob_soft"
    _ok(_run([cli, "predict", "-m", str(model["model_dir"]), "--routing", "soft", "-o", str(runs["soft"]), *common],
             model["env"]))
    return runs


def test_predict_output_folder_matches_nnunetv2_predicts(model, free_run, prob_runs):
    """``-d 990 -c -tr -p -f 0`` finds the trained model (same maps as ``-m``); the output folder holds the model's
    dataset.json and plans.json, the run's arguments, and per case nnU-Net's .npz (softmax over the union labels,
    the image's array layout) and .pkl, whose argmax is the label map."""
    out = prob_runs["hard"]
    for name in ("dataset.json", "plans.json"):
        assert (out / name).read_bytes() == (model["model_dir"] / name).read_bytes()
    args = json.loads((out / "predict_from_raw_data_args.json").read_text())
    assert args["model_folder"] == str(model["model_dir"].resolve()) and args["folds"] == ["0"]
    assert args["save_probabilities"] and args["routing"] == "hard" and not args["use_mirroring"]
    n_labels = len(json.loads((out / "dataset.json").read_text())["labels"])
    for case in CASES:
        _same_image(out / f"{case}.nii.gz", free_run / f"{case}.nii.gz")
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        probs = _probabilities(out, case)
        assert probs.shape == (n_labels, *seg.shape)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)
        np.testing.assert_array_equal(probs.argmax(0), seg)
        with open(out / f"{case}.pkl", "rb") as f:
            props = pickle.load(f)  # written by this test's own run: trusted
        assert list(props["spacing"]) == pytest.approx(list(sitk.ReadImage(str(out / f"{case}.nii.gz"))
                                                           .GetSpacing())[::-1])
    assert not list(out.glob(".export_*")) and not (free_run / f"{CASES[0]}.npz").exists()


def test_nnunetv2_ensemble_runs_on_two_predict_outputs(model, prob_runs):
    out = model["root"] / "ensemble"
    _ok(_run([_bin("nnUNetv2_ensemble"), "-i", str(prob_runs["hard"]), str(prob_runs["soft"]), "-o", str(out),
              "-np", "1"], model["env"]))
    for case in CASES:
        mean = (_probabilities(prob_runs["hard"], case) + _probabilities(prob_runs["soft"], case)) / 2
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        np.testing.assert_array_equal(seg, mean.argmax(0))


def test_nnunetv2_apply_postprocessing_runs_without_plans_and_dataset_flags(model, prob_runs, tmp_path):
    """nnU-Net's postprocessing tool reads dataset.json/plans.json from our output folder. The postprocessing.pkl is
    made here with nnU-Net's own function (largest component per foreground label)."""
    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation,
    )

    labels = list(range(1, 7))
    pp_pkl = tmp_path / "postprocessing.pkl"
    save_pickle(([remove_all_but_largest_component_from_segmentation] * len(labels),
                 [{"labels_or_regions": label} for label in labels]), str(pp_pkl))
    pred, out = prob_runs["hard"], tmp_path / "pp"
    _ok(_run([_bin("nnUNetv2_apply_postprocessing"), "-i", str(pred), "-o", str(out), "-pp_pkl_file", str(pp_pkl),
              "-np", "1"], model["env"]))
    removed = 0
    for case in CASES:
        before = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{case}.nii.gz")))
        after = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        assert set(np.unique(after)) <= set(np.unique(before))
        removed += int((after != before).sum())
        for label in labels:
            assert _only_largest_kept(before == label, after == label)
    assert removed > 0  # the one-epoch model predicts scattered components: the tool did work on our files


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_postprocess_never_keeps_only_the_largest_lesion(model, prob_runs, tmp_path):
    """``nnunet-universal postprocess`` applies nnU-Net's largest-component steps except on the classes of the
    lesion-wise domain (mr_a.ET, id 1), keeps the routing reports, and refuses a pkl that would run code."""
    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation,
    )

    lesion_ids = _domain_ids(model["meta"], "mr_a")
    labels = list(range(1, 7))
    pp_pkl = tmp_path / "postprocessing.pkl"
    save_pickle(([remove_all_but_largest_component_from_segmentation] * len(labels),
                 [{"labels_or_regions": label} for label in labels]), str(pp_pkl))
    pred, out, cli = prob_runs["hard"], tmp_path / "pp", _bin("nnunet-universal")
    proc = _run([cli, "postprocess", "-i", str(pred), "-o", str(out), "-pp_pkl_file", str(pp_pkl)], model["env"])
    _ok(proc)
    assert "not applied (multi-lesion domain): largest component only of 1 (lesion classes mr_a.ET)" in proc.stdout
    report = json.loads((out / "postprocessing_report.json").read_text())
    assert len(report["dropped"]) == len(lesion_ids) and len(report["applied"]) == len(labels) - len(lesion_ids)
    for case in CASES:
        before = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{case}.nii.gz")))
        after = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        for label in labels:
            if label in lesion_ids:
                np.testing.assert_array_equal(after == label, before == label)  # every lesion kept
            else:
                assert _only_largest_kept(before == label, after == label)
        assert (out / f"{case}.routing.json").read_bytes() == (pred / f"{case}.routing.json").read_bytes()
    assert (out / "plans.json").read_bytes() == (pred / "plans.json").read_bytes()

    marker = tmp_path / "code_ran"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))
    proc = _run([cli, "postprocess", "-i", str(pred), "-o", str(tmp_path / "pp2"), "-pp_pkl_file",
                 str(tmp_path / "evil.pkl")], model["env"])
    assert proc.returncode == 2 and "is not an nnU-Net postprocessing.pkl, refused" in proc.stderr
    assert "posix.system is not one of nnU-Net's post-processing functions" in proc.stderr
    assert not marker.exists() and "Traceback" not in proc.stderr


def test_nnunet_universal_train_needs_no_environment(model):
    """``nnunet-universal train`` finds UniversalTrainer without ``eval "$(nnunet-universal env)"``: nnUNet_extTrainer
    unset, ``--val`` re-runs the final validation of the trained fold."""
    env = {k: v for k, v in model["env"].items() if k != "nnUNet_extTrainer"}
    summary = model["model_dir"] / "fold_0" / "validation" / "summary.json"
    written_by_training = summary.stat().st_mtime_ns
    _ok(_run([_bin("nnunet-universal"), "train", str(DATASET_ID), "3d_fullres", "0", "--val", "-device", "cpu"],
             {**env, "nnUNet_n_proc_DA": "0"}, timeout=600))
    assert summary.stat().st_mtime_ns > written_by_training


def test_decide_routing_flags_unsure_cases_and_knows_identical_label_sets():
    from nnunet_universal.inference.routing import decide_routing

    labels = [[1, 2], [3], [3]]  # domains 1 and 2 annotate the same (declared identical) class
    sure = decide_routing(torch.tensor([0.9, 0.06, 0.04]), "hard", 0.8, labels)
    assert (sure.inferred, sure.uncertain, sure.conflicting) == (0, False, False)
    assert sure.applied.tolist() == [1.0, 0.0, 0.0]
    unsure = decide_routing(torch.tensor([0.5, 0.45, 0.05]), "hard", 0.8, labels)
    assert (unsure.inferred, unsure.runner_up, unsure.uncertain, unsure.conflicting) == (0, 1, True, True)
    assert unsure.applied.tolist() == [1.0, 0.0, 0.0]  # never mixed with the runner-up's labels
    harmless = decide_routing(torch.tensor([0.05, 0.5, 0.45]), "hard", 0.8, labels)
    assert (harmless.inferred, harmless.uncertain, harmless.conflicting) == (1, True, False)
    soft = decide_routing(torch.tensor([0.5, 0.45, 0.05]), "soft", 0.8, labels)
    assert soft.applied.tolist() == pytest.approx([0.5, 0.45, 0.05])
    with pytest.raises(ValueError, match="'hard' or 'soft'"):
        decide_routing(torch.tensor([1.0]), "oracle", 0.8, [[1]])


def test_cli_errors_exit_2_with_clear_messages(model, tmp_path):
    cli, m, env = _bin("nnunet-universal"), str(model["model_dir"]), model["env"]
    img = model["raw"] / "imagesTr"
    proc = _run([cli, "predict", "-m", m, "--image", f"T1ce={img / 'mr_a_001_0001.nii.gz'}", "-o", str(tmp_path),
                 "-device", "cpu"], env)
    assert proc.returncode == 2 and "unknown slot 'T1ce'" in proc.stderr and "T1, T1c, T2, FLAIR, CT" in proc.stderr

    _write(tmp_path / "flair_2mm.nii.gz", np.ones((10, 12, 12)), spacing=(2.0, 2.0, 2.0))
    proc = _run([cli, "predict", "-m", m, "--image", f"T1c={img / 'mr_a_001_0001.nii.gz'}", "--image",
                 f"FLAIR={tmp_path / 'flair_2mm.nii.gz'}", "-o", str(tmp_path), "-device", "cpu"], env)
    assert proc.returncode == 2 and "geometry mismatch (size)" in proc.stderr
    assert "mr_a_001_0001.nii.gz" in proc.stderr and "flair_2mm.nii.gz" in proc.stderr

    plain = tmp_path / "plain_model"
    plain.mkdir()
    plans = json.loads((model["model_dir"] / "plans.json").read_text())
    plans.pop("universal")
    (plain / "plans.json").write_text(json.dumps(plans))
    shutil.copy(model["model_dir"] / "dataset.json", plain / "dataset.json")
    proc = _run([cli, "predict", "-m", str(plain), "-i", str(model["partial"]), "-o", str(tmp_path), "-device",
                 "cpu"], env)
    assert proc.returncode == 2 and f"{plain} is not a universal model" in proc.stderr

    proc = _run([cli, "predict", "-m", m, "-i", str(model["partial"]), "--domain", "brats", "-o", str(tmp_path),
                 "-device", "cpu"], env)
    assert proc.returncode == 2 and "unknown domain 'brats'" in proc.stderr and "mr_a" in proc.stderr
