"""QSimNet (paper Sec. 4.3) and the QEEPS ROI head (Res5 + ClsNet/RegNet + OIM + QSimNet)."""
import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from qeeps_d2.modeling.qsimnet import QSimNet
from qeeps_d2.modeling.roi_heads import QEEPSROIHeads

import model_fixtures

SHAPE = {"res4": ShapeSpec(channels=128, stride=16)}
EMBED_DIM = 16  # MODEL.QEEPS.EMBED_DIM of the tiny config
PAIR_FIELDS = {"pred_boxes", "scores", "pred_classes", "pred_embeds", "pred_sims"}


# ---------------------------------------------------------------------------------- QSimNet
def _pinned_qsimnet():
    net = QSimNet(2)
    with torch.no_grad():
        net.norm.running_mean.copy_(torch.tensor([0.5, 0.0]))
        net.norm.running_var.copy_(torch.tensor([0.25, 1.0]))
        net.cls.weight.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
        net.cls.bias.zero_()
    return net


@pytest.mark.parametrize("training", [True, False])
def test_qsimnet_pinned_values(training):
    """d = (q - g)^2 = [[1, 0], [0, 0]]; BN maps column 0 to [+1, -1] (batch stats in training,
    the running stats 0.5 / 0.25 in eval), column 1 to 0; FC -> logits [[0, 2], [0, -2]]."""
    net = _pinned_qsimnet().train(training)
    query = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    logits = net(query, gallery)
    assert logits.shape == (2, 2)
    assert torch.allclose(logits, torch.tensor([[0.0, 2.0], [0.0, -2.0]]), atol=1e-4)
    sims = net.similarity(query, gallery)
    assert torch.allclose(sims, torch.tensor([0.8807971, 0.1192029]), atol=1e-4)


def test_qsimnet_matches_manual_computation():
    torch.manual_seed(0)
    net = QSimNet(EMBED_DIM)
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    query = F.normalize(torch.randn(7, EMBED_DIM), dim=1)
    gallery = F.normalize(torch.randn(7, EMBED_DIM), dim=1)
    d = (query - gallery) ** 2
    normed = (d - d.mean(0)) / torch.sqrt(d.var(0, unbiased=False) + net.norm.eps)
    expected = (normed * net.norm.weight + net.norm.bias) @ net.cls.weight.T + net.cls.bias
    assert torch.allclose(net(query, gallery), expected, atol=1e-5)
    # eval: running statistics; a (1, D) query broadcasts over the gallery rows
    net.eval()
    sims = net.similarity(query[:1], gallery)
    assert torch.allclose(sims, net(query[:1].expand(7, -1), gallery).softmax(1)[:, 1])
    assert sims.shape == (7,) and ((sims >= 0) & (sims <= 1)).all()


# ---------------------------------------------------------------------------------- ROI head
def _heads(qsimnet=True, positive_fraction=0.25, min_det_score=None):
    cfg = model_fixtures.tiny_cfg(qsimnet=qsimnet)
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = positive_fraction
    if min_det_score is not None:
        cfg.MODEL.QEEPS.QSIMNET.MIN_DET_SCORE = min_det_score
    torch.manual_seed(0)
    return QEEPSROIHeads(cfg, SHAPE)


def _proposals(image_size, boxes):
    p = Instances(image_size)
    p.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    p.objectness_logits = torch.zeros(len(boxes))
    return p


def _train_inputs():
    g = torch.Generator().manual_seed(1)
    features = {"res4": torch.rand(2, 128, 4, 6, generator=g)}
    targets = [
        model_fixtures.random_instances(64, 96, [[5, 5, 35, 60], [50, 10, 90, 62]], [2, -1], 2),
        model_fixtures.random_instances(64, 96, [[20, 10, 60, 60], [62, 8, 94, 60]], [1, 0], 1),
    ]
    proposals = [
        _proposals((64, 96), [[6, 6, 36, 58], [4, 4, 34, 61], [52, 12, 88, 60], [0, 0, 10, 10],
                              [60, 0, 96, 20], [38, 30, 60, 64]]),
        _proposals((64, 96), [[21, 12, 59, 58], [63, 10, 93, 58], [0, 40, 20, 64], [30, 0, 50, 8]]),
    ]
    query_embeds = F.normalize(torch.randn(2, EMBED_DIM, generator=g), dim=1)
    return features, proposals, targets, query_embeds


def _expected_labels(sampled, targets):
    """Recompute, from the sampled boxes alone, fg (IoU >= 0.5 with a person), the OIM pid of
    each fg row and the QSimNet label (fg and matched to the query person)."""
    fg, pids, sim = [], [], []
    for p, t in zip(sampled, targets):
        iou, idx = pairwise_iou(t.gt_boxes, p.proposal_boxes).max(dim=0)
        is_fg = iou >= 0.5
        fg.append(is_fg)
        pids.append(t.gt_pids[idx][is_fg])
        sim.append(is_fg & t.gt_is_query[idx])
    return torch.cat(fg), torch.cat(pids), torch.cat(sim).long()


def test_training_losses_qsimnet_positives_and_oim_rows(monkeypatch):
    heads = _heads(positive_fraction=0.5).train()
    features, proposals, targets, query_embeds = _train_inputs()
    seen = {}
    label_and_sample = heads.label_and_sample_proposals
    monkeypatch.setattr(
        heads, "label_and_sample_proposals",
        lambda p, t: seen.setdefault("sampled", label_and_sample(p, t)),
    )
    heads.oim_loss.register_forward_pre_hook(lambda m, args: seen.update(oim=args))
    heads.qsimnet.register_forward_hook(lambda m, args, out: seen.update(sim_in=args, sim_out=out))
    with EventStorage():
        torch.manual_seed(2)
        instances, losses = heads(None, features, proposals, targets, query_embeds=query_embeds)
    assert instances == []
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_oim", "loss_sim"}
    assert all(torch.isfinite(v) for v in losses.values())

    sampled = seen["sampled"]
    fg, fg_pids, sim_labels = _expected_labels(sampled, targets)
    assert 0 < sim_labels.sum() < fg.sum() < len(fg)  # positives, fg negatives and background
    # QSimNet: one row per sampled proposal, its image's query, positives = fg on the query person
    q_rows, g_rows = seen["sim_in"]
    image_index = torch.cat([torch.full((len(p),), i) for i, p in enumerate(sampled)])
    assert torch.equal(q_rows, query_embeds[image_index])
    assert torch.allclose(losses["loss_sim"], F.cross_entropy(seen["sim_out"], sim_labels))
    # OIM: only the foreground rows, with the pids of their matched people
    oim_embeds, oim_pids = seen["oim"]
    assert torch.equal(oim_pids, fg_pids)
    assert torch.allclose(oim_embeds, g_rows[fg])
    assert torch.allclose(oim_embeds.norm(dim=1), torch.ones(len(oim_pids)), atol=1e-5)


def test_training_without_query_or_qsimnet_has_no_sim_loss():
    features, proposals, targets, query_embeds = _train_inputs()
    for heads, q in ((_heads(qsimnet=True), None), (_heads(qsimnet=False), query_embeds)):
        with EventStorage():
            _, losses = heads.train()(None, features, proposals, targets, query_embeds=q)
        assert set(losses) == {"loss_cls", "loss_box_reg", "loss_oim"}
    with pytest.raises(ValueError, match="targets"):
        heads(None, features, proposals, None)


def test_training_with_an_empty_gallery_is_finite():
    heads = _heads().train()
    features, proposals, targets, query_embeds = _train_inputs()
    empty = model_fixtures.random_instances(64, 96, torch.zeros(0, 4).tolist(), [], query_pid=1)
    with EventStorage():
        _, losses = heads(None, features, proposals, [targets[0], empty], query_embeds=query_embeds)
    assert all(torch.isfinite(v) for v in losses.values())


def test_inference_without_qsimnet_uses_cosine_similarity():
    heads = _heads(qsimnet=False).eval()
    features, proposals, _, query_embeds = _train_inputs()
    with torch.no_grad():
        results, losses = heads(None, features, proposals)
        with_query, _ = heads(None, features, proposals, query_embeds=query_embeds)
    assert losses == {}
    for res in results:
        assert len(res) > 0 and not res.has("pred_sims")
        assert res.pred_embeds.shape == (len(res), EMBED_DIM)
        assert torch.allclose(res.pred_embeds.norm(dim=1), torch.ones(len(res)), atol=1e-5)
    for res, q in zip(with_query, query_embeds):
        assert set(res.get_fields()) == PAIR_FIELDS
        assert torch.allclose(res.pred_sims, res.pred_embeds @ q, atol=1e-6)
        # ranked by the cosine (the query-ranked NMS keeps them in that order)
        assert torch.equal(res.pred_sims, res.pred_sims.sort(descending=True).values)


def _pair_inference(monkeypatch, heads, boxes, det, sims):
    """Pair-mode inference of ``heads`` on one image whose proposals ``boxes`` get exactly
    these ClsNet scores ``det`` and query similarities ``sims`` (zero box deltas)."""
    heads.eval()
    with torch.no_grad():  # zero box deltas: predicted boxes = the proposals
        heads.box_predictor.bbox_pred.weight.zero_()
        heads.box_predictor.bbox_pred.bias.zero_()
    det, sims = torch.tensor(det), torch.tensor(sims)
    monkeypatch.setattr(
        heads.box_predictor, "predict_probs",
        lambda preds, props: (torch.stack([det, 1 - det], dim=1),),
    )
    # the head scores only the candidates that pass its ClsNet cut, in proposal order
    candidates = det >= heads.min_det_score
    monkeypatch.setattr(heads, "query_similarity",
                        lambda q, g, qc=None, c=None: sims[candidates][: len(g)]
                        if len(g) == candidates.sum()
                        else pytest.fail("similarity not called on exactly the candidates"))
    features = {"res4": torch.rand(1, 128, 4, 6)}
    query = F.normalize(torch.randn(1, EMBED_DIM), dim=1)
    with torch.no_grad():
        (res,), _ = heads(None, features, [_proposals((64, 96), boxes)], query_embeds=query)
    return res


@pytest.mark.parametrize("qsimnet", [True, False])
def test_pair_inference_filters_on_det_score_and_nms_on_similarity(monkeypatch, qsimnet):
    """A: det 0.9 / sim 0.2; B (IoU 0.88 with A): det 0.5 / sim 0.8; C: det 0.005 / sim 0.99;
    D: det 0.02 / sim 0.5. With the paper's MIN_DET_SCORE 0.01, C is dropped, D is kept (the
    ClsNet's SCORE_THRESH_TEST 0.05 does not apply); NMS on the similarity keeps B over A. The
    same with or without QSimNet (then the similarity is the cosine): any query ranks the NMS."""
    boxes = [[10, 10, 40, 60], [12, 10, 42, 60], [60, 10, 90, 60], [50, 0, 70, 20]]
    res = _pair_inference(monkeypatch, _heads(qsimnet=qsimnet, min_det_score=0.01), boxes,
                          det=[0.9, 0.5, 0.005, 0.02], sims=[0.2, 0.8, 0.99, 0.5])
    assert res.pred_boxes.tensor.tolist() == [boxes[1], boxes[3]]
    assert torch.allclose(res.scores, torch.tensor([0.5, 0.02]))
    assert torch.allclose(res.pred_sims, torch.tensor([0.8, 0.5]))
    assert res.pred_classes.tolist() == [0, 0]
    assert torch.allclose(res.pred_embeds.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("min_det_score", [-1.0, 0.01])
def test_protocol_det_thresh_acts_before_the_similarity_nms(monkeypatch, min_det_score):
    """The target T (det 0.9, sim 0.4) overlaps S (IoU 0.88), a box very similar to the query
    (sim 0.95) but poorly detected (det 0.3). MIN_DET_SCORE -1 (the default) removes S with the
    protocol's DET_THRESH 0.5 before the NMS: T survives. The paper's 0.01 lets S suppress T;
    the evaluation then drops S (< DET_THRESH), and nothing is left."""
    assert model_fixtures.tiny_cfg().MODEL.QEEPS.QSIMNET.MIN_DET_SCORE == -1.0
    heads = _heads(min_det_score=min_det_score)
    assert heads.min_det_score == (0.5 if min_det_score < 0 else 0.01)
    target, similar = [10, 10, 40, 60], [12, 10, 42, 60]
    res = _pair_inference(monkeypatch, heads, [target, similar], det=[0.9, 0.3],
                          sims=[0.4, 0.95])
    if min_det_score < 0:
        assert res.pred_boxes.tensor.tolist() == [target]
        assert torch.allclose(res.scores, torch.tensor([0.9]))
        assert torch.allclose(res.pred_sims, torch.tensor([0.4]))
    else:
        assert res.pred_boxes.tensor.tolist() == [similar]
        assert not (res.scores >= 0.5).any()  # the evaluation's DET_THRESH keeps nothing


def test_min_det_score_minus_one_follows_the_protocol_det_thresh():
    cfg = model_fixtures.tiny_cfg(qsimnet=True)
    cfg.TEST.PERSON_SEARCH.DET_THRESH = 0.3
    assert QEEPSROIHeads(cfg, SHAPE).min_det_score == 0.3
    cfg.MODEL.QEEPS.QSIMNET.MIN_DET_SCORE = 0.2
    assert QEEPSROIHeads(cfg, SHAPE).min_det_score == 0.2


def test_qsimnet_inference_on_random_features():
    heads = _heads().eval()
    features, proposals, _, query_embeds = _train_inputs()
    with torch.no_grad():
        results, _ = heads(None, features, proposals, query_embeds=query_embeds)
    for res in results:
        assert len(res) > 0
        assert (res.scores >= heads.min_det_score).all()
        assert ((res.pred_sims >= 0) & (res.pred_sims <= 1)).all()
        assert torch.equal(res.pred_sims, res.pred_sims.sort(descending=True).values)
    embeds = heads.embed_boxes(features, [Boxes(torch.tensor([[5.0, 5, 35, 60]]))] * 2)
    assert embeds.shape == (2, EMBED_DIM)
    assert torch.allclose(embeds.norm(dim=1), torch.ones(2), atol=1e-5)


def test_reid_head_centres_correlated_features():
    """Pooled res5 features are non-negative and correlated: without centring a fresh head maps
    them to nearly one direction (OIM then cannot start); with its BatchNorm they spread out."""
    from qeeps_d2.modeling.roi_heads import ReIDHead

    torch.manual_seed(0)
    head = ReIDHead(64, 16).train()
    feats = torch.rand(32, 64) + 1.0  # positive, strongly correlated rows
    emb = head(feats)
    assert torch.allclose(emb.norm(dim=1), torch.ones(32), atol=1e-5)
    raw = torch.nn.functional.normalize(head.proj(feats), dim=1)
    off_diagonal = ~torch.eye(32, dtype=torch.bool)
    assert (raw @ raw.T)[off_diagonal].mean() > 0.9
    assert (emb @ emb.T)[off_diagonal].mean().abs() < 0.2
    # a single row in training uses the running statistics instead of failing
    assert head(feats[:1]).shape == (1, 16)
    head.eval()
    assert torch.allclose(head(feats[:3]).norm(dim=1), torch.ones(3), atol=1e-5)


def test_trunk_grad_scale_scales_only_the_shared_features_gradient():
    """embed(): the re-id head gets its full gradient, the shared features a scaled one."""
    from qeeps_d2.modeling.roi_heads import QEEPSROIHeads

    grads = {}
    for scale in (1.0, 0.25):
        torch.manual_seed(0)
        cfg = model_fixtures.tiny_cfg()
        cfg.MODEL.QEEPS.OIM.TRUNK_GRAD_SCALE = scale
        head = QEEPSROIHeads(cfg, {"res4": ShapeSpec(channels=128, stride=16)}).train()
        feats = torch.rand(6, 256, requires_grad=True)
        head.embed(feats).pow(3).sum().backward()
        grads[scale] = (feats.grad.clone(), head.reid_head.proj.weight.grad.clone())
    assert torch.allclose(grads[0.25][0], 0.25 * grads[1.0][0], atol=1e-6)
    assert torch.allclose(grads[0.25][1], grads[1.0][1])


def test_reid_head_normalises_with_foreground_statistics():
    """stats_mask rows give the batch statistics applied to every row (and to the running ones)."""
    from qeeps_d2.modeling.roi_heads import ReIDHead

    torch.manual_seed(0)
    head = ReIDHead(8, 4).train()
    x = torch.rand(10, 8)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:4] = True
    out = head(x, mask)
    z = head.proj(x)
    mean, var = z[:4].mean(0), z[:4].var(0, unbiased=False)
    expected = F.normalize((z - mean) / torch.sqrt(var + head.norm.eps), dim=1)
    assert torch.allclose(out, expected, atol=1e-5)
    m = head.norm.momentum
    assert torch.allclose(head.norm.running_mean, m * mean, atol=1e-6)
    head.eval()
    running = F.normalize(
        (z - head.norm.running_mean) / torch.sqrt(head.norm.running_var + head.norm.eps), dim=1)
    assert torch.allclose(head(x), running, atol=1e-5)


def _buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


def test_embed_boxes_in_training_uses_and_keeps_the_running_statistics():
    """Query boxes are embedded as at test time, also in training: res5's BatchNorms (NORM "BN")
    and the re-id head normalise with their running statistics and do not update them, and
    the gradient still reaches their weights and the features."""
    heads = _heads()
    torch.manual_seed(4)
    with torch.no_grad():  # running statistics far from those of the few boxes below
        for name, buf in heads.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    bn_names = [k for k, m in heads.named_modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert any(k.startswith("res5.") for k in bn_names) and "reid_head.norm" in bn_names
    features = {"res4": torch.rand(2, 128, 4, 6, requires_grad=True)}
    boxes = [Boxes(torch.tensor([[5.0, 5, 35, 60]])), Boxes(torch.tensor([[20.0, 10, 60, 60]]))]
    expected = heads.eval().embed_boxes({"res4": features["res4"].detach()}, boxes)
    heads.train()
    before = _buffers(heads)
    embeds = heads.embed_boxes(features, boxes)
    after = _buffers(heads)
    assert all(torch.equal(before[k], after[k]) for k in before), [
        k for k in before if not torch.equal(before[k], after[k])]
    assert torch.allclose(embeds, expected, atol=1e-5)
    assert all(m.training for m in heads.modules())  # the training mode is restored
    embeds.pow(3).sum().backward()
    grads = dict(heads.named_parameters())
    for name in ("reid_head.proj.weight", "reid_head.norm.weight", "res5.0.conv1.weight",
                 "res5.0.conv1.norm.weight", "res5.2.conv3.norm.bias"):
        assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name
    assert features["res4"].grad.abs().sum() > 0
