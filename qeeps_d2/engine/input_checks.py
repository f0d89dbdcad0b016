"""Checks of ``train_net.py``'s inputs before anything is written: config file and overrides,
data set names, the data sets' files.

:func:`check_train_net_inputs` raises ``ValueError`` / ``FileNotFoundError`` with one message
naming the bad input (the config file, the override, the data set and its file), so that
``train_net.py`` can report it in one line and exit with status 2 (``qeeps_d2.utils.cli``)
*before* ``default_setup`` creates ``OUTPUT_DIR`` and writes its logs and config copy.
"""
from __future__ import annotations

import os
from typing import Sequence

import yaml

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from qeeps_d2.config import add_qeeps_config
from qeeps_d2.data.catalog import DATASET_NAMES

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
    registered = set(DatasetCatalog.list())
    keys = (("DATASETS.TEST", cfg.DATASETS.TEST),) if eval_only else (
        ("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST))
    for key, names in keys:
        for name in names:
            if name not in registered:
                raise ValueError(
                    f"{key}: unknown data set {name!r}; the person-search sets are "
                    f"{', '.join(DATASET_NAMES)}"
                )


def check_train_net_inputs(config_file: str, opts: Sequence[str], eval_only: bool) -> None:
    """Check what ``train_net.py`` is given, reading the data sets' annotation files.

    Raises:
        FileNotFoundError: a missing config file, data set folder or annotation file.
        ValueError: a config that does not parse or has unknown keys or wrong value types,
            an override of an unknown key, an unknown data set name, an annotation file of
            the wrong layout (each message names the file or key).
    """
    from qeeps_d2.engine.trainer import load_test_protocol, setup_cfg, train_records

    cfg = _check_config(config_file, opts)
    _check_dataset_names(cfg, eval_only)
    cfg = setup_cfg(config_file, opts, resolve_schedule=False)
    if not eval_only:
        train_records(cfg)
    for name in cfg.DATASETS.TEST:
        if name in DATASET_NAMES:
            load_test_protocol(cfg, name)
