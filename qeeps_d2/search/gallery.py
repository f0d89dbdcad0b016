"""Gallery sources for ``qeeps-search``: a folder of images, a video file, a stream or a camera.

A gallery is streamed frame by frame (:class:`GalleryFrame`: name, BGR image, index), so a
ten-minute video is never held in memory:

- folder: the ``.jpg/.jpeg/.png/.bmp`` files directly in it (not in sub-folders), sorted by name;
  ``name`` is the file name, ``index`` its position in that sorted list. An unreadable image
  (not an image, truncated, corrupt) is skipped with a warning and listed in
  :attr:`Gallery.skipped`; the search goes on. A folder in which no image at all can be read is
  an error (``ValueError`` at the end of the iteration).
- video file (any file OpenCV's ``VideoCapture`` opens, else PyAV when it is installed; a single
  image file reads as a one-frame video): ``name`` is ``frame_000123``, ``index`` the frame number
  (0-based) in the video.
- stream: a URL (``rtsp://``, ``http(s)://``, ``udp://``, ... as OpenCV's FFmpeg or PyAV open it)
  or a camera index (``"0"``); frames named as a video's. A stream has no length (no ETA) and
  cannot be continued after an interruption; ``max_frames`` bounds a live one.

``every=N`` keeps every N-th frame (or image): indices 0, N, 2N, ...
``start=K`` skips the first K of those (a continued search, see ``qeeps_d2.search.progress``);
a video's skipped frames are grabbed, not decoded (OpenCV). ``max_frames`` stops after that many
kept frames. ``backend`` picks the video decoder: ``"auto"`` (OpenCV, then PyAV if OpenCV cannot
open the source), ``"opencv"`` or ``"pyav"``. Memory does not grow with the gallery's length.
Numpy / OpenCV / Pillow (/ PyAV) only (no torch).
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import cv2
import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_BACKENDS",
    "Gallery",
    "GalleryFrame",
    "count_gallery",
    "image_files",
    "is_stream",
    "iter_gallery",
    "read_image_bgr",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_BACKENDS = ("auto", "opencv", "pyav")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


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


def image_files(folder: str) -> List[str]:
    """Sorted names of the image files directly in ``folder``."""
    return sorted(
        n for n in os.listdir(folder)
        if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))
    )


def _frame_name(index: int) -> str:
    return f"frame_{index:06d}"


def is_stream(path: Union[str, int]) -> bool:
    """Whether ``path`` names a stream rather than a file or folder: a URL with a scheme
    (``rtsp://host/cam``) or a camera index (``0``, ``"1"``)."""
    text = str(path)
    return text.isdigit() or bool(_URL.match(text))


def _capture_source(path: str) -> Union[str, int]:
    """What ``cv2.VideoCapture`` takes: a camera index as an int, anything else as given."""
    return int(path) if path.isdigit() else path


class _OpenCVVideo:
    """Frames of a video or stream through OpenCV: ``frames(start, every)`` yields (index, BGR)
    of the kept frames; the others are grabbed, not decoded."""

    name = "OpenCV"

    def __init__(self, path: str):
        self.capture = cv2.VideoCapture(_capture_source(path))

    def opens(self) -> bool:
        return bool(self.capture.isOpened())

    def announced(self) -> int:
        """Frames the container announces (0 when it does not tell, e.g. a stream)."""
        return max(0, int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT)))

    def fps(self) -> float:
        return float(self.capture.get(cv2.CAP_PROP_FPS) or 0.0)

    def frames(self, keep) -> Iterator[Tuple[int, Optional[np.ndarray]]]:
        """(index, image) for every frame; image None for frames ``keep(index)`` rejects."""
        index = 0
        while True:
            if keep(index):
                ok, image = self.capture.read()
                if not ok:
                    return
                yield index, image
            else:
                if not self.capture.grab():
                    return
                yield index, None
            index += 1

    def release(self) -> None:
        self.capture.release()


class _PyAVVideo:
    """The same through PyAV (``pip install av``), for sources OpenCV's build cannot open.
    PyAV decodes every frame; only the kept ones are converted to arrays."""

    name = "PyAV"

    def __init__(self, path: str):
        try:
            import av
        except ImportError:
            raise ValueError(f"cannot open gallery video {path} with PyAV: PyAV is not installed "
                             "(pip install av)") from None
        self.container = None
        try:
            source = f"/dev/video{path}" if path.isdigit() else path
            self.container = av.open(source)
            self.stream = self.container.streams.video[0]
        except (av.FFmpegError, IndexError):  # not a media file / no video stream
            self.release()
            self.container = None

    def opens(self) -> bool:
        return self.container is not None

    def announced(self) -> int:
        return max(0, int(self.stream.frames or 0))

    def fps(self) -> float:
        rate = self.stream.average_rate
        return float(rate) if rate else 0.0

    def frames(self, keep) -> Iterator[Tuple[int, Optional[np.ndarray]]]:
        for index, frame in enumerate(self.container.decode(self.stream)):
            yield index, frame.to_ndarray(format="bgr24") if keep(index) else None

    def release(self) -> None:
        if self.container is not None:
            self.container.close()


def _open_video(path: str, backend: str):
    """An opened :class:`_OpenCVVideo` / :class:`_PyAVVideo` of ``path``, or None when the
    requested backend(s) cannot open it and decode a first frame."""
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; one of {', '.join(VIDEO_BACKENDS)}")
    kinds = {"opencv": (_OpenCVVideo,), "pyav": (_PyAVVideo,)}.get(backend)
    if kinds is None:
        kinds = (_OpenCVVideo, _PyAVVideo) if _pyav_installed() else (_OpenCVVideo,)
    for kind in kinds:
        video = kind(path)
        if video.opens():
            return video
        video.release()
    return None


def _pyav_installed() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


class Gallery:
    """The frames of a folder of images, a video file or a stream (see the module docstring).

    Iterable, and re-iterable (each iteration reads from the start; a live stream goes on from
    where it is). Opening checks the input:

    Raises:
        FileNotFoundError: ``path`` does not exist (files and folders).
        ValueError: a folder without images, a source no backend can open or decode as a video,
            ``every`` < 1, ``start`` > 0 on a stream, ``max_frames`` < 1, an unknown backend.

    Attributes:
        path, every, start, max_frames, backend: as given (``start``: frames kept by ``every``
            to skip first).
        is_video: whether ``path`` is a video file or a stream (else a folder).
        is_stream: whether ``path`` is a URL or a camera index.
        fps: the video's frame rate as its container tells (0 when unknown; folders: 0).
        decoder: ``"OpenCV"`` or ``"PyAV"`` for videos, None for folders.
        skipped: folder images that could not be read during the last iteration.
        num_read: frames yielded by the last iteration.
        frames_short: video frames the container announces but the last complete iteration
            could not decode (a truncated or damaged file; warned about), else 0.
    """

    def __init__(self, path: Union[str, int], every: int = 1, start: int = 0,
                 max_frames: Optional[int] = None, backend: str = "auto"):
        self.path = str(path)
        self.every = _check_every(every)
        if int(start) != start or start < 0:
            raise ValueError(f"start must be a non-negative integer, got {start!r}")
        self.start = int(start)
        if max_frames is not None and (int(max_frames) != max_frames or max_frames < 1):
            raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
        self.max_frames = None if max_frames is None else int(max_frames)
        if backend not in VIDEO_BACKENDS:
            raise ValueError(f"unknown video backend {backend!r}; one of "
                             f"{', '.join(VIDEO_BACKENDS)}")
        self.backend = backend
        self.is_stream = is_stream(self.path)
        if self.is_stream and self.start:
            raise ValueError(f"gallery stream {self.path} cannot be continued from frame "
                             f"{self.start}: a stream has no fixed frames to skip to")
        if not self.is_stream and not os.path.exists(self.path):
            raise FileNotFoundError(f"gallery {self.path} does not exist")
        self.is_video = self.is_stream or not os.path.isdir(self.path)
        self.skipped: List[str] = []
        self.num_read = 0
        self.frames_short = 0
        self.fps = 0.0
        self.decoder: Optional[str] = None
        if self.is_video:
            video = _open_video(self.path, backend)
            if video is None:
                what = "stream or camera" if self.is_stream else "video"
                tried = "OpenCV or PyAV" if backend == "auto" and _pyav_installed() else (
                    "PyAV" if backend == "pyav" else "OpenCV")
                raise ValueError(
                    f"cannot open gallery {what} {self.path}: not a video {tried} can decode"
                    + ("" if self.is_stream else
                       f" (a folder of {'/'.join(IMAGE_EXTENSIONS)} images also works)")
                )
            try:
                self.fps, self.decoder = video.fps(), video.name
            finally:
                video.release()
        elif not image_files(self.path):
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
            if self.max_frames is not None and self.num_read >= self.max_frames:
                return

    def _folder_frames(self) -> Iterator[GalleryFrame]:
        names = image_files(self.path)
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
        video = _open_video(self.path, self.backend)
        if video is None:
            raise ValueError(f"gallery video {self.path} can no longer be opened")
        announced = video.announced()
        first = self.start * self.every
        end = 0
        try:
            for index, image in video.frames(lambda i: i % self.every == 0 and i >= first):
                end = index + 1
                if image is not None:
                    yield GalleryFrame(_frame_name(index), image, index)
        finally:
            video.release()
        capped = self.max_frames is not None and self.num_read >= self.max_frames
        self.frames_short = 0 if capped or self.is_stream else max(0, announced - end)
        if self.frames_short:
            logger.warning(
                "gallery video %s ends after %d of the %d frames its container announces "
                "(truncated or damaged?): frames %d.. were not searched",
                self.path, end, announced, end,
            )


def iter_gallery(path: Union[str, int], every: int = 1, start: int = 0,
                 max_frames: Optional[int] = None, backend: str = "auto") -> Gallery:
    """The frames of a folder of images, a video file or a stream, every ``every``-th one, from
    the ``start``-th of those on, at most ``max_frames`` of them (a lazy, re-iterable
    :class:`Gallery` of :class:`GalleryFrame`; errors as in :class:`Gallery`)."""
    return Gallery(path, every, start, max_frames, backend)


def count_gallery(path: Union[str, int], every: int = 1, max_frames: Optional[int] = None,
                  backend: str = "auto") -> Optional[int]:
    """How many frames :func:`iter_gallery` will yield (for a progress bar's total).

    Folder: the images kept by ``every`` (unreadable ones included). Video: from the frame
    count its container announces, None when it does not tell (0 or negative) and for streams;
    at most ``max_frames``.
    """
    every = _check_every(every)
    path = str(path)
    if os.path.isdir(path):
        count = math.ceil(len(image_files(path)) / every)
    elif is_stream(path):
        count = None
    else:
        video = _open_video(path, backend)
        frames = 0
        if video is not None:
            try:
                frames = video.announced()
            finally:
                video.release()
        count = math.ceil(frames / every) if frames > 0 else None
    if max_frames is not None:
        count = max_frames if count is None else min(count, max_frames)
    return count
