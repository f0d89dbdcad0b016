"""Training records are built once per config object (the epoch schedule, the loader and the
OIM table initialisation all ask for them), and pairs come from the same image records."""
import gc

import pytest
import torch

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


def _negatives_cfg(tmp_path, weights_table=None):
    cfg = tiny_cfg(qsse=True)
    cfg.DATASETS.TRAIN = (NAME,)
    cfg.DATALOADER.PAIRS.NEGATIVES_PER_QUERY = 1
    cfg.DATALOADER.PAIRS.NEGATIVES = "oim_table"
    cfg.DATALOADER.PAIRS.HARD_POOL = 1
    path = tmp_path / "model.pth"
    state = {} if weights_table is None else {"roi_heads.oim_loss.lut": weights_table}
    torch.save({"model": state}, path)
    cfg.MODEL.WEIGHTS = str(path)
    return cfg


def test_hard_negative_pairs_are_mined_from_the_oim_table_of_the_weights(tmp_path):
    """Ids 1, 2, 3 are each in one image (with id 0); the table makes 3 the look-alike of 1."""
    DatasetCatalog.register(NAME, _dicts)
    try:
        table = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0]])
        pairs = build.build_train_records(_negatives_cfg(tmp_path, table))
        negatives = {(p["query_file_name"], p["query_pid"]): p["file_name"] for p in pairs
                     if all(a["person_id"] != p["query_pid"] for a in p["annotations"])}
        # id 0 is everywhere: no negative; ids 1 and 3 are each other's hardest image; for id 2
        # image 3 (cosine 0.11 to id 3) is harder than image 1 (0 to ids 0 and 1)
        assert negatives == {("/img/1.jpg", 1): "/img/3.jpg", ("/img/3.jpg", 3): "/img/1.jpg",
                             ("/img/2.jpg", 2): "/img/3.jpg"}
        with pytest.raises(ValueError, match="needs an OIM table"):
            build.build_train_records(_negatives_cfg(tmp_path))
        cfg = _negatives_cfg(tmp_path, table)
        cfg.DATALOADER.PAIRS.NEGATIVES = "hardest"
        with pytest.raises(ValueError, match='"random" or "oim_table"'):
            build.build_train_records(cfg)
        cfg = _negatives_cfg(tmp_path, table)
        cfg.DATALOADER.PAIRS.NEGATIVES_PER_QUERY = -1
        with pytest.raises(ValueError, match="NEGATIVES_PER_QUERY must be >= 0"):
            build.build_train_records(cfg)
    finally:
        DatasetCatalog.remove(NAME)
