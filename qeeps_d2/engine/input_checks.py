"""Checks of ``train_net.py``'s inputs before anything is written: config file and overrides,
custom data set files (``DATASETS.PERSON_SEARCH_FILES``), data set names, the data sets' files,
the weights.

:func:`check_train_net_inputs` raises ``ValueError`` / ``FileNotFoundError`` /
:class:`~qeeps_d2.checkpoint.CheckpointError` with one message naming the bad input (the config
file, the override, the data set and its file, the weights file), so that ``train_net.py`` can
report it in one line and exit with status 2 (``qeeps_d2.utils.cli``) *before* ``default_setup``
creates ``OUTPUT_DIR`` and writes its logs and config copy.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Sequence

import yaml

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from qeeps_d2.checkpoint import QEEPSCheckpointer, warn_before_unpickling
from qeeps_d2.config import add_qeeps_config
from qeeps_d2.data.datasets.builtin import register_person_search_files
from qeeps_d2.data.datasets.catalog import is_registered, registered_names

__all__ = ["check_train_net_inputs"]

# What yacs / Detectron2 raise for an unparsable file, an unknown key or a wrong value type.
_CONFIG_ERRORS = (KeyError, ValueError, TypeError, AssertionError, yaml.YAMLError)


def _reason(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


def _check_config(config_file: str, opts: Sequence[str]):
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file} not found")
    cfg = get_cfg()
    add_qeeps_config(cfg)
    try:
        cfg.merge_from_file(config_file)
    except _CONFIG_ERRORS as e:
        raise ValueError(f"config file {config_file}: {_reason(e)}") from e
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"command-line overrides must be KEY VALUE pairs, got {len(opts)} "
                         f"words: {' '.join(map(str, opts))}")
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except _CONFIG_ERRORS as e:
            raise ValueError(f"command-line override {key} {value}: {_reason(e)}") from e
    return cfg


def _check_dataset_names(cfg, eval_only: bool) -> None:
    """Every name of DATASETS.TRAIN (unless ``eval_only``) and DATASETS.TEST must be a
    registered person-search data set (built in, or a file of DATASETS.PERSON_SEARCH_FILES);
    with ``eval_only`` DATASETS.TEST must name at least one (else nothing would be evaluated)."""
    if eval_only and not cfg.DATASETS.TEST:
        raise ValueError("--eval-only with an empty DATASETS.TEST evaluates nothing: name the test "
                         "sets, e.g. DATASETS.TEST '(\"synthps_test\",)'")
    keys = (("DATASETS.TEST", cfg.DATASETS.TEST),) if eval_only else (
        ("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST))
    for key, names in keys:
        for name in names:
            if not is_registered(name):
                raise ValueError(
                    f"{key}: unknown data set {name!r}; the person-search sets are "
                    f"{', '.join(registered_names())} (custom sets: their JSON files in "
                    "DATASETS.PERSON_SEARCH_FILES)"
                )


@contextlib.contextmanager
def _logging_off() -> Iterator[None]:
    """No log records up to WARNING inside (the real load after the checks reports them)."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


def _check_weights(cfg, eval_only: bool, resume: bool) -> None:
    """Load the weights that ``train_net.py`` will load (the last checkpoint of ``OUTPUT_DIR``
    with ``resume``, else ``MODEL.WEIGHTS``) into the config's model, built on the CPU, when they
    are a local file: it must be readable and, with ``eval_only``, fit the model exactly
    (``QEEPSCheckpointer(strict=True)``); for training, partial fits are fine. Remote weights
    (``detectron2://...``) are left to the real load. Quiet but for the pickle warning of a
    ``.pkl`` file, given once here (the real load in this process does not repeat it)."""
    weights = cfg.MODEL.WEIGHTS
    if not resume and (not weights or "://" in weights):
        return  # nothing local to load
    cpu_cfg = cfg.clone()
    cpu_cfg.defrost()
    cpu_cfg.MODEL.DEVICE = "cpu"
    checkpointer = QEEPSCheckpointer(build_model(cpu_cfg), cfg.OUTPUT_DIR, strict=eval_only)
    resumed = resume and checkpointer.has_checkpoint()
    path = checkpointer.get_checkpoint_file() if resumed else weights
    if not path or "://" in path:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{'last checkpoint' if resumed else 'MODEL.WEIGHTS: weights file'}"
                                f" {path} not found")
    warn_before_unpickling(path, log=checkpointer.logger)
    with _logging_off():
        checkpointer.load(path, checkpointables=[])


def check_train_net_inputs(config_file: str, opts: Sequence[str], eval_only: bool,
                           resume: bool = False) -> None:
    """Check what ``train_net.py`` is given, reading the data sets' annotation files and the
    weights it will load (:func:`_check_weights`; ``resume``: ``train_net.py --resume``).

    Raises:
        FileNotFoundError: a missing config file, data set folder, annotation file or weights
            file.
        ValueError: a config that does not parse or has unknown keys or wrong value types,
            an override of an unknown key, a malformed custom data set file, an unknown data
            set name, no test set with ``eval_only``, an annotation file of the wrong layout (each message names the file or
            key).
        qeeps_d2.checkpoint.CheckpointError: weights that cannot be read, that fit no backbone
            weight of the model, or, with ``eval_only``, that miss or add any key the model
            uses at inference (one line naming the file and the groups of keys).
    """
    from qeeps_d2.data.build import build_train_records, load_test_protocol
    from qeeps_d2.engine.trainer import setup_cfg

    cfg = _check_config(config_file, opts)
    register_person_search_files(cfg.DATASETS.PERSON_SEARCH_FILES)
    _check_dataset_names(cfg, eval_only)
    cfg = setup_cfg(config_file, opts, resolve_schedule=False)
    if not eval_only:
        build_train_records(cfg)
    for name in cfg.DATASETS.TEST:
        load_test_protocol(cfg, name)
    _check_weights(cfg, eval_only, resume)
