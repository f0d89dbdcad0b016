"""Person-search evaluation: protocol scoring (numpy only), results files, the Detectron2
evaluator and the ``qeeps-eval`` command (:mod:`qeeps_d2.evaluation.cli`)."""
from .average_precision import average_precision
from .detection_metrics import detection_ground_truth, evaluate_detections
from .evaluator import PersonSearchEvaluator
from .results_file import (
    RESULTS_FORMAT,
    QueryResult,
    SearchResults,
    read_results,
    validate_against_protocol,
    write_results,
)
from .search_inputs import SEARCH_MODES, build_search_records
from .search_metrics import TOP_K, QueryScore, SearchScores, score_query, score_search

__all__ = [
    "average_precision",
    "detection_ground_truth",
    "evaluate_detections",
    "PersonSearchEvaluator",
    "RESULTS_FORMAT",
    "QueryResult",
    "SearchResults",
    "read_results",
    "validate_against_protocol",
    "write_results",
    "SEARCH_MODES",
    "build_search_records",
    "TOP_K",
    "QueryScore",
    "SearchScores",
    "score_query",
    "score_search",
]
