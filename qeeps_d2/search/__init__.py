"""Person search in a user's own images or video: the :class:`PersonSearcher` API, gallery
sources (a folder of images or a video, streamed), rendering of the results (match strips, an
HTML report) and the ``qeeps-search`` command (:mod:`qeeps_d2.search.cli`)."""
from .gallery import Gallery, GalleryFrame, count_gallery, iter_gallery, read_image_bgr
from .render import draw_matches, match_strip, write_html_report
from .searcher import Match, PersonSearcher, resolve_device

__all__ = [
    "Gallery",
    "GalleryFrame",
    "Match",
    "PersonSearcher",
    "count_gallery",
    "draw_matches",
    "iter_gallery",
    "match_strip",
    "read_image_bgr",
    "resolve_device",
    "write_html_report",
]
