"""The results viewer: per-query top-k matches and metrics of results files as an HTML page
(``qeeps-view``, :mod:`qeeps_d2.viewer.cli`; the demo's report uses it too)."""
from .page import Cell, Column, Section, write_page
from .report import ModelResults, QueryRow, ViewerReport, build_viewer, load_models, query_table
from .selection import QuerySelection, parse_query_list, select_queries

__all__ = [
    "Cell",
    "Column",
    "ModelResults",
    "QueryRow",
    "QuerySelection",
    "Section",
    "ViewerReport",
    "build_viewer",
    "load_models",
    "parse_query_list",
    "query_table",
    "select_queries",
    "write_page",
]
