"""The QEEPS meta-architecture end to end on tiny CPU models: training steps for the Table-1 rows,
loss weights, inference on pairs / gallery images / query boxes, Siamese weight sharing."""
import copy

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

import model_fixtures

PAIR_FIELDS = {"pred_boxes", "scores", "pred_classes", "pred_embeds", "pred_sims"}
BASE_LOSSES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_oim"}
# (qsse, qrpn, qsimnet): the paper's Table 1 rows
TABLE1 = {
    "oim": (False, False, False),
    "oim+qrpn": (False, True, False),
    "oim+qsimnet": (False, False, True),
    "oim+qrpn+qsimnet": (False, True, True),
    "qeeps": (True, True, True),
}


def _model(qsse=False, qrpn=False, qsimnet=False, freeze_at=0, loss_weights=None):
    cfg = model_fixtures.tiny_cfg(qsse=qsse, qrpn=qrpn, qsimnet=qsimnet)
    # sample every foreground proposal, so that the labeled query person always reaches OIM/QSimNet
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = 1.0
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    # the paper's ClsNet cut before the QSimNet NMS: few boxes of a random model reach the
    # protocol's DET_THRESH 0.5, and these tests need detections
    cfg.MODEL.QEEPS.QSIMNET.MIN_DET_SCORE = 0.01
    for key, value in (loss_weights or {}).items():
        setattr(cfg.MODEL.QEEPS.LOSS_WEIGHTS, key.upper(), value)
    torch.manual_seed(0)
    model = build_model(cfg)
    model_fixtures.fill_oim_lut(model)
    return model


def _eval_model(row):
    model = _model(*TABLE1[row])
    inputs = model_fixtures.pair_inputs() if model.query_guided else model_fixtures.scene_inputs()
    return model_fixtures.settle_batchnorm(model, inputs)


def _train_step(model, inputs, seed=0):
    model.train()
    torch.manual_seed(seed)
    with EventStorage():
        losses = model(inputs)
    sum(losses.values()).backward()
    return losses


@pytest.mark.parametrize("row", list(TABLE1))
def test_training_step_of_each_table1_row(row):
    qsse, qrpn, qsimnet = TABLE1[row]
    model = _model(qsse, qrpn, qsimnet, freeze_at=2 if qsse else 0)
    assert model.query_guided == any(TABLE1[row])
    inputs = model_fixtures.pair_inputs() if model.query_guided else model_fixtures.scene_inputs()
    losses = _train_step(model, inputs)
    expected = set(BASE_LOSSES)
    expected |= {"loss_qrpn"} if qrpn else set()
    expected |= {"loss_sim"} if qsimnet else set()
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values()), losses

    params = dict(model.named_parameters())
    guided = {
        ".qsse.": qsse,
        "proposal_generator.query_excitation.": qrpn,
        "proposal_generator.query_head.": qrpn,
        "roi_heads.qsimnet.": qsimnet,
        "roi_heads.reid_head.": True,
    }
    for part, present in guided.items():
        names = [n for n in params if part in n]
        assert bool(names) == present, part
        assert all(params[n].requires_grad for n in names), part  # QSSE even in frozen stages
    for name, p in params.items():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
        else:
            assert name.startswith(("backbone.stem.", "backbone.res2.")) and p.grad is None, name
    if qsse:  # FREEZE_AT=2 froze the stem and res2 convolutions but not res2's QSSE
        assert any(n.startswith("backbone.res2.") and ".qsse." in n for n in params)
        assert not params["backbone.res2.0.conv1.weight"].requires_grad


def test_loss_weights_scale_each_term():
    weights = {"loss_cls": 2.0, "loss_box_reg": 0.5, "LOSS_RPN_CLS": 3.0, "loss_rpn_loc": 0.25,
               "loss_oim": 4.0, "loss_qrpn": 1.5, "LOSS_SIM": 0.1}
    weighted = _model(qrpn=True, qsimnet=True, loss_weights=weights)
    assert weighted.loss_weights == {k.lower(): w for k, w in weights.items()}
    plain = copy.deepcopy(weighted)
    plain.loss_weights = {}  # a term missing from MODEL.QEEPS.LOSS_WEIGHTS has weight 1
    inputs = model_fixtures.pair_inputs()
    weighted_losses = _train_step(weighted, inputs)
    plain_losses = _train_step(plain, inputs)
    assert set(weighted_losses) == set(plain_losses) == {k.lower() for k in weights}
    for key, w in weights.items():
        k = key.lower()
        assert plain_losses[k] != 0, k
        assert torch.allclose(weighted_losses[k], w * plain_losses[k], rtol=1e-5), k


@pytest.mark.parametrize("start,warmup,expected", [
    (0, 4, ((0, 0.25), (2, 0.75), (3, 1.0), (10, 1.0))),  # ramp (i + 1) / 4 from the start
    (5, 0, ((0, 0.0), (4, 0.0), (5, 1.0), (9, 1.0))),     # off, then on at iteration 5
    (5, 2, ((4, 0.0), (5, 0.5), (6, 1.0))),               # off, then a 2-iteration ramp
])
def test_oim_loss_start_and_warmup(start, warmup, expected):
    model = _model()
    model.oim_start_iter, model.oim_warmup_iters = start, warmup
    losses = {"loss_oim": torch.tensor(2.0), "loss_cls": torch.tensor(1.0)}
    for it, ramp in expected:
        with EventStorage(it):
            weighted = model._weighted(losses)
        assert weighted["loss_oim"].item() == pytest.approx(2.0 * ramp)
        assert weighted["loss_cls"].item() == 1.0


def test_pair_training_with_an_empty_gallery():
    model = _model(True, True, True)
    inputs = model_fixtures.pair_inputs()
    inputs[1]["instances"] = model_fixtures.random_instances(72, 88, [], [], query_pid=4)
    losses = _train_step(model, inputs)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _rescaled(inputs, scales):
    """Give each input original height/width = scale x its image size."""
    for x, s in zip(inputs, scales):
        x["height"], x["width"] = int(x["image"].shape[1] * s), int(x["image"].shape[2] * s)
    return inputs


@pytest.mark.parametrize("row", ["oim+qrpn", "qeeps"])
def test_pair_inference_keys_and_rescaling(row):
    model = _eval_model(row)
    inputs = _rescaled(model_fixtures.pair_inputs(with_gt=False), [2.0, 0.5])
    with torch.no_grad():
        outputs = model(inputs)
        raw = model.inference(inputs, do_postprocess=False)
    for out, r, x in zip(outputs, raw, inputs):
        inst, raw_inst = out["instances"], r["instances"]
        assert set(inst.get_fields()) == PAIR_FIELDS
        assert inst.image_size == (x["height"], x["width"])
        assert len(inst) > 0
        scale = x["height"] / x["image"].shape[1]
        keep = Boxes(raw_inst.pred_boxes.tensor * scale).nonempty()  # as detector_postprocess
        expected = raw_inst.pred_boxes.tensor[keep] * scale
        assert torch.allclose(inst.pred_boxes.tensor, expected, atol=1e-4)
        assert torch.equal(inst.pred_sims, raw_inst.pred_sims[keep])
        assert (inst.pred_boxes.tensor[:, 2] <= x["width"]).all()
        assert (inst.pred_boxes.tensor[:, 3] <= x["height"]).all()
        assert torch.allclose(inst.pred_embeds.norm(dim=1), torch.ones(len(inst)), atol=1e-5)


def test_gallery_and_query_inference_and_cosine_pair_similarity():
    """OIM+QRPN (no QSimNet): pair similarities are cosines with the query box's own embedding."""
    model = _eval_model("oim+qrpn")
    gallery = _rescaled(model_fixtures.scene_inputs(with_gt=False), [1.5, 1.0])
    pair = model_fixtures.pair_inputs(with_gt=False)[0]
    pair["query_image"] = model_fixtures.pair_inputs(seed=1, with_gt=False)[0]["image"]  # 64 x 96
    query = {"image": pair["query_image"], "query_box": pair["query_box"]}
    with torch.no_grad():
        gallery_out = model(gallery)
        (query_out,) = model([query])
        (pair_out,) = model([pair])
    for out, x in zip(gallery_out, gallery):
        assert set(out) == {"instances", "proposal_boxes"}
        props = out["proposal_boxes"]  # original-image pixels
        assert props.shape[1] == 4 and 0 < len(props) <= 20
        assert (props[:, 2] <= x["width"] + 1e-3).all() and (props[:, 3] <= x["height"] + 1e-3).all()
        assert props[:, 2].max() > 0.5 * x["width"]  # rescaled, not in the 64-pixel input frame
        inst = out["instances"]
        assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_embeds"}
        assert inst.image_size == (x["height"], x["width"]) and len(inst) > 0
        assert (inst.pred_boxes.tensor[:, 2:] <= torch.tensor([x["width"], x["height"]])).all()
    assert set(query_out) == {"query_embed"}
    q = query_out["query_embed"]
    assert q.shape == (16,) and torch.allclose(q.norm(), torch.tensor(1.0), atol=1e-5)
    inst = pair_out["instances"]
    assert torch.allclose(inst.pred_sims, inst.pred_embeds @ q, atol=1e-4)
    # the pair's proposals come from the summed objectness; the plain ones from the stock RPN
    assert set(pair_out) == {"instances", "proposal_boxes", "plain_proposal_boxes"}
    assert pair_out["proposal_boxes"].shape[1] == pair_out["plain_proposal_boxes"].shape[1] == 4


def test_mixed_batch_keeps_the_order():
    """Each output of a gallery/query/pair mix equals that input's output alone (all images are
    64 x 96, so the padding does not depend on the batch)."""
    model = _eval_model("oim+qrpn+qsimnet")
    galleries = [model_fixtures.scene_inputs(seed=s, with_gt=False)[0] for s in (2, 3)]
    pairs = [model_fixtures.pair_inputs(seed=s, with_gt=False)[0] for s in (4, 5)]
    query = {"image": galleries[1]["image"], "query_box": torch.tensor([20.0, 4, 50, 60])}
    batch = [galleries[0], query, pairs[0], galleries[1], pairs[1]]
    with torch.no_grad():
        mixed = model(batch)
        alone = [model([x])[0] for x in batch]
    assert [set(o) - {"proposal_boxes", "plain_proposal_boxes"} for o in mixed] == [
        {"instances"}, {"query_embed"}, {"instances"}, {"instances"}, {"instances"}]
    assert torch.allclose(mixed[1]["query_embed"], alone[1]["query_embed"], atol=1e-5)
    for i in (0, 2, 3, 4):
        a, b = mixed[i]["instances"], alone[i]["instances"]
        assert a.has("pred_sims") == b.has("pred_sims") == (i in (2, 4))
        assert len(a) == len(b) > 0
        assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3)
        assert torch.allclose(a.scores, b.scores, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_siamese_branches_share_weights(training):
    """Same image on both branches -> identical features, equal to the plain gallery forward."""
    model = _eval_model("oim+qrpn+qsimnet").train(training)
    image = model_fixtures.scene_inputs(with_gt=False)[0]
    pair = {**image, "query_image": image["image"].clone(),
            "query_box": torch.tensor([10.0, 8, 40, 60])}
    with torch.no_grad():
        _, gallery_feats, query_feats, _ = model._siamese_features([pair])
        plain = model.backbone(model.preprocess_image([image]).tensor)
    assert torch.equal(gallery_feats["res4"], query_feats["res4"])
    if not training:  # BN running statistics: the Siamese batch matches a single-image forward
        assert torch.allclose(gallery_feats["res4"], plain["res4"], rtol=1e-3, atol=1e-4)


def test_pairs_of_one_query_share_its_backbone_pass():
    """Without QSSE, pairs with the same query_index run the query image once; the outputs equal
    those of the pairs run one by one (all images are 64 x 96: padding does not change)."""
    model = _eval_model("oim+qrpn+qsimnet")
    query = model_fixtures.pair_inputs(seed=6, with_gt=False)[0]
    galleries = [model_fixtures.scene_inputs(seed=s, with_gt=False)[0] for s in (7, 8, 9)]
    pairs = [{**g, "query_image": query["query_image"], "query_box": query["query_box"],
              "query_index": 3} for g in galleries]
    calls = []
    hook = model.backbone.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        batched = model(pairs)
        alone = [model([p])[0] for p in pairs]
    hook.remove()
    assert calls[0] == 3 + 1  # three gallery images and ONE query image
    for a, b in zip(batched, alone):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b) > 0
        assert torch.allclose(a.pred_sims, b.pred_sims, atol=1e-4)
        assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3)


def test_qsse_pairs_do_not_share_the_query_pass():
    """With QSSE the query branch depends on the gallery image: one query row per pair."""
    model = _eval_model("qeeps")
    query = model_fixtures.pair_inputs(seed=6, with_gt=False)[0]
    pairs = [{**g, "query_image": query["query_image"], "query_box": query["query_box"],
              "query_index": 0}
             for g in (model_fixtures.scene_inputs(seed=s, with_gt=False)[0] for s in (7, 8))]
    calls = []
    hook = model.backbone.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        model(pairs)
    hook.remove()
    assert calls == [4]


def test_qsse_squeeze_ignores_the_batch_padding():
    """A pair of small images run alone, then padded into the canvas of a larger pair: every QSSE
    block squeezes each image over its own area only. Convolutions near the image border see the
    padding differently in the two runs, so the test gives the second run the first run's
    residual outputs U inside each image's valid region (the canvas keeps its own values
    outside it) and checks that every block then excites with the same s."""
    model = _model(qsse=True).eval()
    g = torch.Generator().manual_seed(3)
    img = lambda h, w: torch.randint(0, 255, (3, h, w), generator=g).float()  # noqa: E731
    small = {"image": img(45, 61), "height": 45, "width": 61,
             "query_image": img(37, 50), "query_box": torch.tensor([5.0, 4, 30, 35])}
    large = {"image": img(80, 100), "height": 80, "width": 100,
             "query_image": img(70, 90), "query_box": torch.tensor([10.0, 8, 50, 60])}
    blocks = model.backbone.qsse_blocks
    alone_u, alone_valid, excitations = [], [], []

    def record(m, args):  # run alone: rows (gallery, query)
        alone_u.append(args[0])
        alone_valid.append(args[2])

    def substitute(m, args):  # batched with the large pair: rows (g_large, g, q_large, q)
        u, num_pairs, valid = args
        i = len(excitations)
        assert torch.equal(valid[[1, 3]], alone_valid[i])
        u = u.clone()
        for row, alone_row in ((1, 0), (3, 1)):
            h, w = alone_valid[i][alone_row].tolist()
            u[row, :, :h, :w] = alone_u[i][alone_row, :, :h, :w]
        return u, num_pairs, valid

    hooks = [b.qsse.register_forward_hook(lambda m, args, s: excitations.append(s))
             for b in blocks]
    pre_hooks = [b.qsse.register_forward_pre_hook(record) for b in blocks]
    with torch.no_grad():
        model._siamese_features([small])
        alone = excitations[:]
        excitations.clear()
        for hook in pre_hooks:
            hook.remove()
        pre_hooks = [b.qsse.register_forward_pre_hook(substitute) for b in blocks]
        model._siamese_features([large, small])
    for hook in hooks + pre_hooks:
        hook.remove()
    assert len(alone) == len(excitations) == len(blocks) > 0
    for u, valid in zip(alone_u, alone_valid):  # the gallery image fills the canvas alone
        assert tuple(valid[0].tolist()) == tuple(u.shape[2:])
    assert (alone_valid[0][1] < alone_valid[0][0]).all()  # the query is padded even alone
    for s_alone, s_batch in zip(alone, excitations):
        assert torch.allclose(s_batch[[1, 3]], s_alone, atol=1e-6)


@pytest.mark.parametrize("row", ["oim+qsimnet", "qeeps"])
def test_pair_training_embeds_the_queries_as_at_test_time(row):
    """In a pair training step the query path (res5 + re-id head on the query boxes) leaves
    every running statistic of the model as it was, and gives the embedding of eval mode."""
    model = _eval_model(row)  # settled, non-trivial running statistics (NORM "BN")
    heads = model.roi_heads
    embed_boxes = heads.embed_boxes
    seen = {}

    def checked(features, boxes):
        before = {k: v.clone() for k, v in model.named_buffers()}
        embeds = embed_boxes(features, boxes)
        seen["changed"] = [k for k, v in model.named_buffers() if not torch.equal(v, before[k])]
        heads.eval()
        with torch.no_grad():
            seen["eval"] = embed_boxes(features, boxes)
        heads.train()
        seen["train"] = embeds
        return embeds

    heads.embed_boxes = checked
    losses = _train_step(model, model_fixtures.pair_inputs())
    assert seen["changed"] == []
    assert seen["train"].shape == (2, 16) and seen["train"].requires_grad
    assert torch.allclose(seen["train"], seen["eval"], atol=1e-5)
    assert all(torch.isfinite(v) for v in losses.values())
    assert heads.reid_head.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("row", ["oim", "qeeps"])
def test_channels_last_gives_the_default_layouts_results(row):
    """MODEL.QEEPS.CHANNELS_LAST: weights and backbone activations channels-last, the same
    outputs (float rounding) and gradients as the default layout with the same weights."""
    ref = _eval_model(row)
    cfg = model_fixtures.tiny_cfg(*TABLE1[row])
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = 1.0
    cfg.MODEL.QEEPS.QSIMNET.MIN_DET_SCORE = 0.01
    cfg.MODEL.QEEPS.CHANNELS_LAST = True
    model = build_model(cfg)
    model.load_state_dict(ref.state_dict())
    conv = model.backbone.res2[0].conv2.weight  # 3x3: a 1x1 kernel is both layouts at once
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(2, 3, 64, 96)
    feats = model.eval().backbone(x)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats.values())
    # the stem's channels-last max-pool keeps that layout (no round trip through NCHW)
    assert model.backbone.stem(x).is_contiguous(memory_format=torch.channels_last)
    inputs = model_fixtures.pair_inputs(with_gt=False) if ref.query_guided else \
        model_fixtures.scene_inputs(with_gt=False)
    with torch.no_grad():
        want, got = ref.eval()(inputs), model(inputs)
    for a, b in zip(want, got):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b) > 0
        assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3)
        assert torch.allclose(a.pred_embeds, b.pred_embeds, atol=1e-4)
    train = model_fixtures.pair_inputs() if ref.query_guided else model_fixtures.scene_inputs()
    want, got = _train_step(ref, train), _train_step(model, train)
    for key in want:
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-3, abs=1e-5), key
    # gradients through the backbone (the training step's own differ more: near-tied proposals
    # can swap under float rounding, and the sampled ROIs with them)
    for m in (ref, model):
        m.zero_grad()
        m.train()
        sum((f ** 2).mean() for f in m.backbone(x).values()).backward()
    g_ref, g_cl = ref.backbone.res3[0].conv2.weight.grad, model.backbone.res3[0].conv2.weight.grad
    assert torch.allclose(g_ref, g_cl, rtol=1e-3, atol=1e-4 * float(g_ref.abs().max()))
