"""Building an index: planning the chunks still to build (:func:`plan_chunks`), sharing them
among processes (:func:`split_chunks`), embedding and writing them (:func:`build_chunks`), and
merging them into a complete index (:func:`finalize_index`, with the approximate HNSW index of
:func:`build_approximate_index` for large ones). The format: :mod:`qeeps_d2.search.index`."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from ...utils.atomic_write import write_atomically
from ..gallery import iter_gallery
from .manifest import (
    APPROXIMATE_FILE,
    APPROXIMATE_MIN_DETECTIONS,
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    MANIFEST,
    IndexIncomplete,
    IndexMismatch,
    chunk_path,
    chunk_records,
    detection_dtype,
    load_fields,
    read_manifest,
    remove_chunk,
    write_json,
)

__all__ = [
    "ChunkPlan",
    "build_approximate_index",
    "build_chunks",
    "built_frames",
    "finalize_index",
    "plan_chunks",
    "split_chunks",
]


# ---------------------------------------------------------------------------- building
@dataclass(frozen=True)
class ChunkPlan:
    """The chunks still to build: ``chunks`` (ascending) and whether the source's end is
    unknown (``open_end``: a video whose frame count is not known exactly; whoever builds the
    last listed chunk goes on until the source ends)."""

    chunks: Tuple[int, ...]
    open_end: bool


def plan_chunks(index_dir: str, frames_hint: Optional[int] = None) -> ChunkPlan:
    """The chunks of ``index_dir`` (prepared by :func:`prepare_index`) not yet built.

    Args:
        frames_hint: a video's frame count as its container tells (after ``every``), None when
            unknown; folders know theirs.
    """
    manifest = read_manifest(index_dir)
    size = manifest["chunk_frames"]
    records = chunk_records(index_dir)
    if manifest["status"] == "complete":
        return ChunkPlan((), False)
    lasts = [c for c, r in records.items() if r["last"]]
    if manifest["source"]["kind"] == "folder":
        total = math.ceil(len(manifest["source"]["names"]) / size)
        return ChunkPlan(tuple(c for c in range(total) if c not in records), False)
    if lasts:  # the end is known
        return ChunkPlan(tuple(c for c in range(min(lasts) + 1) if c not in records), False)
    total = math.ceil(frames_hint / size) if frames_hint else 0
    pending = [c for c in range(total) if c not in records]
    beyond = total
    while beyond in records:
        beyond += 1
    if not pending or pending[-1] < beyond:  # the end may lie further: from the first gap on
        pending.append(beyond)
    return ChunkPlan(tuple(pending), True)


def built_frames(index_dir: str) -> int:
    """Frames embedded in the chunks built so far."""
    return sum(len(r["frames"]) for r in chunk_records(index_dir).values())


def split_chunks(plan: ChunkPlan, rank: int, world: int) -> Tuple[List[int], bool]:
    """Rank ``rank``'s share of ``plan`` among ``world`` processes: a contiguous run of the
    pending chunks (so that a video is read once, from its first chunk on), and whether it
    holds the open end."""
    chunks = list(plan.chunks)
    bounds = [round(len(chunks) * r / world) for r in range(world + 1)]
    mine = chunks[bounds[rank] : bounds[rank + 1]]
    return mine, bool(plan.open_end and mine and mine[-1] == chunks[-1])


def _runs(chunks: Sequence[int]) -> List[Tuple[int, int]]:
    """Consecutive runs ``(first, last)`` of sorted chunk numbers."""
    runs: List[Tuple[int, int]] = []
    for c in sorted(chunks):
        if runs and c == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], c)
        else:
            runs.append((c, c))
    return runs


class _ChunkWriter:
    """Collects one chunk's frames, embeds them in batches and writes the chunk's files."""

    def __init__(self, index_dir: str, manifest: Dict, embedder, batch_size: int, bar):
        self.index_dir, self.embedder, self.batch_size, self.bar = (index_dir, embedder,
                                                                    batch_size, bar)
        self.size = manifest["chunk_frames"]
        self.dtype = detection_dtype(manifest["embed_dim"], manifest["dtype"])
        self.det_thresh = manifest["det_thresh"]
        self.every = manifest["source"]["every"]
        self.chunk = -1
        self._reset(0)

    def _reset(self, chunk: int) -> None:
        self.chunk = chunk
        self.frames: List[Tuple[int, str]] = []
        self.skipped: List[Tuple[int, str]] = []
        self.rows: List[np.ndarray] = []
        self._batch: List = []

    def add(self, frame) -> None:
        self.frames.append((frame.index // self.every, frame.name))
        self._batch.append(frame)
        if len(self._batch) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        found = self.embedder.embed_frames([f.image for f in self._batch])
        for frame, dets in zip(self._batch, found):
            keep = (np.ones(len(dets), bool) if self.det_thresh is None
                    else dets.scores >= self.det_thresh)
            rows = np.zeros(int(keep.sum()), self.dtype)
            rows["position"] = frame.index // self.every
            rows["box"] = dets.boxes[keep]
            rows["score"] = dets.scores[keep]
            rows["embedding"] = dets.embeddings[keep]
            self.rows.append(rows)
        self.bar.update(len(self._batch))
        self._batch = []

    def finish(self, stop: int, last: bool) -> None:
        """Write the current chunk (positions up to ``stop``), then start the next one."""
        self._flush()
        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, self.dtype)
        record = {"chunk": self.chunk, "start": self.chunk * self.size, "stop": int(stop),
                  "frames": self.frames, "skipped": sorted(self.skipped),
                  "detections": int(len(rows)), "last": bool(last)}
        write_atomically(chunk_path(self.index_dir, self.chunk, "npy"),
                         lambda f: np.save(f, rows))
        write_json(chunk_path(self.index_dir, self.chunk, "json"), record)
        self._reset(self.chunk + 1)


def build_chunks(index_dir: str, embedder, chunks: Sequence[int], open_end: bool = False,
                 batch_size: int = 4, progress: bool = True, desc: str = "index") -> int:
    """Embed the frames of ``chunks`` of a prepared index and write them (one process's share;
    see :func:`split_chunks`).

    Args:
        embedder: a :class:`~qeeps_d2.search.embedder.FrameEmbedder` of the index's model.
        chunks: chunk numbers to build.
        open_end: go on after the last of ``chunks`` until the source ends.
        batch_size: frames per ``embed_frames`` call.
        progress: show a tqdm bar (frames, frames/s).

    Returns:
        the number of frames embedded.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    manifest = read_manifest(index_dir)
    if embedder.embed_dim != manifest["embed_dim"]:
        raise IndexMismatch(f"index {index_dir} holds {manifest['embed_dim']}-d embeddings, the "
                            f"embedder gives {embedder.embed_dim}-d")
    source, size = manifest["source"], manifest["chunk_frames"]
    folder = source["kind"] == "folder"
    total_positions = len(source["names"]) if folder else None
    positions_of = {n: p for p, n in enumerate(source["names"])} if folder else {}
    runs = _runs(chunks)
    hint = sum((b - a + 1) * size for a, b in runs)
    if total_positions is not None:
        hint = sum(min((b + 1) * size, total_positions) - a * size for a, b in runs)
    done = 0
    with tqdm(total=hint, unit="frame", desc=desc, disable=not progress, smoothing=0.1) as bar:
        writer = _ChunkWriter(index_dir, manifest, embedder, batch_size, bar)
        for i, (first, last) in enumerate(runs):
            bounded = not (open_end and i == len(runs) - 1)
            done += _build_run(source, size, writer, positions_of, total_positions, first,
                               last if bounded else None)
    return done


def _build_run(source: Dict, size: int, writer: _ChunkWriter, positions_of: Dict[str, int],
               total_positions: Optional[int], first: int, last: Optional[int]) -> int:
    """Chunks ``first..last`` (``last`` None: until the source ends) read in one pass; returns
    the frames embedded."""
    every, folder = source["every"], source["kind"] == "folder"
    # a video's share is bounded by max_frames (no frame of the next share is decoded)
    cap = (last - first + 1) * size if (last is not None and not folder) else None
    gallery = iter_gallery(source["path"], every, start=first * size, max_frames=cap)
    frames = iter(gallery)
    writer._reset(first)
    skipped: List[Tuple[int, str]] = []  # unreadable images not yet given to their chunk
    taken = 0  # of gallery.skipped
    read, position = 0, first * size - 1

    def finish(stop: int, is_last: bool) -> None:
        nonlocal taken
        skipped.extend((positions_of[n], n) for n in gallery.skipped[taken:])
        taken = len(gallery.skipped)
        writer.skipped = [s for s in skipped if s[0] < stop]
        skipped[:] = [s for s in skipped if s[0] >= stop]
        writer.finish(stop, is_last)

    for frame in frames:
        position = frame.index // every
        while position >= (writer.chunk + 1) * size:  # the frame belongs to a later chunk
            finish((writer.chunk + 1) * size, False)
            if last is not None and writer.chunk > last:
                frames.close()
                return read
        writer.add(frame)
        read += 1
    if cap is not None and read == cap:  # stopped by max_frames, not by the source's end
        finish((writer.chunk + 1) * size, False)
        return read
    # the source ended; a folder's end is known (trailing unreadable images included)
    end = total_positions if folder else position + 1
    while (writer.chunk + 1) * size < end:
        finish((writer.chunk + 1) * size, False)
        if last is not None and writer.chunk > last:
            return read
    finish(max(end, writer.chunk * size), True)
    return read


# ---------------------------------------------------------------------------- merging
def finalize_index(index_dir: str, approximate: Optional[bool] = None) -> Dict:
    """Merge the chunks of all processes: check that chunks ``0..last`` are there and agree
    with the source, remove chunks beyond the source's end, write the manifest with the frame
    list (status ``complete``) and, for ``approximate`` (None: from
    :data:`APPROXIMATE_MIN_DETECTIONS` detections on), the HNSW index.

    Returns:
        the manifest, with ``frames`` (the name of each position), ``num_frames`` (read),
        ``skipped`` (unreadable images), ``num_detections``, ``chunks``, ``approximate``.

    Raises:
        IndexIncomplete: a chunk is missing (a process did not finish): building again
            continues.
    """
    manifest = read_manifest(index_dir)
    records = chunk_records(index_dir)
    lasts = [c for c, r in records.items() if r["last"]]
    if not lasts:
        raise IndexIncomplete(f"index {index_dir} is incomplete: the chunk that reaches the end "
                              "of the source is missing; run the same command again to continue")
    final = min(lasts)
    missing = [c for c in range(final + 1) if c not in records]
    if missing:
        raise IndexIncomplete(f"index {index_dir} is incomplete: {len(missing)} of {final + 1} "
                              f"chunks missing (first: {missing[0]}); run the same command "
                              "again to continue")
    for c in [c for c in records if c > final]:  # built past the end (overstated frame count)
        remove_chunk(index_dir, c)
    size = manifest["chunk_frames"]
    names: List[str] = []
    skipped: List[str] = []
    detections = 0
    for c in range(final + 1):
        record = records[c]
        entries = sorted([(p, n) for p, n in record["frames"]] +
                         [(p, n) for p, n in record["skipped"]])
        expected = list(range(c * size, record["stop"]))
        if record["start"] != c * size or [p for p, _ in entries] != expected:
            raise ValueError(f"index {index_dir}: chunk {c} does not hold positions "
                             f"{c * size}..{record['stop'] - 1}; remove it and build again")
        names += [n for _, n in entries]
        skipped += [n for _, n in record["skipped"]]
        detections += record["detections"]
    source = manifest["source"]
    if source["kind"] == "folder" and names != source["names"]:
        raise ValueError(f"index {index_dir}: its chunks do not list the folder's images; "
                         "remove the index and build again")
    if approximate is None:
        approximate = detections >= APPROXIMATE_MIN_DETECTIONS
    approx = None
    if approximate and detections:
        approx = {"kind": "hnsw", "file": APPROXIMATE_FILE, "M": HNSW_M,
                  "ef_construction": HNSW_EF_CONSTRUCTION}
        path = os.path.join(index_dir, APPROXIMATE_FILE)
        if manifest.get("approximate") != approx or not os.path.isfile(path):
            embeddings = load_fields(index_dir, final + 1, manifest)["embedding"]
            build_approximate_index(embeddings, path)
    elif os.path.exists(os.path.join(index_dir, APPROXIMATE_FILE)):
        os.remove(os.path.join(index_dir, APPROXIMATE_FILE))
    manifest.update(status="complete", frames=names, num_frames=len(names) - len(skipped),
                    skipped=skipped, num_detections=detections, chunks=final + 1,
                    approximate=approx)
    write_json(os.path.join(index_dir, MANIFEST), manifest)
    return manifest


def build_approximate_index(embeddings: np.ndarray, path: Optional[str] = None):
    """An HNSW FAISS index (inner product, :data:`HNSW_M`) of (N, D) float32 ``embeddings``,
    written to ``path`` (atomically) when given; returns it."""
    import faiss

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.IndexHNSWFlat(embeddings.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(embeddings)
    if path is not None:
        tmp = f"{path}.partial"
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    return index
