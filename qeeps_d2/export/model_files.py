"""Build an exportable model from a config file and weights, with one-line errors."""
from __future__ import annotations

import os
from typing import Sequence, Tuple

import torch
import yaml

from detectron2.modeling import build_model

from ..checkpoint import QEEPSCheckpointer
from ..engine.trainer import setup_cfg
from .onnx_export import check_exportable

__all__ = ["load_export_model"]


def load_export_model(config_file: str, weights: str, opts: Sequence[str] = (),
                      first_stage: bool = False) -> Tuple[object, torch.nn.Module]:
    """The config (``config_file`` + ``opts``, on the CPU) and its model, weights loaded strictly,
    in eval mode. ``first_stage``: accept a query-guided model (its first stage exports).

    Raises:
        FileNotFoundError: a missing config or (local) weights file.
        ValueError: a config that does not parse or that cannot export (see
            :func:`~qeeps_d2.export.check_exportable`: query-guided, not a QEEPS model, ...).
        qeeps_d2.checkpoint.CheckpointError: weights that cannot be read or do not fit the
            model (any missing, unused or mis-shaped key but the training-only state).
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file} not found")
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file {weights} not found")
    opts = list(opts) + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights]
    try:
        cfg = setup_cfg(config_file, opts, resolve_schedule=False)
    except (KeyError, ValueError, AssertionError, yaml.YAMLError) as e:
        raise ValueError(f"config {config_file}: {type(e).__name__}: {e}") from e
    check_exportable(cfg, config_file, first_stage)  # before building: a query-guided model is not built
    model = build_model(cfg)
    QEEPSCheckpointer(model, strict=True).load(weights)
    return cfg, model.eval()
