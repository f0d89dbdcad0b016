"""Query-gallery training pairs (``build_pair_records``) and the pair path of
``PersonSearchMapper``: query-box resizing, the shared flip, ``gt_is_query``, query-box
jittering (training only)."""
import cv2
import numpy as np
import pytest
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

import model_fixtures
import search_fixtures
from qeeps_d2.data.mapper import PersonSearchMapper, jitter_box
from qeeps_d2.data.pairs import build_pair_records


# ------------------------------------------------------------------ pair records
def _ann(box, pid):
    return {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "person_id": pid}


def _dicts():
    """Images A..E: id 0 in A, B, C; id 1 in A, C; id 2 only in D; E has nobody labeled."""
    return [
        {"file_name": "A", "image_id": "A", "annotations": [
            _ann([0, 0, 10, 20], 0), _ann([20, 0, 30, 20], 1), _ann([40, 0, 50, 20], -1)]},
        {"file_name": "B", "image_id": "B", "annotations": [_ann([1, 1, 11, 21], 0)]},
        {"file_name": "C", "image_id": "C", "annotations": [
            _ann([2, 2, 12, 22], 1), _ann([30, 2, 40, 22], 0)]},
        {"file_name": "D", "image_id": "D", "annotations": [_ann([3, 3, 13, 23], 2)]},
        {"file_name": "E", "image_id": "E", "annotations": [_ann([4, 4, 14, 24], -1)]},
    ]


def _pairs(records):
    return sorted((r["query_file_name"], tuple(r["query_box"]), r["file_name"], r["query_pid"])
                  for r in records)


def test_every_labeled_box_is_a_query_paired_with_each_other_image_of_its_id():
    records = build_pair_records(_dicts())
    assert _pairs(records) == sorted([
        ("A", (0, 0, 10, 20), "B", 0), ("A", (0, 0, 10, 20), "C", 0),
        ("A", (20, 0, 30, 20), "C", 1),
        ("B", (1, 1, 11, 21), "A", 0), ("B", (1, 1, 11, 21), "C", 0),
        ("C", (2, 2, 12, 22), "A", 1),
        ("C", (30, 2, 40, 22), "A", 0), ("C", (30, 2, 40, 22), "B", 0),
    ])
    for r in records:  # the gallery image's own dict (annotations included) + the query
        gallery = next(d for d in _dicts() if d["file_name"] == r["file_name"])
        assert r["annotations"] == gallery["annotations"] and r["image_id"] == gallery["image_id"]
        assert r["query_image_id"] == r["query_file_name"]
    with pytest.raises(ValueError, match="no query-gallery training pairs"):
        build_pair_records(_dicts()[3:])


def test_galleries_per_query_sampling_is_bounded_and_deterministic_per_seed():
    full = set(_pairs(build_pair_records(_dicts())))
    draws = {}
    for seed in range(8):
        records = build_pair_records(_dicts(), galleries_per_query=1, seed=seed)
        assert _pairs(records) == _pairs(build_pair_records(_dicts(), 1, seed=seed))
        pairs = _pairs(records)
        assert set(pairs) <= full
        queries = [p[:2] for p in pairs]
        # one gallery per query, and every query that has a gallery keeps one
        assert sorted(queries) == sorted({p[:2] for p in full})
        draws[seed] = pairs
    assert len({tuple(p) for p in draws.values()}) > 1  # the seed matters
    # k at least the number of galleries: everything
    assert set(_pairs(build_pair_records(_dicts(), galleries_per_query=2, seed=3))) == full


def _negatives(records):
    """(query image, query box, gallery image) of the records whose gallery lacks the query id."""
    return sorted((r["query_file_name"], tuple(r["query_box"]), r["file_name"]) for r in records
                  if all(a["person_id"] != r["query_pid"] for a in r["annotations"]))


def test_negative_pairs_hold_no_box_of_the_query_id_and_add_to_the_positives():
    positives = _pairs(build_pair_records(_dicts(), seed=0))
    for seed in range(6):
        records = build_pair_records(_dicts(), seed=seed, negatives_per_query=2)
        negatives = _negatives(records)
        # each of the 6 labeled query boxes gets 2 images without its id, never its own image
        assert len(negatives) == 12 and len(records) == len(positives) + 12
        assert all(q != g for q, _, g in negatives)
        assert [p for p in _pairs(records) if p[:3] not in negatives] == positives
        assert _pairs(records) == _pairs(build_pair_records(_dicts(), seed=seed,
                                                            negatives_per_query=2))
    # id 0 (in A, B, C) queried from A: the only images without it are D and E
    assert [n for n in negatives if n[:2] == ("A", (0, 0, 10, 20))] == [
        ("A", (0, 0, 10, 20), "D"), ("A", (0, 0, 10, 20), "E")]
    # 0 negatives: exactly the paper's pairs, the draws of galleries_per_query unchanged
    assert _pairs(build_pair_records(_dicts(), 1, seed=5, negatives_per_query=0)) == _pairs(
        build_pair_records(_dicts(), 1, seed=5))


def test_hard_negative_pairs_come_from_images_holding_the_most_similar_ids():
    # ids 0, 1, 2: 1 looks like 0, 2 does not; unlabeled people never make an image hard
    sim = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    records = build_pair_records(_dicts(), negatives_per_query=1, pid_similarity=sim,
                                 hard_pool=1)
    hard = {(q, b): g for q, b, g in _negatives(records)}
    # the query of id 2 (D): every other image holds 0 or 1; A and C hold id 1 (0.2), B only 0
    assert hard[("D", (3, 3, 13, 23))] in ("A", "C")
    # id 1 queried from A: images without id 1 are B (id 0: 0.9), D (id 2: 0.2), E (nobody)
    assert hard[("A", (20, 0, 30, 20))] == "B"
    # id 0: D (0.1) is harder than E, whose only person is unlabeled
    assert hard[("A", (0, 0, 10, 20))] == "D"
    with pytest.raises(ValueError, match="pid_similarity"):
        build_pair_records(_dicts(), negatives_per_query=1, pid_similarity=sim[:2, :2])
    with pytest.raises(ValueError, match="hard_pool"):
        build_pair_records(_dicts(), negatives_per_query=1, pid_similarity=sim, hard_pool=0)


# ------------------------------------------------------------------ mapper, pair path
GALLERY_HW, QUERY_HW = (120, 150), (100, 200)
# tiny configs: short side 64, long side <= 96 -> gallery 64 x 80, query 48 x 96
GALLERY_OUT, QUERY_OUT = (64, 80), (48, 96)
QUERY_BOX = [20.0, 10.0, 60.0, 90.0]
GALLERY_BOXES = [[10.0, 10.0, 40.0, 100.0], [50.0, 20.0, 80.0, 110.0], [90.0, 5.0, 120.0, 90.0],
                 [100.0, 30.0, 140.0, 115.0]]  # floats (Detectron2 truncates int boxes)
GALLERY_PIDS = [3, -1, 5, 3]


@pytest.fixture(scope="module")
def pair_record(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair_mapper")
    gallery, query = str(root / "gallery.png"), str(root / "query.png")
    cv2.imwrite(gallery, search_fixtures.random_image(11, *GALLERY_HW))
    cv2.imwrite(query, search_fixtures.random_image(12, *QUERY_HW))
    return {
        "file_name": gallery, "image_id": "gallery.png", "height": GALLERY_HW[0],
        "width": GALLERY_HW[1],
        "annotations": [_ann(b, p) for b, p in zip(GALLERY_BOXES, GALLERY_PIDS)],
        "query_file_name": query, "query_image_id": "query.png", "query_box": list(QUERY_BOX),
        "query_pid": 3,
    }


def _map(mapper, record, seed):
    np.random.seed(seed)
    return mapper(record)


def _scaled(boxes, hw_in, hw_out):
    sx, sy = hw_out[1] / hw_in[1], hw_out[0] / hw_in[0]
    return np.asarray(boxes, dtype=np.float64) * [sx, sy, sx, sy]


def _flipped(boxes, width):
    boxes = np.asarray(boxes, dtype=np.float64)
    return np.c_[width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]]


def _query_pixels(record, flip):
    image = utils.read_image(record["query_file_name"], format="BGR")
    image = T.ResizeTransform(*QUERY_HW, *QUERY_OUT).apply_image(image)
    if flip:
        image = image[:, ::-1]
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def test_training_pair_shares_the_flip_and_scales_the_query_box(pair_record):
    """Training: gallery and query image are flipped together (both or neither), the query box
    follows the query image's own resize (and flip), gt_is_query marks the query person."""
    mapper = PersonSearchMapper(model_fixtures.tiny_cfg(), is_train=True)
    gallery_boxes = _scaled(GALLERY_BOXES, GALLERY_HW, GALLERY_OUT)
    query_box = _scaled([QUERY_BOX], QUERY_HW, QUERY_OUT)
    seen = set()
    for seed in range(12):
        out = _map(mapper, pair_record, seed)
        assert tuple(out["image"].shape[1:]) == GALLERY_OUT
        assert tuple(out["query_image"].shape[1:]) == QUERY_OUT
        boxes = out["instances"].gt_boxes.tensor.numpy()
        flip = not np.allclose(boxes, gallery_boxes, atol=1e-3)
        if flip:
            np.testing.assert_allclose(boxes, _flipped(gallery_boxes, GALLERY_OUT[1]), atol=1e-3)
        seen.add(flip)
        assert torch.equal(out["query_image"], _query_pixels(pair_record, flip))
        want = _flipped(query_box, QUERY_OUT[1]) if flip else query_box
        np.testing.assert_allclose(out["query_box"].numpy(), want[0], atol=1e-4)
        assert out["instances"].gt_is_query.tolist() == [True, False, False, True]
        assert out["instances"].gt_pids.tolist() == GALLERY_PIDS
    assert seen == {False, True}  # both cases were checked


def test_test_pair_is_resized_not_flipped_not_jittered(pair_record):
    cfg = model_fixtures.tiny_cfg()
    cfg.DATALOADER.PAIRS.QUERY_BOX_JITTER = 0.3
    mapper = PersonSearchMapper(cfg, is_train=False)
    assert mapper.query_box_jitter == 0.0
    for seed in range(5):
        out = _map(mapper, pair_record, seed)
        assert "instances" not in out
        assert torch.equal(out["query_image"], _query_pixels(pair_record, False))
        np.testing.assert_allclose(out["query_box"].numpy(),
                                   _scaled([QUERY_BOX], QUERY_HW, QUERY_OUT)[0], atol=1e-4)


def test_query_box_jitter_stays_within_bounds(pair_record):
    """Each side moves by at most JITTER x the box's width / height, the box stays in the query
    image and non-empty, and the jitter does move it."""
    cfg = model_fixtures.tiny_cfg()
    cfg.DATALOADER.PAIRS.QUERY_BOX_JITTER = 0.2
    mapper = PersonSearchMapper(cfg, is_train=True)
    box = np.array(QUERY_BOX)
    w, h = box[2] - box[0], box[3] - box[1]
    limit = 0.2 * np.array([w, h, w, h])
    moves = []
    for seed in range(40):
        out = _map(mapper, pair_record, seed)
        flip = not np.allclose(out["instances"].gt_boxes.tensor.numpy(),
                               _scaled(GALLERY_BOXES, GALLERY_HW, GALLERY_OUT), atol=1e-3)
        got = out["query_box"].numpy()[None].astype(np.float64)
        if flip:
            got = _flipped(got, QUERY_OUT[1])
        got = _scaled(got, QUERY_OUT, QUERY_HW)[0]  # back to original query pixels
        assert (np.abs(got - box) <= limit + 1e-3).all(), (seed, got)
        assert got[0] >= -1e-3 and got[1] >= -1e-3 and got[2] <= QUERY_HW[1] + 1e-3
        assert got[3] <= QUERY_HW[0] + 1e-3 and got[2] > got[0] and got[3] > got[1]
        moves.append(np.abs(got - box) / limit)
    moves = np.array(moves)
    assert moves.max() > 0.8 and (moves.max(axis=1) > 0.05).mean() > 0.9  # it does jitter
    # the default (0) is off: the training test above sees the exact scaled box
    assert PersonSearchMapper(model_fixtures.tiny_cfg(), is_train=True).query_box_jitter == 0.0


def test_jitter_box_clips_to_the_image_and_checks_its_fraction():
    np.random.seed(0)
    for _ in range(100):
        got = jitter_box(np.array([0.0, 0.0, 10.0, 10.0]), 0.4, 12, 10)
        assert (got >= 0).all() and got[2] <= 12 and got[3] <= 10
        assert got[2] > got[0] and got[3] > got[1]
    np.testing.assert_array_equal(jitter_box(np.array([1.0, 2, 3, 4]), 0.0, 10, 10), [1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        jitter_box(np.array([0.0, 0, 1, 1]), 0.5, 10, 10)
    cfg = model_fixtures.tiny_cfg()
    cfg.DATALOADER.PAIRS.QUERY_BOX_JITTER = 0.6
    with pytest.raises(ValueError, match="QUERY_BOX_JITTER"):
        PersonSearchMapper(cfg, is_train=True)
