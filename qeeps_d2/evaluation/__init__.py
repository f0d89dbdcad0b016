"""Person-search evaluation: protocol scoring (numpy only), results files, the Detectron2
evaluators (search, proposal recall, detection; combined by :mod:`.build`), the cascade and the
``qeeps-eval`` command (:mod:`qeeps_d2.evaluation.cli`)."""
from .average_precision import average_precision
from .build import PersonSearchEvaluators, build_person_search_evaluator
from .cascade_inference import CascadeState, cascade_inference_on_dataset
from .detection_evaluator import DetectionEvaluator
from .detection_metrics import evaluate_detections
from .proposal_recall import ProposalRecallEvaluator
from .results_file import (
    RESULTS_FORMAT,
    QueryResult,
    SearchResults,
    read_results,
    validate_against_protocol,
    write_results,
)
from .search_evaluator import PersonSearchEvaluator
from .search_metrics import TOP_K, QueryScore, SearchScores, score_query, score_search

__all__ = [
    "average_precision",
    "PersonSearchEvaluators",
    "build_person_search_evaluator",
    "CascadeState",
    "cascade_inference_on_dataset",
    "DetectionEvaluator",
    "evaluate_detections",
    "ProposalRecallEvaluator",
    "PersonSearchEvaluator",
    "RESULTS_FORMAT",
    "QueryResult",
    "SearchResults",
    "read_results",
    "validate_against_protocol",
    "write_results",
    "TOP_K",
    "QueryScore",
    "SearchScores",
    "score_query",
    "score_search",
]
