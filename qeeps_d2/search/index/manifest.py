"""An index's files (the format: :mod:`qeeps_d2.search.index`): its constants, settings and
manifest, the fingerprint of its source, the chunk files (paths, records, rows read back), and
:func:`prepare_index`, which creates an index folder or checks that a build can continue or append
to one. Numpy only (no torch)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from ...utils.atomic_write import remove_stale_temp_files, write_atomically
from ..gallery import image_files, is_stream

__all__ = [
    "APPROXIMATE_FILE",
    "APPROXIMATE_MIN_DETECTIONS",
    "CHUNKS",
    "DEFAULT_CHUNK_FRAMES",
    "DTYPES",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_EF_SEARCH",
    "HNSW_M",
    "INDEX_FORMAT",
    "MANIFEST",
    "IndexIncomplete",
    "IndexMismatch",
    "IndexSettings",
    "chunk_path",
    "chunk_records",
    "describe_model",
    "detection_dtype",
    "load_fields",
    "prepare_index",
    "read_manifest",
    "remove_chunk",
    "source_fingerprint",
    "write_json",
]

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
    """The structured dtype of a chunk's rows (:mod:`qeeps_d2.search.index`)."""
    if dtype not in DTYPES:
        raise ValueError(f"embedding dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return np.dtype([("position", "<i4"), ("box", "<f4", (4,)), ("score", "<f4"),
                     ("embedding", "<f2" if dtype == "float16" else "<f4", (embed_dim,))])



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


def write_json(path: str, data) -> None:
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
        names = image_files(path)[::every]
        if not names:
            raise ValueError(f"source folder {source} holds no image")
        return {"path": path, "kind": "folder", "every": int(every), "names": names}
    size = os.path.getsize(path)
    return {"path": path, "kind": "video", "every": int(every), "size": size,
            "content": _hash_file_parts(path, size)}


def chunk_path(index_dir: str, chunk: int, ext: str) -> str:
    return os.path.join(index_dir, CHUNKS, f"chunk_{chunk:06d}.{ext}")


def chunk_records(index_dir: str) -> Dict[int, Dict]:
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


def remove_chunk(index_dir: str, chunk: int) -> None:
    for ext in ("json", "npy"):  # the marker first: a half-removed chunk counts as missing
        path = chunk_path(index_dir, chunk, ext)
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
            for chunk, record in chunk_records(index_dir).items():
                if record["last"] or record["stop"] - record["start"] < size:
                    remove_chunk(index_dir, chunk)
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
    write_json(manifest_path, manifest)
    return manifest


# ---------------------------------------------------------------------------- chunk rows
def load_fields(index_dir: str, chunks: int, manifest: Dict,
                 embeddings: bool = True) -> Dict[str, np.ndarray]:
    """The rows of chunks ``0..chunks-1`` as one contiguous array per field (``embedding``
    widened to float32; left out without ``embeddings``). Filled chunk by chunk: concatenating
    the structured arrays and then taking fields is some 50 times slower."""
    dtype = detection_dtype(manifest["embed_dim"], manifest["dtype"])
    parts = []
    for c in range(chunks):
        rows = np.load(chunk_path(index_dir, c, "npy"))
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
