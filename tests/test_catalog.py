"""Data set catalog (names, roots, loaders, protocols) and Detectron2 registration."""
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import dataset_fixtures
import qeeps_d2.data.synthps
from qeeps_d2.data.datasets import builtin, catalog

NAMES = ("cuhk_sysu_train", "cuhk_sysu_test", "prw_train", "prw_test", "prw_mini_test",
         "synthps_train", "synthps_test")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """A $DETECTRON2_DATASETS folder holding the CUHK-SYSU and PRW fixtures."""
    root = tmp_path_factory.mktemp("datasets")
    return {
        "root": str(root),
        "cuhk": dataset_fixtures.make_cuhk_sysu_fixture(str(root / "CUHK-SYSU")),
        "prw": dataset_fixtures.make_prw_fixture(str(root / "PRW")),
    }


@pytest.fixture
def env(datasets, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", datasets["root"])
    return datasets


def test_names_and_roots(monkeypatch, tmp_path):
    assert catalog.DATASET_NAMES == NAMES
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert catalog.datasets_root() == str(tmp_path / "datasets")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    roots = {name: catalog.dataset_root(name) for name in NAMES}
    assert roots == {n: str(tmp_path / "d2" / f) for n, f in zip(NAMES, [
        "CUHK-SYSU", "CUHK-SYSU", "PRW", "PRW", "PRW", "synthps", "synthps"])}
    assert catalog.image_root("prw_mini_test") == str(tmp_path / "d2" / "PRW" / "frames")
    assert catalog.image_root("synthps_test") == str(tmp_path / "d2" / "synthps" / "Image" / "SSM")


@pytest.mark.parametrize("call", [catalog.dataset_root, catalog.load_dataset_dicts,
                                  catalog.load_protocol, catalog.num_pids])
def test_unknown_name_lists_known_ones(call):
    with pytest.raises(ValueError, match="unknown data set 'coco_2017_train'; known: cuhk_sysu"):
        call("coco_2017_train")


@pytest.mark.parametrize("name, fixture, split", [
    ("cuhk_sysu_train", "cuhk", "train"), ("cuhk_sysu_test", "cuhk", "test"),
    ("prw_train", "prw", "train"), ("prw_test", "prw", "test"), ("prw_mini_test", "prw", "test"),
])
def test_load_dataset_dicts(env, name, fixture, split):
    dicts = catalog.load_dataset_dicts(name)
    assert [d["image_id"] for d in dicts] == list(env[fixture][split])


def test_missing_dataset_names_its_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="CUHK-SYSU root folder not found: .*CUHK-SYSU"):
        catalog.load_dataset_dicts("cuhk_sysu_train")


def test_missing_test_set_names_its_root_not_a_gallery_size(monkeypatch, tmp_path):
    """Asking for cuhk_sysu_test without its folder: "not found", not "gallery size 100 is not
    available; available: [-1]"."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="CUHK-SYSU root folder not found: .*CUHK-SYSU"):
        catalog.load_protocol("cuhk_sysu_test", gallery_size=100)


def test_load_protocol(env):
    cuhk = catalog.load_protocol("cuhk_sysu_test")
    assert cuhk.name == "cuhk_sysu_test/G100" and len(cuhk) == 2
    assert catalog.load_protocol("cuhk_sysu_test", gallery_size=-1).name == "cuhk_sysu_test/G-1"
    assert [len(cuhk.gallery(i)) for i in range(2)] == [5, 6]
    prw_std = catalog.load_protocol("prw_test", gallery_size=4000)  # size ignored for PRW
    assert prw_std.name == "prw_test" and len(prw_std.gallery(0)) == 5
    cross = catalog.load_protocol("prw_test", cross_camera=True)
    assert cross.name == "prw_test/cross_camera" and len(cross.gallery(1)) == 4


def test_load_protocol_errors(env):
    with pytest.raises(ValueError, match="gallery size 500 is not available.*\\[50, 100, -1\\]"):
        catalog.load_protocol("cuhk_sysu_test", gallery_size=500)
    with pytest.raises(ValueError, match="cross_camera applies to the PRW"):
        catalog.load_protocol("cuhk_sysu_test", cross_camera=True)
    with pytest.raises(ValueError, match="prw_train is a training set"):
        catalog.load_protocol("prw_train")
    # the fixture's test frames are not PRW-mini's frames
    with pytest.raises(ValueError, match="query frame c2s1_159941 is not a PRW test frame"):
        catalog.load_protocol("prw_mini_test")


def test_num_pids(env):
    assert catalog.num_pids("cuhk_sysu_train") == 2
    assert catalog.num_pids("cuhk_sysu_test") == 2
    assert catalog.num_pids("prw_train") == 3


def test_synthps_is_ensured_before_loading(monkeypatch, tmp_path):
    calls = []

    def fake_ensure(root):
        calls.append(root)
        if not os.path.isdir(root):
            dataset_fixtures.make_cuhk_sysu_fixture(root)
        return root

    monkeypatch.setattr(qeeps_d2.data.synthps, "ensure_synthps", fake_ensure)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert len(catalog.load_dataset_dicts("synthps_train")) == 4
    protocol = catalog.load_protocol("synthps_test", gallery_size=50)
    assert protocol.name == "synthps_test/G50" and protocol.dataset == "synthps_test"
    assert catalog.num_pids("synthps_train") == 2
    assert calls == [str(tmp_path / "synthps")] * 3


# ------------------------------------------------------------------------------------------------
# Detectron2 registration
# ------------------------------------------------------------------------------------------------

def test_every_name_is_registered_with_metadata():
    assert set(NAMES) <= set(DatasetCatalog.list())
    for name in NAMES:
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["person"] and meta.evaluator_type == "person_search"
        assert meta.dataset_root.endswith(catalog._FOLDERS[catalog._DATASETS[name][0]])
        assert meta.image_root.startswith(meta.dataset_root)
    assert MetadataCatalog.get("cuhk_sysu_test").protocol["gallery_sizes"][-1] == -1
    assert MetadataCatalog.get("prw_mini_test").protocol["cross_camera"] is True
    assert not hasattr(MetadataCatalog.get("prw_train"), "protocol")


def test_registered_loaders_read_the_root_at_call_time(env):
    dicts = DatasetCatalog.get("prw_test")
    assert [d["image_id"] for d in dicts] == list(env["prw"]["test"])


def test_registration_is_idempotent_and_lazy(monkeypatch, tmp_path):
    builtin.register_person_search_datasets()  # all registered already: no error
    name = "synthps_test"
    original = MetadataCatalog.get(name).as_dict()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "nowhere"))
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    try:
        builtin.register_person_search_datasets()  # touches no disk: the root does not exist
        assert MetadataCatalog.get(name).dataset_root == str(tmp_path / "nowhere" / "synthps")
        assert not (tmp_path / "nowhere").exists()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        monkeypatch.undo()
        builtin.register_person_search_datasets()
    assert MetadataCatalog.get(name).as_dict() == original
