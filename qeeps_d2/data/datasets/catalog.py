"""The built-in person-search data sets: names, roots, loaders and protocols (numpy only).

=================  ====================================  =============================
name               root under ``$DETECTRON2_DATASETS``   content
=================  ====================================  =============================
cuhk_sysu_train    ``CUHK-SYSU/``                        CUHK-SYSU train images
cuhk_sysu_test     ``CUHK-SYSU/``                        pool images; TestG protocols
prw_train          ``PRW/``                              PRW train frames
prw_test           ``PRW/``                              test frames; query_info.txt
prw_mini_test      ``PRW/``                              test frames; the 30 PRW-mini queries
synthps_train      ``synthps/``                          generated on first use
synthps_test       ``synthps/``                          generated on first use
=================  ====================================  =============================

``$DETECTRON2_DATASETS`` (default ``./datasets``) is read at every call, as Detectron2 does.
SynthPS is written in the CUHK-SYSU layout and read by the CUHK-SYSU loader.

Custom data sets (one JSON file each, :mod:`.custom`) join the catalog with
:func:`add_person_search_file` (``qeeps_d2.register_person_search`` also registers them with
Detectron2); every function here then accepts their names too. A custom set is a test set when
its file has a protocol; its root is the file's folder.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from ..search_protocol import SearchProtocol
from . import cuhk_sysu, prw
from .custom import PersonSearchFile, read_person_search_file

__all__ = [
    "DATASET_NAMES",
    "add_person_search_file",
    "dataset_file",
    "registered_names",
    "test_set_names",
    "is_registered",
    "is_test_set",
    "protocol_info",
    "available_gallery_sizes",
    "datasets_root",
    "dataset_root",
    "image_root",
    "load_dataset_dicts",
    "load_protocol",
    "num_pids",
]

# name -> (family, split)
_DATASETS: Dict[str, Tuple[str, str]] = {
    "cuhk_sysu_train": ("cuhk_sysu", "train"),
    "cuhk_sysu_test": ("cuhk_sysu", "test"),
    "prw_train": ("prw", "train"),
    "prw_test": ("prw", "test"),
    "prw_mini_test": ("prw", "test"),
    "synthps_train": ("synthps", "train"),
    "synthps_test": ("synthps", "test"),
}
_FOLDERS = {"cuhk_sysu": "CUHK-SYSU", "prw": "PRW", "synthps": "synthps"}
_IMAGE_FOLDERS = {"cuhk_sysu": cuhk_sysu.IMAGE_DIR, "prw": "frames", "synthps": cuhk_sysu.IMAGE_DIR}

DATASET_NAMES: Tuple[str, ...] = tuple(_DATASETS)
"""The built-in names (:func:`registered_names` adds the custom sets)."""

# custom name -> (absolute JSON path, image root given at registration or None)
_CUSTOM: Dict[str, Tuple[str, Optional[str]]] = {}


def add_person_search_file(name: str, json_file: str, image_root: Optional[str] = None
                           ) -> PersonSearchFile:
    """Put the data set of ``json_file`` into the catalog as ``name`` (read and checked now).

    Args:
        name: the name to use (a built-in name is refused; a custom one is re-pointed).
        json_file: the data set file (:mod:`.custom` format).
        image_root: folder of the images; default: the file's ``image_root``.
    Raises:
        FileNotFoundError / ValueError: the file is missing or malformed (one line naming the
            file and field), or ``name`` is built in.
    """
    if name in _DATASETS:
        raise ValueError(f"{json_file}: {name!r} is a built-in data set name; register the file "
                         "under another name")
    data = read_person_search_file(json_file)
    _CUSTOM[name] = (os.path.abspath(json_file),
                     None if image_root is None else os.path.abspath(image_root))
    return data


def dataset_file(name: str) -> str:
    """The absolute path of custom set ``name``'s file (ValueError for other names)."""
    if name not in _CUSTOM:
        raise ValueError(f"{name!r} is not a custom data set (no file)" if name in _DATASETS
                         else str(_unknown(name)))
    return _CUSTOM[name][0]


def registered_names() -> Tuple[str, ...]:
    """The built-in names, then the custom ones in registration order."""
    return DATASET_NAMES + tuple(n for n in _CUSTOM if n not in _DATASETS)


def is_registered(name: str) -> bool:
    """Whether ``name`` is a person-search data set of the catalog (built in or custom)."""
    return name in _DATASETS or name in _CUSTOM


def is_test_set(name: str) -> bool:
    """Whether ``name`` has a search protocol (built in: ``*_test``; custom: a protocol)."""
    custom = _custom(name)
    if custom is not None:
        return custom.is_test_set
    return _family_split(name)[1] == "test"


def test_set_names() -> Tuple[str, ...]:
    """The registered names that have a search protocol."""
    return tuple(n for n in registered_names() if is_test_set(n))


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown data set {name!r}; known: {', '.join(registered_names())}")


def _custom(name: str) -> Optional[PersonSearchFile]:
    """The checked file of custom set ``name`` (None for a built-in name)."""
    entry = _CUSTOM.get(name)
    return None if entry is None else read_person_search_file(entry[0])


def _family_split(name: str) -> Tuple[str, str]:
    if name not in _DATASETS:
        raise _unknown(name)
    return _DATASETS[name]


def datasets_root() -> str:
    """Absolute ``$DETECTRON2_DATASETS`` (default ``./datasets``), read now."""
    return os.path.abspath(os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets")))


def dataset_root(name: str) -> str:
    """The root folder of data set ``name``, e.g. ``<datasets>/CUHK-SYSU`` (custom: the folder
    of its file)."""
    if name in _CUSTOM:
        return os.path.dirname(_CUSTOM[name][0])
    return os.path.join(datasets_root(), _FOLDERS[_family_split(name)[0]])


def image_root(name: str) -> str:
    """The folder holding the images of data set ``name``."""
    if name in _CUSTOM:
        return _CUSTOM[name][1] or _custom(name).image_root
    return os.path.join(dataset_root(name), _IMAGE_FOLDERS[_family_split(name)[0]])


def _ready_root(name: str) -> str:
    """The root of ``name``; SynthPS is generated there first if missing."""
    root = dataset_root(name)
    if _family_split(name)[0] == "synthps":
        from ..synthps import ensure_synthps  # lazy: the generator is only needed here

        root = ensure_synthps(root)
    return root


def load_dataset_dicts(name: str) -> List[Dict]:
    """Detectron2 dataset dicts of ``name`` (``prw_mini_test``: the PRW test frames).

    Raises:
        ValueError: unknown name (the message lists the known ones), or a loader error.
        FileNotFoundError: the data set is not under its root.
    """
    custom = _custom(name)
    if custom is not None:
        return custom.dataset_dicts(image_root(name))
    family, split = _family_split(name)
    root = _ready_root(name)
    if family == "prw":
        return prw.load_prw(root, split)
    return cuhk_sysu.load_cuhk_sysu(root, split)


def load_protocol(name: str, gallery_size: int = 100, cross_camera: bool = False) -> SearchProtocol:
    """The search protocol of test set ``name``.

    Args:
        name: ``cuhk_sysu_test``, ``synthps_test`` (CUHK-SYSU style), ``prw_test``,
            ``prw_mini_test`` or a custom test set.
        gallery_size: CUHK-SYSU style sets (and custom sets with gallery sizes): one of the
            sizes whose TestG file exists (50, 100, 500, 1000, 2000, 4000), or -1 for the whole
            pool. Ignored for PRW.
        cross_camera: PRW (and custom sets with camera ids): galleries of other cameras than
            the query's.
    Raises:
        ValueError: unknown or train data set, unavailable gallery size, cross_camera on a data
            set without cameras.
    """
    custom = _custom(name)
    if custom is not None:
        if not custom.is_test_set:
            raise ValueError(f"{name} is a training set ({custom.path} has no protocol) and has "
                             f"no search protocol; use one of {', '.join(test_set_names())}")
        return custom.search_protocol(name, gallery_size, cross_camera, image_root(name))
    family, split = _family_split(name)
    if split != "test":
        raise ValueError(f"{name} is a training set and has no search protocol; use one of "
                         f"{', '.join(test_set_names())}")
    root = _ready_root(name)
    if family == "prw":
        if name == "prw_mini_test":
            return prw.load_prw_mini_protocol(root, cross_camera=cross_camera, dataset=name)
        return prw.load_prw_protocol(root, cross_camera=cross_camera, dataset=name)
    if cross_camera:
        raise ValueError(f"{name} has no camera ids; cross_camera applies to the PRW data sets")
    available = cuhk_sysu.available_gallery_sizes(root)
    if gallery_size not in available:
        raise ValueError(f"{name}: gallery size {gallery_size!r} is not available under {root}; "
                         f"available: {available}")
    return cuhk_sysu.load_cuhk_sysu_protocol(root, gallery_size, dataset=name)


def num_pids(name: str) -> int:
    """Labeled train identities of the family of ``name`` (CUHK-SYSU 5532, PRW 483, SynthPS from
    its files), read from the data set's files (Train.mat / ID_train.mat); of a custom training
    set, its distinct labeled ids (which its loader numbers 0..N-1).

    Raises:
        ValueError: unknown name, a custom test set (its ids are not numbered for training).
    """
    custom = _custom(name)
    if custom is not None:
        return custom.num_pids()
    family, _ = _family_split(name)
    root = _ready_root(name)
    if family == "prw":
        return prw.num_train_pids(root)
    return cuhk_sysu.num_train_pids(root)


def available_gallery_sizes(name: str) -> List[int]:
    """The gallery sizes ``load_protocol(name, gallery_size)`` accepts, -1 included (read from
    the data set's files); [] where the size is ignored (PRW, rule-based custom sets)."""
    custom = _custom(name)
    if custom is not None:
        return custom.available_gallery_sizes()
    family, split = _family_split(name)
    if split != "test" or family == "prw":
        return []
    return cuhk_sysu.available_gallery_sizes(_ready_root(name))


def protocol_info(name: str) -> Dict[str, Any]:
    """What ``load_protocol`` accepts for test set ``name``, without reading a built-in set's
    files: ``gallery_sizes`` (the possible sizes, -1 included; empty where sizes do not apply),
    ``default_gallery_size`` (None there) and ``cross_camera`` (whether that option applies)."""
    custom = _custom(name)
    if custom is not None:
        return custom.protocol_info()
    family, split = _family_split(name)
    if split != "test":
        raise ValueError(f"{name} is a training set and has no search protocol")
    if family == "prw":
        return {"gallery_sizes": (), "default_gallery_size": None, "cross_camera": True}
    return {"gallery_sizes": cuhk_sysu.GALLERY_SIZES + (-1,), "default_gallery_size": 100,
            "cross_camera": False}
