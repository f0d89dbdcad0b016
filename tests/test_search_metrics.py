"""Protocol scoring (datasets-and-protocols.md 3.2, 3.3): hand-computed cases for every rule."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from qeeps_d2.data.search_protocol import Gallery, Query, SearchProtocol
from qeeps_d2.evaluation.average_precision import average_precision
from qeeps_d2.evaluation.detection_metrics import evaluate_detections
from qeeps_d2.evaluation.search_metrics import (
    iou_thresholds,
    score_query,
    score_search,
)

NAN4 = [np.nan] * 4
BIG = [0.0, 0.0, 100.0, 200.0]


def gallery(*entries):
    """entries: (name, gt box or None)."""
    names = [n for n, _ in entries]
    gt = np.array([NAN4 if b is None else b for _, b in entries], dtype=np.float64)
    return Gallery(names, gt.reshape(len(names), 4))


def rows(*r):
    return np.array(r, dtype=np.float64).reshape(-1, 6)


# ---------------------------------------------------------------- average precision


def test_average_precision_matches_sklearn_on_random_cases_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(100):
        n = int(rng.integers(1, 40))
        y = rng.random(n) < 0.3
        y[rng.integers(n)] = True
        if trial % 2:  # few distinct values: many ties
            score = rng.integers(0, 4, n) / 3.0
        else:
            score = rng.random(n).astype(np.float32)
        assert average_precision(y, score) == average_precision_score(y, score)


def test_average_precision_ties_form_one_threshold():
    # One threshold holding 1 positive and 1 negative: P = 1/2 at R = 1.
    assert average_precision([1, 0], [0.5, 0.5]) == 0.5
    assert average_precision([0, 1], [0.5, 0.5]) == 0.5
    # 1, (0 1 tie), 0: P(0.9)=1 R=1/2; P(0.5)=2/3 R=1 -> 1/2 + 1/3
    assert average_precision([1, 0, 1, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(5 / 6)
    assert average_precision([0, 0], [0.3, 0.2]) == 0.0
    assert average_precision(np.zeros(0, bool), np.zeros(0)) == 0.0


# ---------------------------------------------------------------- IoU rule


def test_iou_thresholds_small_box_rule():
    gt = np.array([[0, 0, 12, 34], [5, 5, 15, 25], [0, 0, 100, 200]], dtype=np.float64)
    expected = [408 / (22 * 44), 200 / (20 * 30), 0.5]  # 0.4215 is CUHK G100's minimum
    np.testing.assert_allclose(iou_thresholds(gt), expected, rtol=0, atol=1e-15)


def test_small_box_accepts_lower_iou_than_large_box():
    # IoU 0.4 in both images: target found in the 10x20 box (threshold 1/3), not the 100x200 one.
    g = gallery(("small.jpg", [0, 0, 10, 20]), ("big.jpg", BIG))
    dets = {
        "small.jpg": rows([0, 0, 10, 8, 0.9, 0.7]),
        "big.jpg": rows([0, 0, 100, 80, 0.9, 0.8]),
    }
    s = score_query(g, dets)
    assert (s.count_gt, s.count_tp) == (2, 1)
    # ranking 0.8 (neg), 0.7 (tp): AP = 1/2, times recall 1/2
    assert s.ap == pytest.approx(0.25)
    assert s.hits.tolist() == [False, True, True]


def test_iou_is_continuous_without_plus_one():
    # IoU([0,0,10,20],[5,0,15,20]) = 100/300 = 1/3 (the +1 convention would give 0.375 > 1/3...);
    # threshold of a 10x20 box is exactly 1/3, so the detection just matches.
    g = gallery(("a.jpg", [0, 0, 10, 20]))
    assert score_query(g, {"a.jpg": rows([5, 0, 15, 20, 0.9, 0.5])}).count_tp == 1
    # shifted by 1 px: IoU = 90/310 < 1/3 (with +1 it would be 0.335 and match)
    assert score_query(g, {"a.jpg": rows([6, 0, 16, 20, 0.9, 0.5])}).count_tp == 0


# ---------------------------------------------------------------- per-query rules


def test_basic_query_hand_computed():
    g = gallery(("a.jpg", BIG), ("b.jpg", None), ("c.jpg", [10, 10, 110, 210]))
    dets = {
        "a.jpg": rows([0, 0, 100, 200, 0.9, 0.8], [200, 0, 300, 200, 0.9, 0.95]),
        "b.jpg": rows([0, 0, 100, 200, 0.9, 0.7]),
        "c.jpg": rows([10, 10, 110, 210, 0.4, 0.99]),  # below det_thresh: dropped
    }
    s = score_query(g, dets)
    # ranking 0.95 (0), 0.8 (1), 0.7 (0): AP = 1/2; recall 1/2 -> 0.25
    assert (s.count_gt, s.count_tp) == (2, 1)
    assert s.ap == pytest.approx(0.25)
    assert s.hits.tolist() == [False, True, True]
    # with a lower threshold the c.jpg detection is ranked first and found
    s = score_query(g, dets, det_thresh=0.3)
    assert (s.count_tp, s.hits[0]) == (2, True)
    # ranking 0.99 (1), 0.95 (0), 0.8 (1), 0.7 (0): AP = 1*1/2 + 2/3*1/2
    assert s.ap == pytest.approx(0.5 + 1 / 3)


def test_det_thresh_is_inclusive_and_all_below_threshold_scores_zero():
    g = gallery(("a.jpg", BIG))
    assert score_query(g, {"a.jpg": rows(BIG + [0.5, 0.1])}).count_tp == 1
    s = score_query(g, {"a.jpg": rows(BIG + [0.4999, 0.1], [0, 0, 50, 50, 0.2, 0.9])})
    assert (s.ap, s.count_gt, s.count_tp) == (0.0, 1, 0)
    assert not s.hits.any()


def test_target_never_detected():
    g = gallery(("a.jpg", BIG), ("b.jpg", None), ("c.jpg", BIG))
    s = score_query(g, {"b.jpg": rows(BIG + [0.9, 0.9]), "a.jpg": rows([300, 300, 350, 400, 1, 1])})
    assert (s.ap, s.count_gt, s.count_tp) == (0.0, 2, 0)
    assert not s.hits.any()
    # no detection at all: the images still count in count_gt
    assert score_query(g, {}).count_gt == 2


def test_first_match_by_similarity_not_by_iou():
    # IoU 0.6 at sim 0.9 and IoU 1.0 at sim 0.8: the 0.9 one is the TP, the 0.8 one a negative.
    g = gallery(("a.jpg", BIG))
    s = score_query(g, {"a.jpg": rows(BIG + [0.9, 0.8], [0, 0, 100, 120, 0.9, 0.9])})
    # ranking 0.9 (1), 0.8 (0): AP 1 (matching by IoU would give 1/2)
    assert s.ap == 1.0 and s.count_tp == 1 and s.hits[0]


def test_at_most_one_true_positive_per_entry():
    g = gallery(("a.jpg", BIG))
    s = score_query(g, {"a.jpg": rows(BIG + [0.9, 0.9], BIG + [0.9, 0.8])})
    # ranking 0.9 (1), 0.8 (0): AP 1, count_tp 1
    assert (s.ap, s.count_tp) == (1.0, 1)


def test_duplicate_gallery_entries_each_add_detections_and_a_true_positive():
    g = gallery(("a.jpg", BIG), ("a.jpg", BIG))
    dets = {"a.jpg": rows(BIG + [0.9, 0.8], [300, 0, 400, 200, 0.9, 0.9])}
    s = score_query(g, dets)
    # ranking 0.9 0.9 (0 0), 0.8 0.8 (1 1): one threshold at 0.9 (P 0), one at 0.8 (P 1/2, R 1)
    assert (s.count_gt, s.count_tp) == (2, 2)
    assert s.ap == pytest.approx(0.5)
    assert s.hits.tolist() == [False, True, True]
    # duplicate entry of a negative image: its detections enter the ranking twice
    g = gallery(("a.jpg", BIG), ("b.jpg", None), ("b.jpg", None))
    s = score_query(g, {"a.jpg": rows(BIG + [0.9, 0.5]), "b.jpg": rows(BIG + [0.9, 0.6])})
    assert s.ap == pytest.approx(1 / 3)


def test_query_image_in_its_own_gallery_is_an_ordinary_entry():
    # CUHK TestG lists are used as-is: the query image, listed with the query box, is a positive.
    g = gallery(("q.jpg", BIG), ("b.jpg", None))
    s = score_query(g, {"q.jpg": rows(BIG + [0.99, 1.0]), "b.jpg": rows(BIG + [0.9, 0.2])})
    assert (s.ap, s.count_gt, s.count_tp) == (1.0, 1, 1)


def test_similarity_ties():
    # Tie between a negative and the TP at the top: AP = 1/2 whatever the order;
    # top-1 follows the stable order (gallery entry order, then row order).
    tp, neg = rows(BIG + [0.9, 0.7]), rows(BIG + [0.9, 0.7])
    first_pos = score_query(gallery(("a.jpg", BIG), ("b.jpg", None)), {"a.jpg": tp, "b.jpg": neg})
    first_neg = score_query(gallery(("b.jpg", None), ("a.jpg", BIG)), {"a.jpg": tp, "b.jpg": neg})
    assert first_pos.ap == first_neg.ap == 0.5
    assert first_pos.hits.tolist() == [True, True, True]
    assert first_neg.hits.tolist() == [False, True, True]
    # Tie inside one image between two matching detections: one TP only.
    s = score_query(gallery(("a.jpg", BIG)), {"a.jpg": rows(BIG + [0.9, 0.7], BIG + [0.8, 0.7])})
    assert (s.count_tp, s.ap) == (1, 0.5)


def test_top_k_counts_boxes_not_images():
    # 6 negative boxes in one image above the TP: hit@1/@5 false, hit@10 true.
    negs = [[i * 10.0, 300, i * 10 + 5, 320, 0.9, 0.9 - i * 0.01] for i in range(6)]
    g = gallery(("n.jpg", None), ("a.jpg", BIG))
    s = score_query(g, {"n.jpg": rows(*negs), "a.jpg": rows(BIG + [0.9, 0.5])})
    assert s.hits.tolist() == [False, False, True]
    assert s.ap == pytest.approx(1 / 7)


def _reference_score(g, dets, det_thresh):
    """psdb.py-style loop over entries, for comparison with the vectorised code."""
    y_true, y_score, count_tp = [], [], 0
    for name, gt in zip(g.images, g.gt_boxes):
        d = dets.get(name, np.zeros((0, 6)))
        d = d[d[:, 4] >= det_thresh]
        labels = np.zeros(len(d))
        if not np.isnan(gt[0]) and len(d):
            w, h = gt[2] - gt[0], gt[3] - gt[1]
            thr = min(0.5, w * h / ((w + 10) * (h + 10)))
            for j in np.argsort(-d[:, 5], kind="stable"):
                b = d[j]
                iw = max(0, min(b[2], gt[2]) - max(b[0], gt[0]))
                ih = max(0, min(b[3], gt[3]) - max(b[1], gt[1]))
                inter = iw * ih
                iou = inter / ((b[2] - b[0]) * (b[3] - b[1]) + w * h - inter)
                if iou >= thr:
                    labels[j] = 1
                    count_tp += 1
                    break
        y_true.extend(labels)
        y_score.extend(d[:, 5])
    y_true, y_score = np.array(y_true), np.array(y_score)
    count_gt = int((~np.isnan(g.gt_boxes[:, 0])).sum())
    ap = 0.0 if count_tp == 0 else average_precision_score(y_true, y_score) * count_tp / count_gt
    order = np.argsort(-y_score, kind="stable")
    hits = [min(1, y_true[order][:k].sum()) for k in (1, 5, 10)]
    return ap, hits, count_tp


def test_vectorised_scoring_matches_reference_loop_on_random_galleries():
    rng = np.random.default_rng(1)
    for _ in range(40):
        names = [f"s{i}.jpg" for i in rng.integers(0, 8, size=int(rng.integers(1, 10)))]
        gts, dets = [], {}
        for name in set(names):
            k = int(rng.integers(0, 5))
            xy = rng.integers(0, 60, (k, 2))
            wh = rng.integers(5, 40, (k, 2))
            score = rng.choice([0.3, 0.5, 0.7, 0.9], k)
            sim = rng.integers(0, 5, k) / 4.0  # ties
            dets[name] = np.c_[xy, xy + wh, score, sim].astype(np.float64)
        for name in names:
            if rng.random() < 0.5:
                xy = rng.integers(0, 60, 2)
                gts.append(np.r_[xy, xy + rng.integers(5, 40, 2)])
            else:
                gts.append(NAN4)
        g = Gallery(names, np.array(gts, dtype=np.float64))
        s = score_query(g, dets)
        ap, hits, count_tp = _reference_score(g, dets, 0.5)
        assert s.count_tp == count_tp
        assert s.ap == ap
        assert s.hits.tolist() == [bool(h) for h in hits]


# ---------------------------------------------------------------- over queries


def _protocol(galleries):
    queries = [Query(i, f"q{i}.jpg", np.array(BIG), i) for i in range(len(galleries))]
    return SearchProtocol("toy", "toy_test", queries, galleries.__getitem__)


def test_score_search_means_over_given_queries():
    p = _protocol([gallery(("a.jpg", BIG)), gallery(("a.jpg", None), ("b.jpg", BIG))])
    dets = {
        0: {"a.jpg": rows(BIG + [0.9, 0.9])},  # AP 1, top-1 hit
        1: {"a.jpg": rows(BIG + [0.9, 0.9]), "b.jpg": rows(BIG + [0.9, 0.1])},  # AP 1/2
    }
    s = score_search(p, dets)
    assert s.summary() == {
        "mAP": 0.75, "top1": 0.5, "top5": 1.0, "top10": 1.0,
        "num_queries": 2, "num_without_target": 0,
    }
    partial = score_search(p, {1: dets[1]})
    assert partial.query_indices.tolist() == [1] and partial.mean_ap == 0.5
    # a query listed but absent from the detections scores 0
    assert score_search(p, {1: dets[1]}, query_indices=[0, 1]).mean_ap == 0.25
    with pytest.raises(ValueError, match="query index 2 out of range"):
        score_search(p, {2: {}})


def test_query_without_target_in_gallery_scores_zero_and_is_counted():
    p = _protocol([gallery(("a.jpg", None)), gallery(("b.jpg", BIG))])
    s = score_search(p, {0: {"a.jpg": rows(BIG + [0.9, 0.9])}, 1: {"b.jpg": rows(BIG + [1, 1])}})
    assert s.ap.tolist() == [0.0, 1.0]
    assert s.num_without_target == 1


# ---------------------------------------------------------------- detection metrics (3.3)


def test_detection_metrics_hand_computed():
    gt = {
        # two people, the second unlabeled
        "a.jpg": (np.array([BIG, [200, 0, 300, 200]], float), np.array([3, -1])),
        "b.jpg": (np.array([BIG], float), np.array([-1])),
        "c.jpg": (np.array([BIG], float), np.array([0])),  # never detected
    }
    dets = {
        # one box covering both people of a.jpg best with the first; a duplicate of it; a
        # detection of the unlabeled person; one below the threshold
        "a.jpg": np.array([
            [0, 0, 100, 200, 0.9], [0, 0, 100, 190, 0.8],
            [200, 0, 300, 200, 0.7], [0, 0, 100, 200, 0.3],
        ], float),
        "b.jpg": np.array([[500, 500, 600, 600, 0.95]], float),
    }
    m = evaluate_detections(gt, dets)
    # ranking 0.95 (0), 0.9 (1), 0.8 (0, duplicate), 0.7 (1): AP = 1/2*1/2 + 1/2*1/2 = 1/2
    # recall 2 of 4 GT -> det AP 1/4
    assert m["recall"] == 0.5
    assert m["ap"] == pytest.approx(0.25)
    # labeled only: a.jpg keeps pid 3 (found), c.jpg pid 0 (missed) -> 1 of 2
    assert m["labeled_recall"] == 0.5


def test_detection_matching_keeps_each_detections_best_gt_then_each_gts_best_detection():
    # Det 0 overlaps gt 0 (IoU 0.9) and gt 1 (IoU 0.6); det 1 overlaps gt 1 (IoU 0.55) only.
    gt = {"a.jpg": (np.array([[0, 0, 100, 100], [0, 0, 100, 150]], float), np.array([1, 2]))}
    det = np.array([[0, 0, 100, 90, 0.9], [0, 0, 100, 82.5, 0.8]], float)
    m = evaluate_detections(gt, {"a.jpg": det})
    # IoU det0-gt0 = 0.9, det0-gt1 = 0.6, det1-gt0 = 0.825, det1-gt1 = 0.55:
    # both detections keep gt 0 only, gt 0 keeps det 0 -> 1 TP of 2 GT
    assert m["recall"] == 0.5
    assert m["ap"] == pytest.approx(0.5)


def test_detection_metrics_reject_unknown_image():
    with pytest.raises(ValueError, match="x.jpg"):
        evaluate_detections({}, {"x.jpg": np.zeros((0, 5))})
