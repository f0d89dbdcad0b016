"""CUHK-SYSU writer, reader and protocol on a tiny official-format fixture (dataset_fixtures)."""
import json
import logging
import os

import numpy as np
import pytest
import scipy.io

import dataset_fixtures
from qeeps_d2.data.datasets import cuhk_sysu
from qeeps_d2.data.datasets.cuhk_sysu import load_cuhk_sysu, load_cuhk_sysu_protocol, write_cuhk_sysu
from qeeps_d2.evaluation.cli import main as qeeps_eval
from qeeps_d2.evaluation.results_file import write_results

ANNOTATION = os.path.join("annotation")
TRAIN_TEST = os.path.join("annotation", "test", "train_test")


@pytest.fixture(scope="module")
def cuhk(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cuhk") / "CUHK-SYSU")
    return dataset_fixtures.make_cuhk_sysu_fixture(root)


@pytest.fixture
def fresh_cuhk(tmp_path):
    """A private copy to modify."""
    return dataset_fixtures.make_cuhk_sysu_fixture(str(tmp_path / "CUHK-SYSU"))


def _rewrite(root, images=None, galleries=None):
    """Rewrite the fixture's annotation with other ``images`` or gallery lists (size -> lists)."""
    images = images or [(n, np.array(b)) for n, b in dataset_fixtures._CUHK_IMAGES.items()]
    galleries = galleries or dataset_fixtures._CUHK_GALLERIES
    test = {s: list(zip(dataset_fixtures._CUHK_QUERIES, g)) for s, g in galleries.items()}
    write_cuhk_sysu(root, images, dataset_fixtures._CUHK_POOL, dataset_fixtures._CUHK_TRAIN, test)


def _as_expected(dicts):
    return {d["image_id"]: [(a["bbox"], a["person_id"]) for a in d["annotations"]] for d in dicts}


# ------------------------------------------------------------------------------------------------
# writer
# ------------------------------------------------------------------------------------------------

def test_writer_layout_matches_the_official_positional_access(cuhk):
    root = cuhk["root"]
    img = scipy.io.loadmat(os.path.join(root, ANNOTATION, "Images.mat"))["Img"]
    assert img.shape == (1, 10)
    first = img.squeeze()[0]
    assert str(first[0][0]) == "s1.jpg" and first[1][0, 0] == 3
    boxes = [b[0] for b in first[2][0]]
    assert boxes[0].dtype == np.uint16 and boxes[0].shape == (1, 4)
    assert boxes[0].tolist() == [[10, 10, 20, 40]]

    pool = scipy.io.loadmat(os.path.join(root, ANNOTATION, "pool.mat"))["pool"]
    assert [str(a[0]) for a in pool.squeeze()] == dataset_fixtures._CUHK_POOL

    train = scipy.io.loadmat(os.path.join(root, TRAIN_TEST, "Train.mat"))["Train"].squeeze()
    assert len(train) == 2
    assert train[1][0, 0][0][0] == "p2"
    scenes = train[1][0, 0][2].squeeze()
    assert [str(s[0][0]) for s in scenes] == ["s2.jpg", "s3.jpg", "s4.jpg"]

    testg = scipy.io.loadmat(os.path.join(root, TRAIN_TEST, "TestG50.mat"))["TestG50"].squeeze()
    assert testg.shape == (2,)
    query = testg["Query"][1]
    assert query["imname"][0, 0][0] == "s6.jpg" and query["idname"][0, 0][0] == "p11"
    assert query["idlocate"][0, 0][0].tolist() == [60, 10, 20, 50]
    assert query["idlocate"][0, 0].dtype == np.uint16 and query["ishard"][0, 0][0, 0] == 1
    gallery = testg["Gallery"][0].squeeze()
    assert len(gallery) == 6
    negative = gallery[4]
    assert str(negative[0][0]) == "s8.jpg"
    assert negative[1].shape == (1, 0) and negative[1].dtype == np.float64


def test_writer_is_byte_deterministic(tmp_path):
    a = dataset_fixtures.make_cuhk_sysu_fixture(str(tmp_path / "a"))["root"]
    b = dataset_fixtures.make_cuhk_sysu_fixture(str(tmp_path / "b"))["root"]
    for rel in ["annotation/Images.mat", "annotation/pool.mat",
                "annotation/test/train_test/Train.mat", "annotation/test/train_test/TestG100.mat"]:
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel


@pytest.mark.parametrize("change, message", [
    (lambda a: a["test"][50][0][1].insert(0, ("s9.jpg", None)), "positives must come first"),
    (lambda a: a["test"].pop(50), "gallery size 50"),
    (lambda a: a["test"][100].pop(), "queries of TestG50"),
    (lambda a: a["images"].append(("s11.jpg", np.array([[1, 2, -3, 4]]))), "0..65535"),
    (lambda a: a["images"].append(("s11.jpg", np.zeros((0, 4)))), "no person box"),
    (lambda a: a["pool"].append("s99.jpg"), "not in images"),
    (lambda a: a["train"].append(("p3", [("s5.jpg", [10, 10, 20, 50])])), "not a train image"),
])
def test_writer_rejects_inconsistent_input(tmp_path, change, message):
    args = {
        "images": [("s1.jpg", np.array([[1, 1, 5, 5]])), ("s5.jpg", np.array([[1, 1, 5, 5]])),
                   ("s9.jpg", np.array([[2, 2, 5, 5]]))],
        "pool": ["s5.jpg", "s9.jpg"],
        "train": [("p1", [("s1.jpg", [1, 1, 5, 5])])],
        "test": {size: [(("s5.jpg", [1, 1, 5, 5], "p2", 0), [("s5.jpg", [1, 1, 5, 5])])]
                 for size in (50, 100)},
    }
    change(args)
    with pytest.raises(ValueError, match=message):
        write_cuhk_sysu(str(tmp_path), **args)


# ------------------------------------------------------------------------------------------------
# dataset dicts
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test"])
def test_split_dicts_match_expectations(cuhk, split, caplog):
    with caplog.at_level(logging.INFO, logger="qeeps_d2.data.datasets.cuhk_sysu"):
        dicts = load_cuhk_sysu(cuhk["root"], split)
    assert _as_expected(dicts) == cuhk[split]
    assert [d["image_id"] for d in dicts] == list(cuhk[split])  # Images.mat order
    for d in dicts:
        assert d["file_name"] == os.path.join(os.path.abspath(cuhk["root"]), "Image", "SSM",
                                              d["image_id"])
        assert (d["height"], d["width"]) == cuhk["image_sizes"][d["image_id"]]
        assert all(a["bbox_mode"] == 0 and a["category_id"] == 0 for a in d["annotations"])
    assert f"dropped {cuhk['dropped_boxes'][split]} boxes" in caplog.text


def test_uint16_boxes_are_cast_before_adding_width(cuhk):
    s3 = {d["image_id"]: d for d in load_cuhk_sysu(cuhk["root"], "train")}["s3.jpg"]
    assert s3["annotations"][1]["bbox"] == [90.0, 30.0, 65620.0, 70.0]


def test_unmatched_train_box_is_logged_not_labeled(cuhk, caplog):
    with caplog.at_level(logging.WARNING, logger="qeeps_d2.data.datasets.cuhk_sysu"):
        dicts = load_cuhk_sysu(cuhk["root"], "train")
    assert "1 labeled boxes match no box" in caplog.text and "s4.jpg" in caplog.text
    pids = [a["person_id"] for d in dicts for a in d["annotations"]]
    assert sorted(pids) == [-1, -1, -1, 0, 0, 1, 1]


def test_num_train_pids_and_gallery_sizes(cuhk):
    assert cuhk_sysu.num_train_pids(cuhk["root"]) == 2
    assert cuhk_sysu.available_gallery_sizes(cuhk["root"]) == [50, 100, -1]


# ------------------------------------------------------------------------------------------------
# protocol
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [50, 100, -1])
def test_protocol_matches_expectations(cuhk, size):
    protocol = load_cuhk_sysu_protocol(cuhk["root"], size)
    assert protocol.name == f"cuhk_sysu_test/G{size}" and protocol.dataset == "cuhk_sysu_test"
    assert protocol.image_root == os.path.join(os.path.abspath(cuhk["root"]), "Image", "SSM")
    assert [(q.image, q.box.tolist(), q.person_id) for q in protocol.queries] == cuhk["queries"]
    assert [q.index for q in protocol.queries] == [0, 1]
    for i, expected in enumerate(cuhk["galleries"][size]):
        gallery = protocol.gallery(i)
        assert gallery.images == [name for name, _ in expected]
        got = [None if np.isnan(b[0]) else b.tolist() for b in gallery.gt_boxes]
        assert got == [box for _, box in expected]


def test_protocol_keeps_reference_quirks(cuhk):
    g50 = load_cuhk_sysu_protocol(cuhk["root"], 50)
    first = g50.gallery(0)
    assert first.images.count("s7.jpg") == 2 and "s5.jpg" in first.images  # dup + self entry
    assert first.count_gt == 4
    whole = load_cuhk_sysu_protocol(cuhk["root"], -1)  # psdb.py's full set keeps them too
    assert whole.gallery(0).images[:len(first)] == first.images
    assert whole.gallery(0).count_gt == 4 and whole.gallery(1).count_gt == 2


def test_full_set_is_psdb_full_set(fresh_cuhk):
    """gallery_size=-1 as psdb.py: the TestG50 list as is (self and duplicate entries kept), then
    the pool images neither listed nor the query's own, in pool order, as negatives."""
    root = fresh_cuhk["root"]
    g50 = dataset_fixtures._CUHK_GALLERIES[50]
    _rewrite(root, galleries={50: [g50[0], g50[1][:3]]})  # query 1 (s6.jpg): s8 twice, s5
    whole = load_cuhk_sysu_protocol(root, -1)
    first, second = whole.gallery(0), whole.gallery(1)
    assert first.images == ["s6.jpg", "s7.jpg", "s7.jpg", "s5.jpg", "s8.jpg", "s9.jpg", "s10.jpg"]
    assert first.positive.tolist() == [True] * 4 + [False] * 3 and first.count_gt == 4
    # pool order s7, s5, s6, s8, s9, s10: s6 is the query image, s5 and s8 are listed
    assert second.images == ["s8.jpg", "s8.jpg", "s5.jpg", "s7.jpg", "s9.jpg", "s10.jpg"]
    assert second.gt_boxes[:2].tolist() == [[10, 10, 30, 60], [40, 10, 60, 60]]
    assert second.count_gt == 2 and not second.positive[2:].any()


def test_full_set_scores_results_made_by_the_reference_rule(cuhk, tmp_path, monkeypatch, capsys):
    """Detections in query 0's own image (a TestG50 entry) are accepted and scored as psdb.py
    does; query 1's own image, in no list, is not in its gallery."""
    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.dirname(cuhk["root"]))
    queries = [
        {"index": 0, "image": "s5.jpg", "gallery": {
            "s6.jpg": [[5, 5, 30, 65, 0.9, 0.8]], "s5.jpg": [[10, 10, 30, 60, 0.9, 0.7]],
            "s10.jpg": [[0, 0, 30, 60, 0.9, 0.6]], "s8.jpg": [[10, 10, 30, 60, 0.9, 0.5]],
            "s7.jpg": [[20, 20, 40, 60, 0.9, 0.3]]}},
        {"index": 1, "image": "s6.jpg", "gallery": {
            "s8.jpg": [[10, 10, 30, 60, 0.9, 0.4]], "s7.jpg": [[20, 20, 40, 60, 0.9, 0.6]]}},
    ]
    path = str(tmp_path / "full.json")
    argv = ["--dataset", "cuhk_sysu_test", "--gallery-size", "-1", "--json", path]
    write_results(path, "cuhk_sysu_test", queries)
    assert qeeps_eval(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # q0, 4 targets: 0.8 (TP) 0.7 (TP, s5) 0.6 0.5 0.3 0.3 (TP TP, s7 listed twice):
    #   AP 1/4 + 1/4 + 2/4 * 4/6 = 5/6; q1: 0.6 0.4 (TP) 0.4 -> 1/3 * recall 1/2
    assert got["mAP"] == pytest.approx((5 / 6 + 1 / 6) / 2) and got["top1"] == 0.5
    queries[1]["gallery"]["s6.jpg"] = [[60, 10, 80, 60, 0.9, 0.9]]
    write_results(path, "cuhk_sysu_test", queries)
    assert qeeps_eval(argv) == 2
    assert "query 1: image 's6.jpg' is not in its gallery" in capsys.readouterr().err


def test_protocol_rejects_bad_sizes_and_missing_files(cuhk):
    with pytest.raises(ValueError, match="gallery_size must be one of"):
        load_cuhk_sysu_protocol(cuhk["root"], 75)
    with pytest.raises(FileNotFoundError, match="TestG500.mat"):
        load_cuhk_sysu_protocol(cuhk["root"], 500)


def test_protocol_rejects_testg_with_other_queries(fresh_cuhk):
    root = fresh_cuhk["root"]
    path = os.path.join(root, TRAIN_TEST, "TestG100.mat")
    testg = scipy.io.loadmat(path)["TestG100"]
    testg["Query"][0, 1]["idlocate"][0, 0][0, 0] += 1
    scipy.io.savemat(path, {"TestG100": testg})
    with pytest.raises(ValueError, match="query 1 differs from TestG50"):
        load_cuhk_sysu_protocol(root, 100)


# ------------------------------------------------------------------------------------------------
# bad input and cache
# ------------------------------------------------------------------------------------------------

def test_missing_root_and_files(fresh_cuhk, tmp_path):
    with pytest.raises(FileNotFoundError, match="CUHK-SYSU root folder not found"):
        load_cuhk_sysu(str(tmp_path / "nowhere"), "train")
    root = fresh_cuhk["root"]
    os.remove(os.path.join(root, "Image", "SSM", "s9.jpg"))
    with pytest.raises(FileNotFoundError, match="image not found: .*s9.jpg"):
        load_cuhk_sysu(root, "test")
    os.remove(os.path.join(root, ANNOTATION, "pool.mat"))
    with pytest.raises(FileNotFoundError, match="test pool list not found: .*pool.mat"):
        load_cuhk_sysu(root, "train")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_cuhk_sysu(root, "val")


def test_unreadable_and_wrong_layout_mat(fresh_cuhk):
    root = fresh_cuhk["root"]
    images = os.path.join(root, ANNOTATION, "Images.mat")
    with open(images, "wb") as f:
        f.write(b"not a mat file at all")
    with pytest.raises(ValueError, match="image list .*Images.mat is not a readable .mat file"):
        load_cuhk_sysu(root, "train")
    scipy.io.savemat(images, {"Img": np.zeros((1, 3))})
    with pytest.raises(ValueError, match="Images.mat: expected 'Img' struct array"):
        load_cuhk_sysu(root, "train")
    scipy.io.savemat(images, {"Images": np.zeros((1, 3))})
    with pytest.raises(ValueError, match="expected a variable named 'Img', found \\['Images'\\]"):
        load_cuhk_sysu(root, "train")


def test_box_outside_image_and_unknown_pool_image(fresh_cuhk):
    root = fresh_cuhk["root"]
    images = [(n, np.array(b)) for n, b in dataset_fixtures._CUHK_IMAGES.items()]
    images[-2] = ("s9.jpg", np.array([[100, 30, 20, 40]]))  # x1 == width 100
    _rewrite(root, images=images)
    with pytest.raises(ValueError, match=r"s9.jpg: box \[100.0, 30.0, 120.0, 70.0\].*outside"):
        load_cuhk_sysu(root, "test")
    pool_path = os.path.join(root, ANNOTATION, "pool.mat")
    scipy.io.savemat(pool_path, {"pool": np.array(["s5.jpg", "s77.jpg"], dtype=object)[:, None]})
    with pytest.raises(ValueError, match="pool images are not in Images.mat.*s77.jpg"):
        load_cuhk_sysu(root, "train")


def test_parsed_files_are_cached_and_invalidated(fresh_cuhk, monkeypatch):
    root = fresh_cuhk["root"]
    expected = _as_expected(load_cuhk_sysu(root, "test"))
    assert os.listdir(os.path.join(root, ".cache", "qeeps_d2"))

    def no_loadmat(*args, **kwargs):
        raise AssertionError("loadmat called although the cache is valid")

    monkeypatch.setattr(scipy.io, "loadmat", no_loadmat)
    assert _as_expected(load_cuhk_sysu(root, "test")) == expected
    monkeypatch.undo()
    pool_path = os.path.join(root, ANNOTATION, "pool.mat")
    scipy.io.savemat(pool_path, {"pool": np.array(["s5.jpg"], dtype=object)[:, None]})
    assert list(_as_expected(load_cuhk_sysu(root, "test"))) == ["s5.jpg"]


def test_cache_falls_back_to_user_folder_then_to_none(fresh_cuhk, tmp_path, monkeypatch):
    root = fresh_cuhk["root"]
    with open(os.path.join(root, ".cache"), "w"):  # a file: the root's cache folder cannot exist
        pass
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    assert len(load_cuhk_sysu(root, "test")) == 6
    assert any(n.startswith("cuhk_images-") for n in os.listdir(tmp_path / "user" / "qeeps_d2"))
    monkeypatch.setenv("XDG_CACHE_HOME", os.path.join(root, ".cache"))  # not writable either
    assert len(load_cuhk_sysu(root, "train")) == 4


def test_cache_can_be_disabled(fresh_cuhk, monkeypatch):
    monkeypatch.setenv("QEEPS_D2_NO_CACHE", "1")
    assert len(load_cuhk_sysu(fresh_cuhk["root"], "test")) == 6
    assert not os.path.exists(os.path.join(fresh_cuhk["root"], ".cache"))
