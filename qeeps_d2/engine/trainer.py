"""The person-search ``Trainer`` (a ``DefaultTrainer``) and config set-up shared by the CLIs."""
from __future__ import annotations

import logging
import re
import weakref
from typing import List, Sequence

import torch

from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from qeeps_d2.checkpoint import QEEPSCheckpointer
from qeeps_d2.config import add_qeeps_config, cascade_topk, resolve_epoch_schedule
from qeeps_d2.data.build import (
    build_person_search_test_loader,
    build_train_records,
    load_test_protocol,
    train_image_records,
)
from qeeps_d2.data.datasets.builtin import register_person_search_files
from qeeps_d2.data.datasets.catalog import num_pids
from qeeps_d2.data.mapper import PersonSearchMapper
from qeeps_d2.data.samplers import ResumableTrainLoader
from qeeps_d2.engine.hooks import NonFiniteLossCheck, OIMTableInit
from qeeps_d2.engine.local_similarity_fit import LocalSimilarityFit
from qeeps_d2.engine.rng_state import get_rng_state, set_rng_state
from qeeps_d2.engine.run_state import metric_history, resolve_run_seed, restore_metric_history
from qeeps_d2.evaluation.build import build_person_search_evaluator
from qeeps_d2.evaluation.cascade_inference import cascade_inference_on_dataset
from qeeps_d2.utils.atomic_write import remove_stale_temp_files

__all__ = ["Trainer", "setup_cfg"]

logger = logging.getLogger(__name__)


# Parameters that only a query-guided model has (QSSE excitations, the QRPN's query excitation
# and objectness head, QSimNet and its local head): the "new layers" of a QEEPS model fine-tuned
# from OIM.
_QUERY_GUIDANCE = re.compile(
    r"(^|\.)qsse\.|^proposal_generator\.query_|^roi_heads\.qsimnet\.|^roi_heads\.local_sim\.")


def is_trunk_parameter(name: str, detection_only: Sequence[str] = ()) -> bool:
    """True for a parameter of the ResNet trunk: the backbone (stem, res2..res4), the identity
    path's own stages (MODEL.QEEPS.ID_POOLER.OWN_STAGES) and its res5 head (the weights an
    ImageNet or identity-pretrained checkpoint provides), not the QSSE excitations that live
    inside its blocks (new layers), nor what serves detection only, which learns at the heads'
    rate: the detection head's own res5 (MODEL.QEEPS.DET_HEAD "separate") and the backbone
    stages named by the ``detection_only`` prefixes (:func:`detection_only_stages`)."""
    return (name.startswith(("backbone.", "roi_heads.res5.", "roi_heads.id_trunk."))
            and not name.startswith(tuple(detection_only))
            and not is_query_guidance_parameter(name))


def detection_only_stages(model) -> List[str]:
    """Parameter-name prefixes of the backbone stages that only the detector uses: those the
    identity path has its own copies of (``roi_heads.id_trunk``)."""
    id_trunk = getattr(getattr(model, "roi_heads", None), "id_trunk", None)
    return [f"backbone.{name}." for name in id_trunk] if id_trunk is not None else []


def is_query_guidance_parameter(name: str) -> bool:
    """True for a parameter name of the query-guidance blocks (absent from an OIM model)."""
    return _QUERY_GUIDANCE.search(name) is not None


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with person-search data loaders, the person-search evaluator and the
    QEEPS checkpointer (torchvision weights, safe loading of our own checkpoints).

    Resuming is exact: checkpoints also hold the RNG states, the training stream's seed and the
    recent logged metrics (:mod:`~qeeps_d2.engine.run_state`), a config's ``SEED -1`` is drawn
    once per run and reused on ``--resume``, and the training loader
    (:class:`~qeeps_d2.data.samplers.ResumableTrainLoader`) restarts at the resumed iteration's
    batch. Temporary files of a save interrupted by a kill are removed at the next start. A NaN
    or infinite loss term stops training with a message naming the iteration and the term
    (:class:`~qeeps_d2.engine.hooks.NonFiniteLossCheck`).
    """

    def __init__(self, cfg):
        self._resumed_metrics = None
        super().__init__(cfg)
        if comm.is_main_process():
            for path in remove_stale_temp_files(cfg.OUTPUT_DIR):
                logger.info("Removed %s, left by an interrupted save", path)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's SGD (momentum, Nesterov) or AdamW (``SOLVER.OPTIMIZER``) over Detectron2's
        parameter groups, with ``SOLVER.BASE_MODEL_LR_FACTOR`` applied to the parameters that are
        not query-guidance parameters (:func:`is_query_guidance_parameter`) and
        ``SOLVER.TRUNK_LR_FACTOR`` to the trunk's (:func:`is_trunk_parameter`)."""
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name not in ("SGD", "ADAMW"):
            raise ValueError(f"SOLVER.OPTIMIZER must be SGD or ADAMW, got {cfg.SOLVER.OPTIMIZER!r}")
        factor, trunk = cfg.SOLVER.BASE_MODEL_LR_FACTOR, cfg.SOLVER.TRUNK_LR_FACTOR
        detection_only = detection_only_stages(model)
        for key, value in (("BASE_MODEL_LR_FACTOR", factor), ("TRUNK_LR_FACTOR", trunk)):
            if value <= 0:
                raise ValueError(f"SOLVER.{key} must be > 0, got {value}")
        groups = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
            lr_factor_func=lambda name: (
                (1.0 if is_query_guidance_parameter(name) else factor)
                * (trunk if is_trunk_parameter(name, detection_only) else 1.0)),
        )
        if name == "SGD":
            optimizer = torch.optim.SGD(groups, lr=cfg.SOLVER.BASE_LR,
                                        momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV,
                                        weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg.SOLVER.BASE_LR,
                                          weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        return maybe_add_gradient_clipping(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        """Training records (:func:`~qeeps_d2.data.build.build_train_records`) in a resumable,
        deterministic stream."""
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        return ResumableTrainLoader(
            build_train_records(cfg), PersonSearchMapper(cfg, is_train=True),
            cfg.SOLVER.IMS_PER_BATCH, seed, num_workers=cfg.DATALOADER.NUM_WORKERS,
            group_by_aspect=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            rank=comm.get_rank(), world_size=comm.get_world_size(),
        )

    def build_hooks(self):
        """The QEEPS checkpointer (set here, before Detectron2's hooks that use it: torchvision
        weights, safe loading, atomic saves), the non-finite loss check and the OIM table
        initialisation, then Detectron2's hooks."""
        self.checkpointer = QEEPSCheckpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        hooks = [NonFiniteLossCheck()]
        lut_init = self.cfg.MODEL.QEEPS.OIM.LUT_INIT
        if lut_init not in ("zeros", "weights"):
            raise ValueError(f'MODEL.QEEPS.OIM.LUT_INIT must be "zeros" or "weights", got {lut_init!r}')
        if lut_init == "weights":
            hooks.append(OIMTableInit(train_image_records(self.cfg),
                                      PersonSearchMapper(self.cfg, is_train=False)))
        if self.cfg.MODEL.QEEPS.QSIMNET.LOCAL.ENABLED:  # before the checkpointer and evaluation
            hooks.append(LocalSimilarityFit(self.cfg, train_image_records(self.cfg),
                                            PersonSearchMapper(self.cfg, is_train=False)))
        return hooks + super().build_hooks()

    def state_dict(self):
        """Detectron2's trainer state plus the RNG states, the training stream's seed and the
        recent logged metrics."""
        state = super().state_dict()
        state["rng"] = get_rng_state()
        if hasattr(self, "storage"):
            state["metrics"] = metric_history(self.storage)
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            state["data_seed"] = loader.seed
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "rng" in state_dict:
            set_rng_state(state_dict["rng"])
        loader = self._trainer.data_loader
        if "data_seed" in state_dict and isinstance(loader, ResumableTrainLoader):
            loader.set_seed(state_dict["data_seed"])
        self._resumed_metrics = state_dict.get("metrics")

    def before_train(self):
        """A resumed run's storage first gets the metrics logged before the checkpoint."""
        if self._resumed_metrics:
            restore_metric_history(self.storage, self._resumed_metrics)
        super().before_train()

    def resume_or_load(self, resume=True):
        """Detectron2's ``resume_or_load``; the training stream then starts at ``start_iter``."""
        super().resume_or_load(resume=resume)
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            loader.start_at(self.start_iter)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_person_search_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_person_search_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """``DefaultTrainer.test``; with ``TEST.PERSON_SEARCH.CASCADE_TOPK`` > 0 (query-guided
        models) each test set is evaluated in cascade (query-agnostic first stage, then the
        shortlisted pairs; see ``qeeps_d2.evaluation.cascade``)."""
        if not cascade_topk(cfg):
            return super().test(cfg, model, evaluators)
        from functools import partial

        from detectron2.evaluation import print_csv_format

        results = {}
        for idx, name in enumerate(cfg.DATASETS.TEST):
            protocol = load_test_protocol(cfg, name)
            evaluator = evaluators[idx] if evaluators else cls.build_evaluator(cfg, name)
            results[name] = cascade_inference_on_dataset(
                model,
                build_person_search_test_loader(cfg, name, protocol, mode="agnostic"),
                partial(build_person_search_test_loader, cfg, name, protocol, "pairs"),
                evaluator,
                evaluator.cascade,
            )
            if comm.is_main_process():
                logger.info("Evaluation results for %s (cascade top-%d) in csv format:", name,
                            cascade_topk(cfg))
                print_csv_format(results[name])
        return results[cfg.DATASETS.TEST[0]] if len(results) == 1 else results


def _command_line_iterations_win(cfg, opts) -> None:
    """``SOLVER.MAX_ITER`` given on the command line replaces the config's ``SOLVER.EPOCHS``
    schedule (logged; its EPOCH_STEPS are scaled to the new length unless SOLVER.STEPS is given
    too); with ``SOLVER.EPOCHS`` given as well it is an error: the two say different things."""
    keys = opts[0::2]
    if "SOLVER.MAX_ITER" not in keys or cfg.SOLVER.EPOCHS <= 0:
        return
    if "SOLVER.EPOCHS" in keys:
        raise ValueError("give SOLVER.MAX_ITER or SOLVER.EPOCHS, not both (SOLVER.EPOCHS > 0 "
                         "sets MAX_ITER from the data set size)")
    epochs = cfg.SOLVER.EPOCHS
    if "SOLVER.STEPS" not in keys:
        cfg.SOLVER.STEPS = tuple(int(round(e / epochs * cfg.SOLVER.MAX_ITER))
                                 for e in cfg.SOLVER.EPOCH_STEPS)
    logger.warning("SOLVER.MAX_ITER %d from the command line replaces the config's SOLVER.EPOCHS "
                   "%s (lr steps at %s)", cfg.SOLVER.MAX_ITER, epochs, list(cfg.SOLVER.STEPS))
    cfg.SOLVER.EPOCHS = 0
    cfg.SOLVER.EPOCH_STEPS = ()


def setup_cfg(config_file: str, opts=(), args=None, resolve_schedule: bool = True):
    """get_cfg + add_qeeps_config + file + overrides, device fallback, epoch schedule, freeze.

    With ``args`` (from ``default_argument_parser``) also runs Detectron2's ``default_setup``
    (output dir, logging, environment dump, seeding). The custom data sets of
    ``DATASETS.PERSON_SEARCH_FILES`` are registered first (under the names their files hold).
    ``MODEL.QEEPS.OIM.NUM_PIDS`` 0 becomes the training set's number of identities (the model
    is sized from the config alone). For training, ``SEED -1`` is first
    replaced by the run's seed (:func:`~qeeps_d2.engine.run_state.resolve_run_seed`: drawn and
    stored in ``OUTPUT_DIR``, reused by ``--resume``). ``resolve_schedule`` turns
    ``SOLVER.EPOCHS`` into iterations, which reads the training data set (skipped for
    ``--eval-only``).
    """
    cfg = get_cfg()
    add_qeeps_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if args is not None:  # this package's log lines on the console and in OUTPUT_DIR/log.txt,
        # as Detectron2's default_setup does for its own loggers
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="qeeps_d2",
                     abbrev_name="qeeps").propagate = True  # still seen by handlers above
    _command_line_iterations_win(cfg, list(opts))
    register_person_search_files(cfg.DATASETS.PERSON_SEARCH_FILES)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is %s but CUDA is not available: using the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    training = not (args is not None and args.eval_only)
    if args is not None and training and cfg.SEED < 0:
        cfg.SEED = resolve_run_seed(cfg.OUTPUT_DIR, args.resume)
    if cfg.MODEL.QEEPS.OIM.NUM_PIDS <= 0 and cfg.DATASETS.TRAIN:
        try:
            cfg.MODEL.QEEPS.OIM.NUM_PIDS = num_pids(cfg.DATASETS.TRAIN[0])
        except (OSError, ValueError, KeyError) as e:  # building a model will say it is unsized
            logger.warning("MODEL.QEEPS.OIM.NUM_PIDS left at 0: the identities of %s cannot be "
                           "counted (%s)", cfg.DATASETS.TRAIN[0], e)
    if resolve_schedule and training:
        resolve_epoch_schedule(cfg, len(build_train_records(cfg)))
    cfg.freeze()
    if args is not None:
        default_setup(cfg, args)
    return cfg
