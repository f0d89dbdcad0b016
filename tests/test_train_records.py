"""Training records are built once per config object (the epoch schedule, the loader and the
OIM table initialisation all ask for them), and pairs come from the same image records."""
import gc

from detectron2.data import DatasetCatalog

import qeeps_d2.data.build as build
from model_fixtures import tiny_cfg

NAME = "toy_train_records"


def _dicts():
    person = lambda pid: {"bbox": [0, 0, 10, 20], "bbox_mode": 0, "category_id": 0,
                          "person_id": pid}
    return [{"file_name": f"/img/{i}.jpg", "image_id": f"{i}.jpg", "height": 40, "width": 40,
             "annotations": [person(0), person(i)]} for i in range(1, 4)]


def test_records_are_built_once_per_config(monkeypatch):
    calls = []
    DatasetCatalog.register(NAME, lambda: calls.append(1) or _dicts())
    try:
        cfg = tiny_cfg(qsse=True)
        cfg.DATASETS.TRAIN = (NAME,)
        images = build.train_image_records(cfg)
        pairs = build.build_train_records(cfg)
        assert build.build_train_records(cfg) is pairs and build.train_image_records(cfg) is images
        assert len(calls) == 1
        # identity 0 is in all three images: 2 galleries per query box of it
        assert len(pairs) == 6 and all(p["query_pid"] == 0 for p in pairs)
        other = cfg.clone()
        other.MODEL.QEEPS.QSSE.ENABLED = False  # query-agnostic: the images themselves
        assert build.build_train_records(other) == images and len(calls) == 2
        key = id(cfg)
        del cfg, images, pairs
        gc.collect()
        assert key not in build._RECORDS  # the cache entry goes with its config
    finally:
        DatasetCatalog.remove(NAME)
