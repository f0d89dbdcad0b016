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
]


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
    assert "| OIM |" in printed and "| QEEPS (cascade, K=10) |" in printed
    assert "QEEPS - OIM" in printed
    metrics = out / "qeeps" / "eval_G100_cascade10" / "inference" / "synthps_test_metrics.json"
    assert json.loads(metrics.read_text())["mode"] == "cascade"
    report = out / "report.html"
    html = report.read_text()
    assert html.count("<img") == 2 and "Query" in html
    for model in ("oim", "qeeps"):
        assert (out / model / "model_final.pth").is_file()
    # a second run reuses the trained models and evaluations (no retraining)
    mtime = os.path.getmtime(out / "oim" / "model_final.pth")
    assert demo.main(["--out", str(out), "--queries", "1", *TINY]) == 0
    assert os.path.getmtime(out / "oim" / "model_final.pth") == mtime
    # exhaustive evaluation is a separate result, not the cascade one reused
    assert demo.main(["--out", str(out), "--queries", "1", "--cascade-topk", "0", *TINY]) == 0
    assert "| QEEPS |" in capsys.readouterr().out
    assert (out / "qeeps" / "eval_G100" / "inference" / "synthps_test_metrics.json").is_file()
