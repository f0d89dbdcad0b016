"""Results file (architecture.md 4.3): round trips and every rejection."""
import gzip
import json

import numpy as np
import pytest

from qeeps_d2.data.search_protocol import Gallery, Query, SearchProtocol
from qeeps_d2.evaluation.results_file import (
    RESULTS_FORMAT,
    QueryResult,
    read_results,
    validate_against_protocol,
    write_results,
)

ROWS = np.array([[1.5, 2.0, 30.25, 80.0, 0.9, 0.123456789012345678], [0, 0, 1, 1, 0.5, -0.25]])


def _queries():
    return [
        {"index": 1, "image": "q1.jpg", "gallery": {"a.jpg": ROWS, "b.jpg": []}},
        QueryResult(0, "q0.jpg", {"c.jpg": ROWS[:1].tolist()}),
    ]


@pytest.mark.parametrize("name", ["r.json", "r.json.gz"])
def test_round_trip(tmp_path, name):
    path = str(tmp_path / "sub" / name)
    dets = {"a.jpg": np.array([[1, 2, 3, 4, 0.7]])}
    write_results(
        path, "cuhk_sysu_test", _queries(), gallery_detections=dets, partial=True, mode="x"
    )
    r = read_results(path)
    assert r.dataset == "cuhk_sysu_test"
    assert r.extra == {"partial": True, "mode": "x"}
    assert [q.index for q in r.queries] == [1, 0]
    assert [q.image for q in r.queries] == ["q1.jpg", "q0.jpg"]
    np.testing.assert_array_equal(r.queries[0].gallery["a.jpg"], ROWS)  # exact floats
    assert r.queries[0].gallery["b.jpg"].shape == (0, 6)
    assert r.queries[1].gallery["c.jpg"].dtype == np.float64
    np.testing.assert_array_equal(r.gallery_detections["a.jpg"], dets["a.jpg"])
    assert set(r.detections_by_query()) == {0, 1}
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt") as f:
        assert json.load(f)["format"] == RESULTS_FORMAT


def test_write_rejects_reserved_extra_field(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        write_results(str(tmp_path / "r.json"), "prw_test", [], format="other")


def _write_doc(tmp_path, doc, name="r.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def _doc(**changes):
    doc = {
        "format": RESULTS_FORMAT,
        "dataset": "prw_test",
        "queries": _query_with(),
    }
    doc.update(changes)
    return doc


def _query_with(**changes):
    q = {"index": 0, "image": "q.jpg", "gallery": {"a.jpg": [[0, 0, 10, 20, 0.9, 0.5]]}}
    q.update(changes)
    return [q]


@pytest.mark.parametrize(
    "doc, message",
    [
        ([1, 2], "must hold a JSON object"),
        ({k: v for k, v in _doc().items() if k != "format"}, "format tag"),
        (_doc(format="qeeps-results/2"), "format tag"),
        (_doc(dataset="coco_2017_val"), "unknown dataset 'coco_2017_val'"),
        (_doc(queries={}), "'queries' must be a list"),
        (_doc(queries=[{"index": 0, "image": "q.jpg"}]), r"queries\[0\] must be an object"),
        (_doc(queries=_query_with(index=-1)), "non-negative integer"),
        (_doc(queries=_query_with(index="0")), "non-negative integer"),
        (_doc(queries=_query_with(index=True)), "non-negative integer"),
        (_doc(queries=_query_with(image="")), "image must be a non-empty string"),
        (_doc(queries=_query_with(gallery=[])), "gallery must be an object"),
        (_doc(queries=_query_with() + _query_with()), "query index 0 appears more than once"),
        (_doc(queries=_query_with(gallery={"a.jpg": [[0, 0, 10, 20, 0.9]]})), "6 numbers"),
        (_doc(queries=_query_with(gallery={"a.jpg": [[0, 0, 10, 20, 0.9, 1], [1]]})), "6 numbers"),
        (_doc(queries=_query_with(gallery={"a.jpg": [[]]})), "6 numbers"),
        (_doc(queries=_query_with(gallery={"a.jpg": {"x": 1}})), "rows must be a list"),
        (_doc(queries=_query_with(gallery={"a.jpg": [[0, 0, 10, 20, 0.9, "1"]]})), "numbers only"),
        (_doc(queries=_query_with(gallery={"a.jpg": [[0, 0, 10, 20, 0.9, None]]})), "numbers only"),
        (_doc(queries=_query_with(gallery={"a.jpg": [[0, 0, 10, 20, 0.9, float("nan")]]})),
         "row 0 holds a non-finite value"),
        (_doc(queries=_query_with(gallery={"a.jpg": [[0, 0, 10, 20, 1, 1], [9, 0, 8, 20, 1, 1]]})),
         r"row 1 has x2 < x1"),
        (_doc(queries=_query_with(gallery={"a.jpg": [[0, 30, 10, 20, 0.9, 1]]})), "y2 < y1"),
        (_doc(gallery_detections=[]), "'gallery_detections' must be an object"),
        (_doc(gallery_detections={"a.jpg": [[0, 0, 10, 20, 0.9, 0.1]]}), "5 numbers"),
    ],
)
def test_read_rejects(tmp_path, doc, message):
    path = _write_doc(tmp_path, doc)
    with pytest.raises(ValueError, match=message) as e:
        read_results(path)
    assert path in str(e.value)


def test_read_rejects_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_results(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a readable JSON"):
        read_results(str(bad))
    bad_gz = tmp_path / "bad.json.gz"
    bad_gz.write_text("plain text, not gzip")
    with pytest.raises(ValueError, match="bad.json.gz: not a readable JSON"):
        read_results(str(bad_gz))
    with pytest.raises(ValueError, match="must end with .json or .json.gz"):
        read_results(str(tmp_path / "r.txt"))


def _protocol():
    galleries = [
        Gallery(["a.jpg", "b.jpg"], np.full((2, 4), np.nan)),
        Gallery(["c.jpg"], np.full((1, 4), np.nan)),
    ]
    queries = [Query(0, "q.jpg", np.zeros(4), 1), Query(1, "r.jpg", np.zeros(4), 2)]
    return SearchProtocol("prw_test", "prw_test", queries, galleries.__getitem__)


@pytest.mark.parametrize(
    "doc, message",
    [
        (_doc(dataset="prw_mini_test"), "results are for data set 'prw_mini_test'"),
        (_doc(queries=_query_with(index=2)), "query index 2 out of range"),
        (_doc(queries=_query_with(image="r.jpg")),
         "query 0 image is 'r.jpg', the protocol's is 'q.jpg'"),
        (_doc(queries=_query_with(gallery={"c.jpg": []})), "image 'c.jpg' is not in its gallery"),
        # results of another gallery size: the message names the mismatch and the fix
        (dict(_doc(queries=_query_with(gallery={"c.jpg": []})), protocol="prw_test/G100"),
         "made for prw_test/G100, scored here with prw_test \\(score them with "
         "--gallery-size 100\\)"),
    ],
)
def test_validate_against_protocol_rejects(tmp_path, doc, message):
    path = _write_doc(tmp_path, doc)
    results = read_results(path)
    with pytest.raises(ValueError, match=message):
        validate_against_protocol(results, _protocol(), path)


def test_results_of_a_smaller_gallery_are_not_scored_on_a_larger_one(tmp_path):
    """A G50 file scored at G100 used to give the G50 numbers (the other 50 images counted as
    searched without a detection); a G100 file scored at G50 (its subset) stays fine."""
    protocol = _protocol()
    for made_for, scored_as, fails in [("cuhk_sysu_test/G50", "cuhk_sysu_test/G100", True),
                                       ("cuhk_sysu_test/G100", "cuhk_sysu_test/G-1", True),
                                       ("cuhk_sysu_test/G100", "cuhk_sysu_test/G50", False),
                                       ("cuhk_sysu_test/G-1", "cuhk_sysu_test/G4000", False),
                                       ("other_test/G50", "cuhk_sysu_test/G100", False)]:
        doc = dict(_doc(dataset="cuhk_sysu_test"), protocol=made_for)
        path = _write_doc(tmp_path, doc)
        protocol.name, protocol.dataset = scored_as, "cuhk_sysu_test"
        if fails:
            with pytest.raises(ValueError, match=f"made for {made_for}, a smaller gallery than "
                               f"{scored_as}'s.*--gallery-size {made_for.rpartition('G')[2]}"):
                validate_against_protocol(read_results(path), protocol, path)
        else:
            validate_against_protocol(read_results(path), protocol, path)


def test_validate_against_protocol_accepts_partial_results(tmp_path):
    path = _write_doc(tmp_path, _doc(queries=_query_with(gallery={"b.jpg": [], "a.jpg": []})))
    validate_against_protocol(read_results(path), _protocol(), path)
