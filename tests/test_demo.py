"""The demo pipeline at a minimal size: tiny SynthPS, one iteration per model, the report."""
import json
import os

import pytest

from qeeps_d2 import demo
from qeeps_d2.data.search_protocol import Gallery
from qeeps_d2.data.synthps import generate_synthps

import numpy as np

TINY = [
    "MODEL.DEVICE", "cpu",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "100",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "100",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32", "MODEL.RPN.POST_NMS_TOPK_TEST", "16",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.EPOCHS", "0", "SOLVER.MAX_ITER", "1",
    "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0",
    "TEST.PERSON_SEARCH.MAX_QUERIES", "2", "TEST.PERSON_SEARCH.BATCH_SIZE", "4",
    "PRETRAIN.NUM_IDS", "6", "PRETRAIN.IMAGES", "10", "PRETRAIN.CROP_ITERS", "2",
    "PRETRAIN.CROP_BATCH", "8", "PRETRAIN.ROI_ITERS", "1", "PRETRAIN.ROI_BATCH", "2",
]
EVAL_DIRS = {"OIM": os.path.join("oim", "eval_G100"),
             "QEEPS (cascade, K=30)": os.path.join("qeeps", "eval_G100_cascade30")}
RESULTS = os.path.join("inference", "synthps_test_results.json.gz")


def test_top_matches_marks_right_and_wrong():
    gallery = Gallery(["a.jpg", "b.jpg", "a.jpg"],
                      np.array([[0, 0, 10, 20], [np.nan] * 4, [0, 0, 10, 20]], dtype=float))
    dets = {"a.jpg": np.array([[0, 0, 10, 20, 0.9, 0.5], [50, 50, 60, 70, 0.9, 0.7],
                               [0, 0, 10, 20, 0.3, 0.99]]),  # below det_thresh: dropped
            "b.jpg": np.array([[0, 0, 10, 20, 0.8, 0.6]])}
    found = demo.top_matches(gallery, dets, k=5)
    assert [(n, c) for n, _, _, _, c in found] == [("a.jpg", False), ("b.jpg", False),
                                                   ("a.jpg", True)]
    assert [s for *_, s, _ in found] == [0.7, 0.6, 0.5]


def _table_row(printed, label):
    """The cells of the table row ``label`` (the last one printed)."""
    rows = [line for line in printed.splitlines() if line.startswith(f"| {label} |")]
    assert rows, printed
    return [c.strip() for c in rows[-1].strip("|").split("|")]


def _check_table_numbers(printed, out, with_metrics=True):
    """Every mAP / top-1 of the printed table and of the "QEEPS - OIM" line is the numpy
    protocol's score of that model's results file (G50 and G100 from the same file); with
    ``with_metrics`` the G100 numbers are also the evaluation's own metrics.

    Returns:
        label -> [mAP G50, top-1 G50, mAP G100, top-1 G100] (percent).
    """
    from qeeps_d2.data.datasets.catalog import load_protocol
    from qeeps_d2.evaluation.results_file import read_results
    from qeeps_d2.evaluation.search_metrics import score_search

    got = {}
    for label, eval_dir in EVAL_DIRS.items():
        detections = read_results(str(out / eval_dir / RESULTS)).detections_by_query()
        assert len(detections) == 2  # TEST.PERSON_SEARCH.MAX_QUERIES
        numbers = []
        for size in (50, 100):
            scores = score_search(load_protocol("synthps_test", size), detections, 0.5,
                                  query_indices=sorted(detections))
            numbers += [100 * scores.mean_ap, 100 * scores.top_k(1)]
        if with_metrics:
            metrics = json.loads((out / eval_dir / "inference" / "synthps_test_metrics.json")
                                 .read_text())["person_search"]
            assert [metrics["mAP"], metrics["top1"]] == pytest.approx(numbers[2:])
        assert _table_row(printed, label)[1:5] == [f"{v:.1f}" for v in numbers], printed
        got[label] = numbers
    oim, qeeps = got.values()
    assert (f"QEEPS - OIM: mAP {qeeps[2] - oim[2]:+.1f} pp, top-1 {qeeps[3] - oim[3]:+.1f} pp"
            in printed), printed
    return got


def _plant_results(out):
    """Replace both models' results files with known rows (a one-iteration model scores about
    0, which would make the table check vacuous): per query and gallery entry, the target's
    true box and a distractor; OIM ranks the target below every distractor, QEEPS above those
    of G50 images but below those of every other G100-only image: OIM G100 < OIM G50 <
    QEEPS G100 < QEEPS G50."""
    from qeeps_d2.data.datasets.catalog import load_protocol
    from qeeps_d2.evaluation.results_file import read_results, write_results

    g50, g100 = load_protocol("synthps_test", 50), load_protocol("synthps_test", 100)
    for label, eval_dir in EVAL_DIRS.items():
        path = str(out / eval_dir / RESULTS)
        results = read_results(path)
        for q in results.queries:
            small = set(g50.gallery(q.index).images)
            gallery, q.gallery = g100.gallery(q.index), {}
            for k, (name, box) in enumerate(zip(gallery.images, gallery.gt_boxes)):
                if label == "OIM":
                    distractor = 0.5
                else:
                    distractor = 0.3 if name in small or k % 2 else 0.95
                rows = [[0.0, 0.0, 4.0, 4.0, 0.9, distractor]]
                if not np.isnan(box[0]):
                    rows.append([*box.tolist(), 0.9, 0.4 if label == "OIM" else 0.9])
                q.gallery[name] = np.array(rows)
        write_results(path, results.dataset, results.queries, results.gallery_detections,
                      **results.extra)


def test_demo_end_to_end_at_minimal_size(tmp_path, monkeypatch, capsys):
    datasets = tmp_path / "datasets"
    generate_synthps(
        str(datasets / "synthps"), seed=0, num_train_ids=4, num_test_ids=3, train_images=8,
        test_images=101, image_size=(96, 72), persons_per_image=(2, 3), appearances_per_id=(2, 6),
        illumination=1.0,
    )
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--queries", "2", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "| OIM |" in printed and "| QEEPS (cascade, K=30) |" in printed
    assert "QEEPS - OIM" in printed
    _check_table_numbers(printed, out)
    metrics = out / "qeeps" / "eval_G100_cascade30" / "inference" / "synthps_test_metrics.json"
    assert json.loads(metrics.read_text())["mode"] == "cascade"
    report = out / "report.html"
    html = report.read_text()
    assert html.count("<img") == 2 and "Query" in html
    for model in ("pretrain", "oim", "qeeps"):
        assert (out / model / "model_final.pth").is_file()
    assert "mean top-1 similarity at gallery 100" in printed
    # a second run reuses the trained models and evaluations (no retraining); its table comes
    # from the results files, here replaced with rows of known, non-zero and distinct scores
    mtime = os.path.getmtime(out / "oim" / "model_final.pth")
    _plant_results(out)
    assert demo.main(["--out", str(out), "--queries", "1", *TINY]) == 0
    assert os.path.getmtime(out / "oim" / "model_final.pth") == mtime
    got = _check_table_numbers(capsys.readouterr().out, out, with_metrics=False)
    oim, qeeps = got["OIM"], got["QEEPS (cascade, K=30)"]
    assert 0 < oim[2] < oim[0] < qeeps[2] < qeeps[0] == 100.0
    assert qeeps[1] == 100.0 and oim[1] == 0.0
    # exhaustive evaluation is a separate result, not the cascade one reused
    assert demo.main(["--out", str(out), "--queries", "1", "--cascade-topk", "0", *TINY]) == 0
    assert "| QEEPS |" in capsys.readouterr().out
    assert (out / "qeeps" / "eval_G100" / "inference" / "synthps_test_metrics.json").is_file()


def test_top1_similarities_split_right_and_wrong():
    from qeeps_d2.data.search_protocol import Query, SearchProtocol

    galleries = {0: Gallery(["a.jpg", "b.jpg"], np.array([[0, 0, 10, 20], [np.nan] * 4], float)),
                 1: Gallery(["a.jpg"], np.array([[0, 0, 10, 20]], float))}
    protocol = SearchProtocol("p", "d", [Query(i, "q.jpg", np.zeros(4), i) for i in (0, 1)],
                              galleries.__getitem__)
    dets = {0: {"a.jpg": np.array([[0, 0, 10, 20, 0.9, 0.8]]),
                "b.jpg": np.array([[0, 0, 10, 20, 0.9, 0.6]])},
            1: {"a.jpg": np.array([[40, 40, 50, 60, 0.9, 0.7], [0, 0, 10, 20, 0.9, 0.5]])}}
    sims = demo.top1_similarities(protocol, dets)
    assert sims == {"right": [0.8], "wrong": [0.7]}
    assert demo.format_similarities("OIM", sims) == (
        "OIM: mean top-1 similarity at gallery 100: right 0.800 (1), wrong 0.700 (1)")
