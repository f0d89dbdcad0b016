"""What kind of record a data record or model input is (one answer for the whole package).

Person-search records come in four kinds, told apart by their keys both before the mapper
(``file_name``, ``query_file_name``, ``query_box``) and after it (``image``, ``query_image``):

* ``"pair"``: a gallery image with its query image and query box (``query_file_name`` or
  ``query_image``), for query-guided models;
* ``"query"``: a query box in its own image (``query_box`` without a query image);
* ``"gallery"``: a scene image alone (training image, test gallery image, search frame).
"""
from __future__ import annotations

from typing import Mapping

__all__ = ["record_kind", "RECORD_KINDS"]

RECORD_KINDS = ("pair", "query", "gallery")


def record_kind(record: Mapping) -> str:
    """``"pair"``, ``"query"`` or ``"gallery"`` (see the module docstring)."""
    if "query_file_name" in record or "query_image" in record:
        return "pair"
    if "query_box" in record:
        return "query"
    return "gallery"
