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
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from ..search_protocol import SearchProtocol
from . import cuhk_sysu, prw

__all__ = [
    "DATASET_NAMES",
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


def _family_split(name: str) -> Tuple[str, str]:
    if name not in _DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
    return _DATASETS[name]


def datasets_root() -> str:
    """Absolute ``$DETECTRON2_DATASETS`` (default ``./datasets``), read now."""
    return os.path.abspath(os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets")))


def dataset_root(name: str) -> str:
    """The root folder of data set ``name``, e.g. ``<datasets>/CUHK-SYSU``."""
    return os.path.join(datasets_root(), _FOLDERS[_family_split(name)[0]])


def image_root(name: str) -> str:
    """The folder holding the images of data set ``name``."""
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
    family, split = _family_split(name)
    root = _ready_root(name)
    if family == "prw":
        return prw.load_prw(root, split)
    return cuhk_sysu.load_cuhk_sysu(root, split)


def load_protocol(name: str, gallery_size: int = 100, cross_camera: bool = False) -> SearchProtocol:
    """The search protocol of test set ``name``.

    Args:
        name: ``cuhk_sysu_test``, ``synthps_test`` (CUHK-SYSU style), ``prw_test`` or
            ``prw_mini_test``.
        gallery_size: CUHK-SYSU style sets only: one of the sizes whose TestG file exists
            (50, 100, 500, 1000, 2000, 4000), or -1 for the whole pool. Ignored for PRW.
        cross_camera: PRW only: galleries of other cameras than the query's.
    Raises:
        ValueError: unknown or train data set, unavailable gallery size, cross_camera on a data
            set without cameras.
    """
    family, split = _family_split(name)
    if split != "test":
        raise ValueError(f"{name} is a training set and has no search protocol; use one of "
                         f"{', '.join(n for n in DATASET_NAMES if n.endswith('_test'))}")
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
    its files), read from the data set's files (Train.mat / ID_train.mat)."""
    family, _ = _family_split(name)
    root = _ready_root(name)
    if family == "prw":
        return prw.num_train_pids(root)
    return cuhk_sysu.num_train_pids(root)
