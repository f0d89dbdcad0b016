"""Registers the built-in person-search data sets with Detectron2 (on import of ``qeeps_d2``).

Every name of :data:`qeeps_d2.data.datasets.catalog.DATASET_NAMES` goes into ``DatasetCatalog``
as a lazy loader (nothing is read from disk until ``DatasetCatalog.get``) and into
``MetadataCatalog`` with

* ``thing_classes=["person"]``, ``evaluator_type="person_search"``;
* ``dataset_root`` and ``image_root``: where the data set is expected, from
  ``$DETECTRON2_DATASETS`` as set at registration time (the loaders themselves read the variable
  at call time, see :mod:`qeeps_d2.data.datasets.catalog`);
* test sets only: ``protocol``, a dict describing what ``catalog.load_protocol(name,
  gallery_size, cross_camera)`` accepts: ``gallery_sizes`` (the possible CUHK-SYSU style sizes,
  empty for PRW), ``default_gallery_size`` and ``cross_camera`` (whether that option applies).
"""
from __future__ import annotations

import functools

from detectron2.data import DatasetCatalog, MetadataCatalog

from . import catalog
from .cuhk_sysu import GALLERY_SIZES

__all__ = ["register_person_search_datasets"]


def _protocol_info(name: str) -> dict:
    if name.startswith("prw"):
        return {"gallery_sizes": (), "default_gallery_size": None, "cross_camera": True}
    return {"gallery_sizes": GALLERY_SIZES + (-1,), "default_gallery_size": 100,
            "cross_camera": False}


def register_person_search_datasets() -> None:
    """Register every built-in data set; names already in ``DatasetCatalog`` are left alone."""
    registered = set(DatasetCatalog.list())
    for name in catalog.DATASET_NAMES:
        if name in registered:
            continue
        DatasetCatalog.register(name, functools.partial(catalog.load_dataset_dicts, name))
        metadata = {
            "thing_classes": ["person"],
            "evaluator_type": "person_search",
            "dataset_root": catalog.dataset_root(name),
            "image_root": catalog.image_root(name),
        }
        if name.endswith("_test"):
            metadata["protocol"] = _protocol_info(name)
        MetadataCatalog.get(name).set(**metadata)


register_person_search_datasets()
