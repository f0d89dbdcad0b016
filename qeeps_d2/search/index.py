"""The gallery index: every detection of an archive (frame, box, score, embedding) on disk, built
once by ``qeeps-index`` and searched with FAISS by ``qeeps-search --index``.

An index is a folder::

    INDEX/manifest.json              settings, model and source signatures, status, frame list
    INDEX/chunks/chunk_000012.npy    the detections of chunk 12 (a structured array, below)
    INDEX/chunks/chunk_000012.json   its frames (position, name), unreadable images, count, last?
    INDEX/approximate.faiss          large indexes only: the approximate (HNSW) FAISS index

*Frames and chunks.* The source's frames (a folder's images sorted by name, or a video's frames;
every ``every``-th one) are numbered by position p = 0, 1, 2, ...; the frame index (as
``qeeps-search`` reports it) is ``p * every``. Chunk c holds positions
``[c * chunk_frames, (c + 1) * chunk_frames)``. A chunk's content depends on the model and its
frames only (the embedder's results do not depend on batch composition), so chunks can be built
in any order, by any number of processes (:func:`plan_chunks`, :func:`split_chunks`), and an
interrupted build continued: each chunk's ``.npy`` is written atomically, then its ``.json`` (the
marker that the chunk is done). The chunk that reaches the end of the source is marked ``last``;
:func:`finalize_index` checks that chunks ``0..last`` are all there, writes the frame list into
the manifest (status ``complete``) and, from :data:`APPROXIMATE_MIN_DETECTIONS` detections on,
the approximate FAISS index. Two builds with the same model and source give the same files,
byte for byte, whatever the number of processes or interruptions.

*Detections* (one row each, ``detection_dtype``): ``position`` int32, ``box`` (4,) float32 XYXY in
the frame's pixels, ``score`` float32 (>= the index's ``det_thresh``), ``embedding`` (D,)
float32 or float16 (``dtype``), L2-normalised. Per detection on disk: 24 + 4 D bytes (float32)
or 24 + 2 D bytes (float16).

*Continuing and appending* (:func:`prepare_index`): building into an existing index needs the
same model (signature), source, ``every``, ``det_thresh``, ``dtype`` and ``chunk_frames``, else a
one-line :class:`IndexMismatch`. A folder that gained images sorting after all the indexed ones
is appended: the existing full chunks are kept, the rest is built. Any other change of the
source is refused.

*Search* (:class:`IndexSearcher`): exact inner product (``faiss.IndexFlatIP``) below
:data:`APPROXIMATE_MIN_DETECTIONS` detections, the stored HNSW index (``efSearch``
:data:`HNSW_EF_SEARCH`) from there on; embeddings are L2-normalised, so the inner product is the
cosine similarity ``qeeps-search`` ranks by. Numpy and FAISS only (no torch).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from ..utils.atomic_write import remove_stale_temp_files, write_atomically
from .gallery import _image_files, is_stream, iter_gallery, read_image_bgr

__all__ = [
    "APPROXIMATE_MIN_DETECTIONS",
    "ChunkPlan",
    "DEFAULT_CHUNK_FRAMES",
    "HNSW_EF_SEARCH",
    "HNSW_M",
    "INDEX_FORMAT",
    "IndexData",
    "IndexIncomplete",
    "IndexMatch",
    "IndexMismatch",
    "IndexSearcher",
    "IndexSettings",
    "build_approximate_index",
    "build_chunks",
    "built_frames",
    "describe_model",
    "detection_dtype",
    "finalize_index",
    "load_index",
    "plan_chunks",
    "prepare_index",
    "read_frames",
    "read_manifest",
    "source_fingerprint",
    "split_chunks",
]

logger = logging.getLogger(__name__)

INDEX_FORMAT = "qeeps-index/1"
MANIFEST = "manifest.json"
CHUNKS = "chunks"
APPROXIMATE_FILE = "approximate.faiss"
DEFAULT_CHUNK_FRAMES = 128
DTYPES = ("float32", "float16")
# From this many detections on, an index gets an HNSW index and is searched approximately.
# benchmarks/index_bench.py, 2 CPU threads, D=128: the exact search takes 0.3 ms at 10k, 7 ms at
# 100k and 69 ms at 1M detections (3x the SynthPS query's own forward pass); HNSW answers in
# 0.2-0.4 ms with recall@10 1.000 at 100k and 0.962 at 1M, for +784 bytes per detection (on
# disk and in memory) and a build of 5 s per 100k (124 s at 1M).
APPROXIMATE_MIN_DETECTIONS = 1_000_000
HNSW_M = 32  # graph degree of the HNSW index
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 64  # candidates kept while searching (recall vs latency)
_CHUNK_NAME = re.compile(r"^chunk_(\d{6,})\.json$")


class IndexMismatch(ValueError):
    """Building into an index made with another model, source or settings (one-line message)."""


class IndexIncomplete(ValueError):
    """An index whose build has not finished (some chunks missing)."""


@dataclass(frozen=True)
class IndexSettings:
    """What an index is built from; all of it must match to continue a build.

    Attributes:
        model: ``{"backend", "signature", ...}``: ``backend`` ("torch" / "onnx") and
            ``signature`` (a hash of what decides the embeddings) are compared, the other keys
            (config and weights paths, opts) are kept to rebuild the model for searching.
        source: the folder or video file (stored as an absolute path).
        every: every N-th frame.
        det_thresh: detections scoring below it are not stored (None: the embedder's cut).
        embed_dim: D.
        dtype: ``"float32"`` or ``"float16"`` embeddings on disk.
        chunk_frames: frames per chunk (the unit of resuming and of sharding).
    """

    model: Dict
    source: str
    every: int = 1
    det_thresh: Optional[float] = None
    embed_dim: int = 0
    dtype: str = "float32"
    chunk_frames: int = DEFAULT_CHUNK_FRAMES


def detection_dtype(embed_dim: int, dtype: str = "float32") -> np.dtype:
    """The structured dtype of a chunk's rows (module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"embedding dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return np.dtype([("position", "<i4"), ("box", "<f4", (4,)), ("score", "<f4"),
                     ("embedding", "<f2" if dtype == "float16" else "<f4", (embed_dim,))])


# ---------------------------------------------------------------------------- manifest, source
def read_manifest(index_dir: str) -> Dict:
    """The manifest of ``index_dir``.

    Raises:
        FileNotFoundError: no index there.
        ValueError: a manifest that is not JSON or not of this format.
    """
    path = os.path.join(index_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no index in {index_dir} ({MANIFEST} not found)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"index manifest {path} unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise ValueError(f"index manifest {path}: not a {INDEX_FORMAT} manifest")
    return manifest


def _write_json(path: str, data) -> None:
    write_atomically(path, lambda f: json.dump(data, f, indent=1, sort_keys=True), mode="w")


def _hash_file_parts(path: str, size: int, part: int = 1 << 20) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(part))
        if size > 2 * part:
            f.seek(size - part)
        h.update(f.read(part))
    return h.hexdigest()


def source_fingerprint(source: str, every: int) -> Dict:
    """``{"path", "kind", "every", ...}`` of a source: a folder's kept image names (``names``,
    position order), or a video's size and a hash of its first and last MiB (``content``).

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: a stream (URL, camera: no fixed frames to index), ``every`` < 1, a folder
            without images.
    """
    if is_stream(source):
        raise ValueError(f"cannot index the stream {source}: an index needs a video file or a "
                         "folder of images (record the stream to a file first)")
    if int(every) != every or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    path = os.path.abspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"source {source} does not exist")
    if os.path.isdir(path):
        names = _image_files(path)[::every]
        if not names:
            raise ValueError(f"source folder {source} holds no image")
        return {"path": path, "kind": "folder", "every": int(every), "names": names}
    size = os.path.getsize(path)
    return {"path": path, "kind": "video", "every": int(every), "size": size,
            "content": _hash_file_parts(path, size)}


def _chunk_path(index_dir: str, chunk: int, ext: str) -> str:
    return os.path.join(index_dir, CHUNKS, f"chunk_{chunk:06d}.{ext}")


def _chunk_records(index_dir: str) -> Dict[int, Dict]:
    """chunk number -> its ``.json`` record, for the chunks whose ``.json`` exists."""
    folder = os.path.join(index_dir, CHUNKS)
    records = {}
    if not os.path.isdir(folder):
        return records
    for name in os.listdir(folder):
        match = _CHUNK_NAME.match(name)
        if match:
            with open(os.path.join(folder, name)) as f:
                records[int(match.group(1))] = json.load(f)
    return records


def _remove_chunk(index_dir: str, chunk: int) -> None:
    for ext in ("json", "npy"):  # the marker first: a half-removed chunk counts as missing
        path = _chunk_path(index_dir, chunk, ext)
        if os.path.exists(path):
            os.remove(path)


def describe_model(model: Dict) -> str:
    """A manifest's model entry in words (its files)."""
    if model.get("backend") == "onnx":
        return f"ONNX file {model.get('onnx_file')}"
    return f"config {model.get('config')}, weights {model.get('weights')}"


def _check_same(index_dir: str, manifest: Dict, settings: IndexSettings, source: Dict) -> None:
    """Raise :class:`IndexMismatch` (one line) unless ``settings`` can continue ``manifest``."""
    old = manifest["model"]
    if (old.get("backend"), old.get("signature")) != (settings.model.get("backend"),
                                                      settings.model.get("signature")):
        raise IndexMismatch(
            f"index {index_dir} was built with another model ({describe_model(old)}), not "
            f"{describe_model(settings.model)}: use that model, or another --output")
    old_source = manifest["source"]
    if (old_source["path"], old_source["kind"]) != (source["path"], source["kind"]):
        raise IndexMismatch(f"index {index_dir} was built from {old_source['path']}, not "
                            f"{source['path']}: use another --output")
    for key, option in (("every", "--every"), ("det_thresh", "--confidence-threshold"),
                        ("dtype", "--dtype"), ("chunk_frames", "--chunk-frames"),
                        ("embed_dim", "the embedding size")):
        ours = source["every"] if key == "every" else getattr(settings, key)
        theirs = old_source["every"] if key == "every" else manifest[key]
        if ours != theirs:
            raise IndexMismatch(f"index {index_dir} was built with {option} {theirs}, not "
                                f"{ours}: use the same, or another --output")
    if source["kind"] == "video":
        if (old_source["size"], old_source["content"]) != (source["size"], source["content"]):
            raise IndexMismatch(f"index {index_dir}: the video {source['path']} changed since "
                                "the index was started: use another --output")
    else:
        old_names, names = old_source["names"], source["names"]
        if names[: len(old_names)] != old_names:
            first = next((i for i, (a, b) in enumerate(zip(old_names, names)) if a != b),
                         len(names))
            was = old_names[first]
            now = names[first] if first < len(names) else "missing"
            raise IndexMismatch(
                f"index {index_dir}: the folder {source['path']} changed since the index was "
                f"started (image {first} was {was}, now {now}; only images added after the "
                "last one, in name order, can be appended): use another --output")


def prepare_index(index_dir: str, settings: IndexSettings) -> Dict:
    """Create the index folder for ``settings`` or check that an existing one can be continued
    (or appended to), then write its manifest (status ``building`` unless nothing is left to do).

    Call it once, before the processes that build chunks start (it removes temporary files and
    chunks that no longer fit an appended folder).

    Returns:
        the manifest.

    Raises:
        IndexMismatch: an existing index of another model, source or settings.
        FileNotFoundError, ValueError: as :func:`source_fingerprint`; a folder at ``index_dir``
            that holds something other than an index.
    """
    detection_dtype(settings.embed_dim, settings.dtype)  # checks dtype
    if settings.chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {settings.chunk_frames}")
    source = source_fingerprint(settings.source, settings.every)
    manifest_path = os.path.join(index_dir, MANIFEST)
    if os.path.isfile(manifest_path):
        manifest = read_manifest(index_dir)
        _check_same(index_dir, manifest, settings, source)
        remove_stale_temp_files(index_dir)
        remove_stale_temp_files(os.path.join(index_dir, CHUNKS))
        appended = (source["kind"] == "folder"
                    and len(source["names"]) > len(manifest["source"]["names"]))
        if manifest["status"] == "complete" and not appended:
            return manifest
        if appended:  # chunks that are not full any more (the old last one) are rebuilt
            size = settings.chunk_frames
            for chunk, record in _chunk_records(index_dir).items():
                if record["last"] or record["stop"] - record["start"] < size:
                    _remove_chunk(index_dir, chunk)
            if os.path.exists(os.path.join(index_dir, APPROXIMATE_FILE)):
                os.remove(os.path.join(index_dir, APPROXIMATE_FILE))
    elif os.path.isdir(index_dir) and os.listdir(index_dir):
        raise ValueError(f"output {index_dir} exists and is not an index (no {MANIFEST}): "
                         "choose a new or empty folder")
    os.makedirs(os.path.join(index_dir, CHUNKS), exist_ok=True)
    manifest = {
        "format": INDEX_FORMAT, "status": "building", "model": settings.model, "source": source,
        "det_thresh": settings.det_thresh, "embed_dim": int(settings.embed_dim),
        "dtype": settings.dtype, "chunk_frames": int(settings.chunk_frames),
    }
    _write_json(manifest_path, manifest)
    return manifest


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
    records = _chunk_records(index_dir)
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
    return sum(len(r["frames"]) for r in _chunk_records(index_dir).values())


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
        write_atomically(_chunk_path(self.index_dir, self.chunk, "npy"),
                         lambda f: np.save(f, rows))
        _write_json(_chunk_path(self.index_dir, self.chunk, "json"), record)
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
    records = _chunk_records(index_dir)
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
        _remove_chunk(index_dir, c)
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
            embeddings = _load_fields(index_dir, final + 1, manifest)["embedding"]
            build_approximate_index(embeddings, path)
    elif os.path.exists(os.path.join(index_dir, APPROXIMATE_FILE)):
        os.remove(os.path.join(index_dir, APPROXIMATE_FILE))
    manifest.update(status="complete", frames=names, num_frames=len(names) - len(skipped),
                    skipped=skipped, num_detections=detections, chunks=final + 1,
                    approximate=approx)
    _write_json(os.path.join(index_dir, MANIFEST), manifest)
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


# ---------------------------------------------------------------------------- loading, search
def _load_fields(index_dir: str, chunks: int, manifest: Dict,
                 embeddings: bool = True) -> Dict[str, np.ndarray]:
    """The rows of chunks ``0..chunks-1`` as one contiguous array per field (``embedding``
    widened to float32; left out without ``embeddings``). Filled chunk by chunk: concatenating
    the structured arrays and then taking fields is some 50 times slower."""
    dtype = detection_dtype(manifest["embed_dim"], manifest["dtype"])
    parts = []
    for c in range(chunks):
        rows = np.load(_chunk_path(index_dir, c, "npy"))
        if rows.dtype != dtype:
            raise ValueError(f"index {index_dir}: chunk {c} has rows of {rows.dtype}, expected "
                             f"{dtype}")
        parts.append(rows)
    total = sum(len(rows) for rows in parts)
    fields = {"position": np.empty(total, np.int32), "box": np.empty((total, 4), np.float32),
              "score": np.empty(total, np.float32)}
    if embeddings:
        fields["embedding"] = np.empty((total, manifest["embed_dim"]), np.float32)
    start = 0
    parts.reverse()
    while parts:  # each chunk freed once copied
        rows = parts.pop()
        for name, array in fields.items():
            array[start : start + len(rows)] = rows[name]
        start += len(rows)
    return fields


@dataclass
class IndexData:
    """A complete index in memory (rows in gallery order).

    Attributes:
        manifest: its manifest.
        positions: (N,) int32 frame position of each detection.
        boxes: (N, 4) float32; scores: (N,) float32.
        embeddings: (N, D) float32 (float16 indexes are widened); None when read without
            them, and once an :class:`IndexSearcher` that read the index itself moved them
            into FAISS.
        frames: the name of each position; every: the source's frame step.
        index_dir: the folder it was read from.
    """

    index_dir: str
    manifest: Dict
    positions: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    embeddings: Optional[np.ndarray]
    frames: List[str] = field(repr=False)
    every: int = 1

    def frame_index(self, position: int) -> int:
        """The frame index (``qeeps-search``'s) of a position."""
        return int(position) * self.every


def load_index(index_dir: str, embeddings: bool = True) -> IndexData:
    """Read a complete index (without its embeddings: ``embeddings`` False).

    Raises:
        FileNotFoundError: no index there.
        IndexIncomplete: its build has not finished.
    """
    manifest = read_manifest(index_dir)
    if manifest["status"] != "complete":
        raise IndexIncomplete(f"index {index_dir} is still being built (or was interrupted): "
                              "run qeeps-index again to finish it")
    fields = _load_fields(index_dir, manifest["chunks"], manifest, embeddings)
    return IndexData(
        index_dir=index_dir,
        manifest=manifest,
        positions=fields["position"],
        boxes=fields["box"],
        scores=fields["score"],
        embeddings=fields.get("embedding"),
        frames=list(manifest["frames"]),
        every=int(manifest["source"]["every"]),
    )


@dataclass
class IndexMatch:
    """A detection of the index scored against a query (the fields of
    :class:`~qeeps_d2.search.Match`, plus ``position`` and ``row``)."""

    frame: str
    index: int
    box: Tuple[float, float, float, float]
    det_score: float
    similarity: float
    position: int
    row: int


class IndexSearcher:
    """Top-k search of a complete index with FAISS.

    Example::

        searcher = IndexSearcher("output/index")
        for m in searcher.search(query_embedding, topk=10):
            print(m.frame, m.box, m.similarity)
    """

    def __init__(self, index: "str | IndexData", det_thresh: Optional[float] = None,
                 approximate: Optional[bool] = None, ef_search: int = HNSW_EF_SEARCH):
        """
        Args:
            index: an index folder, or its :class:`IndexData`.
            det_thresh: keep detections scoring at least this (None: the index's own; lower
                than the index's is an error, those detections are not stored).
            approximate: search the stored HNSW index (None: when the index has one).
            ef_search: HNSW candidates per search (recall vs latency).

        Raises:
            ValueError: ``det_thresh`` below the index's; ``approximate`` True for an index
                without an HNSW index.
        """
        import faiss

        own = not isinstance(index, IndexData)
        if own:  # the stored HNSW index holds its own vectors
            manifest = read_manifest(index)
            use_stored = approximate if approximate is not None else bool(
                manifest.get("approximate"))
            index = load_index(index, embeddings=not use_stored)
        self.data = index
        manifest = self.data.manifest
        self.embed_dim = int(manifest["embed_dim"])
        stored = manifest["det_thresh"]
        if det_thresh is not None and stored is not None and det_thresh < stored:
            raise ValueError(f"detection threshold {det_thresh} is below the index's {stored}: "
                             "it does not store those detections (build it with "
                             f"--confidence-threshold {det_thresh})")
        self.det_thresh = stored if det_thresh is None else float(det_thresh)
        approx = manifest.get("approximate")
        if approximate is None:
            approximate = approx is not None
        if approximate and approx is None:
            raise ValueError(f"index has no approximate index (it holds "
                             f"{manifest['num_detections']} detections; "
                             f"one is built from {APPROXIMATE_MIN_DETECTIONS} on)")
        self.approximate = bool(approximate)
        kept = (np.ones(len(self.data.scores), bool) if self.det_thresh is None
                else self.data.scores >= self.det_thresh)
        self.num_detections = int(kept.sum())
        self._params = None
        if self.approximate:
            self._index = faiss.read_index(os.path.join(self.data.index_dir, approx["file"]))
            self._rows = None  # FAISS ids are rows
            self._params = faiss.SearchParametersHNSW()
            self._params.efSearch = int(ef_search)
            if self.num_detections < len(kept):
                self._selector = faiss.IDSelectorBatch(np.flatnonzero(kept).astype(np.int64))
                self._params.sel = self._selector
        else:
            if self.data.embeddings is None:
                raise ValueError("exact search needs the embeddings: load_index(..., "
                                 "embeddings=True)")
            self._index = faiss.IndexFlatIP(self.embed_dim)
            if self.num_detections == len(kept):  # FAISS ids are rows
                self._rows = None
                self._index.add(np.ascontiguousarray(self.data.embeddings, dtype=np.float32))
            else:
                self._rows = np.flatnonzero(kept)
                self._index.add(np.ascontiguousarray(self.data.embeddings[self._rows]))
        if own:  # FAISS holds the vectors now
            self.data.embeddings = None

    @property
    def ef_search(self) -> Optional[int]:
        """HNSW candidates per search (None for the exact search); settable."""
        return None if self._params is None else int(self._params.efSearch)

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if self._params is None:
            raise ValueError("ef_search applies to the approximate (HNSW) search")
        self._params.efSearch = int(value)

    def _search(self, query: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """(similarities, rows) of the ``n`` best detections, similarity descending, ties in
        gallery order."""
        query = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
        if query.shape[1] != self.embed_dim:
            raise ValueError(f"query embedding has {query.shape[1]} values, the index's "
                             f"{self.embed_dim}")
        norm = float(np.linalg.norm(query))
        if not abs(norm - 1.0) < 1e-3:  # inner products would not be cosine similarities
            raise ValueError(f"query embedding is not L2-normalised (norm {norm:.4g})")
        n = min(n, self.num_detections)
        if n <= 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        # a few more than asked, so that ties at the cut are decided by gallery order
        want = min(n + 16, self.num_detections)
        sims, ids = (self._index.search(query, want, params=self._params) if self._params
                     else self._index.search(query, want))
        sims, ids = sims[0], ids[0]
        valid = ids >= 0
        sims, ids = sims[valid], ids[valid]
        rows = ids if self._rows is None else self._rows[ids]
        order = np.lexsort((rows, -sims))[:n]
        return sims[order], rows[order]

    def _match(self, row: int, similarity: float) -> IndexMatch:
        d = self.data
        p = int(d.positions[row])
        return IndexMatch(d.frames[p], d.frame_index(p), tuple(float(v) for v in d.boxes[row]),
                          float(d.scores[row]), float(similarity), p, int(row))

    def search(self, query: np.ndarray, topk: int = 10) -> List[IndexMatch]:
        """The ``topk`` detections most similar to the (D,) L2-normalised ``query`` embedding
        (score >= ``det_thresh``), similarity descending (ties: gallery order)."""
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        sims, rows = self._search(query, topk)
        return [self._match(r, s) for s, r in zip(sims, rows)]

    def best_frames(self, query: np.ndarray, k: int, topk: int = 10) -> List[IndexMatch]:
        """What a cascade over the index needs: the best matches, similarity descending (ties:
        gallery order), deep enough to cover ``k`` distinct frames (the ``k`` frames with the
        best matches: the first ``k`` met) and ``topk`` matches of other frames, or the whole
        index."""
        if k < 1 or topk < 1:
            raise ValueError(f"k and topk must be >= 1, got {k}, {topk}")
        n = 4 * (k + topk)
        while True:
            sims, rows = self._search(query, n)
            positions = self.data.positions[rows]
            first = list(dict.fromkeys(positions.tolist()))[:k]
            others = int(np.count_nonzero(~np.isin(positions, first)))
            if (len(first) >= k and others >= topk) or n >= self.num_detections:
                return [self._match(r, s) for s, r in zip(sims, rows)]
            n *= 4


def read_frames(data: IndexData, positions: Sequence[int]) -> Dict[int, np.ndarray]:
    """The (H, W, 3) uint8 BGR frames at ``positions``, read back from the index's source (a
    video is read once, from the first wanted frame to the last; images that cannot be read any
    more are left out)."""
    source = data.manifest["source"]
    wanted = sorted(set(int(p) for p in positions))
    frames: Dict[int, np.ndarray] = {}
    if not wanted:
        return frames
    if source["kind"] == "folder":
        for p in wanted:
            try:
                frames[p] = read_image_bgr(os.path.join(source["path"], data.frames[p]))
            except (OSError, ValueError) as e:
                logger.warning("%s: left out of the report", e)
        return frames
    gallery = iter_gallery(source["path"], data.every, start=wanted[0],
                           max_frames=wanted[-1] - wanted[0] + 1)
    keep = set(wanted)
    for frame in gallery:
        p = frame.index // data.every
        if p in keep:
            frames[p] = frame.image
    return frames
