"""MODEL.QEEPS.DET_HEAD "separate": ClsNet/RegNet on their own res5, the identity path embeds the
final regressed boxes."""
import pytest
import torch
import torch.nn.functional as F

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from qeeps_d2.modeling.roi_heads import QEEPSROIHeads

import model_fixtures

SHAPE = {"res4": ShapeSpec(channels=128, stride=16)}


def _cfg(det_head="separate", qsimnet=False):
    cfg = model_fixtures.tiny_cfg(qsimnet=qsimnet)
    cfg.MODEL.QEEPS.DET_HEAD = det_head
    cfg.MODEL.QEEPS.QSIMNET.MIN_DET_SCORE = 0.0  # every proposal is a QSimNet candidate
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    return cfg


def _heads(qsimnet=False, seed=0):
    torch.manual_seed(seed)
    heads = QEEPSROIHeads(_cfg(qsimnet=qsimnet), SHAPE)
    with torch.no_grad():  # distinct weights for the two res5 and real box deltas
        for p in heads.det_res5.parameters():
            p.add_(0.3 * torch.randn_like(p))
        heads.box_predictor.bbox_pred.weight.normal_(std=0.05)
        for name, buf in heads.reid_head.norm.named_buffers():  # non-trivial running stats
            if name == "running_var":
                buf.uniform_(0.5, 2.0)
            elif name == "running_mean":
                buf.normal_()
    return heads


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    features = {"res4": torch.rand(2, 128, 4, 6, generator=g)}
    proposals = []
    for boxes in ([[6, 6, 36, 58], [52, 12, 88, 60], [0, 0, 30, 40]],
                  [[21, 12, 59, 58], [63, 10, 93, 58]]):
        p = Instances((64, 96))
        p.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        p.objectness_logits = torch.zeros(len(boxes))
        proposals.append(p)
    targets = [
        model_fixtures.random_instances(64, 96, [[5, 5, 35, 60], [50, 10, 90, 62]], [2, -1], 2),
        model_fixtures.random_instances(64, 96, [[20, 10, 60, 60], [62, 8, 94, 60]], [1, 0], 1),
    ]
    query_embeds = F.normalize(torch.randn(2, 16, generator=g), dim=1)
    return features, proposals, targets, query_embeds


def test_det_head_mode_is_checked():
    with pytest.raises(ValueError, match="DET_HEAD"):
        QEEPSROIHeads(_cfg(det_head="two"), SHAPE)
    assert QEEPSROIHeads(_cfg(det_head="shared"), SHAPE).det_res5 is None


def test_checkpoint_without_det_res5_starts_it_from_res5(tmp_path):
    """A shared-head checkpoint (or the identity pretraining, or a model-zoo ResNet) loads
    into both res5 copies; a separate-head checkpoint keeps its own detection res5."""
    torch.manual_seed(0)
    shared = build_model(_cfg(det_head="shared"))
    DetectionCheckpointer(shared, save_dir=str(tmp_path)).save("shared")
    torch.manual_seed(1)
    model = build_model(_cfg())
    heads = model.roi_heads
    DetectionCheckpointer(model).load(str(tmp_path / "shared.pth"))
    res5 = heads.res5.state_dict()
    assert res5 and res5.keys() == heads.det_res5.state_dict().keys()
    for key, value in heads.det_res5.state_dict().items():
        assert torch.equal(value, shared.roi_heads.res5.state_dict()[key]), key
        assert torch.equal(value, res5[key]), key
    # a separate-head checkpoint: its det_res5 is loaded as is
    with torch.no_grad():
        for p in heads.det_res5.parameters():
            p.add_(1.0)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("separate")
    expected = {k: v.clone() for k, v in heads.det_res5.state_dict().items()}
    torch.manual_seed(2)
    fresh = build_model(_cfg())
    DetectionCheckpointer(fresh).load(str(tmp_path / "separate.pth"))
    for key, value in fresh.roi_heads.det_res5.state_dict().items():
        assert torch.equal(value, expected[key]), key
    res5 = dict(fresh.roi_heads.res5.named_parameters())
    for key, value in fresh.roi_heads.det_res5.named_parameters():
        assert not torch.equal(value, res5[key]), key


def _grad_norm(module):
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(sum(g.abs().sum() for g in grads)) if grads else 0.0


@pytest.mark.parametrize("loss, trained, untouched", [
    ("loss_cls", "det_res5", "res5"),
    ("loss_box_reg", "det_res5", "res5"),
    ("loss_oim", "res5", "det_res5"),
])
def test_each_loss_trains_its_own_res5(loss, trained, untouched):
    heads = _heads().train()
    model_fixtures.fill_oim_lut(type("M", (), {"roi_heads": heads}))
    features, proposals, targets, _ = _inputs()
    with EventStorage():
        torch.manual_seed(3)
        _, losses = heads(None, features, proposals, targets)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_oim"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses[loss].backward()
    assert _grad_norm(getattr(heads, trained)) > 0
    assert _grad_norm(getattr(heads, untouched)) == 0


def _embed(heads, features, boxes):
    return heads.embed(heads.box_features(features, boxes))


def test_inference_embeds_the_final_regressed_boxes():
    heads = _heads().eval()
    features, proposals, _, query_embeds = _inputs()
    with torch.no_grad():
        results, _ = heads(None, features, proposals, query_embeds=query_embeds)
        for i, (res, props) in enumerate(zip(results, proposals)):
            assert len(res) > 0
            # the detections moved away from their proposals (else the check below is empty)
            assert not any(torch.equal(b, p) for b in res.pred_boxes.tensor
                           for p in props.proposal_boxes.tensor)
            expected = _embed(heads, {"res4": features["res4"][i : i + 1]}, [res.pred_boxes])
            assert torch.allclose(res.pred_embeds, expected, atol=1e-5)
            assert torch.allclose(res.pred_sims, res.pred_embeds @ query_embeds[i], atol=1e-6)
            # and the scores are those of the detection res5
            feats = heads.det_box_features({"res4": features["res4"][i : i + 1]},
                                           [props.proposal_boxes])
            probs = heads.box_predictor(feats)[0].softmax(dim=1)[:, 0]
            assert all(torch.isclose(probs, s, atol=1e-5).any() for s in res.scores)


def test_qsimnet_inference_embeds_the_regressed_candidates():
    heads = _heads(qsimnet=True).eval()
    features, proposals, _, query_embeds = _inputs()
    with torch.no_grad():
        results, _ = heads(None, features, proposals, query_embeds=query_embeds)
        for i, res in enumerate(results):
            assert len(res) > 0
            feats = {"res4": features["res4"][i : i + 1]}
            expected = _embed(heads, feats, [res.pred_boxes])
            assert torch.allclose(res.pred_embeds, expected, atol=1e-5)
            sims = heads.qsimnet.similarity(query_embeds[i : i + 1], expected)
            assert torch.allclose(res.pred_sims, sims, atol=1e-6)


def test_given_boxes_scores_from_the_detection_res5_embeddings_from_the_identity_res5():
    heads = _heads().eval()
    features, proposals, _, _ = _inputs()
    with torch.no_grad():
        results = heads.forward_given_boxes(features, proposals)
        boxes = [p.proposal_boxes for p in proposals]
        probs = heads.box_predictor(heads.det_box_features(features, boxes))[0].softmax(1)[:, 0]
        embeds = _embed(heads, features, boxes)
    assert torch.allclose(torch.cat([r.scores for r in results]), probs, atol=1e-6)
    assert torch.allclose(torch.cat([r.pred_embeds for r in results]), embeds, atol=1e-6)
