"""MODEL.QEEPS.ID_POOLER: the identity path pools its boxes from an earlier backbone stage and
runs the later stages (the backbone's, or its own copies) on each box before res5."""
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ROIAlign
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from qeeps_d2.engine.pretrain import _crop_embed, _normalize
from qeeps_d2.engine.trainer import Trainer

import model_fixtures


def _cfg(own_stages=False, qsse=False, det_head="separate", out_features=("res2", "res4")):
    cfg = model_fixtures.tiny_cfg(qsse=qsse)
    cfg.MODEL.QEEPS.DET_HEAD = det_head
    cfg.MODEL.RESNETS.OUT_FEATURES = list(out_features)
    cfg.MODEL.QEEPS.ID_POOLER.IN_FEATURE = "res2"
    cfg.MODEL.QEEPS.ID_POOLER.RESOLUTION = (24, 12)
    cfg.MODEL.QEEPS.ID_POOLER.OWN_STAGES = own_stages
    # sample every foreground proposal, so that the labeled person always reaches OIM
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = 1.0
    return cfg


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = build_model(_cfg(**kwargs))
    model.eval()
    return model


def test_config_errors_name_the_keys():
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        build_model(_cfg(out_features=("res4",)))
    with pytest.raises(ValueError, match="DET_HEAD"):
        build_model(_cfg(det_head="shared"))


@pytest.mark.parametrize("own_stages", [False, True])
def test_identity_features_are_res2_pooled_boxes_through_res3_res4_res5(own_stages):
    """By hand: ROIAlign (aligned) on res2 at 24 x 12, the stages after res2, res5, mean."""
    model = _model(own_stages=own_stages)
    heads = model.roi_heads
    if own_stages:  # the copies must be the ones that run: make them differ from the backbone
        with torch.no_grad():
            for p in heads.id_trunk.parameters():
                p.mul_(1.5)
    x = torch.rand(1, 3, 64, 96) * 255
    boxes = torch.tensor([[4.0, 2.0, 40.0, 62.0], [50.0, 10.0, 70.0, 50.0]])
    with torch.no_grad():
        features = model.backbone(_normalize(model, x))
        got = heads.box_features(features, [Boxes(boxes)])
        rois = torch.cat([torch.zeros(2, 1), boxes], dim=1)
        y = ROIAlign((24, 12), 1 / 4, 0, aligned=True)(features["res2"], rois)
        stages = (heads.id_trunk.values() if own_stages
                  else [model.backbone.res3, model.backbone.res4])
        for stage in stages:
            y = stage(y)
        want = heads.res5(y).mean(dim=(2, 3))
        res4_path = heads._pooled_res5(heads.res5, features, [Boxes(boxes)])
    assert got.shape == (2, heads.res5[-1].out_channels)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, res4_path, atol=1e-3)


def test_a_box_filling_a_crop_sized_image_embeds_as_the_crop():
    """Pooling res2 at 24 x 12 from a 96 x 48 image's whole box samples every res2 cell at its
    centre: the identity path then equals the crop path of the identity pretraining."""
    model = _model(own_stages=True)
    x = torch.rand(1, 3, 96, 48) * 255
    with torch.no_grad():
        features = model.backbone(_normalize(model, x))
        box = [Boxes(torch.tensor([[0.0, 0.0, 48.0, 96.0]]))]
        pooled = model.roi_heads.reid_head(model.roi_heads.box_features(features, box))
        crop = _crop_embed(model, x)
    torch.testing.assert_close(pooled, crop, rtol=1e-4, atol=1e-5)


def test_pair_mode_replays_each_pairs_qsse_gates():
    """After a paired forward, a whole-image box of gallery i continued from res2 equals that
    image's res4 in the paired forward: its QSSE blocks weighted with pair i's gates (the two
    pairs' gates differ, so the wrong pair or stock blocks fail)."""
    model = _model(qsse=True)
    backbone = model.backbone
    g = torch.Generator().manual_seed(3)
    both = torch.rand(4, 3, 48, 96, generator=g) * 255  # galleries 0, 1 then queries 0, 1
    with torch.no_grad():
        features = backbone(_normalize(model, both), num_pairs=2)
        gates = [b.gates for b in backbone.qsse_blocks if b.gates is not None]
        assert gates and not torch.allclose(gates[-1][0], gates[-1][1])
        res2 = features["res2"][:2]
        for i in (0, 1):
            got = backbone.forward_from(res2[i : i + 1], "res2", torch.tensor([i]))
            # (convolution kernels differ with the batch size: float tolerance)
            torch.testing.assert_close(got, features["res4"][i : i + 1], rtol=1e-2, atol=2e-3)
        swapped = backbone.forward_from(res2[:1], "res2", torch.tensor([1]))
        assert (swapped - features["res4"][:1]).abs().max() > 0.05
        with pytest.raises(ValueError, match="image_index"):
            backbone.forward_from(res2[:1], "res2")
        backbone(_normalize(model, both[:1]))  # single stream: no gates kept, stock blocks
        assert all(b.gates is None for b in backbone.qsse_blocks)


def test_own_stages_start_from_the_backbone_and_keep_their_own(tmp_path):
    torch.manual_seed(0)
    plain = build_model(_cfg())  # no copies: e.g. an OIM model before ID_POOLER.OWN_STAGES
    DetectionCheckpointer(plain, save_dir=str(tmp_path)).save("plain")
    model = _model(seed=1, own_stages=True)
    DetectionCheckpointer(model).load(str(tmp_path / "plain.pth"))
    copies = model.roi_heads.id_trunk.state_dict()
    assert copies and {k.split(".")[0] for k in copies} == {"res3", "res4"}
    for key, value in copies.items():
        assert torch.equal(value, plain.state_dict()["backbone." + key]), key
    # only the copied stages are filled: nothing the model lacks (res2) is added
    incompatible = _model(seed=3, own_stages=True).load_state_dict(plain.state_dict(),
                                                                   strict=False)
    assert not incompatible.unexpected_keys
    with torch.no_grad():
        for p in model.roi_heads.id_trunk.parameters():
            p.add_(1.0)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("own")
    again = _model(seed=2, own_stages=True)
    DetectionCheckpointer(again).load(str(tmp_path / "own.pth"))
    for key, value in again.roi_heads.id_trunk.state_dict().items():
        assert torch.equal(value, model.roi_heads.id_trunk.state_dict()[key]), key
    assert not any(".qsse." in k for k in _model(qsse=True, own_stages=True)
                   .roi_heads.id_trunk.state_dict())


def test_each_loss_reaches_only_its_stages():
    """Own stages: the OIM loss trains the copies and not the backbone's res3/res4, the
    detection losses the reverse."""
    model = _model(own_stages=True)
    model.train()
    model_fixtures.fill_oim_lut(model)  # a zero table gives the embeddings no gradient
    inputs = model_fixtures.scene_inputs()
    with EventStorage():
        losses = model(inputs)
    backbone = [p for n, p in model.backbone.named_parameters() if n.startswith(("res3", "res4"))]
    copies = list(model.roi_heads.id_trunk.parameters())

    def reached(loss, params):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return any(g is not None and g.abs().sum() > 0 for g in grads)

    assert reached(losses["loss_oim"], copies)
    assert not reached(losses["loss_oim"], backbone)
    det = losses["loss_cls"] + losses["loss_box_reg"] + losses["loss_rpn_cls"]
    assert reached(det, backbone)
    assert not reached(det, copies)


def test_copied_stages_learn_at_the_trunk_rate_the_backbones_at_the_heads_rate():
    cfg = _cfg(own_stages=True)
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.TRUNK_LR_FACTOR = 0.1
    model = build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr[id(named["roi_heads.id_trunk.res3.0.conv1.weight"])] == pytest.approx(0.1)
    assert lr[id(named["backbone.res3.0.conv1.weight"])] == pytest.approx(1.0)
    assert lr[id(named["roi_heads.res5.0.conv1.weight"])] == pytest.approx(0.1)
