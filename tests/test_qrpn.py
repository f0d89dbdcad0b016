"""QRPN (paper Sec. 4.2, Eq. 4): anchor labels and sampling, the query branch, the summed RPN."""
import math

import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, ImageList
from detectron2.utils.events import EventStorage

from qeeps_d2.modeling.qrpn import QueryGuidedRPN

import model_fixtures

SHAPE = {"res4": ShapeSpec(channels=128, stride=16)}


def _qrpn():
    torch.manual_seed(0)
    return QueryGuidedRPN(model_fixtures.tiny_cfg(qrpn=True), SHAPE)


def _person_instances(boxes, query_mask):
    inst = model_fixtures.random_instances(100, 100, boxes, list(range(len(boxes))))
    inst.gt_is_query = torch.tensor(query_mask, dtype=torch.bool)
    return inst


def test_label_query_anchors_positive_negative_ignore():
    qrpn = _qrpn()
    query, other = [0, 0, 10, 10], [20, 0, 30, 10]
    anchors = Boxes(torch.tensor([
        [0, 0, 10, 10],    # IoU 1.0 with the query person        -> positive
        [0, 0, 10, 8],     # IoU 0.8 with the query person        -> positive
        [0, 0, 10, 5],     # IoU 0.5 with the query person        -> ignored
        [20, 0, 30, 10],   # exactly on the other person          -> ignored (never negative)
        [20, 0, 30, 4],    # IoU 0.4 with the other person        -> ignored
        [50, 50, 60, 60],  # overlaps nobody                      -> negative
        [20, 0, 30, 2],    # IoU 0.2 with the other person only   -> negative
        [0, 0, 10, 2],     # IoU 0.2 with the query person only   -> negative
    ], dtype=torch.float32))
    labels = qrpn.label_query_anchors(anchors, _person_instances([query, other], [True, False]))
    assert labels.tolist() == [1, 1, -1, -1, -1, 0, 0, 0]


def test_label_query_anchors_best_anchor_rule_and_edge_cases():
    qrpn = _qrpn()
    anchors = Boxes(torch.tensor([
        [0, 0, 10, 5],     # IoU 0.5: below 0.6 but the best -> positive
        [0, 5, 10, 10],    # IoU 0.5: tied best              -> positive
        [0, 0, 10, 4],     # IoU 0.4                         -> ignored
        [40, 40, 50, 50],  # IoU 0                           -> negative
    ], dtype=torch.float32))
    inst = _person_instances([[0, 0, 10, 10]], [True])
    assert qrpn.label_query_anchors(anchors, inst).tolist() == [1, 1, -1, 0]
    # no query person in this gallery image: only negatives and ignored anchors
    inst_no_query = _person_instances([[0, 0, 10, 10]], [False])
    assert qrpn.label_query_anchors(anchors, inst_no_query).tolist() == [-1, -1, -1, 0]
    # no person at all: every anchor is a negative
    empty = _person_instances(torch.zeros(0, 4).tolist(), [])
    assert qrpn.label_query_anchors(anchors, empty).tolist() == [0, 0, 0, 0]


def _sampling_anchors(num_pos, num_neg):
    """num_pos copies of the query box, then num_neg boxes far from everybody."""
    pos = torch.tensor([[0.0, 0, 10, 10]]).repeat(num_pos, 1)
    neg = torch.tensor([[60.0, 60, 70, 70]]) + torch.arange(num_neg)[:, None] * 0.01
    ignored = torch.tensor([[0.0, 0, 10, 5]]).repeat(7, 1)
    return Boxes(torch.cat([pos, ignored, neg]))


@pytest.mark.parametrize("num_pos,num_neg", [(100, 200), (10, 200), (10, 20)])
def test_query_losses_sample_128_anchors_half_positive(num_pos, num_neg):
    qrpn = _qrpn()
    anchors = _sampling_anchors(num_pos, num_neg)
    gt = [_person_instances([[0, 0, 10, 10]], [True]) for _ in range(2)]
    sampled_pos = min(num_pos, 64)
    sampled_neg = min(num_neg, 128 - sampled_pos)
    n = len(anchors)
    torch.manual_seed(3)
    with EventStorage() as storage:
        zero = qrpn.query_losses([anchors], [torch.zeros(2, n)], gt)
        assert storage.latest()["qrpn/num_pos_anchors"][0] == sampled_pos
        # BCE of logit 0 is log 2 for every sampled anchor; normaliser 128 x 2 images
        assert zero.item() == pytest.approx((sampled_pos + sampled_neg) * math.log(2) / 128)
        # logit 10 everywhere: positives cost softplus(-10), negatives softplus(10)
        ten = qrpn.query_losses([anchors], [torch.full((2, n), 10.0)], gt)
    softplus = F.softplus(torch.tensor([-10.0, 10.0]))
    expected = (sampled_pos * softplus[0] + sampled_neg * softplus[1]) / 128
    assert ten.item() == pytest.approx(expected.item(), rel=1e-5)


def _rpn_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = ImageList(torch.zeros(2, 3, 128, 192), [(128, 192), (112, 176)])
    features = {"res4": torch.rand(2, 128, 8, 12, generator=g)}
    query_features = {"res4": torch.rand(2, 128, 8, 12, generator=g)}
    query_boxes = [Boxes(torch.tensor([[10.0, 8, 60, 100]])),
                   Boxes(torch.tensor([[70.0, 20, 120, 110]]))]
    gt = [
        model_fixtures.random_instances(
            128, 192, [[20, 10, 70, 110], [100, 20, 150, 120]], [1, -1], query_pid=1
        ),
        model_fixtures.random_instances(112, 176, [[30, 5, 80, 100]], [3], query_pid=3),
    ]
    return images, features, gt, query_features, query_boxes


def _qrpn_and_stock(query_bias):
    """A QRPN whose query head outputs the constant ``query_bias``, and a stock RPN with the
    same weights."""
    qrpn = _qrpn()
    with torch.no_grad():
        qrpn.query_head.objectness_logits.weight.zero_()
        qrpn.query_head.objectness_logits.bias.fill_(query_bias)
    stock = RPN(model_fixtures.tiny_cfg(qrpn=True), SHAPE)
    result = stock.load_state_dict(qrpn.state_dict(), strict=False)
    assert result.missing_keys == [] and all(k.startswith("query_") for k in result.unexpected_keys)
    return qrpn, stock


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("query_bias", [0.0, 1.5])
def test_constant_query_head_shifts_stock_objectness(training, query_bias):
    """With a constant query objectness c, the summed logits are the stock ones + c: same boxes
    (the NMS order is unchanged and the deltas are the stock RPN's), logits shifted by c."""
    qrpn, stock = _qrpn_and_stock(query_bias)
    qrpn.train(training)
    stock.train(training)
    images, features, gt, query_features, query_boxes = _rpn_inputs()
    with EventStorage():
        torch.manual_seed(5)
        proposals, losses = qrpn(images, features, gt, query_features, query_boxes)
        torch.manual_seed(5)
        stock_proposals, stock_losses = stock(images, features, gt)
    assert [len(p) for p in proposals] == [len(p) for p in stock_proposals] != [0, 0]
    for p, s in zip(proposals, stock_proposals):
        assert torch.equal(p.proposal_boxes.tensor, s.proposal_boxes.tensor)
        assert torch.allclose(p.objectness_logits, s.objectness_logits + query_bias, atol=1e-5)
    if training:
        assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_qrpn"}
        for k in ("loss_rpn_cls", "loss_rpn_loc"):
            assert torch.equal(losses[k], stock_losses[k])
        assert torch.isfinite(losses["loss_qrpn"]) and losses["loss_qrpn"] > 0
    else:
        assert losses == {}


def test_query_branch_excites_gallery_features_per_channel():
    """The query head sees the gallery res4 times sigmoid(FC2 relu(FC1 ROIPool(query)))."""
    qrpn = _qrpn().eval()
    images, features, _, query_features, query_boxes = _rpn_inputs(1)
    seen = {}
    qrpn.query_head.register_forward_hook(lambda m, i, o: seen.update(inp=i[0][0], out=o[0]))
    qrpn(images, features, None, query_features, query_boxes)
    pooled = qrpn.query_pooler([query_features["res4"]], query_boxes)
    assert pooled.shape == (2, 128, 3, 3)
    exc = qrpn.query_excitation
    hidden = torch.clamp(pooled.flatten(1) @ exc.fc1.weight.T + exc.fc1.bias, min=0)
    weights = torch.sigmoid(hidden @ exc.fc2.weight.T + exc.fc2.bias)  # (2, 128)
    assert exc.fc1.weight.shape == (8, 128 * 9)
    assert torch.allclose(seen["inp"], features["res4"] * weights[:, :, None, None], atol=1e-6)
    assert seen["out"].shape == (2, 15, 8, 12)  # 5 sizes x 3 aspect ratios per location


def test_without_query_inputs_it_is_the_stock_rpn():
    qrpn, stock = _qrpn_and_stock(0.0)
    with torch.no_grad():  # a non-trivial query head must not matter without query inputs
        qrpn.query_head.objectness_logits.weight.normal_(std=1.0)
        qrpn.query_head.objectness_logits.bias.fill_(3.0)
    images, features, gt, _, _ = _rpn_inputs(2)
    with EventStorage():
        torch.manual_seed(7)
        proposals, losses = qrpn(images, features, gt)
        torch.manual_seed(7)
        stock_proposals, stock_losses = stock(images, features, gt)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.equal(losses[k], stock_losses[k]) for k in losses)
    for p, s in zip(proposals, stock_proposals):
        assert torch.equal(p.proposal_boxes.tensor, s.proposal_boxes.tensor)
        assert torch.equal(p.objectness_logits, s.objectness_logits)


def test_disabled_qrpn_has_no_query_branch():
    rpn = QueryGuidedRPN(model_fixtures.tiny_cfg(qrpn=False), SHAPE)
    assert not rpn.enabled
    assert not any(k.startswith("query_") for k in rpn.state_dict())


@pytest.mark.parametrize("training", [True, False])
def test_summed_objectness_adds_each_anchors_own_logits(training):
    """Anchor by anchor: the logit used for the proposals of anchor i = (y, x, a) (Detectron2's
    order, index (y * Wi + x) * A + a) is stock[a, y, x] + qrpn[a, y, x], with a query head
    whose logits vary over anchors and positions."""
    qrpn, _ = _qrpn_and_stock(0.0)
    with torch.no_grad():
        qrpn.query_head.objectness_logits.weight.normal_(std=1.0)
        qrpn.query_head.objectness_logits.bias.copy_(torch.linspace(-2, 2, 15))
    qrpn.train(training)
    images, features, gt, query_features, query_boxes = _rpn_inputs(3)
    seen = {}
    qrpn.rpn_head.register_forward_hook(lambda m, i, o: seen.update(stock=o[0][0]))
    qrpn.query_head.register_forward_hook(lambda m, i, o: seen.update(query=o[0]))
    predict = qrpn.predict_proposals

    def record(anchors, logits, *args):
        seen.setdefault("anchors", anchors)
        seen.setdefault("summed", logits)
        return predict(anchors, logits, *args)

    qrpn.predict_proposals = record
    with EventStorage():
        qrpn(images, features, gt, query_features, query_boxes)
    stock, query = seen["stock"], seen["query"]
    (summed,), (anchors,) = seen["summed"], seen["anchors"]
    num_images, num_anchors, height, width = stock.shape
    assert query.shape == stock.shape == (2, 15, 8, 12)
    assert query.std(dim=1).min() > 0.1 and query.std(dim=(2, 3)).min() > 0.1  # not constant
    assert summed.shape == (num_images, height * width * num_anchors)
    # anchor i is the a-th cell anchor at (x, y): its centre is (x, y) * stride
    centres = anchors.get_centers().view(height, width, num_anchors, 2)
    assert torch.allclose(centres[3, 5, 7], torch.tensor([5.0 * 16, 3.0 * 16]))
    for y in range(height):
        for x in range(width):
            for a in range(num_anchors):
                i = (y * width + x) * num_anchors + a
                assert torch.allclose(
                    summed[:, i], stock[:, a, y, x] + query[:, a, y, x], atol=1e-6
                ), (y, x, a)
