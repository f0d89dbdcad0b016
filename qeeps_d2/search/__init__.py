"""Person search in a user's own images or video: the :class:`PersonSearcher` API, gallery
sources (a folder of images or a video, streamed), rendering of the results (match strips, an
HTML report), the ``qeeps-search`` command (:mod:`qeeps_d2.search.cli`), and the gallery index
(:mod:`qeeps_d2.search.index`: every detection embedded once by ``qeeps-index``,
:mod:`qeeps_d2.search.index_cli`; searched with FAISS by :class:`IndexSearcher`)."""
from .embedder import FrameDetections, FrameEmbedder, TorchFrameEmbedder
from .gallery import Gallery, GalleryFrame, count_gallery, iter_gallery, read_image_bgr
from .index import IndexMatch, IndexSearcher, load_index
from .render import draw_matches, match_strip, write_html_report
from .searcher import Match, PersonSearcher, merge_cascade_matches, resolve_device

__all__ = [
    "FrameDetections",
    "FrameEmbedder",
    "Gallery",
    "GalleryFrame",
    "IndexMatch",
    "IndexSearcher",
    "Match",
    "PersonSearcher",
    "TorchFrameEmbedder",
    "count_gallery",
    "draw_matches",
    "iter_gallery",
    "load_index",
    "match_strip",
    "merge_cascade_matches",
    "read_image_bgr",
    "resolve_device",
    "write_html_report",
]
