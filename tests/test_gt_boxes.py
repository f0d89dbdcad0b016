"""Evaluation with ground-truth boxes (TEST.PERSON_SEARCH.USE_GT_BOXES): the model scores each
gallery image's annotated boxes (agnostic, pairs, cascade; Trainer.test and train_net.py
--eval-only) and the labelled results hold exactly those boxes, scored by the numpy protocol."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes

import dataset_fixtures
import model_fixtures
import search_fixtures
from dist_eval_worker import eval_cfg, guided_model
from qeeps_d2.data.build import load_test_protocol
from qeeps_d2.data.mapper import PersonSearchMapper
from qeeps_d2.engine import Trainer
from qeeps_d2.evaluation.search_metrics import score_search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("guided", [False, True], ids=["agnostic", "pairs"])
def test_model_scores_exactly_the_given_boxes(guided):
    """Given boxes come back one row each, in order, rescaled to the original size (not
    clipped), with ClsNet scores, unit embeddings and (pairs) similarities; no box of its own."""
    torch.manual_seed(0)
    cfg = model_fixtures.tiny_cfg(qsse=guided, qrpn=guided, qsimnet=guided)
    model = build_model(cfg)
    model_fixtures.settle_batchnorm(model, model_fixtures.pair_inputs() if guided
                                    else model_fixtures.scene_inputs())
    inputs = model_fixtures.pair_inputs(seed=2, with_gt=False) if guided else \
        model_fixtures.scene_inputs(seed=2, with_gt=False)
    # the images are at "original" size x2: outputs are rescaled by 2
    given = [torch.tensor([[5.0, 5.0, 35.0, 60.0], [50.0, 10.0, 97.0, 64.0]]),  # past the border
             torch.zeros(0, 4)]
    for x, boxes in zip(inputs, given):
        x.update(given_boxes=boxes, height=2 * x["image"].shape[1], width=2 * x["image"].shape[2])
    with torch.no_grad():
        outputs = model(inputs)
        plain = model([{k: v for k, v in x.items() if k != "given_boxes"} for x in inputs])
    for x, boxes, out, other in zip(inputs, given, outputs, plain):
        inst = out["instances"]
        assert inst.image_size == (x["height"], x["width"])
        torch.testing.assert_close(inst.pred_boxes.tensor, 2 * boxes)
        assert len(inst) == len(boxes) and "proposal_boxes" not in out
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        torch.testing.assert_close(inst.pred_embeds.norm(dim=1), torch.ones(len(boxes)))
        assert inst.has("pred_sims") == guided and other["instances"].has("pred_sims") == guided
        if guided:
            assert ((inst.pred_sims >= 0) & (inst.pred_sims <= 1)).all()
    if not guided:  # the embeddings are the re-id head's on those boxes
        with torch.no_grad():
            feats = model.backbone(model.preprocess_image(inputs).tensor)
            want = model.roi_heads.embed_boxes(feats, [Boxes(b) for b in given])
        torch.testing.assert_close(outputs[0]["instances"].pred_embeds, want)


def test_mapper_resizes_the_given_boxes(tmp_path):
    import cv2

    path = str(tmp_path / "g.png")
    cv2.imwrite(path, search_fixtures.random_image(1, 100, 160))  # -> 60 x 96 (long side cap)
    mapper = PersonSearchMapper(model_fixtures.tiny_cfg(), is_train=False)
    out = mapper({"file_name": path, "given_boxes": [[10, 20, 50, 90], [0, 0, 160, 100]]})
    assert tuple(out["image"].shape) == (3, 60, 96)
    torch.testing.assert_close(out["given_boxes"], torch.tensor(
        [[10 * 0.6, 20 * 0.6, 50 * 0.6, 90 * 0.6], [0, 0, 96, 60]]))
    empty = mapper({"file_name": path, "given_boxes": []})
    assert tuple(empty["given_boxes"].shape) == (0, 4)


@pytest.fixture(scope="module")
def cuhk(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt_boxes")
    expected = dataset_fixtures.make_cuhk_sysu_fixture(str(root / "CUHK-SYSU"))
    return root, expected


def _gt_cfg(guided, k, out):
    cfg = eval_cfg(guided, k, out, batch_size=2)
    cfg.TEST.PERSON_SEARCH.USE_GT_BOXES = True
    cfg.TEST.PERSON_SEARCH.DET_THRESH = 0.5  # would drop boxes whose ClsNet score is lower
    return cfg


def _read(out):
    path = os.path.join(out, "inference", "cuhk_sysu_test_gtboxes_results.json.gz")
    with gzip.open(path, "rt") as f:
        return json.load(f)


@pytest.mark.parametrize("run", ["agnostic", "pairs", "cascade"])
def test_evaluation_with_gt_boxes(run, cuhk, monkeypatch, tmp_path, capsys):
    """Trainer.test (the --eval-only path): every gallery image of every query holds exactly its
    annotated boxes (original pixels) with det_score 1, the results are labelled, and the mAP
    and top-k are the numpy protocol's on those rows."""
    root, expected = cuhk
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    model = guided_model()
    guided, k = run != "agnostic", 2 if run == "cascade" else 0
    if not guided:
        plain = build_model(eval_cfg(False, 0, ""))
        plain.load_state_dict(model.state_dict(), strict=False)
        model = plain
    cfg = _gt_cfg(guided, k, str(tmp_path))
    metrics = Trainer.test(cfg, model)
    assert set(metrics) == {"person_search_gt_boxes"}  # no detection metrics, labelled
    search = metrics["person_search_gt_boxes"]
    doc = _read(str(tmp_path))
    assert doc["gt_boxes"] is True and doc["mode"] == run and "gallery_detections" not in doc
    assert not os.path.exists(tmp_path / "inference" / "cuhk_sysu_test_results.json.gz")
    with open(tmp_path / "inference" / "cuhk_sysu_test_gtboxes_metrics.json") as f:
        assert json.load(f)["gt_boxes"] is True
    protocol = load_test_protocol(cfg, "cuhk_sysu_test")
    rows = {}
    for q in doc["queries"]:
        images = set(protocol.gallery(q["index"]).images)
        assert set(q["gallery"]) == images  # every gallery image: no box dropped
        for name, r in q["gallery"].items():
            r = np.asarray(r)
            annotated = np.array([box for box, _ in expected["test"][name]])
            np.testing.assert_allclose(r[:, :4], annotated, atol=1e-3)
            assert (r[:, 4] == 1.0).all()
        rows[q["index"]] = {n: np.asarray(r) for n, r in q["gallery"].items()}
    if run == "cascade":  # K=2 re-scored images per query: pair rows (each image's best at or
        # above the floor), the others' rows shifted below -1
        assert doc["num_pairs"] == 4
        assert all(sum((r[:, 5] >= -1).any() for r in g.values()) == 2 for g in rows.values())
    scores = score_search(protocol, rows, cfg.TEST.PERSON_SEARCH.DET_THRESH)
    assert search["mAP"] == pytest.approx(100 * scores.mean_ap)
    assert search["top1"] == pytest.approx(100 * scores.top_k(1))
    assert search["num_queries"] == 2
    if run == "agnostic":  # qeeps-eval scores the file alike and says it holds GT boxes
        from qeeps_d2.evaluation.cli import main

        path = str(tmp_path / "inference" / "cuhk_sysu_test_gtboxes_results.json.gz")
        assert main(["--dataset", "cuhk_sysu_test", "--json", path]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        assert "with ground-truth boxes" in printed[0]
        cli = json.loads(printed[-1])
        assert cli["gt_boxes"] is True and 100 * cli["mAP"] == pytest.approx(search["mAP"])


def test_train_net_eval_only_with_gt_boxes(cuhk, tmp_path):
    """``train_net.py --eval-only ... TEST.PERSON_SEARCH.USE_GT_BOXES True`` end to end."""
    root, expected = cuhk
    config, weights, _, _ = search_fixtures.save_model_files(str(tmp_path / "model"), False)
    out = str(tmp_path / "eval")
    env = dict(os.environ, DETECTRON2_DATASETS=str(root))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "projects", "QEEPS", "train_net.py"),
         "--config-file", config, "--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out,
         "DATALOADER.NUM_WORKERS", "0", "TEST.PERSON_SEARCH.USE_GT_BOXES", "True"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "copypaste: Task: person_search_gt_boxes" in proc.stdout + proc.stderr
    doc = _read(out)
    assert doc["gt_boxes"] is True and len(doc["queries"]) == 2
    for q in doc["queries"]:
        for name, r in q["gallery"].items():
            annotated = np.array([box for box, _ in expected["test"][name]])
            np.testing.assert_allclose(np.asarray(r)[:, :4], annotated, atol=1e-3)
