"""``qeeps-search --output-video``: the searched frames as a video, the query person marked.

Each searched frame is written with its detections drawn: the frame's best match at or above the
similarity ``threshold`` as a thick green box labelled with its similarity, the other
detections thin and grey with theirs, and a banner (frame number, best similarity) on top, so a
user can scrub through footage and see where the person shows up. Frames of another size than
the first are scaled to fit and padded (a video has one frame size). Numpy / OpenCV only.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import cv2
import numpy as np

from .render import CORRECT_COLOUR, draw_matches

__all__ = ["AnnotatedVideoWriter", "CODECS"]

# container extension -> FourCC OpenCV writes into it without extra libraries
CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}
OTHER_COLOUR = (150, 150, 150)
_MAX_FPS = 120.0


def _fit(image: np.ndarray, size) -> np.ndarray:
    """``image`` scaled (aspect kept) and zero-padded to ``size`` = (width, height)."""
    width, height = size
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.zeros((height, width, 3), np.uint8)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[top:top + nh, left:left + nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    return out


class AnnotatedVideoWriter:
    """Write searched frames with their matches drawn into a video file.

    Example::

        with AnnotatedVideoWriter("out.mp4", fps=25 / every, threshold=0.6) as video:
            for frame, matches in ...:      # matches: the frame's Match objects
                video.write(frame.image, matches, frame.index)

    Args:
        path: output file; its extension picks the codec (:data:`CODECS`).
        fps: frames per second of the output (the source's rate divided by the search's ``every``
            keeps real time); values <= 0 or unknown fall back to 5.
        threshold: similarity at or above which a frame's best match is marked as the query
            person (None: always mark the frame's best match).
    Raises:
        ValueError: an extension without a known codec.
    """

    def __init__(self, path: str, fps: float, threshold: Optional[float] = None):
        ext = os.path.splitext(path)[1].lower()
        if ext not in CODECS:
            raise ValueError(f"output video {path}: unknown extension {ext or '(none)'!r}; "
                             f"use one of {', '.join(sorted(CODECS))}")
        self.path = path
        self.fps = float(fps) if fps and 0 < fps <= _MAX_FPS else 5.0
        self.threshold = threshold
        self.frames_written = 0
        self._writer = None
        self._size = None

    def __enter__(self) -> "AnnotatedVideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, size) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fourcc = cv2.VideoWriter_fourcc(*CODECS[os.path.splitext(self.path)[1].lower()])
        writer = cv2.VideoWriter(self.path, fourcc, self.fps, size)
        if not writer.isOpened():
            raise OSError(f"cannot write output video {self.path} (OpenCV could not open a "
                          f"{CODECS[os.path.splitext(self.path)[1].lower()]} writer there)")
        self._writer, self._size = writer, size

    def annotate(self, image: np.ndarray, matches: Sequence, index: int) -> np.ndarray:
        """The (H, W, 3) uint8 BGR frame with ``matches`` drawn (see the module docstring)."""
        best = max(range(len(matches)), key=lambda i: matches[i].similarity, default=None)
        found = best is not None and (self.threshold is None
                                      or matches[best].similarity >= self.threshold)
        order = [i for i in range(len(matches)) if not (found and i == best)]
        if found:
            order.append(best)  # drawn last, on top
        boxes = [matches[i].box for i in order]
        labels = [f"{matches[i].similarity:.2f}" for i in order]
        colours = [CORRECT_COLOUR if found and i == best else OTHER_COLOUR for i in order]
        out = draw_matches(image, boxes, labels, colours)
        if found:  # the match twice as thick as the others
            x1, y1, x2, y2 = (int(round(v)) for v in matches[best].box)
            thick = max(2, round(min(out.shape[:2]) / 75))
            cv2.rectangle(out, (x1, y1), (x2, y2), CORRECT_COLOUR, thick)
        banner = f"frame {index}"
        if best is not None:
            banner += f"  best {matches[best].similarity:.2f}" + ("  FOUND" if found else "")
        scale = max(0.4, min(out.shape[:2]) / 700)
        (w, h), _ = cv2.getTextSize(banner, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(out, (0, 0), (w + 8, h + 10), (0, 0, 0), -1)
        cv2.putText(out, banner, (4, h + 5), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    CORRECT_COLOUR if found else (255, 255, 255), 1, cv2.LINE_AA)
        return out

    def write(self, image: np.ndarray, matches: Sequence, index: int) -> None:
        """Append one searched frame (``matches``: its detections as :class:`Match` es)."""
        if self._writer is None:
            self._open((image.shape[1], image.shape[0]))
        self._writer.write(_fit(self.annotate(image, matches, index), self._size))
        self.frames_written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
