"""Gallery sources for ``qeeps-search``: a folder of images or a video file, read lazily.

A gallery is streamed frame by frame (:class:`GalleryFrame`: name, BGR image, index), so a
ten-minute video is never held in memory:

- folder: the ``.jpg/.jpeg/.png/.bmp`` files directly in it (not in sub-folders), sorted by name;
  ``name`` is the file name, ``index`` its position in that sorted list. An unreadable image
  (not an image, truncated, corrupt) is skipped with a warning and listed in
  :attr:`Gallery.skipped`; the search goes on. A folder in which no image at all can be read is
  an error (``ValueError`` at the end of the iteration).
- video (any file OpenCV's ``VideoCapture`` opens; a single image file reads as a one-frame
  video): ``name`` is ``frame_000123``, ``index`` the frame number (0-based) in the video.

``every=N`` keeps every N-th frame (or image): indices 0, N, 2N, ...
``start=K`` skips the first K of those (a continued search, see ``qeeps_d2.search.progress``);
a video's skipped frames are grabbed, not decoded. Memory does not grow with the gallery's length.
Numpy / OpenCV / Pillow only (no torch).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

import cv2
import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "Gallery",
    "GalleryFrame",
    "count_gallery",
    "iter_gallery",
    "read_image_bgr",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class GalleryFrame:
    """One gallery image: ``name`` (file name or ``frame_000123``), ``image`` (H, W, 3) uint8 BGR,
    ``index`` (position in the folder's sorted image list, or frame number in the video)."""

    name: str
    image: np.ndarray
    index: int


def read_image_bgr(path: str) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 BGR array (EXIF orientation applied), decoded
    with Pillow as Detectron2's ``read_image`` does (so searching and evaluation see the same
    pixels). Pillow, unlike OpenCV, refuses a truncated JPEG instead of returning it half grey.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not an image, or is truncated or corrupt (the message names it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} not found")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            rgb = np.asarray(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: not an image file, truncated or corrupt "
                         f"({e})") from None
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _check_every(every: int) -> int:
    if int(every) != every or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    return int(every)


def _image_files(folder: str) -> List[str]:
    """Sorted names of the image files directly in ``folder``."""
    return sorted(
        n for n in os.listdir(folder)
        if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))
    )


def _frame_name(index: int) -> str:
    return f"frame_{index:06d}"


class Gallery:
    """The frames of a folder of images or of a video file (see the module docstring).

    Iterable, and re-iterable (each iteration reads from the start). Opening checks the input:

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a folder without images, a file OpenCV cannot open or decode as a video,
            ``every`` < 1.

    Attributes:
        path, every, start: as given (``start``: frames kept by ``every`` to skip first).
        is_video: whether ``path`` is a video file (else a folder).
        skipped: folder images that could not be read during the last iteration.
        num_read: frames yielded by the last iteration.
        frames_short: video frames the container announces but the last complete iteration
            could not decode (a truncated or damaged file; warned about), else 0.
    """

    def __init__(self, path: str, every: int = 1, start: int = 0):
        self.path = str(path)
        self.every = _check_every(every)
        if int(start) != start or start < 0:
            raise ValueError(f"start must be a non-negative integer, got {start!r}")
        self.start = int(start)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"gallery {self.path} does not exist")
        self.is_video = not os.path.isdir(self.path)
        self.skipped: List[str] = []
        self.num_read = 0
        self.frames_short = 0
        if self.is_video:
            capture = cv2.VideoCapture(self.path)
            try:
                if not capture.isOpened() or not capture.read()[0]:
                    raise ValueError(
                        f"cannot open gallery video {self.path}: not a video OpenCV can decode "
                        f"(a folder of {'/'.join(IMAGE_EXTENSIONS)} images also works)"
                    )
            finally:
                capture.release()
        elif not _image_files(self.path):
            raise ValueError(
                f"gallery folder {self.path} holds no {'/'.join(IMAGE_EXTENSIONS)} image"
            )

    def __iter__(self) -> Iterator[GalleryFrame]:
        self.skipped = []
        self.num_read = 0
        frames = self._video_frames() if self.is_video else self._folder_frames()
        for frame in frames:
            self.num_read += 1
            yield frame

    def _folder_frames(self) -> Iterator[GalleryFrame]:
        names = _image_files(self.path)
        for index in range(self.start * self.every, len(names), self.every):
            name = names[index]
            try:
                image = read_image_bgr(os.path.join(self.path, name))
            except (OSError, ValueError) as e:
                self.skipped.append(name)
                logger.warning("%s; skipped (%d unreadable so far)", e, len(self.skipped))
                continue
            yield GalleryFrame(name, image, index)
        if self.skipped:
            logger.warning(
                "gallery %s: skipped %d unreadable image(s) of %d",
                self.path, len(self.skipped), len(range(0, len(names), self.every)),
            )
            if self.num_read == 0 and self.start == 0:
                raise ValueError(
                    f"gallery folder {self.path}: none of its {len(self.skipped)} image(s) "
                    "could be read (not images, truncated or corrupt)"
                )

    def _video_frames(self) -> Iterator[GalleryFrame]:
        capture = cv2.VideoCapture(self.path)
        announced = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        try:
            index = 0
            while True:
                if index % self.every == 0 and index >= self.start * self.every:
                    ok, image = capture.read()
                    if not ok:
                        break
                    yield GalleryFrame(_frame_name(index), image, index)
                elif not capture.grab():  # skipped frames are not decoded
                    break
                index += 1
        finally:
            capture.release()
        self.frames_short = max(0, announced - index)
        if self.frames_short:
            logger.warning(
                "gallery video %s ends after %d of the %d frames its container announces "
                "(truncated or damaged?): frames %d.. were not searched",
                self.path, index, announced, index,
            )


def iter_gallery(path: str, every: int = 1, start: int = 0) -> Gallery:
    """The frames of a folder of images or a video file, every ``every``-th one, from the
    ``start``-th of those on (a lazy, re-iterable :class:`Gallery` of :class:`GalleryFrame`;
    errors as in :class:`Gallery`)."""
    return Gallery(path, every, start)


def count_gallery(path: str, every: int = 1) -> Optional[int]:
    """How many frames :func:`iter_gallery` will yield (for a progress bar's total).

    Folder: the images kept by ``every`` (unreadable ones included). Video: from
    ``CAP_PROP_FRAME_COUNT``, None when the container does not tell (0 or negative).
    """
    every = _check_every(every)
    if os.path.isdir(path):
        return math.ceil(len(_image_files(path)) / every)
    capture = cv2.VideoCapture(str(path))
    try:
        frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    finally:
        capture.release()
    return math.ceil(frames / every) if frames > 0 else None
