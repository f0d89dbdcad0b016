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

*Modules.* :mod:`.manifest`: the constants, settings, manifest, source fingerprint and chunk
files, and :func:`prepare_index`; :mod:`.build`: planning, building and merging the chunks;
:mod:`.searcher`: loading and searching a complete index. Everything public is re-exported here.
"""
from .build import (
    ChunkPlan,
    build_approximate_index,
    build_chunks,
    built_frames,
    finalize_index,
    plan_chunks,
    split_chunks,
)
from .manifest import (
    APPROXIMATE_MIN_DETECTIONS,
    DEFAULT_CHUNK_FRAMES,
    HNSW_EF_SEARCH,
    HNSW_M,
    INDEX_FORMAT,
    IndexIncomplete,
    IndexMismatch,
    IndexSettings,
    describe_model,
    detection_dtype,
    prepare_index,
    read_manifest,
    source_fingerprint,
)
# the old module's other constants (qeeps_d2.search.index_cli, benchmarks/index_bench.py)
from .manifest import APPROXIMATE_FILE, CHUNKS, DTYPES, HNSW_EF_CONSTRUCTION, MANIFEST  # noqa: F401
from .searcher import IndexData, IndexMatch, IndexSearcher, load_index, read_frames

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
