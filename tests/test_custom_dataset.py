"""Custom person-search data sets (qeeps_d2/data/datasets/custom.py): a built-in set converted by
qeeps-convert-dataset loads and scores exactly as the built-in loader does (CUHK-SYSU, PRW,
PRW-mini, SynthPS); the gallery rules on hand-made sets; bad files give one-line errors naming
the file and the field; registration; training configs size the OIM table from a custom set;
the evaluator and qeeps-eval work with custom names."""
import ast
import copy
import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.structures import Boxes, Instances

import dataset_fixtures
import model_fixtures
import qeeps_d2
from qeeps_d2.data.datasets import catalog, convert, custom, prw
from qeeps_d2.data.datasets.builtin import register_person_search_file
from qeeps_d2.data.synthps import generate_synthps
from qeeps_d2.evaluation.cli import main as eval_main
from qeeps_d2.evaluation.results_file import read_results, write_results

TINY_SYNTHPS = dict(num_train_ids=4, num_test_ids=3, train_images=8, test_images=51,
                    image_size=(96, 72), persons_per_image=(2, 4), appearances_per_id=(2, 6),
                    illumination=1.0, gallery_sizes=(50,))
# PRW-mini's query list, for the fixture's frames (the shipped one names real PRW frames)
MINI_LINES = ["9 20.0000 20.0000 20.0000 40.0000 c2s2_000021",
              "7 -1.7030 20.5000 30.2500 50.7500 c3s3_000030"]
# the protocol settings of each family: (gallery_size, cross_camera)
SETTINGS = {"cuhk_sysu_test": [(50, False), (100, False), (-1, False)],
            "synthps_test": [(50, False), (-1, False)],
            "prw_test": [(100, False), (100, True)],
            "prw_mini_test": [(100, False), (100, True)]}


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """A $DETECTRON2_DATASETS holding the CUHK-SYSU, PRW and SynthPS fixtures."""
    root = tmp_path_factory.mktemp("datasets")
    dataset_fixtures.make_cuhk_sysu_fixture(str(root / "CUHK-SYSU"))
    dataset_fixtures.make_prw_fixture(str(root / "PRW"))
    generate_synthps(str(root / "synthps"), seed=3, **TINY_SYNTHPS)
    return root


@pytest.fixture(autouse=True)
def env(datasets_root, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets_root))
    monkeypatch.setattr(prw, "read_prw_mini_query_lines", lambda: list(MINI_LINES))
    return datasets_root


@pytest.fixture(autouse=True)
def unregister_afterwards():
    """The custom names a test registers go with it (later tests see only their own)."""
    before = set(DatasetCatalog.list())
    yield
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        catalog._CUSTOM.pop(name, None)


def _convert(tmp_path, dataset, suffix=".json", extra=()):
    path = str(tmp_path / f"{dataset}{suffix}")
    assert convert.main(["--dataset", dataset, "--out", path, *extra]) == 0
    return path


def _same_protocol(builtin, converted, builtin_name, custom_name):
    assert converted.name == builtin.name.replace(builtin_name, custom_name)
    assert converted.dataset == custom_name and converted.image_root == builtin.image_root
    assert len(converted) == len(builtin) > 0
    for a, b in zip(builtin.queries, converted.queries):
        assert (a.index, a.image, a.person_id, a.camera_id) == \
            (b.index, b.image, b.person_id, b.camera_id)
        assert a.box.dtype == b.box.dtype and np.array_equal(a.box, b.box)
    for i in range(len(builtin)):
        a, b = builtin.gallery(i), converted.gallery(i)
        assert a.images == b.images, i
        assert np.array_equal(a.gt_boxes, b.gt_boxes, equal_nan=True), i


# ------------------------------------------------------------------------------------------------
# Converted built-in sets read back as the built-in loaders read them
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", catalog.DATASET_NAMES)
def test_converted_set_loads_as_the_builtin(dataset, tmp_path, capsys):
    path = _convert(tmp_path, dataset, ".json.gz" if dataset.startswith("prw") else ".json")
    assert f"{dataset}_json ({dataset})" in capsys.readouterr().out
    name = register_person_search_file(path)
    assert name == f"{dataset}_json"
    builtin_dicts = DatasetCatalog.get(dataset)
    assert DatasetCatalog.get(name) == builtin_dicts and len(builtin_dicts) > 3
    assert catalog.image_root(name) == catalog.image_root(dataset)
    if not catalog.is_test_set(dataset):
        assert not catalog.is_test_set(name)
        assert catalog.num_pids(name) == catalog.num_pids(dataset) >= 2
        return
    assert catalog.is_test_set(name) and name in catalog.test_set_names()
    for gallery_size, cross_camera in SETTINGS[dataset]:
        _same_protocol(catalog.load_protocol(dataset, gallery_size, cross_camera),
                       catalog.load_protocol(name, gallery_size, cross_camera), dataset, name)


def test_cuhk_lists_keep_their_quirks_as_explicit_entries(tmp_path):
    """The fixture's TestG lists list s7 twice, s8 twice with two boxes and the query's own
    image: the file writes names where the first box of the id is the target, objects where it
    is not; the pool order differs from the image order, so it is written too."""
    doc = json.load(open(_convert(tmp_path, "cuhk_sysu_test")))
    protocol = doc["protocol"]
    assert (protocol["gallery"], protocol["gallery_sizes"]) == ("explicit", [50, 100])
    assert protocol["pool"] == ["s7.jpg", "s5.jpg", "s6.jpg", "s8.jpg", "s9.jpg", "s10.jpg"]
    assert protocol["queries"][1]["galleries"]["50"][:2] == [
        "s8.jpg", {"image": "s8.jpg", "box": [40, 10, 60, 60]}]
    assert protocol["queries"][0]["galleries"]["50"][:3] == ["s6.jpg", "s7.jpg", "s7.jpg"]
    assert doc["image_root"] == catalog.image_root("cuhk_sysu_test")


def test_converted_prw_has_cameras_and_the_rule(tmp_path):
    doc = json.load(open(_convert(tmp_path, "prw_test")))
    assert doc["protocol"]["gallery"] == "all_other_images"
    assert doc["protocol"]["queries"][2] == {"image": "c3s3_000030.jpg", "box": [0, 20, 30, 71],
                                             "person_id": 7, "camera_id": 3}
    assert [image["camera_id"] for image in doc["images"]] == [1, 1, 2, 3, 6, 2]
    assert MetadataCatalog.get(register_person_search_file(
        str(tmp_path / "prw_test.json"))).protocol["cross_camera"] is True


# ------------------------------------------------------------------------------------------------
# Results score the same through the custom name
# ------------------------------------------------------------------------------------------------

def _random_results(protocol, seed):
    """Per query: every gallery image gets its target box (jittered) and random boxes, random
    detection scores (some below 0.5) and similarities."""
    rng = np.random.default_rng(seed)
    queries = []
    for i in range(len(protocol)):
        gallery = protocol.gallery(i)
        rows = {}
        for name, gt in zip(gallery.images, gallery.gt_boxes):
            boxes = [gt + rng.uniform(-4, 4, 4)] if not np.isnan(gt[0]) else []
            for _ in range(rng.integers(0, 3)):
                x, y = rng.uniform(0, 50, 2)
                boxes.append(np.array([x, y, x + rng.uniform(10, 30), y + rng.uniform(20, 50)]))
            rows[name] = [list(b) + [rng.uniform(0.3, 1.0), rng.uniform(-1, 1)] for b in boxes]
        queries.append({"index": i, "image": protocol.queries[i].image, "gallery": rows})
    return queries


def _scores(capsys, argv):
    assert eval_main(argv + ["--json"]) == 0
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("dataset", ["cuhk_sysu_test", "prw_test", "synthps_test"])
def test_results_score_the_same_through_the_custom_name(dataset, tmp_path, capsys):
    path = _convert(tmp_path, dataset)
    name = f"{dataset}_json"
    for k, (gallery_size, cross_camera) in enumerate(SETTINGS[dataset]):
        protocol = catalog.load_protocol(dataset, gallery_size, cross_camera)
        queries = _random_results(protocol, seed=k)
        builtin_file, custom_file = str(tmp_path / f"b{k}.json"), str(tmp_path / f"c{k}.json.gz")
        write_results(builtin_file, dataset, queries)
        write_results(custom_file, name, queries)
        options = ["--gallery-size", str(gallery_size)] + ["--cross-camera"] * cross_camera
        _, expected = _scores(capsys, ["--dataset", dataset, *options, builtin_file])
        out, got = _scores(capsys, ["--dataset", path, *options, custom_file])
        for key in ("mAP", "top1", "top5", "top10", "num_queries", "partial"):
            assert got[key] == expected[key], (key, gallery_size, cross_camera)
        assert 0 < got["mAP"] < 1, "a score that cannot tell the protocols apart"
        assert got["dataset"] == name and got["protocol"] == protocol.name.replace(dataset, name)
        setting = ("whole pool" if gallery_size == -1 else f"gallery size {gallery_size}"
                   if not dataset.startswith("prw") else
                   "cross-camera" if cross_camera else "standard")
        assert out.startswith(f"Person search on {name} (") and setting in out.splitlines()[0]


# ------------------------------------------------------------------------------------------------
# The gallery rules on hand-made files
# ------------------------------------------------------------------------------------------------

def _box(pid, x=10, y=10):
    return {"box": [x, y, x + 20, y + 40], "person_id": pid}


def _doc(protocol=None, cameras=(1, 1, 2, 3)):
    """Four 100 x 80 images: a (ids 5, -1), b (5 twice, 8), c (8), d (nobody)."""
    boxes = [[_box(5), _box(-1, 50)], [_box(5, 5), _box(5, 40), _box(8, 60)], [_box(8)], []]
    images = [{"file_name": name, "width": 100, "height": 80, "boxes": b}
              for name, b in zip(["a.jpg", "sub/b.jpg", "c.jpg", "d.jpg"], boxes)]
    if cameras:
        for image, camera in zip(images, cameras):
            image["camera_id"] = camera
    doc = {"format": "qeeps-person-search", "version": 1, "name": "toy_set", "images": images}
    if protocol is not None:
        doc["protocol"] = protocol
    return doc


def _write_doc(tmp_path, doc, name="toy.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def _galleries(protocol):
    return [(protocol.gallery(i).images, protocol.gallery(i).gt_boxes[:, 0].tolist())
            for i in range(len(protocol))]


NAN = float("nan")


def test_all_other_images_and_other_cameras(tmp_path):
    queries = [{"image": "a.jpg", "box": [10, 10, 30, 50], "person_id": 5},
               {"image": "c.jpg", "box": [10, 10, 30, 50], "person_id": 8, "camera_id": 2}]
    qeeps_d2.register_person_search("toy_rule", _write_doc(
        tmp_path, _doc({"gallery": "all_other_images", "queries": queries})))
    standard = catalog.load_protocol("toy_rule")
    assert standard.name == "toy_rule" and standard.queries[1].camera_id == 2
    # the target is the first box of the id in each image (b holds 5 twice)
    got = _galleries(standard)
    assert got[0][0] == ["sub/b.jpg", "c.jpg", "d.jpg"] and got[0][1][0] == 5
    assert np.isnan(got[0][1][1:]).all()
    assert got[1][0] == ["a.jpg", "sub/b.jpg", "d.jpg"] and got[1][1][1] == 60
    cross = catalog.load_protocol("toy_rule", cross_camera=True)
    assert cross.name == "toy_rule/cross_camera"
    assert [g for g, _ in _galleries(cross)] == [["c.jpg", "d.jpg"],
                                                 ["a.jpg", "sub/b.jpg", "d.jpg"]]
    assert MetadataCatalog.get("toy_rule").protocol == {
        "gallery_sizes": (), "default_gallery_size": None, "cross_camera": True}

    qeeps_d2.register_person_search("toy_cams", _write_doc(
        tmp_path, _doc({"gallery": "other_cameras", "queries": queries}), "cams.json"))
    assert [g for g, _ in _galleries(catalog.load_protocol("toy_cams"))] == \
        [g for g, _ in _galleries(cross)]
    qeeps_d2.register_person_search("toy_nocams", _write_doc(
        tmp_path, _doc({"gallery": "all_other_images", "queries": queries[:1]}, cameras=()),
        "nocams.json"))
    with pytest.raises(ValueError, match="toy_nocams has no camera ids: cross_camera needs"):
        catalog.load_protocol("toy_nocams", cross_camera=True)
    assert "camera_id" not in DatasetCatalog.get("toy_nocams")[0]
    assert DatasetCatalog.get("toy_cams")[1]["camera_id"] == 1


def test_explicit_galleries_with_and_without_sizes(tmp_path):
    query = {"image": "a.jpg", "box": [10, 10, 30, 50], "person_id": 5}
    listed = ["c.jpg", {"image": "sub/b.jpg", "box": [40, 10, 60, 50]}, "sub/b.jpg",
              {"image": "c.jpg", "box": None}, {"image": "sub/b.jpg", "box": None}]
    qeeps_d2.register_person_search("toy_list", _write_doc(
        tmp_path, _doc({"gallery": "explicit", "queries": [dict(query, gallery=listed)]})))
    protocol = catalog.load_protocol("toy_list", gallery_size=1234)  # no sizes: ignored
    assert protocol.name == "toy_list"
    images, x1 = _galleries(protocol)[0]
    assert images == ["c.jpg", "sub/b.jpg", "sub/b.jpg", "c.jpg", "sub/b.jpg"]
    np.testing.assert_array_equal(x1, [NAN, 40, 5, NAN, NAN])
    with pytest.raises(ValueError, match="cross_camera does not apply to the explicit"):
        catalog.load_protocol("toy_list", cross_camera=True)

    sized = {"gallery": "explicit", "gallery_sizes": [2, 1], "pool": ["d.jpg", "c.jpg", "a.jpg"],
             "queries": [dict(query, galleries={"1": ["c.jpg"], "2": ["sub/b.jpg", "c.jpg"]})]}
    qeeps_d2.register_person_search("toy_sized", _write_doc(tmp_path, _doc(sized), "sized.json"))
    assert _galleries(catalog.load_protocol("toy_sized", 2))[0][0] == ["sub/b.jpg", "c.jpg"]
    whole = catalog.load_protocol("toy_sized", -1)
    # the smallest size's list, then the pool in its order without the listed and query images
    assert whole.name == "toy_sized/G-1" and _galleries(whole)[0][0] == ["c.jpg", "d.jpg"]
    with pytest.raises(ValueError, match=r"gallery size 100 is not available in .*sized.json; "
                                         r"available: \[2, 1, -1\]"):
        catalog.load_protocol("toy_sized", 100)
    assert MetadataCatalog.get("toy_sized").protocol["default_gallery_size"] == 1


def test_training_set_ids_are_numbered_and_test_ids_kept(tmp_path):
    doc = _doc()
    doc["images"][3]["boxes"] = [_box(42), _box(-1, 50)]
    qeeps_d2.register_person_search("toy_train", _write_doc(tmp_path, doc))
    ids = [[a["person_id"] for a in d["annotations"]] for d in DatasetCatalog.get("toy_train")]
    assert ids == [[0, -1], [0, 0, 1], [1], [2, -1]]  # 5, 8, 42 -> 0, 1, 2
    assert catalog.num_pids("toy_train") == 3
    with pytest.raises(ValueError, match="toy_train is a training set"):
        catalog.load_protocol("toy_train")
    doc["protocol"] = {"gallery": "all_other_images", "queries": [
        {"image": "a.jpg", "box": [10, 10, 30, 50], "person_id": 5}]}
    qeeps_d2.register_person_search("toy_test", _write_doc(tmp_path, doc, "test.json"))
    ids = [[a["person_id"] for a in d["annotations"]] for d in DatasetCatalog.get("toy_test")]
    assert ids == [[5, -1], [5, 5, 8], [8], [42, -1]]
    with pytest.raises(ValueError, match="toy_set is a test set"):
        catalog.num_pids("toy_test")


# ------------------------------------------------------------------------------------------------
# Bad files: one line naming the file and the field
# ------------------------------------------------------------------------------------------------

def _set(path, value):
    """A mutation of the toy document: set ``path`` (keys / indices) to ``value``."""
    def mutate(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return doc
    return mutate


DELETE = object()
QUERY = {"image": "a.jpg", "box": [10, 10, 30, 50], "person_id": 5}
RULE = {"gallery": "all_other_images", "queries": [QUERY]}
EXPLICIT = {"gallery": "explicit", "gallery_sizes": [1, 2],
            "queries": [dict(QUERY, galleries={"1": ["c.jpg"], "2": ["c.jpg", "d.jpg"]})]}

BAD_FILES = {
    # case: (protocol of the toy document, mutation, the message after "<file>: ")
    "x2-before-x1": (None, _set(["images", 1, "boxes", 0, "box"], [12, 5, 10, 30]),
                     "images[1].boxes[0].box: x2 (10) <= x1 (12)"),
    "y2-before-y1": (None, _set(["images", 0, "boxes", 1, "box"], [5, 30, 10, 30]),
                     "images[0].boxes[1].box: y2 (30) <= y1 (30)"),
    "box-outside": (None, _set(["images", 2, "boxes", 0, "box"], [100, 5, 120, 30]),
                    "images[2].boxes[0].box: [100, 5, 120, 30] lies outside its image (100x80)"),
    "box-3-numbers": (None, _set(["images", 2, "boxes", 0, "box"], [1, 2, 3]),
                      "images[2].boxes[0].box: must be [x1, y1, x2, y2], 4 numbers"),
    "box-string": (None, _set(["images", 2, "boxes", 0, "box"], [1, 2, "3", 4]),
                   "images[2].boxes[0].box: must be [x1, y1, x2, y2], 4 numbers"),
    "person-id-below-minus-1": (None, _set(["images", 0, "boxes", 0, "person_id"], -2),
                                "images[0].boxes[0].person_id: must be >= -1, got -2"),
    "person-id-string": (None, _set(["images", 0, "boxes", 0, "person_id"], "5"),
                         "images[0].boxes[0].person_id: must be an integer, got \"5\""),
    "person-id-bool": (None, _set(["images", 0, "boxes", 0, "person_id"], True),
                       "images[0].boxes[0].person_id: must be an integer, got true"),
    "unknown-box-field": (None, _set(["images", 0, "boxes", 0, "pid"], 3),
                          "images[0].boxes[0].pid: unknown field (allowed: box, person_id)"),
    "missing-height": (None, _set(["images", 3, "height"], DELETE),
                       "images[3]: missing field 'height'"),
    "width-zero": (None, _set(["images", 3, "width"], 0), "images[3].width: must be >= 1, got 0"),
    "width-float": (None, _set(["images", 3, "width"], 100.0),
                    "images[3].width: must be an integer, got 100.0"),
    "duplicate-file-name": (None, _set(["images", 2, "file_name"], "a.jpg"),
                            "images[2].file_name: 'a.jpg' is also images[0]'s"),
    "file-name-up": (None, _set(["images", 2, "file_name"], "../c.jpg"),
                     "images[2].file_name: '../c.jpg' must be a normalised path relative"),
    "file-name-absolute": (None, _set(["images", 2, "file_name"], "/c.jpg"),
                           "images[2].file_name: '/c.jpg' must be a normalised path relative"),
    "camera-on-some-images": (None, _set(["images", 2, "camera_id"], DELETE),
                              "images[2].camera_id: missing, but images[0] has one"),
    "camera-negative": (None, _set(["images", 0, "camera_id"], -1),
                        "images[0].camera_id: must be >= 0, got -1"),
    "no-images": (None, _set(["images"], []), "images: must not be empty"),
    "format": (None, _set(["format"], "coco"),
               "format: must be 'qeeps-person-search', got \"coco\""),
    "version": (None, _set(["version"], 2), "version: must be 1 (the version this package reads)"),
    "name": (None, _set(["name"], "my set"), "name: 'my set' must be letters, digits"),
    "name-like-a-file": (None, _set(["name"], "x.json"), "name: 'x.json' must be letters"),
    "unknown-top-field": (None, _set(["imagess"], []), "imagess: unknown field (allowed: format"),
    "rule": (RULE, _set(["protocol", "gallery"], "all"),
             "protocol.gallery: must be one of all_other_images, other_cameras, explicit"),
    "other-cameras-without-cameras": (
        dict(RULE, gallery="other_cameras"),
        lambda doc: [image.pop("camera_id") for image in doc["images"]] and doc,
        "protocol.gallery: 'other_cameras' needs a camera_id on every image"),
    "query-unknown-image": (RULE, _set(["protocol", "queries", 0, "image"], "zz.jpg"),
                            "protocol.queries[0].image: unknown image 'zz.jpg' (not in images)"),
    "query-unlabeled": (RULE, _set(["protocol", "queries", 0, "person_id"], -1),
                        "protocol.queries[0].person_id: must be >= 0, got -1"),
    "query-box-outside": (RULE, _set(["protocol", "queries", 0, "box"], [0, 90, 10, 120]),
                          "protocol.queries[0].box: [0, 90, 10, 120] lies outside its image"),
    "query-camera-mismatch": (RULE, _set(["protocol", "queries", 0, "camera_id"], 4),
                              "protocol.queries[0].camera_id: 4 is not the camera of image "
                              "'a.jpg' (1)"),
    "no-queries": (RULE, _set(["protocol", "queries"], []), "protocol.queries: must not be empty"),
    "gallery-with-a-rule": (RULE, _set(["protocol", "queries", 0, "gallery"], ["c.jpg"]),
                            "protocol.queries[0].gallery: only with \"gallery\": \"explicit\""),
    "sizes-with-a-rule": (RULE, _set(["protocol", "gallery_sizes"], [50]),
                          "protocol.gallery_sizes: only with \"gallery\": \"explicit\""),
    "gallery-unknown-image": (EXPLICIT, _set(["protocol", "queries", 0, "galleries", "2", 1],
                                             "e.jpg"),
                              "protocol.queries[0].galleries.2[1]: unknown image 'e.jpg'"),
    "gallery-entry-box": (EXPLICIT, _set(["protocol", "queries", 0, "galleries", "1", 0],
                                         {"image": "c.jpg", "box": [5, 50, 10, 40]}),
                          "protocol.queries[0].galleries.1[0].box: y2 (40) <= y1 (50)"),
    "gallery-entry-number": (EXPLICIT, _set(["protocol", "queries", 0, "galleries", "1", 0], 3),
                             "protocol.queries[0].galleries.1[0]: must be an image name or"),
    "gallery-size-missing": (EXPLICIT, _set(["protocol", "queries", 0, "galleries", "2"], DELETE),
                             "protocol.queries[0].galleries: missing size 2"),
    "gallery-size-unknown": (EXPLICIT, _set(["protocol", "queries", 0, "galleries", "3"], []),
                             "protocol.queries[0].galleries.3: not a size of "
                             "protocol.gallery_sizes (1, 2)"),
    "gallery-without-sizes": (EXPLICIT, _set(["protocol", "gallery_sizes"], DELETE),
                              "protocol.queries[0].galleries: only with protocol.gallery_sizes"),
    "sizes-twice": (EXPLICIT, _set(["protocol", "gallery_sizes"], [1, 2, 1]),
                    "protocol.gallery_sizes[2]: 1 is listed twice"),
    "pool-twice": (EXPLICIT, _set(["protocol", "pool"], ["a.jpg", "c.jpg", "a.jpg"]),
                   "protocol.pool[2]: 'a.jpg' is listed twice"),
    "pool-with-a-rule": (RULE, _set(["protocol", "pool"], ["a.jpg"]),
                         "protocol.pool: only with \"gallery\": \"explicit\" and gallery_sizes"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_give_one_line_errors(case, tmp_path):
    protocol, mutate, message = BAD_FILES[case]
    good = _doc(copy.deepcopy(protocol))
    custom.read_person_search_file(_write_doc(tmp_path, good, "good.json"))  # the base is fine
    path = _write_doc(tmp_path, mutate(copy.deepcopy(good)), "bad.json")
    with pytest.raises(ValueError) as error:
        custom.read_person_search_file(path)
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"{path}: {message}"), text


@pytest.mark.parametrize("content, message", [
    ("{\"format\": ", "not a readable JSON person-search data set file (Expecting value: line 1"),
    ("[1, 2]", "the file must hold a JSON object, got a list"),
])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^{path}: " + message.replace("(", r"\(")):
        custom.read_person_search_file(str(path))
    with pytest.raises(FileNotFoundError, match="no.json: person-search data set file not found"):
        custom.read_person_search_file(str(tmp_path / "no.json"))
    with pytest.raises(ValueError, match="must end with .json or .json.gz"):
        custom.read_person_search_file(str(tmp_path / "x.txt"))


def test_a_changed_file_is_read_again(tmp_path):
    path = _write_doc(tmp_path, _doc())
    assert len(custom.read_person_search_file(path).file_names) == 4
    doc = _doc()
    doc["images"].pop()
    with open(path, "w") as f:
        f.write(json.dumps(doc) + " " * 50)  # another size: another stamp
    assert len(custom.read_person_search_file(path).file_names) == 3


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------

def test_registration_metadata_names_and_image_root(tmp_path, caplog):
    path = _write_doc(tmp_path, _doc())
    with pytest.raises(ValueError, match=r"toy.json: data set name 'prw_test' is already "
                                         r"registered \(a built-in data set\)"):
        qeeps_d2.register_person_search("prw_test", path)
    DatasetCatalog.register("someone_elses", list)
    try:
        with pytest.raises(ValueError, match="'someone_elses' is already registered"):
            qeeps_d2.register_person_search("someone_elses", path)
    finally:
        DatasetCatalog.remove("someone_elses")
    qeeps_d2.register_person_search("toy_meta", path)
    meta = MetadataCatalog.get("toy_meta")
    assert (meta.thing_classes, meta.evaluator_type) == (["person"], "person_search")
    assert (meta.dataset_root, meta.image_root, meta.json_file) == (
        str(tmp_path), str(tmp_path), path)
    assert not hasattr(meta, "protocol")
    assert "toy_meta" in catalog.registered_names() and "toy_meta" not in catalog.DATASET_NAMES
    assert DatasetCatalog.get("toy_meta")[1]["file_name"] == str(tmp_path / "sub" / "b.jpg")
    assert DatasetCatalog.get("toy_meta")[1]["image_id"] == "sub/b.jpg"

    doc = _doc()
    doc["image_root"] = "pictures"
    moved = _write_doc(tmp_path, doc, "moved.json")
    with caplog.at_level("WARNING"):
        qeeps_d2.register_person_search("toy_meta", moved)  # re-pointed, said in the log
    assert "data set toy_meta re-registered" in caplog.text
    assert MetadataCatalog.get("toy_meta").image_root == str(tmp_path / "pictures")
    assert DatasetCatalog.get("toy_meta")[0]["file_name"] == str(tmp_path / "pictures" / "a.jpg")
    qeeps_d2.register_person_search("toy_meta", moved, image_root=str(tmp_path / "elsewhere"))
    assert DatasetCatalog.get("toy_meta")[0]["file_name"] == str(tmp_path / "elsewhere" / "a.jpg")


def test_custom_data_set_file_is_numpy_only():
    source = open(custom.__file__).read()
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert imported <= {"__future__", "gzip", "json", "logging", "math", "os", "re",
                        "dataclasses", "typing", "numpy"}, imported


# ------------------------------------------------------------------------------------------------
# Training configs, the evaluator, qeeps-eval
# ------------------------------------------------------------------------------------------------

def _config(tmp_path):
    cfg = model_fixtures.tiny_cfg()
    cfg.MODEL.QEEPS.OIM.NUM_PIDS = 0
    cfg.SOLVER.EPOCHS = 0
    cfg.DATASETS.TEST = ()
    path = tmp_path / "tiny.yaml"
    path.write_text(cfg.dump())
    return str(path)


def test_training_config_sizes_the_oim_table_from_a_custom_set(tmp_path, monkeypatch):
    from qeeps_d2.data.build import build_train_records
    from qeeps_d2.engine.input_checks import check_train_net_inputs
    from qeeps_d2.engine.trainer import setup_cfg

    doc = _doc()
    doc["name"] = "toy_train_cfg"
    doc["images"][3]["boxes"] = [_box(42)]
    _write_doc(tmp_path, doc, "train.json")
    test = _convert(tmp_path, "prw_test")
    monkeypatch.chdir(tmp_path)  # file paths relative to the working directory
    opts = ["DATASETS.PERSON_SEARCH_FILES", '("train.json", "prw_test.json")',
            "DATASETS.TRAIN", '("toy_train_cfg",)', "DATASETS.TEST", '("prw_test_json",)']
    check_train_net_inputs(_config(tmp_path), opts, eval_only=False)
    cfg = setup_cfg(_config(tmp_path), opts, resolve_schedule=False)
    assert cfg.MODEL.QEEPS.OIM.NUM_PIDS == 3  # ids 5, 8, 42
    pids = {a["person_id"] for r in build_train_records(cfg) for a in r["annotations"]}
    assert pids == {-1, 0, 1, 2}
    assert catalog.dataset_file("prw_test_json") == test

    cuhk = _convert(tmp_path, "cuhk_sysu_train", extra=["--name", "cuhk_cfg"])
    cfg = setup_cfg(_config(tmp_path), ["DATASETS.PERSON_SEARCH_FILES", f'("{cuhk}",)',
                                        "DATASETS.TRAIN", '("cuhk_cfg",)'],
                    resolve_schedule=False)
    assert cfg.MODEL.QEEPS.OIM.NUM_PIDS == catalog.num_pids("cuhk_sysu_train") == 2

    with pytest.raises(ValueError, match="DATASETS.TRAIN: unknown data set 'toy_train_cgf'; the "
                                         "person-search sets are cuhk_sysu_train.*toy_train_cfg"):
        check_train_net_inputs(_config(tmp_path), opts[:2] + [
            "DATASETS.TRAIN", '("toy_train_cgf",)'], eval_only=False)
    doc["images"][0]["boxes"][0]["box"] = [30, 10, 20, 50]
    _write_doc(tmp_path, doc, "train.json")
    with pytest.raises(ValueError, match=r"train.json: images\[0\].boxes\[0\].box: x2 \(20\) <= "):
        check_train_net_inputs(_config(tmp_path), opts, eval_only=False)
    doc["images"][0]["boxes"][0]["box"] = [10, 10, 30, 50]
    doc["name"] = "prw_test_json"
    _write_doc(tmp_path, doc, "train.json")
    with pytest.raises(ValueError, match="name 'prw_test_json' is also the name of train.json"):
        check_train_net_inputs(_config(tmp_path), opts, eval_only=False)


def _fake_model(dicts, protocol):
    """A query-agnostic model that 'detects' every annotated person with an embedding of its
    identity (one-hot, plus seeded noise) and embeds each query the same way."""
    rng = np.random.default_rng(0)
    boxes_of = {d["image_id"]: d["annotations"] for d in dicts}

    def embed(pid):
        e = np.eye(1000)[pid % 1000] * (pid >= 0) + rng.normal(0, 0.3, 1000)
        return e / np.linalg.norm(e)

    def model(inputs):
        outputs = []
        for x in inputs:
            if "query_box" in x:
                pid = protocol.queries[x["query_index"]].person_id
                outputs.append({"query_embed": torch.tensor(embed(pid), dtype=torch.float32)})
                continue
            anns = boxes_of[x["image_id"]]
            inst = Instances((x["height"], x["width"]))
            inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4))
            inst.scores = torch.full((len(anns),), 0.9)
            inst.pred_embeds = torch.tensor(np.array([embed(a["person_id"]) for a in anns]),
                                            dtype=torch.float32).reshape(len(anns), -1)
            outputs.append({"instances": inst})
        return outputs

    return model


def test_evaluator_results_file_and_qeeps_eval_on_a_custom_set(tmp_path, capsys):
    """The trainer's evaluator on a custom test set: its results file names the set, and
    qeeps-eval scores that file through the data set file to the evaluator's numbers."""
    from qeeps_d2.data.build import build_person_search_test_loader
    from qeeps_d2.evaluation.build import build_person_search_evaluator

    name = register_person_search_file(_convert(tmp_path, "prw_test"))
    cfg = model_fixtures.tiny_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.DATALOADER.NUM_WORKERS = 0
    evaluator = build_person_search_evaluator(cfg, name)
    model = _fake_model(DatasetCatalog.get(name), catalog.load_protocol(name))
    results = inference_on_dataset(model, build_person_search_test_loader(cfg, name), evaluator)
    search = results["person_search"]
    assert 0 < search["mAP"] < 100 and search["num_queries"] == 3
    path = str(tmp_path / "out" / "inference" / f"{name}_results.json.gz")
    assert read_results(path).dataset == name
    _, got = _scores(capsys, ["--dataset", str(tmp_path / "prw_test.json"), path])
    assert 100 * got["mAP"] == pytest.approx(search["mAP"])
    assert 100 * got["top1"] == pytest.approx(search["top1"])


def test_qeeps_eval_names_and_errors(tmp_path, capsys):
    path = _convert(tmp_path, "cuhk_sysu_test")
    results = str(tmp_path / "r.json")
    write_results(results, "cuhk_sysu_test_json", [])
    # a name registered in this process works as a name too
    register_person_search_file(path)
    assert eval_main(["--dataset", "cuhk_sysu_test_json", "--gallery-size", "50", results]) == 0
    assert "Person search on cuhk_sysu_test_json (gallery size 50)" in capsys.readouterr().out

    def error(argv):
        assert eval_main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qeeps-eval: error: "), lines
        return lines[0]

    assert "--dataset: unknown test set 'coco'; registered test sets: cuhk_sysu_test, " \
        in error(["--dataset", "coco", results])
    assert "cuhk_sysu_test_json" in error(["--dataset", "coco", results])
    assert "--dataset: cuhk_sysu_train is a training set" in error(
        ["--dataset", "cuhk_sysu_train", results])
    assert "gallery size 500 is not available in" in error(
        ["--dataset", path, "--gallery-size", "500", results])
    assert "no.json: person-search data set file not found" in error(
        ["--dataset", str(tmp_path / "no.json"), results])
    stray = str(tmp_path / "stray.json")
    write_results(stray, "never_registered", [])
    assert "unknown dataset 'never_registered'" in error(["--dataset", path, stray])
