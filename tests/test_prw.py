"""PRW and PRW-mini reader and protocols on a tiny official-format fixture (dataset_fixtures)."""
import collections
import os

import numpy as np
import pytest
import scipy.io

import dataset_fixtures
from qeeps_d2.data.datasets import prw
from qeeps_d2.data.datasets.prw import load_prw, load_prw_mini_protocol, load_prw_protocol

# PRW-mini pids (datasets-and-protocols.md section 4)
MINI_PIDS = [484, 493, 495, 504, 537, 559, 596, 601, 607, 617, 640, 647, 662, 696, 703, 707, 713,
             735, 751, 755, 776, 778, 828, 832, 848, 862, 863, 871, 902, 906]


@pytest.fixture(scope="module")
def prw_data(tmp_path_factory):
    return dataset_fixtures.make_prw_fixture(str(tmp_path_factory.mktemp("prw") / "PRW"))


@pytest.fixture
def fresh_prw(tmp_path):
    return dataset_fixtures.make_prw_fixture(str(tmp_path / "PRW"))


def _as_expected(dicts):
    return {d["image_id"]: [(a["bbox"], a["person_id"]) for a in d["annotations"]] for d in dicts}


def test_box_rule_clips_adds_then_truncates():
    got = prw.prw_boxes_to_xyxy(np.array([[-1.703, 20.5, 30.25, 50.75], [10.6, 10.2, 20.5, 50.9]]))
    assert got.tolist() == [[0.0, 20.0, 30.0, 71.0], [10.0, 10.0, 31.0, 61.0]]
    assert prw.camera_id("c3s2_044587") == 3
    with pytest.raises(ValueError, match="no camera id"):
        prw.camera_id("s2_044587")


@pytest.mark.parametrize("split", ["train", "test"])
def test_split_dicts_match_expectations(prw_data, split):
    dicts = load_prw(prw_data["root"], split)
    assert _as_expected(dicts) == prw_data[split]
    assert [d["image_id"] for d in dicts] == list(prw_data[split])
    for d in dicts:
        assert d["file_name"] == os.path.join(os.path.abspath(prw_data["root"]), "frames",
                                              d["image_id"])
        assert (d["height"], d["width"]) == prw_data["image_sizes"][d["image_id"]]
        assert d["camera_id"] == prw_data["camera_ids"][d["image_id"]]
        assert all(a["bbox_mode"] == 0 and a["category_id"] == 0 for a in d["annotations"])


def test_num_train_pids(prw_data):
    assert prw.num_train_pids(prw_data["root"]) == 3


@pytest.mark.parametrize("mode", ["standard", "cross_camera"])
def test_protocol_matches_expectations(prw_data, mode):
    protocol = load_prw_protocol(prw_data["root"], cross_camera=mode == "cross_camera")
    assert protocol.name == ("prw_test" if mode == "standard" else "prw_test/cross_camera")
    assert protocol.dataset == "prw_test"
    assert protocol.image_root == os.path.join(os.path.abspath(prw_data["root"]), "frames")
    assert [(q.image, q.box.tolist(), q.person_id, q.camera_id)
            for q in protocol.queries] == prw_data["queries"]
    for i, expected in enumerate(prw_data["galleries"][mode]):
        gallery = protocol.gallery(i)
        assert gallery.images == [name for name, _ in expected]
        got = [None if np.isnan(b[0]) else b.tolist() for b in gallery.gt_boxes]
        assert got == [box for _, box in expected]


def test_protocol_counts(prw_data):
    standard = load_prw_protocol(prw_data["root"])
    assert [len(standard.gallery(i)) for i in range(3)] == [5, 5, 5]
    assert [standard.gallery(i).count_gt for i in range(3)] == [2, 2, 2]
    cross = load_prw_protocol(prw_data["root"], cross_camera=True)
    assert [len(cross.gallery(i)) for i in range(3)] == [4, 4, 5]
    assert [cross.gallery(i).count_gt for i in range(3)] == [2, 1, 2]


def test_bad_query_lines(fresh_prw, tmp_path):
    root = fresh_prw["root"]
    bad = tmp_path / "bad.txt"
    bad.write_text("7 10 10 20 50 c1s2_000010\r\n\r\n9 20 20 40 c2s2_000021\r\n")
    with pytest.raises(ValueError, match="bad.txt line 3: expected 'pid x y w h frame'"):
        load_prw_protocol(root, query_file=str(bad))
    bad.write_text("7 10 10 20 50 c1s1_000001\n")
    with pytest.raises(ValueError, match="line 1: query frame c1s1_000001 is not a PRW test frame"):
        load_prw_protocol(root, query_file=str(bad))
    with pytest.raises(FileNotFoundError, match="PRW query list not found"):
        load_prw_protocol(root, query_file=str(tmp_path / "none.txt"))


def test_missing_files(fresh_prw, tmp_path):
    root = fresh_prw["root"]
    with pytest.raises(FileNotFoundError, match="PRW root folder not found"):
        load_prw(str(tmp_path / "nowhere"), "test")
    os.remove(os.path.join(root, "frames", "c6s2_000040.jpg"))
    with pytest.raises(FileNotFoundError, match="image not found: .*c6s2_000040.jpg"):
        load_prw(root, "test")
    os.remove(os.path.join(root, "annotations", "c2s2_000021.jpg.mat"))
    with pytest.raises(FileNotFoundError, match="annotation of frame c2s2_000021 not found"):
        load_prw(root, "test")
    os.remove(os.path.join(root, "ID_train.mat"))
    with pytest.raises(FileNotFoundError, match="PRW train id list not found"):
        load_prw(root, "train")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_prw(root, "val")


def _rewrite_annotation(root, frame, variables):
    scipy.io.savemat(os.path.join(root, "annotations", f"{frame}.jpg.mat"), variables)


@pytest.mark.parametrize("frame, variables, message", [
    ("c1s2_000010", {"boxes": np.ones((1, 5))},
     "expected a variable named 'box_new' or 'anno_file' or 'anno_previous', found \\['boxes'\\]"),
    ("c1s2_000010", {"box_new": np.ones((2, 4))}, "expected an \\(n, 5\\) numeric array"),
    ("c1s2_000010", {"box_new": np.array([[-5.0, 1, 1, 5, 5]])}, "person id -5"),
    ("c1s2_000010", {"box_new": np.array([[7.0, 10, 10, 0, 5]])},
     "c1s2_000010.jpg: box \\[10.0, 10.0, 10.0, 15.0\\] \\(XYXY\\) is a zero-size box"),
    ("c6s2_000040", {"box_new": np.array([[7.0, 95, 10, 10, 5]])},
     "c6s2_000040.jpg: box \\[95.0, 10.0, 105.0, 15.0\\] .*outside the image \\(90x72\\)"),
])
def test_bad_annotations(fresh_prw, frame, variables, message):
    _rewrite_annotation(fresh_prw["root"], frame, variables)
    with pytest.raises(ValueError, match=message):
        load_prw(fresh_prw["root"], "test")


def test_unknown_train_id_and_unreadable_list(fresh_prw):
    root = fresh_prw["root"]
    _rewrite_annotation(root, "c6s1_000003", {"box_new": np.array([[77.0, 0, 0, 20, 50]])})
    with pytest.raises(ValueError, match="c6s1_000003.jpg.mat: train person id 77 is not in"):
        load_prw(root, "train")
    with open(os.path.join(root, "frame_test.mat"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="PRW test frame list .*frame_test.mat is not a readable"):
        load_prw(root, "test")


# ------------------------------------------------------------------------------------------------
# PRW-mini
# ------------------------------------------------------------------------------------------------

def test_shipped_prw_mini_list():
    lines = prw.read_prw_mini_query_lines()
    assert len(lines) == 30
    fields = [line.split() for line in lines]
    assert all(len(f) == 6 for f in fields)
    assert [int(f[0]) for f in fields] == MINI_PIDS
    assert collections.Counter(prw.camera_id(f[5]) for f in fields) == {c: 5 for c in range(1, 7)}


def test_prw_mini_protocol(tmp_path):
    """The 30 queries against a test set of their 30 frames plus one frame holding pid 484."""
    root = str(tmp_path / "PRW")
    fields = [line.split() for line in prw.read_prw_mini_query_lines()]
    frames = [f[5] for f in fields] + ["c2s9_000001"]
    os.makedirs(os.path.join(root, "annotations"))
    for f in fields:
        _rewrite_annotation(root, f[5], {"box_new": np.array([[float(v) for v in f[:5]]])})
    _rewrite_annotation(root, "c2s9_000001", {"box_new": np.array([[484.0, 1, 2, 30, 60]])})
    cells = np.empty((len(frames), 1), dtype=object)
    for i, frame in enumerate(frames):
        cells[i, 0] = np.array([frame])
    scipy.io.savemat(os.path.join(root, "frame_test.mat"), {"img_index_test": cells})

    protocol = load_prw_mini_protocol(root)
    assert protocol.name == "prw_mini_test" and protocol.dataset == "prw_mini_test"
    assert [q.person_id for q in protocol.queries] == MINI_PIDS
    assert protocol.queries[0].image == "c2s1_159941.jpg" and protocol.queries[0].camera_id == 2
    # 484 849.7009 619.8089 172.6134 440.8639 -> [849, 619, 1022, 1060]
    assert protocol.queries[0].box.tolist() == [849.0, 619.0, 1022.0, 1060.0]
    assert [len(protocol.gallery(i)) for i in (0, 29)] == [30, 30]
    assert protocol.gallery(0).count_gt == 1 and protocol.gallery(1).count_gt == 0
    assert protocol.gallery(0).gt_boxes[-1].tolist() == [1.0, 2.0, 31.0, 62.0]
    cross = load_prw_mini_protocol(root, cross_camera=True)
    assert cross.name == "prw_mini_test/cross_camera"
    assert len(cross.gallery(0)) == 25 and cross.gallery(0).count_gt == 0
