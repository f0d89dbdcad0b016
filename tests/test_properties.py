"""Property tests (hypothesis) of the search protocol's scoring and of the results-file reader.

Galleries are random: 1-8 entries, each holding the query person (a GT box) or not, each with 0-4
detections; some detections are jittered copies of the GT box (likely true positives), others
random boxes. Unless a property needs ties, similarities are distinct ("ties aside").
"""
import gzip
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qeeps_d2.data.search_protocol import Gallery
from qeeps_d2.evaluation.box_iou import box_iou
from qeeps_d2.evaluation.results_file import RESULTS_FORMAT, read_results
from qeeps_d2.evaluation.search_metrics import TOP_K, iou_thresholds, score_query

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
DET_THRESH = 0.5

coord = st.floats(0, 200, allow_nan=False, width=32)


@st.composite
def boxes(draw):
    x1, y1 = draw(coord), draw(coord)
    return [x1, y1, x1 + draw(st.floats(1, 80, width=32)), y1 + draw(st.floats(1, 120, width=32))]


@st.composite
def detection(draw, gt):
    """A detection row without similarity: a jittered GT box (if any) or a random box."""
    if gt is not None and draw(st.booleans()):
        jitter = draw(st.lists(st.floats(-3, 3, width=32), min_size=4, max_size=4))
        box = [g + j for g, j in zip(gt, jitter)]
        box[2], box[3] = max(box[2], box[0] + 1), max(box[3], box[1] + 1)
    else:
        box = draw(boxes())
    return box + [draw(st.floats(0, 1, width=32))]


@st.composite
def search_case(draw, distinct=True):
    """(gallery, detections by image name) with similarities distinct when ``distinct``."""
    n = draw(st.integers(1, 8))
    gts = [draw(st.one_of(st.none(), boxes())) for _ in range(n)]
    names = [f"img_{i}.jpg" for i in range(n)]
    rows = {name: [draw(detection(gt)) for _ in range(draw(st.integers(0, 4)))]
            for name, gt in zip(names, gts)}
    total = sum(len(r) for r in rows.values())
    if distinct:
        sims = draw(st.lists(st.integers(0, 10**6), min_size=total, max_size=total, unique=True))
        sims = [s / 10**6 for s in sims]
    else:
        sims = draw(st.lists(st.sampled_from([0.1, 0.5, 0.9]), min_size=total, max_size=total))
    it = iter(sims)
    detections = {name: np.array([r + [next(it)] for r in rs], dtype=np.float64).reshape(-1, 6)
                  for name, rs in rows.items()}
    gt_boxes = np.array([g if g is not None else [np.nan] * 4 for g in gts], dtype=np.float64)
    return Gallery(names, gt_boxes), detections


def _score(gallery, detections):
    s = score_query(gallery, detections, DET_THRESH)
    return s.ap, tuple(bool(h) for h in s.hits)


@SETTINGS
@given(search_case(distinct=False))
def test_ap_and_topk_lie_in_unit_interval(case):
    gallery, detections = case
    s = score_query(gallery, detections, DET_THRESH)
    assert 0.0 <= s.ap <= 1.0
    assert s.hits.dtype == bool and s.hits.shape == (len(TOP_K),)
    assert list(s.hits) == sorted(s.hits)  # top-1 hit implies top-5 and top-10 hits
    assert 0 <= s.count_tp <= s.count_gt


@SETTINGS
@given(search_case(), st.randoms(use_true_random=False))
def test_invariant_to_gallery_and_detection_order(case, rnd):
    gallery, detections = case
    order = list(range(len(gallery)))
    rnd.shuffle(order)
    shuffled_gallery = Gallery([gallery.images[i] for i in order], gallery.gt_boxes[order])
    shuffled_rows = {}
    for name in reversed(list(detections)):
        rows = detections[name]
        shuffled_rows[name] = rows[rnd.sample(range(len(rows)), len(rows))]
    ap, hits = _score(gallery, detections)
    shuffled_ap, shuffled_hits = _score(shuffled_gallery, shuffled_rows)
    assert shuffled_ap == pytest.approx(ap, abs=1e-12) and shuffled_hits == hits


@SETTINGS
@given(search_case())
def test_perfect_results_score_one(case):
    gallery, detections = case
    assume(gallery.count_gt > 0)
    # every GT box detected exactly, more similar than any other detection
    perfect = {name: rows.copy() for name, rows in detections.items()}
    for k, (name, gt) in enumerate(zip(gallery.images, gallery.gt_boxes)):
        if not np.isnan(gt[0]):
            row = np.r_[gt, 1.0, 2.0 + k]
            perfect[name] = np.vstack([perfect[name], row[None]])
    ap, hits = _score(gallery, perfect)
    assert ap == pytest.approx(1.0)
    assert hits == (True,) * len(TOP_K)


def _matching_rows(gallery, detections):
    """image name -> indices of its rows that match the entry's GT box (the entry's true
    positive is the most similar of them)."""
    found = {}
    for name, gt in zip(gallery.images, gallery.gt_boxes):
        rows = detections[name]
        if np.isnan(gt[0]) or not len(rows):
            continue
        ok = (rows[:, 4] >= DET_THRESH) & (
            box_iou(rows[:, :4], np.repeat(gt[None], len(rows), 0)) >= iou_thresholds(gt[None]))
        if ok.any():
            found[name] = np.flatnonzero(ok)
    return found


@SETTINGS
@given(search_case(), st.data())
def test_removing_a_true_positive_never_raises_ap(case, data):
    """The person is no longer found in one image: its true positive is removed together with
    the image's other detections of that person. (Removing the true-positive row alone can
    raise AP: hypothesis found that a duplicate detection of the same person, a false positive
    before, then becomes the image's true positive -- the protocol's one-TP-per-image rule.)"""
    gallery, detections = case
    matching = _matching_rows(gallery, detections)
    assume(matching)
    name = data.draw(st.sampled_from(sorted(matching)))
    before, _ = _score(gallery, detections)
    fewer = dict(detections)
    fewer[name] = np.delete(detections[name], matching[name], axis=0)
    after, _ = _score(gallery, fewer)
    assert after <= before + 1e-12


# ---------------------------------------------------------------------------- results reader
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda children: st.one_of(
    st.lists(children, max_size=5), st.dictionaries(st.text(max_size=6), children, max_size=5)),
    max_leaves=25)
row_like = st.lists(st.one_of(st.floats(), st.integers(-5, 500), st.text(max_size=3), st.none(),
                              st.lists(st.integers(), max_size=2)), max_size=7)
query_like = st.fixed_dictionaries({}, optional={
    "index": st.one_of(st.integers(-2, 3), json_value),
    "image": st.one_of(st.just("s5.jpg"), json_value),
    "gallery": st.one_of(st.dictionaries(st.text(max_size=6), st.lists(row_like, max_size=3),
                                         max_size=3), json_value),
})
document = st.one_of(
    json_value,
    st.fixed_dictionaries({}, optional={
        "format": st.one_of(st.just(RESULTS_FORMAT), json_value),
        "dataset": st.one_of(st.sampled_from(["cuhk_sysu_test", "prw_test"]), json_value),
        "queries": st.one_of(st.lists(st.one_of(query_like, json_value), max_size=4), json_value),
        "gallery_detections": st.one_of(
            st.dictionaries(st.text(max_size=6), st.lists(row_like, max_size=3), max_size=3),
            json_value),
    }),
)


@settings(max_examples=150, deadline=None)
@given(document)
def test_results_reader_never_crashes_on_fuzzed_json(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("fuzz") / "r.json"
    path.write_text(json.dumps(doc))
    try:
        results = read_results(str(path))
    except ValueError as e:
        assert str(path) in str(e)
        return
    for q in results.queries:  # accepted: every row is 6 finite numbers with x1<=x2, y1<=y2
        for rows in q.gallery.values():
            assert rows.shape[1] == 6 and np.isfinite(rows).all()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_results_reader_never_crashes_on_garbage_bytes(tmp_path_factory, data, gz):
    path = tmp_path_factory.mktemp("bytes") / ("r.json.gz" if gz else "r.json")
    if gz and data[:1] == b"x":
        data = gzip.compress(data)  # sometimes valid gzip of garbage
    path.write_bytes(data)
    with pytest.raises(ValueError, match="r.json"):
        read_results(str(path))
