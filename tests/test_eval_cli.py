"""qeeps-eval on the tiny official-format CUHK-SYSU and PRW fixtures."""
import json
import os

import pytest

from qeeps_d2.evaluation.cli import main
from qeeps_d2.evaluation.results_file import write_results


@pytest.fixture(autouse=True)
def datasets_env(cuhk_prw_env):
    """Every test here reads the CUHK-SYSU / PRW fixtures (tests/conftest.py)."""
    return cuhk_prw_env


# CUHK fixture, G100: query 0 (s5.jpg) has targets in s6, s7; query 1 (s6.jpg) in s8, and s7 is
# listed twice as a negative.
CUHK_QUERIES = [
    {"index": 0, "image": "s5.jpg", "gallery": {
        "s6.jpg": [[5, 5, 30, 65, 0.9, 0.8]], "s7.jpg": [[20, 20, 40, 60, 0.9, 0.3]],
        "s8.jpg": [[10, 10, 30, 60, 0.9, 0.5]]}},
    {"index": 1, "image": "s6.jpg", "gallery": {
        "s8.jpg": [[10, 10, 30, 60, 0.9, 0.4]], "s7.jpg": [[20, 20, 40, 60, 0.9, 0.6]]}},
]
# G100: q0 ranking 0.8 (TP) 0.5 0.3 (TP) -> AP 5/6; q1: 0.6 0.6 (s7 twice) 0.4 (TP) -> AP 1/3.
# G50 (s7 twice and s5 itself as positives; s8 twice with two boxes):
#   q0: 0.8 (TP) 0.5 0.3 0.3 (TP TP) -> 5/6 * recall 3/4 = 5/8; q1: 0.6 0.4 (TP) 0.4 -> 1/3 * 1/2.
CUHK_G100 = {"mAP": (5 / 6 + 1 / 3) / 2, "top1": 0.5, "top5": 1.0, "top10": 1.0, "num_queries": 2}
CUHK_G50 = {"mAP": (5 / 8 + 1 / 6) / 2, "top1": 0.5, "top5": 1.0, "top10": 1.0, "num_queries": 2}


def _write(tmp_path, dataset, queries, name="results.json.gz", **extra):
    path = str(tmp_path / name)
    write_results(path, dataset, queries, **extra)
    return path


def _json_line(out):
    return json.loads(out.strip().splitlines()[-1])


def _check(got, expected):
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_cuhk_table_says_gallery_size(tmp_path, capsys):
    path = _write(tmp_path, "cuhk_sysu_test", CUHK_QUERIES)
    assert main(["--dataset", "cuhk_sysu_test", path]) == 0
    out = capsys.readouterr().out
    assert "gallery size 100" in out
    assert "  mAP      58.33%" in out
    assert "  top-1    50.00%" in out
    assert "partial" not in out
    assert not out.strip().splitlines()[-1].startswith("{")


def test_cuhk_json_and_gallery_sizes(tmp_path, capsys):
    path = _write(tmp_path, "cuhk_sysu_test", CUHK_QUERIES, name="r.json")
    assert main(["--dataset", "cuhk_sysu_test", "--json", path]) == 0
    got = _json_line(capsys.readouterr().out)
    _check(got, CUHK_G100)
    assert got["partial"] is False
    assert main(["--dataset", "cuhk_sysu_test", "--gallery-size", "50", "--json", path]) == 0
    out = capsys.readouterr().out
    assert "gallery size 50" in out
    _check(_json_line(out), CUHK_G50)


def test_partial_results_are_scored_on_their_queries(tmp_path, capsys):
    path = _write(tmp_path, "cuhk_sysu_test", CUHK_QUERIES[:1])
    assert main(["--dataset", "cuhk_sysu_test", "--json", path]) == 0
    out = capsys.readouterr().out
    assert "partial: 1 of 2 queries" in out
    got = _json_line(out)
    _check(got, {"mAP": 5 / 6, "top1": 1.0, "num_queries": 1})
    assert got["partial"] is True


def test_duplicate_rows_are_collapsed_with_a_warning(tmp_path, capsys, caplog):
    """The same row listed five times would count four false positives (before: mAP 58 -> 42):
    exact duplicates within an image are kept once, with one warning; equal boxes of different
    images, or of one image with other similarities, are not duplicates."""
    queries = json.loads(json.dumps(CUHK_QUERIES))
    queries[1]["gallery"]["s7.jpg"] *= 5  # the negative above the target, five times
    queries[0]["gallery"]["s8.jpg"] *= 2
    queries[0]["gallery"]["s8.jpg"].append([10, 10, 30, 60, 0.9, 0.2])  # same box, lower sim
    path = _write(tmp_path, "cuhk_sysu_test", queries, name="dup.json")
    with caplog.at_level("WARNING"):
        assert main(["--dataset", "cuhk_sysu_test", "--json", path]) == 0
    got = _json_line(capsys.readouterr().out)
    # q0: 0.8 (TP) 0.5 0.3 (TP) 0.2 -> AP 5/6 as before; q1 as before
    _check(got, CUHK_G100)
    assert caplog.text.count("exact duplicate detection rows") == 1
    assert "5 exact duplicate detection rows" in caplog.text and "in 2 queries" in caplog.text


def test_detection_metrics_from_gallery_detections(tmp_path, capsys):
    dets = {"s6.jpg": [[5, 5, 30, 65, 0.9]], "s9.jpg": [[60, 40, 80, 70, 0.95]],
            "s8.jpg": [[10, 10, 30, 60, 0.8], [40, 10, 60, 60, 0.6]]}
    path = _write(tmp_path, "cuhk_sysu_test", CUHK_QUERIES, gallery_detections=dets)
    assert main(["--dataset", "cuhk_sysu_test", "--json", path]) == 0
    out = capsys.readouterr().out
    assert "detection: AP 19.17%, recall 30.00%, labeled recall 50.00%" in out
    got = _json_line(out)
    # 0.95 (FP) 0.9 0.8 0.6 (TP): AP (1/2 + 2/3 + 3/4) / 3 = 23/36, times recall 3 of the 10
    # people of the 6 test images; labeled people: 6, found 3.
    _check(got, {"det_ap": 23 / 36 * 3 / 10, "det_recall": 3 / 10, "det_labeled_recall": 0.5})


# PRW fixture: query 0 (camera 1, pid 7): targets in c2s2_000020, c3s3_000030; query 1 (camera 2,
# pid 9): targets in c1s2_000011 and c2s2_000020 (same camera: not in the cross-camera gallery);
# query 2 (pid 7): no detection submitted.
PRW_QUERIES = [
    {"index": 0, "image": "c1s2_000010.jpg", "gallery": {
        "c2s2_000020.jpg": [[10, 10, 31, 61, 0.9, 0.9]],
        "c6s2_000040.jpg": [[30, 30, 50, 70, 0.9, 0.95]]}},
    {"index": 1, "image": "c2s2_000021.jpg", "gallery": {
        "c1s2_000011.jpg": [[5, 5, 30, 65, 0.9, 0.7]],
        "c6s2_000040.jpg": [[30, 30, 50, 70, 0.9, 0.75]]}},
    {"index": 2, "image": "c3s3_000030.jpg", "gallery": {}},
]


def test_prw_standard_and_cross_camera(tmp_path, capsys):
    path = _write(tmp_path, "prw_test", PRW_QUERIES)
    assert main(["--dataset", "prw_test", "--json", path]) == 0
    out = capsys.readouterr().out
    assert "standard protocol" in out
    # q0: 0.95 0.9 (TP) -> 1/2 * 1/2; q1: 0.75 0.7 (TP) -> 1/2 * 1/2 (2 targets); q2: 0
    _check(_json_line(out), {"mAP": 1 / 6, "top1": 0.0, "top5": 2 / 3, "num_queries": 3})
    assert main(["--dataset", "prw_test", "--cross-camera", "--json", path]) == 0
    out = capsys.readouterr().out
    assert "cross-camera protocol" in out
    # q1's same-camera target no longer counts: 1/2 * 1/1
    _check(_json_line(out), {"mAP": (0.25 + 0.5) / 3, "top5": 2 / 3, "num_queries": 3})


def test_results_of_another_data_set_are_rejected(tmp_path, capsys):
    path = _write(tmp_path, "cuhk_sysu_test", CUHK_QUERIES)
    assert main(["--dataset", "prw_test", path]) == 2
    assert "results are for data set 'cuhk_sysu_test'" in capsys.readouterr().err


def _error(capsys, argv):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qeeps-eval: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


def test_user_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    good = _write(tmp_path, "cuhk_sysu_test", CUHK_QUERIES)
    cuhk = ["--dataset", "cuhk_sysu_test"]
    assert "--dataset: unknown test set 'coco'" in _error(capsys, ["--dataset", "coco", good])
    assert "RESULTS" in _error(capsys, cuhk)
    assert "not found" in _error(capsys, cuhk + [str(tmp_path / "no.json")])
    assert "gallery size 77" in _error(capsys, cuhk + ["--gallery-size", "77", good])
    assert "--det-thresh must be >= 0" in _error(capsys, cuhk + ["--det-thresh", "-1", good])
    bad_image = [dict(CUHK_QUERIES[0], image="s9.jpg")]
    path = _write(tmp_path, "cuhk_sysu_test", bad_image, name="bad.json")
    assert "query 0 image is 's9.jpg'" in _error(capsys, cuhk + [path])
    path = _write(tmp_path, "cuhk_sysu_test", CUHK_QUERIES, name="thr.json", min_det_score=0.5)
    assert "det_score >= 0.5" in _error(capsys, cuhk + ["--det-thresh", "0.3", path])
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"format": "qeeps-results/1", "dataset": "cuhk_sysu_test", "queries": 3}')
    assert "'queries' must be a list" in _error(capsys, cuhk + [str(malformed)])
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "nowhere"))
    message = _error(capsys, ["--dataset", "cuhk_sysu_test", good])
    assert os.path.join("nowhere", "CUHK-SYSU") in message
