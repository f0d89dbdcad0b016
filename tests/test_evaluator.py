"""PersonSearchEvaluators (search, proposal recall, detection) through Detectron2's inference_on_dataset
with a fake model."""
import gzip
import json
import logging

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.structures import Boxes, BoxMode, Instances

from qeeps_d2.data.search_protocol import Gallery, Query, SearchProtocol
from qeeps_d2.evaluation.build import PersonSearchEvaluators
from qeeps_d2.evaluation.results_file import read_results
from qeeps_d2.data.search_inputs import build_search_records

DATASET = "qeeps_evaluator_toy_test"  # registered here for the detection ground truth
BIG = [0.0, 0.0, 100.0, 200.0]
B_TARGET = [200.0, 0.0, 300.0, 200.0]
C_TARGET = [10.0, 10.0, 60.0, 110.0]
NAN4 = [np.nan] * 4


def _protocol():
    galleries = [
        Gallery(["a.jpg", "b.jpg"], np.array([BIG, NAN4])),
        Gallery(["c.jpg", "b.jpg"], np.array([C_TARGET, B_TARGET])),
    ]
    queries = [Query(0, "q0.jpg", np.array(BIG), 0), Query(1, "q1.jpg", np.array(C_TARGET), 1)]
    return SearchProtocol("synthps_test/G2", "synthps_test", queries, galleries.__getitem__, "/img")


def _dicts():
    def ann(box, pid):
        return {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "person_id": pid}

    return [
        {"image_id": "a.jpg", "annotations": [ann(BIG, 0), ann([300, 0, 400, 200], -1)]},
        {"image_id": "b.jpg", "annotations": [ann(B_TARGET, 1), ann(BIG, -1)]},
        # 60 x 150 px as XYWH: checks the box-mode conversion
        {"image_id": "c.jpg", "annotations": [
            ann(C_TARGET, 1),
            {"bbox": [500, 0, 60, 150], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
             "person_id": 2},
        ]},
        {"image_id": "q0.jpg", "annotations": [ann(BIG, 0)]},
    ]


@pytest.fixture(autouse=True)
def toy_dataset():
    DatasetCatalog.register(DATASET, _dicts)
    yield
    DatasetCatalog.remove(DATASET)


def _instances(rows, extra):
    """rows: [x1, y1, x2, y2, score, extra...]; extra: name of the per-box field."""
    rows = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), -1)
    inst = Instances((300, 500))
    inst.pred_boxes = Boxes(rows[:, :4])
    inst.scores = rows[:, 4]
    inst.set(extra, rows[:, 5:] if extra == "pred_embeds" else rows[:, 5])
    return inst


# Query-agnostic outputs: per gallery image [box, score, embedding (2-d)], per query an embedding.
GALLERY_OUT = {
    "a.jpg": [BIG + [0.9, 1, 0], [300, 0, 400, 200, 0.8, 0, 1], [0, 0, 50, 50, 0.3, 1, 0]],
    "b.jpg": [B_TARGET + [0.95, 0.6, 0.8], BIG + [0.7, 0.8, 0.6]],
    "c.jpg": [C_TARGET + [0.6, 0, 1]],
}
QUERY_OUT = {0: [1.0, 0.0], 1: [0.6, 0.8]}
# Query-guided outputs: per (query, gallery image) [box, score, similarity].
PAIR_OUT = {
    (0, "a.jpg"): [BIG + [0.9, 0.9], [300, 0, 400, 200, 0.8, 0.95]],
    (0, "b.jpg"): [B_TARGET + [0.95, 0.2]],
    (1, "c.jpg"): [C_TARGET + [0.6, 0.5]],
    (1, "b.jpg"): [B_TARGET + [0.4, 0.99], BIG + [0.7, 0.7]],
}


class FakeModel:
    """Answers each record from the tables above, as the QEEPS model would."""

    def __init__(self):
        self.seen = []

    def __call__(self, inputs):
        outputs = []
        for x in inputs:
            self.seen.append(x)
            if "query_file_name" in x:
                rows = PAIR_OUT[(x["query_index"], x["image_id"])]
                outputs.append({"instances": _instances(rows, "pred_sims")})
            elif "query_box" in x:
                outputs.append({"query_embed": torch.tensor(QUERY_OUT[x["query_index"]])})
            else:
                outputs.append({"instances": _instances(GALLERY_OUT[x["image_id"]], "pred_embeds")})
        return outputs


def _run(mode, tmp_path, query_indices=None, skip=(), model=None):
    protocol = _protocol()
    records = build_search_records(protocol, mode, query_indices)
    records = [r for r in records if r["image_id"] not in skip]
    batches = [records[i : i + 2] for i in range(0, len(records), 2)]  # a list works as a loader
    evaluator = PersonSearchEvaluators(
        DATASET, protocol, output_dir=str(tmp_path), query_indices=query_indices
    )
    return inference_on_dataset(model or FakeModel(), batches, evaluator)


def test_agnostic_mode_hand_computed(tmp_path):
    results = _run("agnostic", tmp_path)
    ps = results["person_search"]
    # q0: sims a 1.0 (TP) 0.0, b 0.6 0.8 -> TP ranked first: AP 1
    # q1: sims b 1.0 (TP) 0.96, c 0.8 (TP) -> AP 1/2 + 2/3 * 1/2 = 5/6
    assert ps["mAP"] == pytest.approx(100 * (1 + 5 / 6) / 2)
    assert (ps["top1"], ps["top5"], ps["top10"]) == (100.0, 100.0, 100.0)
    assert (ps["num_queries"], ps["partial"]) == (2, False)
    # detection: 5 kept detections all TP of 6 people; labeled: 3 of 4
    det = results["detection"]
    assert det["AP"] == pytest.approx(100 * 5 / 6)
    assert det["recall"] == pytest.approx(100 * 5 / 6)
    assert det["labeled_recall"] == pytest.approx(75.0)

    written = read_results(str(tmp_path / f"{DATASET}_results.json.gz"))
    assert written.dataset == "synthps_test"
    assert written.extra == {"protocol": "synthps_test/G2", "mode": "agnostic", "partial": False,
                             "min_det_score": 0.5}
    q1 = written.queries[1]
    assert (q1.index, q1.image, sorted(q1.gallery)) == (1, "q1.jpg", ["b.jpg", "c.jpg"])
    # rows of b.jpg for query 1: boxes, scores, similarity = embedding . (0.6, 0.8)
    expected = [B_TARGET + [0.95, 1.0], BIG + [0.7, 0.96]]
    np.testing.assert_allclose(q1.gallery["b.jpg"], expected, rtol=1e-6)
    # the 0.3-score detection of a.jpg is below det_thresh: not written
    assert written.gallery_detections["a.jpg"].shape == (2, 5)


class FakeLocalModel(FakeModel):
    """FakeModel's outputs plus a fitted local head's: cells of every gallery detection
    (``pred_cells``) and of every query box (``query_cells``, with ``local_params``)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa
        self.cells = {n: unit(len(rows), 3, 4) for n, rows in GALLERY_OUT.items()}
        self.query_cells = {i: unit(3, 4) for i in QUERY_OUT}
        self.params = torch.tensor([0.2, 0.5])

    def __call__(self, inputs):
        outputs = super().__call__(inputs)
        for x, out in zip(inputs, outputs):
            if "query_embed" in out:
                out.update(query_cells=self.query_cells[x["query_index"]], local_params=self.params)
            else:
                out["instances"].pred_cells = self.cells[x["image_id"]]
        return outputs


def test_agnostic_rows_score_with_the_local_head_when_outputs_carry_cells(tmp_path):
    from qeeps_d2.modeling.local_similarity import agnostic_similarity

    model = FakeLocalModel()
    _run("agnostic", tmp_path, model=model)
    written = read_results(str(tmp_path / f"{DATASET}_results.json.gz"))
    for i, q in enumerate(written.queries):
        query = {"query_embed": torch.tensor(QUERY_OUT[i]),
                 "query_cells": model.query_cells[i], "local_params": model.params}
        for name, rows in q.gallery.items():
            out = torch.tensor(GALLERY_OUT[name], dtype=torch.float32)
            kept = out[:, 4] >= 0.5
            expected = agnostic_similarity(query, out[kept, 5:], model.cells[name][kept])
            np.testing.assert_allclose(rows[:, 5], expected.numpy(), atol=1e-6)
            np.testing.assert_allclose(rows[:, :5], out[kept, :5].numpy(), atol=1e-5)
    # the cosine rows of test_agnostic_mode_hand_computed are not these
    assert not np.allclose(written.queries[1].gallery["b.jpg"][:, 5], [1.0, 0.96], atol=1e-2)


def test_pairs_mode_hand_computed(tmp_path):
    results = _run("pairs", tmp_path)
    ps = results["person_search"]
    # q0: 0.95 (neg), 0.9 (TP), 0.2 (neg) -> AP 1/2; q1: b 0.7 (neg), c 0.5 (TP); the 0.99
    # detection scores 0.4 < det_thresh -> AP 1/2 * recall 1/2
    assert ps["mAP"] == pytest.approx(100 * (0.5 + 0.25) / 2)
    assert (ps["top1"], ps["top5"]) == (0.0, 100.0)
    assert "detection" not in results  # no query-independent detections
    with gzip.open(tmp_path / f"{DATASET}_results.json.gz", "rt") as f:
        doc = json.load(f)
    assert doc["mode"] == "pairs" and "gallery_detections" not in doc
    assert doc["queries"][1]["gallery"]["b.jpg"] == [BIG + [0.699999988079071, 0.699999988079071]]


def test_partial_evaluation_is_labelled(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="qeeps_d2.evaluation"):
        results = _run("pairs", tmp_path, query_indices=[1])
    assert results["person_search"]["partial"] is True
    assert results["person_search"]["num_queries"] == 1
    assert results["person_search"]["mAP"] == pytest.approx(25.0)
    assert "partial: 1 of 2 queries" in caplog.text


def test_missing_gallery_output_counts_as_no_detection_and_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qeeps_d2.evaluation"):
        results = _run("agnostic", tmp_path, skip=("c.jpg",))
    # q1 loses its c.jpg target: b 1.0 (TP), 0.96 -> AP 1 * recall 1/2
    assert results["person_search"]["mAP"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert "1 of 3 gallery images have no model output" in caplog.text, caplog.text
    assert "MANY" in caplog.text


def test_records_cover_the_protocol():
    protocol = _protocol()
    agnostic = build_search_records(protocol, "agnostic")
    assert [r["image_id"] for r in agnostic] == ["a.jpg", "b.jpg", "c.jpg", "q0.jpg", "q1.jpg"]
    assert agnostic[0] == {"file_name": "/img/a.jpg", "image_id": "a.jpg"}
    assert agnostic[4] == {"file_name": "/img/q1.jpg", "image_id": "q1.jpg",
                           "query_box": C_TARGET, "query_index": 1}
    pairs = build_search_records(protocol, "pairs", query_indices=[1])
    assert [(r["query_index"], r["image_id"]) for r in pairs] == [(1, "c.jpg"), (1, "b.jpg")]
    assert pairs[0] == {"file_name": "/img/c.jpg", "image_id": "c.jpg",
                        "query_file_name": "/img/q1.jpg", "query_image_id": "q1.jpg",
                        "query_box": C_TARGET, "query_index": 1}
    with pytest.raises(ValueError, match="unknown search mode"):
        build_search_records(protocol, "crops")
    with pytest.raises(ValueError, match="query index 5 out of range"):
        build_search_records(protocol, "pairs", [5])


def test_duplicate_gallery_entries_give_one_pair_record():
    p = _protocol()
    dup = SearchProtocol(p.name, p.dataset, p.queries[:1],
                         lambda i: Gallery(["a.jpg", "a.jpg"], np.array([BIG, BIG])), "/img")
    assert [r["image_id"] for r in build_search_records(dup, "pairs")] == ["a.jpg"]


@pytest.mark.parametrize("guided", [False, True], ids=["agnostic", "pairs"])
def test_real_model_and_loader_agree_with_qeeps_eval(guided, tmp_path, monkeypatch, capsys, caplog):
    """The QEEPS model, mapper and test loader on the CUHK-SYSU fixture: every record gets an
    output, and qeeps-eval scores the written file exactly as the evaluator did."""
    import dataset_fixtures
    import model_fixtures
    from detectron2.modeling import build_model

    from qeeps_d2.data.build import build_person_search_test_loader, load_test_protocol
    from qeeps_d2.evaluation.cli import main

    dataset_fixtures.make_cuhk_sysu_fixture(str(tmp_path / "CUHK-SYSU"))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    torch.manual_seed(0)
    cfg = model_fixtures.tiny_cfg(qsse=guided, qrpn=guided, qsimnet=guided)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    protocol = load_test_protocol(cfg, "cuhk_sysu_test")
    loader = build_person_search_test_loader(cfg, "cuhk_sysu_test", protocol)
    evaluator = PersonSearchEvaluators("cuhk_sysu_test", protocol, output_dir=str(tmp_path),
                                       det_thresh=0.0)
    with caplog.at_level(logging.WARNING, logger="qeeps_d2.evaluation"):
        results = inference_on_dataset(build_model(cfg), loader, evaluator)
    assert "no model output" not in caplog.text and "no query embedding" not in caplog.text
    assert ("detection" in results) != guided
    path = str(tmp_path / "cuhk_sysu_test_results.json.gz")
    assert main(["--dataset", "cuhk_sysu_test", "--det-thresh", "0", "--json", path]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("mAP", "top1", "top5", "top10"):
        assert 100 * cli[key] == results["person_search"][key]
    assert cli["num_queries"] == results["person_search"]["num_queries"] == 2
    if not guided:
        assert 100 * cli["det_recall"] == results["detection"]["recall"]
        assert 100 * cli["det_ap"] == results["detection"]["AP"]


class FakeModelWithProposals(FakeModel):
    """FakeModel plus proposals: pairs also carry the stock RPN's ("plain") proposals."""

    PROPOSALS = {  # (query index or None for gallery outputs, image) -> proposals
        (0, "a.jpg"): [[1, 1, 101, 199]],                   # covers BIG (IoU > 0.5)
        (0, "b.jpg"): [B_TARGET],                           # b holds no positive of q0
        (1, "c.jpg"): [[300, 0, 350, 100]],                 # misses C_TARGET
        (1, "b.jpg"): [BIG, [205, 5, 300, 200]],            # second covers B_TARGET
        (None, "a.jpg"): [[0, 0, 100, 150]],                # IoU 0.75 with BIG
        (None, "b.jpg"): [[0, 0, 10, 10]],                  # misses B_TARGET
        (None, "c.jpg"): [[10, 10, 60, 60]],                # IoU exactly 0.5 with C_TARGET
    }
    PLAIN = {(0, "a.jpg"): [[0, 0, 10, 10]], (0, "b.jpg"): [B_TARGET], (1, "c.jpg"): [C_TARGET],
             (1, "b.jpg"): [[0, 0, 5, 5]]}

    def __call__(self, inputs):
        outputs = super().__call__(inputs)
        for x, out in zip(inputs, outputs):
            if "query_file_name" in x:
                key = (x["query_index"], x["image_id"])
                out["proposal_boxes"] = torch.tensor(self.PROPOSALS[key])
                out["plain_proposal_boxes"] = torch.tensor(self.PLAIN[key])
            elif "query_box" not in x:
                out["proposal_boxes"] = torch.tensor(self.PROPOSALS[(None, x["image_id"])])
        return outputs


@pytest.mark.parametrize("mode", ["pairs", "agnostic"])
def test_detector_recall_of_proposals(mode, tmp_path):
    """Positives: q0 in a.jpg, q1 in c.jpg and b.jpg. Pairs: proposals cover a (q0) and b (q1),
    plain proposals cover c only; agnostic: a and c (IoU 0.5 counts) are covered, b is not."""
    protocol = _protocol()
    records = build_search_records(protocol, mode)
    evaluator = PersonSearchEvaluators(DATASET, protocol, output_dir=None)
    recall = inference_on_dataset(FakeModelWithProposals(), [records],
                                  evaluator)["proposal_recall"]
    assert recall["recall"] == pytest.approx(100 * 2 / 3)
    if mode == "pairs":
        assert recall["plain_recall"] == pytest.approx(100 / 3)
    else:
        assert "plain_recall" not in recall


def test_no_recall_without_proposals(tmp_path):
    assert "proposal_recall" not in _run("pairs", tmp_path)


def test_metrics_file_holds_the_returned_metrics(tmp_path):
    results = _run("pairs", tmp_path)
    with open(tmp_path / f"{DATASET}_metrics.json") as f:
        saved = json.load(f)
    assert saved["protocol"] == "synthps_test/G2" and saved["mode"] == "pairs"
    assert saved["person_search"] == pytest.approx(dict(results["person_search"]))
