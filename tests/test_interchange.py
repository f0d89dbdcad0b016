"""qeeps-convert-results: COCO detections (round trip through pycocotools against the project's
detection AP) and per-query top-k lists (SeqNet layout), on the tiny CUHK-SYSU fixture."""
import contextlib
import io
import json
import os
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model_fixtures import REPO
from qeeps_d2.data.dataset_dicts import detection_ground_truth
from qeeps_d2.data.datasets.catalog import load_dataset_dicts, load_protocol
from qeeps_d2.evaluation.detection_metrics import evaluate_detections
from qeeps_d2.evaluation.interchange import main
from qeeps_d2.evaluation.results_file import write_results
from qeeps_d2.evaluation.search_metrics import TOP_K, score_query
from test_viewer import forget_custom_sets, write_custom_set  # noqa: F401 (a fixture)

# G100 galleries of the fixture: query 0 (s5.jpg, person 0) has targets in s6 and s7; query 1
# (s6.jpg, person 1) in s8, and s7 is listed twice.
CUHK_QUERIES = [
    {"index": 0, "image": "s5.jpg", "gallery": {
        "s6.jpg": [[5, 5, 30, 65, 0.9, 0.8]], "s7.jpg": [[20, 20, 40, 60, 0.9, 0.3]],
        "s8.jpg": [[10, 10, 30, 60, 0.9, 0.5]]}},
    {"index": 1, "image": "s6.jpg", "gallery": {
        "s8.jpg": [[10, 10, 30, 60, 0.9, 0.4]], "s7.jpg": [[20, 20, 40, 60, 0.95, 0.6]]}},
]

# Query-independent detections of the 6 test images (10 people), by descending score: right (R)
# or wrong (W) at IoU 0.5: R R R W R W R W W, so precision only falls at the true positives and
# COCO's interpolated AP differs from the step AP only by its 101-point sampling. Rows below
# det_score 0.5 would be wrong too; --det-thresh 0.5 drops them.
DETECTIONS = {
    "s6.jpg": [[5, 6, 30, 64, 0.99], [60, 11, 81, 60, 0.97], [85, 65, 99, 79, 0.6],
               [0, 0, 6, 6, 0.2]],
    "s8.jpg": [[11, 10, 31, 60, 0.95], [40, 40, 60, 79, 0.9]],   # the second: IoU < 0.5
    "s9.jpg": [[30, 31, 50, 71, 0.85], [70, 0, 90, 20, 0.78]],
    "s5.jpg": [[49, 10, 70, 61, 0.75], [85, 65, 99, 79, 0.55]],
    "s7.jpg": [[0, 60, 10, 79, 0.3]],
}


@pytest.fixture(autouse=True)
def datasets_env(cuhk_prw_env):
    """Every test here reads the CUHK-SYSU / PRW fixtures (tests/conftest.py)."""
    return cuhk_prw_env


def _write(tmp_path, queries=CUHK_QUERIES, name="results.json.gz", **extra):
    path = str(tmp_path / name)
    write_results(path, "cuhk_sysu_test", queries, **extra)
    return path


def _read(path):
    with open(path) as f:
        return json.load(f)


def _coco_ap50(gt_path, det_path):
    gt = COCO(gt_path)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(gt, gt.loadRes(det_path), "bbox")
        evaluation.params.iouThrs = np.array([0.5])
        evaluation.params.areaRng, evaluation.params.areaRngLbl = [[0, 1e10]], ["all"]
        evaluation.params.maxDets = [1000]
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][0, :, 0, 0, 0]
    return float(precision.mean()), float(evaluation.eval["recall"][0, 0, 0, 0])


def test_coco_detections_round_trip_to_the_projects_detection_ap(tmp_path, capsys):
    path = _write(tmp_path, gallery_detections=DETECTIONS)
    det, gt = str(tmp_path / "coco" / "det.json"), str(tmp_path / "coco" / "gt.json")
    assert main([path, "--coco", det, "--coco-gt", gt, "--det-thresh", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "9 detections of 5 images (from gallery_detections" in printed
    assert "10 persons in 6 images of cuhk_sysu_test" in printed

    dicts = load_dataset_dicts("cuhk_sysu_test")
    ground_truth = detection_ground_truth(dicts, {d["image_id"] for d in dicts})
    ours = evaluate_detections(ground_truth, {k: np.array(v) for k, v in DETECTIONS.items()}, 0.5)
    assert ours["recall"] == pytest.approx(0.5)  # the fixture's claim: 5 of 10 found
    ap, recall = _coco_ap50(gt, det)
    assert recall == pytest.approx(ours["recall"])
    assert ap == pytest.approx(ours["ap"], abs=0.01)

    # every entry: the data set's 1-based image order, XYWH boxes, the detection score
    names = [d["image_id"] for d in dicts]
    got = sorted((names[e["image_id"] - 1], e["bbox"], e["score"]) for e in _read(det))
    want = sorted((n, [x1, y1, x2 - x1, y2 - y1], s) for n, rows in DETECTIONS.items()
                  for x1, y1, x2, y2, s in rows if s >= 0.5)
    assert got == want
    assert all(e["category_id"] == 1 for e in _read(det))
    images = {i["id"]: i["file_name"] for i in _read(gt)["images"]}
    assert images == {k + 1: n for k, n in enumerate(names)}
    # without --det-thresh: every row of the file
    assert main([path, "--coco", det]) == 0
    assert len(_read(det)) == sum(len(v) for v in DETECTIONS.values())


def test_coco_detections_from_the_queries_rows_once_per_image(tmp_path, capsys):
    """Without gallery_detections, each query's rows: a box with its score kept once per image
    (s8's box is in both queries, s7's box has two scores: two detections)."""
    path = _write(tmp_path)
    det = str(tmp_path / "det.json")
    assert main([path, "--coco", det]) == 0
    assert "4 detections of 3 images (from the queries' rows" in capsys.readouterr().out
    entries = sorted((e["image_id"], e["bbox"], e["score"]) for e in _read(det))
    ids = {d["image_id"]: k + 1 for k, d in enumerate(load_dataset_dicts("cuhk_sysu_test"))}
    assert entries == sorted([(ids["s6.jpg"], [5, 5, 25, 60], 0.9),
                              (ids["s7.jpg"], [20, 20, 20, 40], 0.9),
                              (ids["s7.jpg"], [20, 20, 20, 40], 0.95),
                              (ids["s8.jpg"], [10, 10, 20, 50], 0.9)])


def test_image_ids_from_a_coco_file(tmp_path, capsys):
    path = _write(tmp_path, gallery_detections=DETECTIONS)
    names = ["s5.jpg", "s6.jpg", "s7.jpg", "s8.jpg", "s9.jpg", "s10.jpg"]
    coco = {"images": [{"id": 1000 + k, "file_name": f"Image/SSM/{n}"} for k, n in
                       enumerate(reversed(names))], "annotations": [], "categories": []}
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(coco))
    det = str(tmp_path / "det.json")
    assert main([path, "--coco", det, "--image-ids", str(ids_file)]) == 0
    by_id = {1000 + k: n for k, n in enumerate(reversed(names))}
    assert sorted({by_id[e["image_id"]] for e in _read(det)}) == sorted(DETECTIONS)
    # a plain name -> id object, missing an image: one line naming it
    ids_file.write_text(json.dumps({"s6.jpg": 3}))
    assert main([path, "--coco", det, "--image-ids", str(ids_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qeeps-convert-results: error: ") and "\n" not in err
    assert "has no image id" in err and "'s5.jpg'" in err


def test_topk_lists_in_the_seqnet_layout(tmp_path):
    path = _write(tmp_path)
    out = str(tmp_path / "top.json")
    assert main([path, "--topk", out]) == 0
    doc = _read(out)
    assert doc["image_root"].endswith(os.path.join("CUHK-SYSU", "Image", "SSM"))
    assert (doc["protocol"], doc["k"], doc["det_thresh"]) == ("cuhk_sysu_test/G100", 10, 0.5)
    q0, q1 = doc["results"]
    assert (q0["query_img"], q0["query_roi"], q0["query_index"], q0["query_pid"]) == (
        "s5.jpg", [10.0, 10.0, 30.0, 60.0], 0, 0)
    assert q0["query_gt"] == [{"img": "s6.jpg", "roi": [5.0, 5.0, 30.0, 65.0]},
                              {"img": "s7.jpg", "roi": [20.0, 20.0, 40.0, 60.0]}]
    assert [(g["img"], g["roi"], g["score"], g["correct"]) for g in q0["gallery"]] == [
        ("s6.jpg", [5, 5, 30, 65, 0.9], 0.8, 1), ("s8.jpg", [10, 10, 30, 60, 0.9], 0.5, 0),
        ("s7.jpg", [20, 20, 40, 60, 0.9], 0.3, 1)]
    assert all(g["det_score"] == g["roi"][4] for g in q0["gallery"])
    # s7 is listed twice in query 1's gallery: its detection once
    assert [(g["img"], g["correct"]) for g in q1["gallery"]] == [("s7.jpg", 0), ("s8.jpg", 1)]
    assert main([path, "--topk", out, "--k", "1", "--gallery-size", "50"]) == 0
    doc = _read(out)
    assert [len(r["gallery"]) for r in doc["results"]] == [1, 1]
    assert doc["results"][0]["query_gt"] == [  # s7 is listed twice with this box
        {"img": "s6.jpg", "roi": [5.0, 5.0, 30.0, 65.0]},
        {"img": "s7.jpg", "roi": [20.0, 20.0, 40.0, 60.0]},
        {"img": "s5.jpg", "roi": [10.0, 10.0, 30.0, 60.0]}]


def test_topk_lists_follow_the_files_ranking(tmp_path):
    """Random rows over the G100 galleries: each list is the file's kept rows sorted by
    similarity, cut at k, and its first right entry is where the protocol finds the target."""
    rng = np.random.default_rng(0)
    protocol = load_protocol("cuhk_sysu_test", 100)
    queries = []
    for q in range(len(protocol)):
        gallery = protocol.gallery(q)
        rows = {}
        for name, box in zip(gallery.images, gallery.gt_boxes):
            target = box if not np.isnan(box[0]) else np.array([10.0, 10.0, 30.0, 60.0])
            boxes = target + rng.normal(0, 3, (3, 4))
            rows[name] = np.c_[boxes, rng.choice([0.3, 0.7, 0.9], 3), rng.random(3)]
        queries.append({"index": q, "image": protocol.queries[q].image, "gallery": rows})
    path = _write(tmp_path, queries)
    out = str(tmp_path / "top.json")
    for k in (4, 10):
        assert main([path, "--topk", out, "--k", str(k)]) == 0
        for entry, query in zip(_read(out)["results"], queries):
            kept = sorted(((n, r) for n, rows in query["gallery"].items() for r in rows.tolist()
                           if r[4] >= 0.5), key=lambda nr: -nr[1][5])
            assert [(g["img"], g["roi"], g["score"]) for g in entry["gallery"]] == [
                (n, r[:5], r[5]) for n, r in kept[:k]]
    checked = 0
    for entry, query in zip(_read(out)["results"], queries):  # k = 10
        gallery = protocol.gallery(query["index"])
        score = score_query(gallery, query["gallery"], 0.5)
        correct = [g["correct"] for g in entry["gallery"]]
        assert (correct[0] == 1) == score.hits[0]
        if len(set(gallery.images)) == len(gallery.images):  # else the protocol counts twice
            first = correct.index(1) + 1 if 1 in correct else None
            assert [first is not None and first <= k for k in TOP_K] == score.hits.tolist()
            checked += 1
    assert checked == 1


def test_custom_data_set_file(tmp_path, forget_custom_sets):
    """--dataset FILE.json: the custom set's protocol, images and ids."""
    from qeeps_d2.data.datasets import catalog

    data, queries = write_custom_set(str(tmp_path / "custom"), "interchange_custom_test")
    path = str(tmp_path / "r.json")
    write_results(path, "interchange_custom_test", queries)
    top, det = str(tmp_path / "top.json"), str(tmp_path / "det.json")
    assert main([path, "--dataset", data, "--topk", top, "--coco", det]) == 0
    lists = _read(top)
    assert lists["protocol"] == "interchange_custom_test"
    assert lists["image_root"] == str(tmp_path / "custom")
    assert [[(g["img"], g["correct"]) for g in r["gallery"]] for r in lists["results"]] == [
        [("d.jpg", 0), ("c.jpg", 1)], [("a.jpg", 1), ("c.jpg", 0), ("d.jpg", 1)]]
    ids = {e["image_id"] for e in _read(det)}
    assert ids == {1, 3, 4}  # a, c, d: the file's image order, 1-based
    assert "interchange_custom_test" in catalog.registered_names()  # until the fixture ends


def test_one_line_errors(tmp_path, capsys):
    path = _write(tmp_path)

    def error(*argv):
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("qeeps-convert-results: error: ") and "\n" not in err
        return err

    assert "nothing to write" in error(path)
    assert "--k must be at least 1" in error(path, "--topk", str(tmp_path / "t.json"), "--k", "0")
    assert "results are for data set 'cuhk_sysu_test', not 'prw_test'" in error(
        path, "--topk", str(tmp_path / "t.json"), "--dataset", "prw_test")
    assert "no.json: results file not found" in error(str(tmp_path / "no.json"), "--coco", "x")
    (tmp_path / "ids.json").write_text("[1, 2]")
    assert "expected a COCO file" in error(path, "--coco", "x", "--image-ids",
                                           str(tmp_path / "ids.json"))
    assert not os.path.exists("x")


def test_console_script_and_numpy_only():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts["qeeps-convert-results"] == "qeeps_d2.evaluation.interchange:main"
    # import the module with torch and detectron2 unavailable, past the package __init__ files
    # (which register the models)
    code = (
        "import sys, types, os\n"
        "sys.modules['torch'] = sys.modules['detectron2'] = None\n"
        f"root = os.path.join({REPO!r}, 'qeeps_d2')\n"
        "for name in ('', '.data', '.data.datasets', '.evaluation', '.utils'):\n"
        "    m = types.ModuleType('qeeps_d2' + name)\n"
        "    m.__path__ = [os.path.join(root, *name.split('.')[1:])]\n"
        "    sys.modules['qeeps_d2' + name] = m\n"
        "import qeeps_d2.evaluation.interchange, qeeps_d2.evaluation.ranking\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
