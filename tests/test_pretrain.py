"""Identity pretraining of the trunk (qeeps_d2.engine.pretrain) at a minimal size."""
import os

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

from qeeps_d2.checkpoint import QEEPSCheckpointer
from qeeps_d2.engine.pretrain import (DETECTOR_KEYS, PRETRAINED_KEYS, _trainable_trunk,
                                     ensure_pretrained, pretrain_identity)
from qeeps_d2.engine.trainer import setup_cfg

from model_fixtures import REPO

CONFIG = os.path.join(REPO, "configs", "SynthPS", "oim.yaml")
TINY = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.QEEPS.OIM.NUM_PIDS", "4",
        "PRETRAIN.NUM_IDS", "6", "PRETRAIN.IMAGES", "10", "PRETRAIN.CROP_BATCH", "24",
        "PRETRAIN.ROI_BATCH", "2"]


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    return tmp_path


def test_crop_stage_learns_the_pretraining_identities(datasets):
    torch.manual_seed(0)
    cfg = setup_cfg(CONFIG, TINY + ["PRETRAIN.CROP_ITERS", "40", "PRETRAIN.ROI_ITERS", "3",
                                    "PRETRAIN.DETECTION", "False"], resolve_schedule=False)
    model = build_model(_trainable_trunk(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    times, losses = pretrain_identity(model, cfg.PRETRAIN)
    assert len(losses["crop"]) == 40 and len(losses["scene"]) == 3
    # 6 identities: chance-level cross-entropy is log(6) = 1.8 (plus the random start); it falls
    assert np.mean(losses["crop"][:5]) > 1.5
    assert np.mean(losses["crop"][-5:]) < 0.75 * np.mean(losses["crop"][:5])
    after = model.state_dict()
    for prefix in PRETRAINED_KEYS:
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix))
    # without PRETRAIN.DETECTION the detector is not trained
    for k in after:
        if k.startswith(("proposal_generator.", "roi_heads.box_predictor.", "roi_heads.det_res5.")):
            assert torch.equal(before[k], after[k]), k


def test_ensure_pretrained_writes_weights_the_oim_model_loads(datasets):
    path = str(datasets / "pretrain" / "model_final.pth")
    opts = TINY + ["PRETRAIN.CROP_ITERS", "2", "PRETRAIN.ROI_ITERS", "1"]
    assert ensure_pretrained(CONFIG, path, opts) == path
    state = torch.load(path, weights_only=True)["model"]
    # the SynthPS configs pretrain the detector too (PRETRAIN.DETECTION)
    assert state and all(k.startswith(PRETRAINED_KEYS + DETECTOR_KEYS) for k in state)
    cfg = setup_cfg(CONFIG, opts, resolve_schedule=False)
    model = build_model(cfg)
    QEEPSCheckpointer(model).load(path)
    loaded = model.state_dict()
    expected = [k for k in loaded if k.startswith(PRETRAINED_KEYS + DETECTOR_KEYS)]
    assert set(expected) <= set(state)
    for k in expected:
        assert torch.equal(loaded[k], state[k]), k
    # kept: a second call does not pretrain again
    mtime = os.path.getmtime(path)
    assert ensure_pretrained(CONFIG, path, opts) == path
    assert os.path.getmtime(path) == mtime


def test_pretraining_set_must_not_be_the_evaluation_seed(datasets):
    with pytest.raises(ValueError, match="PRETRAIN.SEED"):
        ensure_pretrained(CONFIG, str(datasets / "p.pth"), TINY + ["PRETRAIN.SEED", "0"])


def test_pretraining_trains_the_whole_trunk_even_where_the_target_freezes_it(datasets):
    """The SynthPS configs freeze stem + res2 (and a target may use FrozenBN); the pretraining
    itself (from scratch) must train all of it, with BatchNorm statistics."""
    cfg = setup_cfg(CONFIG, TINY + ["MODEL.RESNETS.NORM", "FrozenBN"], resolve_schedule=False)
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2
    model = build_model(_trainable_trunk(cfg))
    stem = model.backbone.stem.conv1
    assert stem.weight.requires_grad and isinstance(stem.norm, torch.nn.BatchNorm2d)


def test_crop_stage_trains_the_identity_stages_and_starts_the_detectors_from_them(datasets):
    """MODEL.QEEPS.ID_POOLER.OWN_STAGES (the SynthPS configs): the crops run through the
    identity path's own res3/res4, and the backbone's (the detector's) then start as copies of
    them, as the one shared trunk would."""
    cfg = setup_cfg(CONFIG, TINY + ["PRETRAIN.CROP_ITERS", "2", "PRETRAIN.ROI_ITERS", "0",
                                    "PRETRAIN.DETECTION", "False"], resolve_schedule=False)
    assert cfg.MODEL.QEEPS.ID_POOLER.OWN_STAGES
    torch.manual_seed(0)
    model = build_model(_trainable_trunk(cfg))
    before = {k: v.clone() for k, v in model.roi_heads.id_trunk.state_dict().items()}
    pretrain_identity(model, cfg.PRETRAIN)
    copies = model.roi_heads.id_trunk.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in copies.items())
    backbone = model.backbone.state_dict()
    for key, value in copies.items():
        assert torch.equal(backbone[key], value), key


def test_detection_pretraining_trains_and_saves_the_detector(datasets):
    """PRETRAIN.DETECTION: stage 2 also trains the RPN and the detection head (here its own
    res5) and the checkpoint carries them; without it they stay untouched (test above)."""
    opts = TINY + ["PRETRAIN.CROP_ITERS", "1", "PRETRAIN.ROI_ITERS", "2",
                   "PRETRAIN.DETECTION", "True", "MODEL.QEEPS.DET_HEAD", "separate"]
    cfg = setup_cfg(CONFIG, opts, resolve_schedule=False)
    torch.manual_seed(0)
    model = build_model(_trainable_trunk(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pretrain_identity(model, cfg.PRETRAIN)
    after = model.state_dict()
    for prefix in DETECTOR_KEYS + PRETRAINED_KEYS:
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), \
            prefix
    path = str(datasets / "pretrain_det" / "model_final.pth")
    ensure_pretrained(CONFIG, path, opts)
    state = torch.load(path, weights_only=True)["model"]
    for prefix in DETECTOR_KEYS:
        assert any(k.startswith(prefix) for k in state), prefix


def test_an_identity_only_pretraining_is_not_taken_for_a_detection_one(datasets):
    path = str(datasets / "pretrain_old" / "model_final.pth")
    opts = TINY + ["PRETRAIN.CROP_ITERS", "1", "PRETRAIN.ROI_ITERS", "1"]
    ensure_pretrained(CONFIG, path, opts + ["PRETRAIN.DETECTION", "False"])
    with pytest.raises(RuntimeError, match="without the detector"):
        ensure_pretrained(CONFIG, path, opts)
    assert ensure_pretrained(CONFIG, path, opts + ["PRETRAIN.DETECTION", "False"]) == path
