"""Registers the person-search data sets with Detectron2: the built-in ones (on import of
``qeeps_d2``) and custom ones (:func:`register_person_search`, one JSON file each).

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

A custom set gets the same metadata (``dataset_root``: the folder of its file) plus
``json_file``; its file is read and checked when it is registered.
"""
from __future__ import annotations

import functools
import logging
from typing import List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from . import catalog
from .custom import read_person_search_file

__all__ = ["register_person_search_datasets", "register_person_search",
           "register_person_search_file", "register_person_search_files"]

logger = logging.getLogger(__name__)


def _metadata(name: str) -> dict:
    metadata = {
        "thing_classes": ["person"],
        "evaluator_type": "person_search",
        "dataset_root": catalog.dataset_root(name),
        "image_root": catalog.image_root(name),
    }
    if catalog.is_test_set(name):
        metadata["protocol"] = catalog.protocol_info(name)
    return metadata


def register_person_search_datasets() -> None:
    """Register every built-in data set; names already in ``DatasetCatalog`` are left alone."""
    registered = set(DatasetCatalog.list())
    for name in catalog.DATASET_NAMES:
        if name in registered:
            continue
        DatasetCatalog.register(name, functools.partial(catalog.load_dataset_dicts, name))
        MetadataCatalog.get(name).set(**_metadata(name))


def register_person_search(name: str, json_file: str, image_root: Optional[str] = None) -> None:
    """Register the custom data set of ``json_file`` (format: :mod:`.custom`) as ``name``.

    The file is read and checked now. Afterwards every tool takes ``name``: ``DATASETS.TRAIN``
    (the OIM table is sized from its identities), ``DATASETS.TEST`` and the evaluators (if the
    file has a protocol), ``catalog.load_dataset_dicts`` / ``load_protocol`` / ``num_pids``,
    results files. Registering a custom name again re-points it (logged).

    Args:
        name: the data set name (not a built-in one, nor one registered by other code).
        json_file: the data set file.
        image_root: folder of the images; default: the file's ``image_root``.
    Raises:
        FileNotFoundError / ValueError: a missing or malformed file (one line naming the file
            and the field), a name already taken.
    """
    known = set(DatasetCatalog.list())
    custom = catalog.is_registered(name) and name not in catalog.DATASET_NAMES
    if name in known and not custom:
        owner = "a built-in data set" if name in catalog.DATASET_NAMES else "by other code"
        raise ValueError(f"{json_file}: data set name {name!r} is already registered ({owner}); "
                         "choose another name")
    before = (catalog.dataset_file(name), catalog.image_root(name)) if custom else None
    catalog.add_person_search_file(name, json_file, image_root)
    if name in known:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, functools.partial(catalog.load_dataset_dicts, name))
    MetadataCatalog.get(name).set(json_file=catalog.dataset_file(name), **_metadata(name))
    after = (catalog.dataset_file(name), catalog.image_root(name))
    if before is not None and before != after:
        logger.warning("data set %s re-registered: %s (images in %s), before: %s (images in %s)",
                       name, *after, *before)


def register_person_search_file(json_file: str, image_root: Optional[str] = None) -> str:
    """:func:`register_person_search` under the ``"name"`` the file holds; returns the name."""
    name = read_person_search_file(json_file).name
    register_person_search(name, json_file, image_root)
    return name


def register_person_search_files(json_files: Sequence[str]) -> List[str]:
    """Register each file under its ``"name"`` (``DATASETS.PERSON_SEARCH_FILES``); returns the
    names.

    Raises:
        ValueError: as :func:`register_person_search`, or two files holding the same name.
    """
    names, origin = [], {}
    for path in json_files:
        name = read_person_search_file(path).name
        if name in origin:
            raise ValueError(f"{path}: name {name!r} is also the name of {origin[name]}; data "
                             "set names must differ")
        origin[name] = path
        names.append(name)
    for path in json_files:
        register_person_search_file(path)
    return names


register_person_search_datasets()
