"""A search over a long gallery that can be interrupted (Ctrl-C, SIGKILL, a crash) and continued.

:func:`resumable_search` feeds the gallery to :meth:`PersonSearcher.search` in chunks of
``save_every`` frames, streamed (a chunk is never held in memory as a whole). After each chunk
the running top-K matches and the position in the gallery are saved to a progress folder::

    <progress_dir>/state.json         {"signature", "frames_done", "num_read", "skipped", "matches"}
    <progress_dir>/frame_000123.png   the frame of each kept match (lossless, for the report)

``state.json`` is replaced atomically, so a process killed at any moment leaves the state of its
last finished chunk. A later call with the same ``signature`` (same model, query, box, gallery
file, ``every``, ``topk``) starts after ``frames_done`` frames with the saved matches; any other
signature discards the folder and starts from the first frame. The continued search returns the
same matches as an uninterrupted one: chunks are merged by a stable sort on similarity, earlier
frames first, which is the order one pass gives. Memory holds one batch of frames and the frames
of the top-K matches, whatever the gallery's length.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import cv2
from tqdm import tqdm

from ..utils.atomic_write import write_atomically
from .gallery import count_gallery, iter_gallery
from .searcher import Match, PersonSearcher

__all__ = ["SearchInterrupted", "SearchOutcome", "discard_progress", "file_signature",
           "resumable_search"]

logger = logging.getLogger(__name__)

_STATE = "state.json"


class SearchInterrupted(Exception):
    """The search was interrupted (Ctrl-C); its progress up to the last saved chunk is kept."""


@dataclass
class SearchOutcome:
    """What :func:`resumable_search` found: ``matches`` (similarity descending), the frames
    searched (``num_read``, over all sessions) and the unreadable images ``skipped``."""

    matches: List[Match]
    num_read: int
    skipped: List[str]
    continued_from: int = 0


def file_signature(path: str) -> Dict:
    """``{"path", "size", "mtime"}`` of a file (a folder: of its entries' names), to notice that an
    input changed between an interrupted search and its continuation."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return {"path": path, "entries": len(os.listdir(path))}
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime": st.st_mtime_ns}


def _frame_file(index: int) -> str:
    return f"frame_{index:09d}.png"


def _load_state(progress_dir: str, signature: Dict) -> Optional[Dict]:
    path = os.path.join(progress_dir, _STATE)
    if not os.path.isfile(path):
        if os.path.isdir(progress_dir):
            shutil.rmtree(progress_dir)
        return None
    try:
        with open(path) as f:
            state = json.load(f)
        if state.get("signature") == signature:
            for m in state["matches"]:
                image = cv2.imread(os.path.join(progress_dir, _frame_file(m["index"])),
                                   cv2.IMREAD_COLOR)
                if image is None:
                    raise ValueError(f"frame {m['index']} missing")
                m["image"] = image
            return state
        logger.info("progress in %s is for another search: starting from the first frame",
                    progress_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("progress in %s unreadable (%s): starting from the first frame",
                       progress_dir, e)
    shutil.rmtree(progress_dir)
    return None


def _save_state(progress_dir: str, signature: Dict, frames_done: int, num_read: int,
                skipped: Sequence[str], matches: Sequence[Match]) -> None:
    """Frames of new matches first, then ``state.json`` (atomic), then unused frames removed."""
    os.makedirs(progress_dir, exist_ok=True)
    wanted = {_frame_file(m.index): m for m in matches}
    for name, m in wanted.items():
        path = os.path.join(progress_dir, name)
        if not os.path.exists(path):
            write_atomically(path, lambda f, image=m.image: f.write(
                cv2.imencode(".png", image)[1].tobytes()))
    state = {
        "signature": signature, "frames_done": frames_done, "num_read": num_read,
        "skipped": list(skipped),
        "matches": [{k: v for k, v in asdict(m).items() if k != "image"} for m in matches],
    }
    write_atomically(os.path.join(progress_dir, _STATE),
                     lambda f: json.dump(state, f), mode="w")
    for name in os.listdir(progress_dir):
        if name.startswith("frame_") and name not in wanted:
            os.remove(os.path.join(progress_dir, name))


def _merge(matches: List[Match], new: List[Match], topk: int) -> List[Match]:
    merged = matches + new
    merged.sort(key=lambda m: -m.similarity)  # stable: earlier frames first among ties
    return merged[:topk]


def resumable_search(searcher: PersonSearcher, query_image: str, query_box: Sequence[float],
                     gallery_path: str, progress_dir: str, signature: Dict, every: int = 1,
                     topk: int = 10, batch_size: int = 4, save_every: int = 200,
                     progress: bool = True) -> SearchOutcome:
    """Search ``gallery_path`` (folder or video) for the query, continuing a previous
    interrupted search with the same ``signature`` found in ``progress_dir``; the folder is
    removed when the search completes (module docstring).

    Raises:
        SearchInterrupted: on Ctrl-C; the progress of the finished chunks is kept.
        ValueError, OSError: as :meth:`PersonSearcher.search` and :func:`iter_gallery`.
    """
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    state = _load_state(progress_dir, signature)
    start = state["frames_done"] if state else 0
    matches = [Match(**dict(m, box=tuple(m["box"]))) for m in state["matches"]] if state else []
    num_read = state["num_read"] if state else 0
    skipped = list(state["skipped"]) if state else []
    if start:
        logger.info("continuing an interrupted search after %d frames (%s)", start, progress_dir)
    gallery = iter_gallery(gallery_path, every, start)
    frames = iter(gallery)
    position = start
    bar = None  # created when the first frame is read (after the query was checked)

    def chunk() -> Iterator:
        nonlocal position, bar
        for _ in range(save_every):
            frame = next(frames, None)
            if frame is None:
                return
            if bar is None:
                bar = tqdm(total=count_gallery(gallery_path, every), initial=start,
                           unit="frame", desc="search", disable=not progress)
            position = frame.index // every + 1
            bar.update(position - bar.n)
            yield frame

    try:
        try:
            while True:
                before = position
                new = searcher.search(query_image, query_box, chunk(), topk=topk,
                                      batch_size=batch_size, progress=False, keep_frames=True)
                if position == before:
                    break
                matches = _merge(matches, new, topk)
                skipped = skipped + [s for s in gallery.skipped if s not in skipped]
                _save_state(progress_dir, signature, position, num_read + gallery.num_read,
                            skipped, matches)
        finally:
            if bar is not None:
                bar.close()
    except KeyboardInterrupt:
        saved = 0
        if os.path.isfile(os.path.join(progress_dir, _STATE)):
            with open(os.path.join(progress_dir, _STATE)) as f:
                saved = json.load(f)["frames_done"]
        raise SearchInterrupted(
            f"interrupted after {position} frames; the first {saved} are saved in "
            f"{progress_dir}: run the same command again to continue from there"
        ) from None
    num_read += gallery.num_read
    skipped = skipped + [s for s in gallery.skipped if s not in skipped]
    if num_read == 0 and skipped:
        raise ValueError(f"gallery {gallery_path}: none of its images could be read")
    return SearchOutcome(matches, num_read, skipped, continued_from=start)


def discard_progress(progress_dir: str) -> None:
    """Remove the progress folder of a completed search."""
    shutil.rmtree(progress_dir, ignore_errors=True)
