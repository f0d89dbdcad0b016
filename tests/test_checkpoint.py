"""QEEPSCheckpointer: MSRA/Caffe2 .pkl, torchvision .pth and own checkpoints on the tiny model.

The checkpoint files are written here from the tiny model's own parameter list, under the
official names of each format, with random values; loading must put every value back in place.
"""
import logging
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision

from qeeps_d2.engine import Trainer
from detectron2.engine.hooks import PeriodicCheckpointer
from detectron2.modeling import build_model

from model_fixtures import tiny_cfg
from qeeps_d2.checkpoint import (
    CheckpointError,
    QEEPSCheckpointer,
    TORCHVISION_PIXEL_MEAN,
    TORCHVISION_PIXEL_STD,
)

_RESNET_KEY = re.compile(r"^(backbone\.(stem|res[2-4])|roi_heads\.res5)\.")
_C2_NORM = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
_C2_CONV = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}


def _model(seed=0, **switches):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**switches))


def _resnet_keys(model):
    """Stem, res2-res4 (backbone) and res5 (ROI head) weights, without the QSSE add-ons."""
    return [
        k for k in model.state_dict()
        if _RESNET_KEY.match(k) and ".qsse." not in k and not k.endswith("num_batches_tracked")
    ]


def _c2_name(key):
    """backbone.res2.0.conv1.norm.weight -> res2_0_branch2a_bn_s (MSRA R-50.pkl names)."""
    parts = key.split(".")[1:]
    if parts[0] == "stem":
        return "conv1_w" if parts[2] == "weight" else f"res_conv1_bn_{_C2_NORM[parts[-1]]}"
    stage, block, conv = parts[:3]
    base = f"{stage}_{block}_{_C2_CONV[conv]}"
    return f"{base}_w" if parts[3] == "weight" else f"{base}_bn_{_C2_NORM[parts[-1]]}"


def _torchvision_name(key):
    """backbone.res4.0.conv2.norm.weight -> layer3.0.bn2.weight (torchvision ResNet names)."""
    parts = key.split(".")[1:]
    if parts[0] == "stem":
        return "conv1." + parts[-1] if parts[2] != "norm" else "bn1." + parts[-1]
    layer = f"layer{int(parts[0][3:]) - 1}.{parts[1]}"
    if parts[2] == "shortcut":
        return f"{layer}.downsample.{1 if parts[3] == 'norm' else 0}.{parts[-1]}"
    if parts[3] == "norm":
        return f"{layer}.bn{parts[2][-1]}.{parts[-1]}"
    return f"{layer}.{parts[2]}.{parts[-1]}"


def _random_like(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) for k, v in model.state_dict().items()
            if v.is_floating_point()}


def _assert_landed(model, expected):
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], torch.as_tensor(value)), key


def test_name_helpers_use_the_official_names():
    assert _c2_name("backbone.stem.conv1.weight") == "conv1_w"
    assert _c2_name("backbone.stem.conv1.norm.bias") == "res_conv1_bn_b"
    assert _c2_name("backbone.res2.0.conv1.norm.weight") == "res2_0_branch2a_bn_s"
    assert _c2_name("roi_heads.res5.0.shortcut.weight") == "res5_0_branch1_w"
    assert _torchvision_name("backbone.res4.0.conv2.norm.running_var") == "layer3.0.bn2.running_var"
    assert _torchvision_name("roi_heads.res5.0.shortcut.norm.bias") == "layer4.0.downsample.1.bias"
    # the generated names are exactly torchvision's ResNet-50 keys (tiny_cfg is a depth-50 ResNet)
    model = _model()
    names = {_torchvision_name(k) for k in model.state_dict() if _RESNET_KEY.match(k)
             and ".qsse." not in k}
    with torch.device("meta"):
        official = set(torchvision.models.resnet50().state_dict())
    assert names | {"fc.weight", "fc.bias"} == official


@pytest.mark.parametrize(
    "switches, wrapped",
    [({}, True), ({"qsse": True, "qrpn": True, "qsimnet": True}, True),
     ({"qsse": True, "qrpn": True, "qsimnet": True}, False)],
    ids=["oim-blobs", "qeeps-blobs", "qeeps-plain"],
)
def test_msra_caffe2_pkl_lands_every_resnet_weight(tmp_path, switches, wrapped):
    model = _model(**switches)
    keys = _resnet_keys(model)
    values = _random_like(model, seed=1)
    blobs = {_c2_name(k): values[k].numpy() for k in keys}
    blobs["fc1000_w"] = np.ones((1000, 256), np.float32)
    blobs["fc1000_b"] = np.ones((1000,), np.float32)
    blobs["res2_0_branch2a_w_momentum"] = np.ones(1, np.float32)  # dropped by the loader
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs, "__author__": "Caffe2"} if wrapped else blobs, f)

    QEEPSCheckpointer(model).load(str(path))  # no "Cannot match one checkpoint key" error
    _assert_landed(model, {k: values[k] for k in keys})


def test_torchvision_pth_lands_every_resnet_weight(tmp_path, caplog):
    model = _model()
    keys = _resnet_keys(model)
    values = _random_like(model, seed=2)
    state = {_torchvision_name(k): values[k] for k in keys}
    state["fc.weight"] = torch.ones(1000, 256)
    state["fc.bias"] = torch.ones(1000)
    state["layer1.0.bn1.num_batches_tracked"] = torch.tensor(3)
    torch.save(state, tmp_path / "resnet50.pth")

    with caplog.at_level(logging.WARNING):
        QEEPSCheckpointer(model).load(str(tmp_path / "resnet50.pth"))
    _assert_landed(model, {k: values[k] for k in keys})
    # the classifier is reported unused; the MSRA-style config triggers the torchvision warning
    fit = [r.getMessage() for r in caplog.records if r.name == "fvcore.common.checkpoint"]
    assert len(fit) == 1 and "unused: fc (2 keys)" in fit[0], fit
    warned = [r.getMessage() for r in caplog.records if r.name == "qeeps_d2.checkpoint"]
    assert len(warned) == 4
    assert any("MODEL.PIXEL_STD" in w and "58.395" in w for w in warned)
    assert any("STRIDE_IN_1X1 is True" in w for w in warned)


def test_torchvision_config_gives_no_warning(tmp_path, caplog):
    cfg = tiny_cfg()
    cfg.MODEL.PIXEL_MEAN = list(TORCHVISION_PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(TORCHVISION_PIXEL_STD)
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    model = build_model(cfg)
    values = model.state_dict()
    state = {_torchvision_name(k): values[k] for k in _resnet_keys(model)}
    torch.save(state, tmp_path / "tv.pth")
    with caplog.at_level(logging.WARNING):
        QEEPSCheckpointer(model).load(str(tmp_path / "tv.pth"))
    assert not [r for r in caplog.records if r.name == "qeeps_d2.checkpoint"]


def _perturb(model, seed):
    """Random values in every parameter and buffer, OIM lut/queue included."""
    state = model.state_dict()
    with torch.no_grad():
        for key, value in _random_like(model, seed).items():
            state[key].copy_(value)
        model.roi_heads.oim_loss.queue_ptr.fill_(3)


def test_own_checkpoint_round_trip_with_weights_only(tmp_path):
    switches = {"qsse": True, "qrpn": True, "qsimnet": True}
    model = _model(seed=0, **switches)
    _perturb(model, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    QEEPSCheckpointer(model, str(tmp_path), optimizer=optimizer).save("model_final", iteration=7)

    raw = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert set(raw) == {"model", "optimizer", "iteration"} and raw["iteration"] == 7

    fresh = _model(seed=1, **switches)
    assert not torch.equal(fresh.roi_heads.oim_loss.lut, model.roi_heads.oim_loss.lut)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    extra = QEEPSCheckpointer(fresh, str(tmp_path), optimizer=fresh_opt).resume_or_load("")
    assert extra == {"iteration": 7}
    expected = model.state_dict()
    got = fresh.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["momentum_buffer"],
        optimizer.state_dict()["state"][0]["momentum_buffer"],
    )


def test_oim_checkpoint_loads_into_qeeps_model(tmp_path):
    """The paper's flow: a trained OIM model initialises QEEPS; the new blocks keep their init."""
    oim = _model(seed=0)
    _perturb(oim, seed=4)
    QEEPSCheckpointer(oim, str(tmp_path)).save("oim")
    qeeps = _model(seed=1, qsse=True, qrpn=True, qsimnet=True)
    qsse_before = qeeps.backbone.res2[0].qsse.fc1.weight.clone()
    QEEPSCheckpointer(qeeps).load(str(tmp_path / "oim.pth"))
    _assert_landed(qeeps, oim.state_dict())
    assert torch.equal(qeeps.backbone.res2[0].qsse.fc1.weight, qsse_before)


class _NotATensor:
    pass


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickled-object", "truncated-pkl"])
def test_unreadable_file_error_names_the_file(tmp_path, damage):
    model = _model()
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, good)
    path = tmp_path / ("bad.pkl" if damage == "truncated-pkl" else "bad.pth")
    if damage == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "pickled-object":
        torch.save({"model": model.state_dict(), "extra": _NotATensor()}, path)
    else:
        payload = pickle.dumps({"blobs": {"conv1_w": np.ones((16, 3, 7, 7), np.float32)}})
        path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as err:
        QEEPSCheckpointer(model).load(str(path))
    if damage == "pickled-object":
        assert "weights_only=True" in str(err.value)


def test_other_architecture_error_lists_what_did_not_match(tmp_path):
    model = _model()
    QEEPSCheckpointer(model, str(tmp_path)).save("tiny")
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 24
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 16
    wider = build_model(cfg)
    with pytest.raises(CheckpointError) as err:
        QEEPSCheckpointer(wider).load(str(tmp_path / "tiny.pth"))
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "tiny.pth") in msg and "not one backbone weight" in msg
    assert "shape mismatches: backbone.res2 (" in msg and "roi_heads.res5 (" in msg
    assert ("e.g. backbone.stem.conv1.weight: (16, 3, 7, 7) in the file, (24, 3, 7, 7) in the "
            "model") in msg
    assert "unused" not in msg


def test_unrelated_state_dict_is_refused(tmp_path):
    torch.save({"encoder.layer.weight": torch.ones(3)}, tmp_path / "other.pth")
    unused = r"unused: encoder\.layer \(1 key\)"
    with pytest.raises(CheckpointError, match=unused):
        QEEPSCheckpointer(_model()).load(str(tmp_path / "other.pth"))


class _TinyTrainer(Trainer):
    """The QEEPS Trainer with no data loader and no event writers: enough to load and save."""

    @classmethod
    def build_train_loader(cls, cfg):
        return []

    def build_writers(self):
        return []



def test_default_trainer_loads_torchvision_and_resumes(tmp_path):
    cfg = tiny_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    (tmp_path / "out").mkdir()  # train_net.py's default_setup creates it
    probe = build_model(cfg)
    keys = _resnet_keys(probe)
    values = _random_like(probe, seed=5)
    torch.save({_torchvision_name(k): values[k] for k in keys}, tmp_path / "tv.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "tv.pth")

    trainer = _TinyTrainer(cfg)
    assert isinstance(trainer.checkpointer, QEEPSCheckpointer)
    hook = next(h for h in trainer._hooks if isinstance(h, PeriodicCheckpointer))
    assert hook.checkpointer is trainer.checkpointer
    trainer.resume_or_load(resume=False)
    _assert_landed(trainer.model, {k: values[k] for k in keys})

    trainer.iter = 41
    hook.checkpointer.save("model_0000041")
    resumed = _TinyTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 42
    _assert_landed(resumed.model, trainer.model.state_dict())
