"""Image width and height from file headers, cached (numpy + Pillow, no decoding).

Detectron2 dataset dicts need ``height``/``width``; decoding 18k JPEGs would take minutes, while
Pillow's lazy ``Image.open`` reads only the header. The sizes are cached (see
:mod:`qeeps_d2.data.datasets.parse_cache`), keyed by the size and mtime of every image file.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .parse_cache import Array, cached, file_fingerprint

__all__ = ["read_image_sizes"]


def read_image_sizes(root: str, tag: str, image_dir: str, names: Sequence[str]) -> np.ndarray:
    """Return the (N, 2) int64 array of ``(height, width)`` of ``image_dir/name`` for each name.

    Args:
        root: the data set root (where the cache lives).
        tag: cache tag of this image list, e.g. ``"cuhk_train_sizes"``.
        image_dir: folder holding the images.
        names: image file base names, e.g. ``"s1.jpg"``.
    Raises:
        FileNotFoundError: an image is missing (the message names it).
        ValueError: an image header cannot be read.
    """
    paths = [os.path.join(image_dir, name) for name in names]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
    return cached(root, tag, file_fingerprint(paths), lambda: _read_headers(paths),
                  Array("int64", (None, 2)))


def _read_headers(paths: Sequence[str]) -> np.ndarray:
    sizes = np.zeros((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"unreadable image {path}: {e}") from e
        sizes[i] = (height, width)
    return sizes
