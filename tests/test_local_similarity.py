"""MODEL.QEEPS.QSIMNET.LOCAL: the local similarity head, its fitting and its use in pair mode."""
import math

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes

from qeeps_d2.engine.local_similarity_fit import fit_local_similarity
from qeeps_d2.modeling.local_similarity import LocalSimilarity

import model_fixtures


def _reference(q, g, eq, eg, tau, alpha):
    """The head's formula in numpy, for one pair: q, g (P, d) unit cells, eq, eg (D,)."""
    s = q @ g.T
    a = np.exp(s / tau)
    a /= a.sum(axis=1, keepdims=True)
    local = (a * s).sum(axis=1).mean()
    return (local + alpha * float(eq @ eg)) / (1 + abs(alpha))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_score_is_the_formula_pinned_on_a_small_pair():
    head = LocalSimilarity(in_channels=4, dim=3)
    with torch.no_grad():
        head.log_tau.fill_(math.log(0.5))
        head.alpha.fill_(0.25)
    rng = np.random.default_rng(0)
    q, g = _unit(rng.normal(size=(2, 3))), _unit(rng.normal(size=(2, 3)))
    eq, eg = _unit(rng.normal(size=5)), _unit(rng.normal(size=5))
    got = head(torch.tensor(q[None], dtype=torch.float32), torch.tensor(g[None], dtype=torch.float32),
               torch.tensor(eq[None], dtype=torch.float32), torch.tensor(eg[None], dtype=torch.float32))
    assert got.shape == (1,)
    assert float(got.detach()) == pytest.approx(_reference(q, g, eq, eg, 0.5, 0.25), abs=1e-6)
    # two hand-made cells: q = (e1, e2), g = (e1, e1), tau -> 0: each query cell takes its best
    # gallery cell, local = mean(1, 0) = 0.5; identical embeddings: (0.5 + 0.25) / 1.25 = 0.6
    with torch.no_grad():
        head.log_tau.fill_(math.log(1e-4))
    e1, e2 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    got = head(torch.tensor([[e1, e2]]), torch.tensor([[e1, e1]]), torch.tensor([e1]), torch.tensor([e1]))
    assert float(got) == pytest.approx(0.6, abs=1e-5)


def test_a_query_cell_finds_its_match_wherever_it_sits_in_the_gallery_box():
    """The soft alignment searches all gallery cells: moving the matching cell elsewhere in the
    box (a logo seen at another height) leaves the score unchanged; a fixed cell-to-cell
    comparison would drop it."""
    torch.manual_seed(0)
    head = LocalSimilarity(in_channels=8, dim=8)
    q = head.cells(torch.randn(1, 8, 3, 2))
    g = head.cells(torch.randn(1, 8, 3, 2))
    e = torch.nn.functional.normalize(torch.randn(1, 16), dim=1)
    moved = g[:, torch.randperm(6)]
    assert torch.allclose(head(q, g, e, e), head(q, moved, e, e), atol=1e-6)
    assert float(head(q, q, e, e)) > float(head(q, g, e, e))
    out = head(q, torch.cat([g, q]), e, torch.cat([e, e]))  # one query against two boxes
    assert out.shape == (2,) and bool((out.abs() <= 1 + 1e-6).all())


def _logo_boxes(num_ids=12, per_id=4, cells=6, channels=8, seed=0):
    """Boxes whose identity is one 'logo' (in the first half of the channels) at a random cell;
    the other half carries strong nuisance in every cell, and the global embeddings carry no
    identity: only a head that learns which channels to compare, and searches the cells, finds
    the person."""
    rng = np.random.default_rng(seed)
    half = channels // 2
    logos = rng.normal(size=(num_ids, half)) * 3
    maps, pids = [], []
    for p in range(num_ids):
        for _ in range(per_id):
            m = rng.normal(size=(cells, channels)) * 0.3
            m[:, half:] += rng.normal(size=(cells, channels - half)) * 3
            m[rng.integers(cells), :half] += logos[p]
            maps.append(m)
            pids.append(p)
    maps = torch.tensor(np.array(maps), dtype=torch.float32)
    embeds = torch.nn.functional.normalize(torch.randn(len(pids), 16), dim=1)
    return maps, embeds, torch.tensor(pids)


def _retrieval_top1(head, maps, embeds, pids):
    with torch.no_grad():
        cells = head.cells_from_flat(maps)
        hits = 0
        for i in range(len(pids)):
            s = head(cells[i : i + 1], cells, embeds[i : i + 1], embeds)
            s[i] = -9
            hits += int(pids[int(s.argmax())] == pids[i])
    return hits / len(pids)


def test_fitting_learns_a_local_cue_the_global_embedding_lacks():
    torch.manual_seed(0)
    maps, embeds, pids = _logo_boxes()
    test_maps, test_embeds, test_pids = _logo_boxes(seed=1)  # other identities and logos
    head = LocalSimilarity(in_channels=8, dim=8)
    assert not head.fitted
    before = _retrieval_top1(head, test_maps, test_embeds, test_pids)
    loss = fit_local_similarity(head, maps, embeds, pids, iters=150, batch=32, hard_pool=8,
                                hard_negatives=4, random_negatives=4, lr=1e-2)
    assert math.isfinite(loss) and head.fitted
    assert torch.allclose(head.mean, maps.reshape(-1, 8).mean(0))
    after = _retrieval_top1(head, test_maps, test_embeds, test_pids)
    # chance: 3 mates among 47 boxes (0.06)
    assert after >= 0.5 and after > before + 0.3, (before, after)


def test_fitting_needs_identities_with_two_boxes():
    head = LocalSimilarity(in_channels=8, dim=8)
    with pytest.raises(ValueError, match="two identities"):
        fit_local_similarity(head, torch.randn(3, 6, 8), torch.randn(3, 16), torch.tensor([0, 1, 2]))


def _cfg(local=True):
    cfg = model_fixtures.tiny_cfg(qsse=True, qrpn=True, qsimnet=True)
    cfg.MODEL.QEEPS.DET_HEAD = "separate"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res4"]
    cfg.MODEL.QEEPS.ID_POOLER.IN_FEATURE = "res2"
    cfg.MODEL.QEEPS.ID_POOLER.RESOLUTION = (24, 12)
    cfg.MODEL.QEEPS.ID_POOLER.OWN_STAGES = True
    cfg.MODEL.QEEPS.QSIMNET.LOCAL.ENABLED = local
    return cfg


def test_config_needs_qsimnet_and_own_identity_stages():
    cfg = _cfg()
    cfg.MODEL.QEEPS.ID_POOLER.OWN_STAGES = False
    with pytest.raises(ValueError, match="QSIMNET.LOCAL needs"):
        build_model(cfg)
    cfg = _cfg()
    cfg.MODEL.QEEPS.QSIMNET.ENABLED = False
    with pytest.raises(ValueError, match="QSIMNET.LOCAL needs"):
        build_model(cfg)
    for key, value in (("HARD_POOL", 0), ("FIT_BATCH", 0), ("LR", 0.0)):
        cfg = _cfg()
        cfg.MODEL.QEEPS.QSIMNET.LOCAL[key] = value
        with pytest.raises(ValueError, match=f"QSIMNET.LOCAL.{key} must be"):
            build_model(cfg)


@pytest.mark.parametrize("described", ["nothing", "one box per identity"])
def test_too_few_identities_leave_the_head_unfitted_and_training_goes_on(described, caplog,
                                                                        monkeypatch):
    """The hook logs and keeps QSimNet instead of failing the end of a training run."""
    import logging
    from qeeps_d2.engine import local_similarity_fit

    boxes = (None if described == "nothing" else
             (torch.randn(3, 18, 128), torch.randn(3, 16), torch.tensor([0, 1, 2])))
    monkeypatch.setattr(local_similarity_fit, "describe_labeled_boxes", lambda *a, **k: boxes)
    cfg = _cfg()
    cfg.MODEL.QEEPS.QSIMNET.LOCAL.PRETRAIN_IDS = False
    torch.manual_seed(0)
    model = build_model(cfg)
    hook = local_similarity_fit.LocalSimilarityFit(cfg, [], None)
    with caplog.at_level(logging.WARNING, logger="qeeps_d2"):
        hook.fit(model, model.roi_heads.local_sim)
    assert not model.roi_heads.local_sim.fitted
    assert "NOT fitted" in caplog.text


def _pair_inputs(h=64, w=96):
    torch.manual_seed(1)
    image = (torch.rand(3, h, w) * 255).float()
    return [{"image": image, "query_image": image.flip(2), "query_box": [10.0, 8.0, 40.0, 60.0],
             "height": h, "width": w, "given_boxes": torch.tensor([[50.0, 5.0, 80.0, 60.0],
                                                                   [10.0, 8.0, 40.0, 60.0]])}]


def test_pair_scores_come_from_the_fitted_head_only():
    torch.manual_seed(0)
    model = build_model(_cfg()).eval()
    heads = model.roi_heads
    with torch.no_grad():
        plain = model(_pair_inputs())[0]["instances"]
        # unfitted: QSimNet's probabilities, as without the head
        assert plain.pred_sims.shape == (2,)
        assert bool(((plain.pred_sims >= 0) & (plain.pred_sims <= 1)).all())
        heads.local_sim.fitted_flag.fill_(1)
        local = model(_pair_inputs())[0]["instances"]
    assert torch.allclose(plain.pred_embeds, local.pred_embeds, atol=1e-6)
    assert not torch.allclose(plain.pred_sims, local.pred_sims, atol=1e-3)
    # the fitted head's score of each given box, recomputed from its pieces
    with torch.no_grad():
        inp = _pair_inputs()
        images, feats, q_feats, q_boxes = model._siamese_features(inp)
        q_embeds, q_cells = heads.describe_boxes(q_feats, q_boxes)
        embeds, cells = heads._describe_per_image(feats, [Boxes(inp[0]["given_boxes"])])
        expected = heads.local_sim(q_cells, cells[0], q_embeds, embeds[0])
    assert torch.allclose(local.pred_sims, expected, atol=1e-5)


def test_pair_detections_are_ranked_and_suppressed_by_the_fitted_head():
    """Pair mode with the model's own detections (the cascade's second stage): each detection's
    similarity is the fitted head's score of its box, and the NMS kept them in that order."""
    cfg = _cfg()
    cfg.MODEL.QEEPS.QSIMNET.MIN_DET_SCORE = 0.0  # random weights: every proposal a candidate
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    heads = model.roi_heads
    heads.local_sim.fitted_flag.fill_(1)
    inp = _pair_inputs()
    del inp[0]["given_boxes"]
    with torch.no_grad():
        out = model(inp)[0]["instances"]
        images, feats, q_feats, q_boxes = model._siamese_features(inp)
        q_embeds, q_cells = heads.describe_boxes(q_feats, q_boxes)
        embeds, cells = heads._describe_per_image(feats, [out.pred_boxes])
        expected = heads.local_sim(q_cells, cells[0], q_embeds, embeds[0])
    assert len(out) > 1
    assert torch.allclose(out.pred_sims, expected, atol=1e-4)
    assert torch.equal(out.pred_sims, out.pred_sims.sort(descending=True).values)


def test_description_batches_equal_size_images_without_changing_them(tmp_path):
    from qeeps_d2.data.datasets.cuhk_sysu import load_cuhk_sysu
    from qeeps_d2.data.mapper import PersonSearchMapper
    from qeeps_d2.data.synthps import generate_synthps
    from qeeps_d2.engine.local_similarity_fit import describe_labeled_boxes

    root = str(tmp_path / "synthps")
    generate_synthps(root, seed=0, num_train_ids=4, num_test_ids=3, train_images=8,
                     test_images=51, image_size=(96, 72), persons_per_image=(2, 3),
                     gallery_sizes=(50,), appearances_per_id=(2, 6))
    records = load_cuhk_sysu(root, "train")
    labeled = [a["person_id"] for r in records for a in r["annotations"] if a["person_id"] >= 0]
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    mapper = PersonSearchMapper(cfg, is_train=False)
    one = describe_labeled_boxes(model, records, mapper, batch_size=1)
    three = describe_labeled_boxes(model, records, mapper, batch_size=3)
    assert one[2].tolist() == three[2].tolist() == labeled
    assert one[0].shape == (len(labeled), 6 * 3, 128) and one[1].shape == (len(labeled), 16)
    # an untrained network: cells up to ~4e3, so float rounding relative to that scale
    assert float((one[0] - three[0]).abs().max()) <= 1e-5 * float(one[0].abs().max())
    assert torch.allclose(one[1], three[1], atol=1e-5)
    assert model.training  # left as it was


def test_agnostic_similarity_is_the_head_with_cells_and_the_cosine_without():
    from qeeps_d2.modeling.local_similarity import agnostic_similarity

    head = LocalSimilarity(in_channels=4, dim=3)
    with torch.no_grad():
        head.log_tau.fill_(math.log(0.5))
        head.alpha.fill_(0.25)
    assert head.params().tolist() == pytest.approx([0.5, 0.25])
    rng = np.random.default_rng(1)
    q, g = _unit(rng.normal(size=(2, 3))), _unit(rng.normal(size=(4, 2, 3)))
    eq, eg = _unit(rng.normal(size=5)), _unit(rng.normal(size=(4, 5)))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    query = {"query_embed": t(eq), "query_cells": t(q), "local_params": head.params()}
    got = agnostic_similarity(query, t(eg), t(g))
    expected = [_reference(q, g[i], eq, eg[i], 0.5, 0.25) for i in range(4)]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert not np.allclose(expected, eg @ eq, atol=1e-2)  # the cosine would be another score
    # either side without cells: the cosine
    cosine = eg @ eq
    np.testing.assert_allclose(agnostic_similarity(query, t(eg)).numpy(), cosine, atol=1e-6)
    np.testing.assert_allclose(agnostic_similarity({"query_embed": t(eq)}, t(eg), t(g)).numpy(),
                               cosine, atol=1e-6)
    assert agnostic_similarity(query, torch.zeros(0, 5), torch.zeros(0, 2, 3)).shape == (0,)


def _agnostic_inputs():
    pair = _pair_inputs()[0]
    gallery = {k: pair[k] for k in ("image", "height", "width", "given_boxes")}
    query = {"image": pair["query_image"], "query_box": pair["query_box"], "height": pair["height"],
             "width": pair["width"], "query_index": 0}
    return gallery, query


def test_query_agnostic_outputs_carry_cells_once_fitted_and_score_as_the_head():
    """The cascade's first stage: gallery detections (given boxes and the detector's own) and
    query boxes come with the fitted head's cells, and agnostic_similarity on them is the head's
    score of the same boxes described directly."""
    from qeeps_d2.modeling.local_similarity import agnostic_similarity

    torch.manual_seed(0)
    # normalised activations, so that the random detector detects something
    model = model_fixtures.settle_batchnorm(build_model(_cfg()), model_fixtures.scene_inputs())
    heads = model.roi_heads
    gallery, query = _agnostic_inputs()
    detect = {k: v for k, v in gallery.items() if k != "given_boxes"}
    with torch.no_grad():
        given, q_out, found = model([gallery, query, detect])
        assert not given["instances"].has("pred_cells") and not found["instances"].has("pred_cells")
        assert set(q_out) == {"query_embed"}
        heads.local_sim.fitted_flag.fill_(1)
        given, q_out, found = model([gallery, query, detect])
        cells = given["instances"].pred_cells
        assert cells.shape == (2, 6 * 3, heads.local_sim.proj.out_features)
        assert found["instances"].pred_cells.shape[0] == len(found["instances"]) > 0
        assert set(q_out) == {"query_embed", "query_cells", "local_params"}
        got = agnostic_similarity(q_out, given["instances"].pred_embeds, cells)
        # the same boxes described from the backbone features directly
        q_feats = model.backbone(model.preprocess_image([query]).tensor)
        q_embeds, q_cells = heads.describe_boxes(q_feats, model._query_boxes([query]))
        g_feats = model.backbone(model.preprocess_image([gallery]).tensor)
        g_embeds, g_cells = heads._describe_per_image(g_feats, [Boxes(gallery["given_boxes"])])
        expected = heads.local_sim(q_cells, g_cells[0], q_embeds, g_embeds[0])
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, given["instances"].pred_embeds @ q_out["query_embed"], atol=1e-3)


def test_searcher_scores_query_agnostic_detections_with_the_head():
    from detectron2.structures import Instances

    from qeeps_d2.modeling.local_similarity import agnostic_similarity
    from qeeps_d2.search.gallery import GalleryFrame
    from qeeps_d2.search.searcher import PersonSearcher

    cfg = _cfg()
    torch.manual_seed(0)
    searcher = PersonSearcher(cfg, build_model(cfg))
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa
    inst = Instances((64, 96))
    inst.pred_boxes = Boxes(torch.tensor([[1.0, 2, 30, 60], [40, 2, 70, 60], [5, 5, 9, 9]]))
    inst.scores = torch.tensor([0.9, 0.8, 0.1])  # the last is below DET_THRESH
    inst.pred_embeds, inst.pred_cells = unit(3, 16), unit(3, 18, 8)
    query = {"query_embed": unit(16), "query_cells": unit(18, 8),
             "local_params": torch.tensor([0.1, 0.5])}
    frame = GalleryFrame("f.jpg", None, 0)
    matches = searcher._matches(frame, inst, query, keep_frames=False)
    expected = agnostic_similarity(query, inst.pred_embeds[:2], inst.pred_cells[:2])
    np.testing.assert_allclose([m.similarity for m in matches], expected.numpy(), atol=1e-6)
    assert not np.allclose([m.similarity for m in matches],
                           (inst.pred_embeds[:2] @ query["query_embed"]).numpy(), atol=1e-3)
