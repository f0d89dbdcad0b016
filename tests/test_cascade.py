"""Cascade evaluation and search: shortlist, merge, costs, the evaluator's two stages, the Trainer's
``--eval-only`` path and ``PersonSearcher`` (CPU, tiny)."""
import dataclasses
import gzip
import json
import logging

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import inference_on_dataset

from qeeps_d2.evaluation.cascade import (
    FIRST_STAGE_OFFSET,
    LOW_RESCORED_OFFSET,
    best_similarity,
    cascade_cost,
    cascade_rows,
    exhaustive_cost,
    merge_cascade_rows,
    protocol_costs,
    rescored_floor,
    shortlist,
    shortlist_images,
)
from qeeps_d2.evaluation.build import PersonSearchEvaluators
from qeeps_d2.evaluation.cascade_inference import CascadeState, cascade_inference_on_dataset
from qeeps_d2.evaluation.results_file import read_results
from qeeps_d2.data.search_inputs import build_search_records
from test_evaluator import B_TARGET, BIG, C_TARGET, DATASET, FakeModel, _dicts, _protocol


def _rows(*sims, score=0.9):
    """One (N, 6) row per similarity, all with the same box and score."""
    return np.array([[0, 0, 10, 20, score, s] for s in sims], dtype=np.float64).reshape(-1, 6)


# ------------------------------------------------------------------ numpy logic
def test_best_similarity_ignores_low_scores():
    rows = np.r_[_rows(0.2, 0.5), _rows(0.9, score=0.4)]
    assert best_similarity(rows, 0.5) == 0.5
    assert best_similarity(rows, 0.3) == 0.9
    assert best_similarity(np.zeros((0, 6)), 0.5) == -np.inf
    assert best_similarity(None, 0.5) == -np.inf


def test_shortlist_orders_by_best_similarity_ties_in_gallery_order():
    rows = {"a": _rows(0.1, 0.7), "b": _rows(0.7), "c": _rows(0.95, score=0.2), "d": _rows(0.3)}
    images = ["e", "a", "b", "a", "c", "d"]  # e: no rows; a twice; c: only a low-score box
    assert shortlist_images(images, rows, 2, 0.5) == ["a", "b"]  # tie 0.7: gallery order
    assert shortlist_images(images, rows, 3, 0.5) == ["a", "b", "d"]
    # images without a kept detection come last, in gallery order; K >= size = every image
    assert shortlist_images(images, rows, 10, 0.5) == ["a", "b", "d", "e", "c"]
    assert shortlist({0: images, 1: ["d", "b"]}, {0: rows}, 1, 0.5) == {0: ["a"], 1: ["d"]}
    with pytest.raises(ValueError, match=">= 1"):
        shortlist_images(images, rows, 0, 0.5)


def test_merge_ranks_rescored_rows_above_first_stage_rows():
    first = {"a": _rows(0.99, -1.0), "b": _rows(1.0), "c": _rows(0.5)}
    second = {"a": _rows(0.0)}  # b is shortlisted but had no detection in pair mode
    merged = merge_cascade_rows(["a", "b", "c", "d"], first, second, ["a", "b"], 0.5)
    assert sorted(merged) == ["a", "c"]
    np.testing.assert_array_equal(merged["a"], _rows(0.0))
    np.testing.assert_array_equal(merged["c"], _rows(0.5 - FIRST_STAGE_OFFSET))
    np.testing.assert_array_equal(first["c"], _rows(0.5))  # inputs untouched
    # the lowest possible pair similarity (cosine -1) beats the best first-stage one (cosine 1)
    assert -1.0 > 1.0 - FIRST_STAGE_OFFSET


def test_merge_ranks_rescored_rows_below_the_floor_under_the_first_stage_rows():
    """Shortlisted a: the query person 0.9 and a bystander 0.2; shortlisted b: best 0.6 (the
    floor) and 0.6 again; a low-score row 0.95 (not kept by the protocol) does not set the
    floor. The bystander (0.2 < 0.6) ranks below c's first-stage match, the rows at the floor
    stay above it."""
    first = {"c": _rows(0.5)}
    second = {"a": np.r_[_rows(0.9, 0.2), _rows(0.95, score=0.3)], "b": _rows(0.6, 0.6)}
    merged = merge_cascade_rows(["a", "b", "c"], first, second, ["a", "b"], 0.5)
    assert merged["a"][:, 5].tolist() == pytest.approx(
        [0.9, 0.2 - LOW_RESCORED_OFFSET, 0.95])
    assert merged["b"][:, 5].tolist() == [0.6, 0.6]
    order = sorted(((s, n) for n, rows in merged.items() for s in rows[:, 5]), reverse=True)
    assert [n for _, n in order] == ["a", "a", "b", "b", "c", "a"]
    # the highest demoted pair similarity (1 - 6) is below the lowest first-stage one (-1 - 3)
    assert 1.0 - LOW_RESCORED_OFFSET < -1.0 - FIRST_STAGE_OFFSET
    np.testing.assert_array_equal(second["a"][:, 5], [0.9, 0.2, 0.95])  # inputs untouched
    assert rescored_floor([-np.inf, 0.3, 0.7]) == 0.3 and rescored_floor([-np.inf]) == np.inf


def test_cascade_rows_from_first_stage_and_exhaustive_rows():
    first = {0: {"a": _rows(0.2), "b": _rows(0.9)}, 1: {"a": _rows(0.5)}}
    pairs = {0: {"a": _rows(0.7), "b": _rows(0.1)}, 1: {"a": _rows(0.3), "c": _rows(0.8)}}
    merged, lists = cascade_rows({0: ["a", "b"], 1: ["c", "a"]}, first, pairs, 1, 0.5)
    assert lists == {0: ["b"], 1: ["a"]}
    np.testing.assert_array_equal(merged[0]["b"], _rows(0.1))
    np.testing.assert_array_equal(merged[0]["a"], _rows(0.2 - FIRST_STAGE_OFFSET))
    assert sorted(merged[1]) == ["a"]  # c: not re-scored and no first-stage detection
    np.testing.assert_array_equal(merged[1]["a"], _rows(0.3))


def test_costs_exhaustive_vs_cascade():
    # CUHK-SYSU G100: 2,900 queries, 6,978 gallery images
    assert exhaustive_cost([100] * 2900).pairs == 290_000
    c = cascade_cost([100] * 2900, 10, 6978)
    assert (c.pairs, c.gallery_images, c.query_boxes) == (29_000, 6978, 2900)
    assert c.seconds(per_pair=0.3, per_image=0.1, per_query=0.01) == pytest.approx(
        29_000 * 0.3 + 697.8 + 29.0)
    assert cascade_cost([3, 20], 5, 21).pairs == 3 + 5
    exhaustive, cascaded = protocol_costs(_protocol(), 1)
    assert exhaustive.pairs == 4 and (cascaded.pairs, cascaded.gallery_images) == (2, 3)


def test_pair_records_restricted_to_a_shortlist():
    records = build_search_records(_protocol(), "pairs",
                                   shortlist={0: ["b.jpg"], 1: ["c.jpg", "b.jpg"]})
    assert [(r["query_index"], r["image_id"]) for r in records] == [
        (0, "b.jpg"), (1, "c.jpg"), (1, "b.jpg")]
    only_q1 = build_search_records(_protocol(), "pairs", shortlist={1: ["b.jpg"]})
    assert [(r["query_index"], r["image_id"]) for r in only_q1] == [(1, "b.jpg")]
    with pytest.raises(ValueError, match="needs mode 'pairs'"):
        build_search_records(_protocol(), "agnostic", shortlist={})


# ------------------------------------------------------------------ evaluator, fake model
@pytest.fixture
def toy_dataset():
    DatasetCatalog.register(DATASET, _dicts)
    yield
    DatasetCatalog.remove(DATASET)


def _run_cascade(k, tmp_path, model=None):
    protocol = _protocol()
    model = model or FakeModel()
    evaluator = PersonSearchEvaluators(DATASET, protocol, output_dir=str(tmp_path), cascade_topk=k)

    def batches(records):
        return [records[i : i + 2] for i in range(0, len(records), 2)]

    results = cascade_inference_on_dataset(
        model, batches(build_search_records(protocol, "agnostic")),
        lambda sl: batches(build_search_records(protocol, "pairs", shortlist=sl)), evaluator,
        evaluator.cascade,
    )
    return results, evaluator, model


def test_cascade_hand_computed(toy_dataset, tmp_path, caplog):
    """Stage 1 (test_evaluator's agnostic outputs): q0 best a 1.0 > b 0.8, q1 best b 1.0 > c 0.8,
    so K=1 re-scores (q0, a) and (q1, b) only."""
    with caplog.at_level(logging.INFO, logger="qeeps_d2.evaluation"):
        results, evaluator, model = _run_cascade(1, tmp_path)
    assert evaluator.cascade.shortlist == {0: ["a.jpg"], 1: ["b.jpg"]}
    assert [(x["query_index"], x["image_id"]) for x in model.seen if "query_file_name" in x] == [
        (0, "a.jpg"), (1, "b.jpg")]
    ps = results["person_search"]
    # q0: a (pairs) 0.95 neg = the floor (one image re-scored), 0.9 TP below it -> 0.9 - 6;
    # b (first stage) -2.2, -2.4 -> the TP is 4th: AP 1/4, top-1 miss.
    # q1: b (pairs) 0.7 neg (its 0.4-score target is dropped); c (first stage) 0.8 - 3 TP ->
    # AP 1/2 * recall 1/2.
    assert ps["mAP"] == pytest.approx(100 * (0.25 + 0.25) / 2)
    assert (ps["top1"], ps["top5"]) == (0.0, 100.0)
    assert (ps["cascade_topk"], ps["num_pairs"]) == (1, 2)
    assert ps["first_stage_mAP"] == pytest.approx(100 * (1 + 5 / 6) / 2)  # test_evaluator's
    assert results["detection"]["recall"] == pytest.approx(100 * 5 / 6)  # first-stage detector
    assert "cascade top-1: 2 pairs re-scored" in caplog.text
    assert "Cascade stage 1" in caplog.text and "2 pairs" in caplog.text

    written = read_results(str(tmp_path / f"{DATASET}_results.json.gz"))
    assert written.extra["mode"] == "cascade" and written.extra["cascade_topk"] == 1
    assert written.extra["num_pairs"] == 2
    q0 = written.queries[0]
    np.testing.assert_allclose(q0.gallery["b.jpg"],
                               [B_TARGET + [0.95, 0.6 - 3], BIG + [0.7, 0.8 - 3]], rtol=1e-6)
    np.testing.assert_allclose(q0.gallery["a.jpg"][:, 5], [0.9 - 6, 0.95], rtol=1e-6)
    np.testing.assert_allclose(written.queries[1].gallery["c.jpg"], [C_TARGET + [0.6, 0.8 - 3]],
                               rtol=1e-6)
    with open(tmp_path / f"{DATASET}_metrics.json") as f:
        saved = json.load(f)
    assert (saved["mode"], saved["cascade_topk"], saved["num_pairs"]) == ("cascade", 1, 2)


def test_cascade_with_k_at_least_the_gallery_equals_the_pair_evaluation(toy_dataset, tmp_path):
    results, _, _ = _run_cascade(2, tmp_path / "cascade")
    protocol = _protocol()
    pairs = inference_on_dataset(
        FakeModel(), [build_search_records(protocol, "pairs")],
        PersonSearchEvaluators(DATASET, protocol, output_dir=str(tmp_path / "pairs")),
    )
    for key in ("mAP", "top1", "top5", "top10"):
        assert results["person_search"][key] == pairs["person_search"][key]
    with gzip.open(tmp_path / "cascade" / f"{DATASET}_results.json.gz", "rt") as f:
        cascaded = json.load(f)["queries"]
    with gzip.open(tmp_path / "pairs" / f"{DATASET}_results.json.gz", "rt") as f:
        exhaustive = json.load(f)["queries"]
    assert cascaded == exhaustive


def test_cascade_evaluator_is_reusable_and_checks_its_inputs(toy_dataset, tmp_path):
    results, evaluator, _ = _run_cascade(1, tmp_path)
    protocol = _protocol()
    again = cascade_inference_on_dataset(
        FakeModel(), [build_search_records(protocol, "agnostic")],
        lambda sl: [build_search_records(protocol, "pairs", shortlist=sl)], evaluator,
        evaluator.cascade,
    )
    assert again["person_search"] == results["person_search"]
    with pytest.raises(ValueError, match="needs query-agnostic outputs"):
        cascade_inference_on_dataset(
            FakeModel(), [build_search_records(protocol, "pairs")], None, evaluator,
            evaluator.cascade)
    with pytest.raises(ValueError, match="K >= 1"):
        CascadeState(0)
    with pytest.raises(ValueError, match="must be >= 0"):
        PersonSearchEvaluators(DATASET, protocol, cascade_topk=-1)


# ------------------------------------------------------------------ real model
def test_guided_model_runs_gallery_images_and_query_boxes_without_query_guidance():
    """With QSSE, QRPN and QSimNet on, a gallery-image input gives exactly the outputs of the
    same weights in the OIM model (no query guidance), and a query-box input its embedding."""
    import model_fixtures
    from detectron2.modeling import build_model

    cfgs = [model_fixtures.tiny_cfg(qsse=True, qrpn=True, qsimnet=True), model_fixtures.tiny_cfg()]
    for cfg in cfgs:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    guided = build_model(cfgs[0])
    model_fixtures.settle_batchnorm(guided, model_fixtures.scene_inputs())  # gallery-mode stats
    plain = build_model(cfgs[1]).eval()
    missing, _ = plain.load_state_dict(guided.state_dict(), strict=False)
    assert missing == [] and guided.query_guided and not plain.query_guided
    pairs = model_fixtures.pair_inputs(seed=1, with_gt=False)
    gallery = model_fixtures.scene_inputs(seed=1, with_gt=False)
    queries = [{"image": x["query_image"], "query_box": x["query_box"]} for x in pairs]
    with torch.no_grad():
        got, want = guided(gallery + queries), plain(gallery + queries)
        paired = guided(pairs)
    for g, w in zip(got[:2], want[:2]):
        assert len(g["instances"]) > 0
        for field in ("pred_boxes", "scores", "pred_embeds"):
            a, b = g["instances"].get(field), w["instances"].get(field)
            a, b = (a.tensor, b.tensor) if field == "pred_boxes" else (a, b)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not g["instances"].has("pred_sims")
    for g, w in zip(got[2:], want[2:]):
        torch.testing.assert_close(g["query_embed"], w["query_embed"], rtol=0, atol=0)
        assert g["query_embed"].shape == (16,)
    assert all(p["instances"].has("pred_sims") for p in paired)  # pairs do use the query


def test_trainer_test_cascade_on_the_cuhk_fixture(tmp_path, monkeypatch, caplog):
    """Trainer.test (the --eval-only path) on a real tiny QEEPS model: K >= the gallery gives the
    exhaustive results file row for row; K=1 runs one pair per query, labelled cascade, its
    re-scored image holds the pair rows and the others the first stage's, shifted."""
    import dataset_fixtures
    from dist_eval_worker import eval_cfg, guided_model, read_results

    from qeeps_d2.engine import Trainer

    dataset_fixtures.make_cuhk_sysu_fixture(str(tmp_path / "CUHK-SYSU"))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    model = guided_model()

    def run(k):
        metrics = Trainer.test(eval_cfg(True, k, str(tmp_path / f"k{k}")), model)
        return metrics, read_results(str(tmp_path / f"k{k}"))

    exhaustive, exhaustive_doc = run(0)
    full, full_doc = run(100)
    with caplog.at_level(logging.INFO, logger="qeeps_d2.evaluation"):
        one, one_doc = run(1)
    assert exhaustive_doc["mode"] == "pairs" and full_doc["mode"] == "cascade"
    assert full_doc["queries"] == exhaustive_doc["queries"]
    assert sum(len(r) for q in full_doc["queries"] for r in q["gallery"].values()) > 20
    assert full["person_search"]["mAP"] == exhaustive["person_search"]["mAP"]
    assert (one_doc["mode"], one_doc["cascade_topk"], one_doc["num_pairs"]) == ("cascade", 1, 2)
    assert one["person_search"]["cascade_topk"] == 1
    assert "cascade top-1: 2 pairs re-scored" in caplog.text
    first = one_doc["gallery_detections"]
    for q, q_full in zip(one_doc["queries"], full_doc["queries"]):
        rescored = [n for n, rows in q["gallery"].items() if any(r[5] >= -1 for r in rows)]
        assert len(rescored) == 1 and len(q["gallery"]) == 5
        # the pair rows; with one image re-scored its best row is the floor, the others below it
        # are shifted under the first-stage rows
        got, pair_rows = q["gallery"][rescored[0]], q_full["gallery"][rescored[0]]
        assert [r[:5] for r in got] == [r[:5] for r in pair_rows] and len(got) > 1
        floor = max(r[5] for r in pair_rows)  # det_thresh 0: every row is kept
        assert [r[5] for r in got] == pytest.approx(
            [r[5] if r[5] >= floor else r[5] - LOW_RESCORED_OFFSET for r in pair_rows])
        for n, rows in q["gallery"].items():
            if n != rescored[0]:  # first-stage boxes and scores, similarity in [-4, -2]
                assert [r[:5] for r in rows] == first[n]
                assert all(-4 <= r[5] <= -2 for r in rows)


# ------------------------------------------------------------------ qeeps-search
QUERY_BOX = (10.0, 8.0, 40.0, 60.0)


@pytest.fixture(scope="module")
def searchers():
    """(query-guided searcher, the same model searched query-agnostically = the first stage)."""
    from dist_eval_worker import eval_cfg, guided_model

    from qeeps_d2.search import PersonSearcher

    model = guided_model()
    return (PersonSearcher(eval_cfg(True, 0, ""), model),
            PersonSearcher(eval_cfg(False, 0, ""), model))


def _frames(count=6):
    import search_fixtures

    from qeeps_d2.search import GalleryFrame

    return [GalleryFrame(f"f{i}", search_fixtures.random_image(100 + i), i) for i in range(count)]


def _search(searcher, **kwargs):
    import search_fixtures

    kwargs.setdefault("batch_size", 1)
    return searcher.search(search_fixtures.random_image(7), QUERY_BOX, iter(_frames()),
                           progress=False, **kwargs)


def _key(matches):
    return [(m.frame, m.box, m.det_score, m.similarity) for m in matches]


def test_search_cascade_reranks_the_best_first_stage_frames(searchers):
    guided, first_stage = searchers
    exhaustive = _search(guided)
    stage1 = _search(first_stage)
    assert len({m.frame for m in stage1}) == 6 and len(exhaustive) > 20
    # K >= the number of frames: the exhaustive pair search
    assert _key(_search(guided, cascade_topk=6)) == _key(exhaustive)
    # K = 2: the two frames with the best first-stage match, re-scored; the others shifted
    best = {}
    for m in stage1:
        best.setdefault(m.frame, m.similarity)  # stage1 is similarity-descending
    top2 = sorted(best, key=lambda f: (-best[f], f))[:2]
    # and re-scored matches below the floor (the weaker frame's best) under the shifted ones
    floor = min(max(m.similarity for m in exhaustive if m.frame == f) for f in top2)
    pair = [m if m.similarity >= floor
            else dataclasses.replace(m, similarity=m.similarity - LOW_RESCORED_OFFSET)
            for m in exhaustive if m.frame in top2]
    shifted = [dataclasses.replace(m, similarity=m.similarity - FIRST_STAGE_OFFSET)
               for m in stage1 if m.frame not in top2]
    expected = sorted(pair + shifted, key=lambda m: -m.similarity)
    assert any(m.similarity < -5 for m in pair)  # the case is exercised
    cascaded = _search(guided, cascade_topk=2)
    assert _key(cascaded) == _key(expected)
    rescored = sum(m.similarity >= floor for m in pair)
    assert min(m.similarity for m in cascaded[:rescored]) >= -1 > cascaded[rescored].similarity
    assert cascaded[-1].similarity < -5 and cascaded[-1].frame in top2
    # streaming with a small topk keeps the same best matches (batches of 4 frames)
    n = rescored + 3  # every re-scored match and 3 first-stage ones
    short = _search(guided, cascade_topk=2, topk=n, batch_size=4)
    assert [m.frame for m in short] == [m.frame for m in expected[:n]]
    np.testing.assert_allclose([m.similarity for m in short],
                               [m.similarity for m in expected[:n]], atol=1e-5)


def test_search_cascade_input_errors(searchers):
    guided, first_stage = searchers
    with pytest.raises(ValueError, match="needs a query-guided model"):
        _search(first_stage, cascade_topk=2)
    with pytest.raises(ValueError, match="cascade_topk must be >= 1"):
        _search(guided, cascade_topk=0)


def test_cli_cascade_topk(searchers, tmp_path, capsys):
    import cv2
    import search_fixtures

    from qeeps_d2.checkpoint import QEEPSCheckpointer
    from qeeps_d2.search.cli import main

    guided, _ = searchers
    QEEPSCheckpointer(guided.model, str(tmp_path)).save("model")
    config = tmp_path / "config.yaml"
    config.write_text(guided.cfg.dump())
    folder = tmp_path / "gallery"
    folder.mkdir()
    for frame in _frames():
        cv2.imwrite(str(folder / f"{frame.name}.png"), frame.image)
    cv2.imwrite(str(tmp_path / "query.png"), search_fixtures.random_image(7))

    def cli(*extra):
        return main(["--config", str(config), "--weights", str(tmp_path / "model.pth"),
                     "--query", str(tmp_path / "query.png"), "--box", "10,8,40,60",
                     "--gallery", str(folder), "--out", str(tmp_path / "out"), "--device", "cpu",
                     "--batch-size", "1", *extra])

    assert cli("--cascade-topk", "2", "--topk", "5") == 0
    stdout = capsys.readouterr().out
    results = json.load(open(tmp_path / "out" / "results.json"))
    assert results["model"]["cascade_topk"] == 2 and "cascade" in stdout
    expected = _search(guided, cascade_topk=2, topk=5)
    assert [m["frame"] for m in results["matches"]] == [f"{m.frame}.png" for m in expected]
    np.testing.assert_allclose([m["similarity"] for m in results["matches"]],
                               [m.similarity for m in expected], atol=1e-5)
    assert cli("--cascade-topk", "-1") == 2
    assert "--cascade-topk must be >= 0" in capsys.readouterr().err


# ------------------------------------------------------------------ tools/cascade_eval.py
def test_cascade_eval_tool_on_the_cuhk_fixture(tmp_path, monkeypatch, capsys):
    import importlib.util
    import os

    import dataset_fixtures
    from dist_eval_worker import eval_cfg, guided_model

    from qeeps_d2.checkpoint import QEEPSCheckpointer

    spec = importlib.util.spec_from_file_location(
        "cascade_eval", os.path.join(os.path.dirname(__file__), "..", "tools", "cascade_eval.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    dataset_fixtures.make_cuhk_sysu_fixture(str(tmp_path / "CUHK-SYSU"))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    QEEPSCheckpointer(guided_model(), str(tmp_path)).save("model")
    config = tmp_path / "config.yaml"
    config.write_text(eval_cfg(True, 0, str(tmp_path / "unused")).dump())
    model_args = ["--config-file", str(config), "--weights", str(tmp_path / "model.pth")]

    def run(out, *extra):
        code = tool.main(model_args + ["--output", str(tmp_path / out), *extra])
        if code:
            return code
        return {(r["method"], r["gallery"]): r
                for r in json.load(open(tmp_path / out / "cascade_eval.json"))}

    rows = run("real", "--topk", "1", "--gallery-sizes", "50", "100")
    assert "| cascade K=1 |" in capsys.readouterr().out
    # 2 queries, 5 distinct gallery images each; G50 is not a subset of G100 here: its own run
    assert [rows[("exhaustive", s)]["pairs"] for s in (50, 100)] == [10, 10]
    assert [rows[("cascade K=1", s)]["pairs"] for s in (50, 100)] == [2, 2]
    assert all(rows[(m, s)]["seconds"] > 0 and not rows[(m, s)]["estimated"]
               for m in ("exhaustive", "cascade K=1") for s in (50, 100))
    assert rows[("first stage only (query-agnostic)", 100)]["pairs"] == 0

    # --emulate from the exhaustive G100 file: K=1 as the real run (batches of 1: the same pair
    # rows), K=5 (whole galleries) as the exhaustive one; times estimated from --seconds-per-pair
    def results(run_dir):
        return str(tmp_path / "real" / run_dir / "inference" / "cuhk_sysu_test_results.json.gz")

    emulated = run("emu", "--topk", "1", "5", "--gallery-sizes", "100", "--emulate",
                   "--seconds-per-pair", "0.5", "--exhaustive-results", results("G100_exhaustive"))
    for k, real in ((1, rows[("cascade K=1", 100)]), (5, rows[("exhaustive", 100)])):
        emu = emulated[(f"cascade K={k} (emulated)", 100)]
        assert (emu["mAP"], emu["top1"], emu["pairs"]) == (real["mAP"], real["top1"], real["pairs"])
        assert emu["estimated"] and emu["seconds"] > 0.5 * emu["pairs"]
    assert emulated[("exhaustive", 100)]["seconds"] is None  # reused file: time unknown
    first = ("first stage only (query-agnostic)", 100)
    assert emulated[first]["mAP"] == rows[first]["mAP"]
    # a cascade results file is no exhaustive one
    capsys.readouterr()
    assert run("bad", "--gallery-sizes", "100", "--exhaustive-results",
               results("G100_cascade1")) == 2
    assert "expected an exhaustive 'pairs' results file" in capsys.readouterr().err
    # a saved demo config has no test set: a usage error naming the fix, not an IndexError
    cfg = eval_cfg(True, 0, str(tmp_path / "unused"))
    cfg.defrost()
    cfg.DATASETS.TEST = ()
    config.write_text(cfg.dump())
    capsys.readouterr()
    assert run("none", "--gallery-sizes", "100") == 2
    assert "DATASETS.TEST is empty" in capsys.readouterr().err
