"""The person-search ``Trainer`` (a ``DefaultTrainer``) and config set-up shared by the CLIs."""
from __future__ import annotations

import logging
import os

import torch

from detectron2.config import get_cfg
from detectron2.data import get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from qeeps_d2.checkpoint import install_qeeps_checkpointer
from qeeps_d2.config import add_qeeps_config, resolve_epoch_schedule
from qeeps_d2.data.build import (
    build_person_search_test_loader,
    build_person_search_train_loader,
    evaluated_queries,
    load_test_protocol,
    uses_pairs,
)
from qeeps_d2.data.pairs import build_pair_records

__all__ = ["Trainer", "setup_cfg", "num_train_records"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with person-search data loaders, the person-search evaluator and the
    QEEPS checkpointer (torchvision weights, safe loading of our own checkpoints)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        install_qeeps_checkpointer(self)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's SGD, or AdamW with the same parameter groups (``SOLVER.OPTIMIZER``)."""
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name == "SGD":
            return super().build_optimizer(cfg, model)
        if name != "ADAMW":
            raise ValueError(f"SOLVER.OPTIMIZER must be SGD or ADAMW, got {cfg.SOLVER.OPTIMIZER!r}")
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        optimizer = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR,
                                      weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        return maybe_add_gradient_clipping(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_person_search_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_person_search_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from qeeps_d2.evaluation.evaluator import PersonSearchEvaluator

        protocol = load_test_protocol(cfg, dataset_name)
        return PersonSearchEvaluator(
            dataset_name,
            protocol,
            output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"),
            det_thresh=cfg.TEST.PERSON_SEARCH.DET_THRESH,
            query_indices=evaluated_queries(cfg, protocol),
        )


def num_train_records(cfg) -> int:
    """Training records per epoch: images (OIM) or query-gallery pairs (query-guided)."""
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=True)
    if uses_pairs(cfg):
        return len(build_pair_records(dicts, cfg.DATALOADER.PAIRS.GALLERIES_PER_QUERY))
    return len(dicts)


def setup_cfg(config_file: str, opts=(), args=None, resolve_schedule: bool = True):
    """get_cfg + add_qeeps_config + file + overrides, device fallback, epoch schedule, freeze.

    With ``args`` (from ``default_argument_parser``) also runs Detectron2's ``default_setup``
    (output dir, logging, environment dump, seeding). ``resolve_schedule`` turns
    ``SOLVER.EPOCHS`` into iterations, which reads the training data set (skipped for
    ``--eval-only``).
    """
    cfg = get_cfg()
    add_qeeps_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is %s but CUDA is not available: using the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if resolve_schedule and not (args is not None and args.eval_only):
        resolve_epoch_schedule(cfg, num_train_records(cfg))
    cfg.freeze()
    if args is not None:
        default_setup(cfg, args)
    return cfg
