"""Person-search data: the data sets (:mod:`.datasets`: CUHK-SYSU, PRW and SynthPS readers,
custom sets from one JSON file each, their registration and search protocols), the SynthPS generator (:mod:`.synthps`), and what a
config trains and tests on: records (:mod:`.pairs`, :mod:`.search_inputs`), the mapper, samplers
and loaders (:mod:`.build`)."""
from .build import (
    build_person_search_test_loader,
    build_train_records,
    evaluated_queries,
    gallery_gt_boxes,
    load_test_protocol,
    train_image_records,
)
from .dataset_dicts import UNLABELED, detection_ground_truth, make_image_dicts
from .datasets.builtin import (
    register_person_search,
    register_person_search_file,
    register_person_search_files,
)
from .datasets.catalog import (
    DATASET_NAMES,
    dataset_root,
    datasets_root,
    load_dataset_dicts,
    load_protocol,
    num_pids,
    registered_names,
)
from .mapper import PersonSearchMapper
from .pairs import build_pair_records
from .samplers import ResumableTrainLoader
from .search_inputs import SEARCH_MODES, build_search_records
from .search_protocol import Gallery, Query, SearchProtocol

__all__ = [
    "build_person_search_test_loader",
    "build_train_records",
    "evaluated_queries",
    "gallery_gt_boxes",
    "load_test_protocol",
    "train_image_records",
    "UNLABELED",
    "detection_ground_truth",
    "make_image_dicts",
    "register_person_search",
    "register_person_search_file",
    "register_person_search_files",
    "DATASET_NAMES",
    "dataset_root",
    "datasets_root",
    "load_dataset_dicts",
    "load_protocol",
    "num_pids",
    "registered_names",
    "PersonSearchMapper",
    "build_pair_records",
    "ResumableTrainLoader",
    "SEARCH_MODES",
    "build_search_records",
    "Gallery",
    "Query",
    "SearchProtocol",
]
