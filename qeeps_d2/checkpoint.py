"""Loading ``MODEL.WEIGHTS``: model-zoo ``.pkl``, torchvision ResNet ``.pth``, QEEPS checkpoints.

:class:`QEEPSCheckpointer` is Detectron2's ``DetectionCheckpointer`` with three additions:

1. **torchvision ResNet state dicts** (``torchvision.models.resnet50().state_dict()`` saved with
   ``torch.save``: ``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``,
   ``layer1.0.downsample.{0,1}.*``, ``fc.*``) are recognised by their key names and renamed on load
   to Detectron2's ResNet names (the renames of Detectron2's ``tools/convert-torchvision-to-d2.py``:
   ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``, ``layer{1..4}`` -> ``res{2..5}``,
   ``bn{k}`` -> ``conv{k}.norm``, ``downsample.0``/``.1`` -> ``shortcut``/``shortcut.norm``), then
   matched by name suffix, so ``res2..res4`` land in ``backbone.*`` and ``res5`` (torchvision's
   ``layer4``) in ``roi_heads.res5.*``. ``fc.*`` (the ImageNet classifier) is reported as unused;
   BN ``num_batches_tracked`` counters are dropped. torchvision weights expect a different input
   than the MSRA ones and need, in the config::

       MODEL.PIXEL_MEAN [123.675, 116.280, 103.530]
       MODEL.PIXEL_STD [58.395, 57.120, 57.375]
       INPUT.FORMAT "RGB"
       MODEL.RESNETS.STRIDE_IN_1X1 False

   A warning is logged when a torchvision checkpoint is loaded into a model built otherwise.
2. **``.pth`` files are read with ``torch.load(..., weights_only=True)``**: a checkpoint written by
   the Detectron2 trainer (``{"model", "optimizer", "scheduler"/"trainer", "iteration", ...}``)
   holds only tensors and plain containers, and anything else is refused instead of executed.
   An unreadable (corrupt, truncated, not a checkpoint) file raises :class:`CheckpointError`
   naming the file.
3. **A checkpoint that does not fit the model raises** :class:`CheckpointError` when not a single
   backbone weight was loaded from it (a different architecture, different widths, an unrelated
   file), listing the shape mismatches and the missing and unused keys. Partial fits (e.g. an OIM
   model's checkpoint loaded into a QEEPS model: the QSSE/QRPN/QSimNet weights are missing and
   keep their initialisation) are loaded and the differences logged, as in Detectron2.

4. **Saving is atomic**: a checkpoint (and the ``last_checkpoint`` tag) is written to a temporary
   file in the same folder, flushed to disk and renamed over the final name, so a crash or a
   SIGKILL while saving leaves the previous checkpoint, and the tag pointing to it, intact.

Model-zoo files (``detectron2://ImageNetPretrained/MSRA/R-50.pkl``, Caffe2 names such as
``res2_0_branch2a_w``) load exactly as with the stock checkpointer (Caffe2 renames + suffix
matching). **Security**: ``.pkl`` files are Python pickles, and unpickling runs code chosen by
whoever wrote the file: load ``.pkl`` weights only from a trusted source.
"""
from __future__ import annotations

import logging
import os
import re
import weakref
from typing import Any, Dict, List, Mapping

import torch
from fvcore.common.checkpoint import PeriodicCheckpointer

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling.backbone.resnet import BottleneckBlock

from qeeps_d2.utils.atomic_write import write_atomically

__all__ = [
    "CheckpointError",
    "QEEPSCheckpointer",
    "TORCHVISION_PIXEL_MEAN",
    "TORCHVISION_PIXEL_STD",
    "convert_torchvision_resnet_names",
    "install_qeeps_checkpointer",
    "is_torchvision_resnet",
    "torchvision_preprocessing_mismatches",
]

logger = logging.getLogger(__name__)

# Input normalisation that torchvision's ImageNet ResNets were trained with (RGB, 0-255 scale).
TORCHVISION_PIXEL_MEAN = (123.675, 116.280, 103.530)
TORCHVISION_PIXEL_STD = (58.395, 57.120, 57.375)

# At most this many entries of each key list go into a mismatch error message.
_MAX_LISTED_KEYS = 20

# torchvision -> Detectron2 ResNet renames, applied in order to each key.
_TORCHVISION_RENAMES = (
    (re.compile(r"^conv1\."), "stem.conv1."),
    (re.compile(r"^bn1\."), "stem.conv1.norm."),
    (re.compile(r"^layer([1-4])\."), lambda m: f"res{int(m.group(1)) + 1}."),
    (re.compile(r"\.bn([1-3])\."), r".conv\1.norm."),
    (re.compile(r"\.downsample\.0\."), ".shortcut."),
    (re.compile(r"\.downsample\.1\."), ".shortcut.norm."),
)


class CheckpointError(RuntimeError):
    """A weights file that cannot be read, or whose weights do not fit the model."""


def is_torchvision_resnet(state_dict: Mapping[str, Any]) -> bool:
    """True if ``state_dict`` has torchvision ResNet key names (``conv1.weight``, ``bn1.*``,
    ``layer1.*``) rather than Detectron2 ones."""
    return (
        "conv1.weight" in state_dict
        and "bn1.weight" in state_dict
        and any(k.startswith("layer1.") for k in state_dict)
    )


def convert_torchvision_resnet_names(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Rename a torchvision ResNet state dict to Detectron2 ResNet names (values unchanged).

    ``layer3.0.bn2.weight`` -> ``res4.0.conv2.norm.weight``, ``layer1.0.downsample.1.bias`` ->
    ``res2.0.shortcut.norm.bias``, ``bn1.running_mean`` -> ``stem.conv1.norm.running_mean``;
    keys outside the ResNet body (``fc.*``) are kept as they are, BN ``num_batches_tracked``
    counters are dropped. The result has no model prefix (``backbone.``, ``roi_heads.``): it is
    meant for suffix matching (``matching_heuristics``).
    """
    converted = {}
    for key, value in state_dict.items():
        if key.endswith(".num_batches_tracked"):
            continue
        new_key = key
        for pattern, replacement in _TORCHVISION_RENAMES:
            new_key = pattern.sub(replacement, new_key)
        converted[new_key] = value
    return converted


def torchvision_preprocessing_mismatches(model: torch.nn.Module) -> List[str]:
    """The ways ``model``'s input conventions differ from what torchvision ResNets expect.

    Checks ``pixel_mean``/``pixel_std`` buffers, ``input_format`` and, on its bottleneck blocks,
    where the stride sits (torchvision strides in the 3x3 conv: ``STRIDE_IN_1X1 False``).

    Returns:
        one line per mismatch, naming the config key; empty if the model fits.
    """
    problems = []
    for name, key, expected in (
        ("pixel_mean", "MODEL.PIXEL_MEAN", TORCHVISION_PIXEL_MEAN),
        ("pixel_std", "MODEL.PIXEL_STD", TORCHVISION_PIXEL_STD),
    ):
        value = getattr(model, name, None)
        if value is None:
            continue
        actual = [round(float(v), 3) for v in value.flatten()]
        if len(actual) != len(expected) or not torch.allclose(
            torch.tensor(actual), torch.tensor(expected), atol=1e-3
        ):
            problems.append(f"{key} is {actual}, torchvision weights need {list(expected)}")
    input_format = getattr(model, "input_format", None)
    if input_format is not None and input_format != "RGB":
        problems.append(f'INPUT.FORMAT is "{input_format}", torchvision weights need "RGB"')
    if any(
        isinstance(m, BottleneckBlock) and tuple(m.conv1.stride) != (1, 1) for m in model.modules()
    ):
        problems.append("MODEL.RESNETS.STRIDE_IN_1X1 is True, torchvision weights need False")
    return problems


def _listed(keys: List[str]) -> str:
    """The first ``_MAX_LISTED_KEYS`` of ``keys``, comma-separated, with a count of the rest."""
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f", ... ({more} more)" if more > 0 else "")


class QEEPSCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that also reads torchvision ResNets, loads ``.pth`` files with
    ``weights_only=True`` and refuses checkpoints that do not fit the model (module docstring).

    Same constructor as ``DetectionCheckpointer(model, save_dir="", *, save_to_disk=None,
    **checkpointables)``; saving writes the same content, atomically.
    """

    def save(self, name: str, **kwargs: Any) -> None:
        """Save ``{"model", <checkpointables>, **kwargs}`` to ``save_dir/name.pth`` atomically,
        then tag it as the last checkpoint (also atomically)."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        write_atomically(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``save_dir/last_checkpoint`` at ``last_filename_basename`` (atomic rename)."""
        write_atomically(os.path.join(self.save_dir, "last_checkpoint"),
                         lambda f: f.write(last_filename_basename), mode="w")

    def _load_file(self, filename: str) -> Dict[str, Any]:
        """Read ``filename`` into ``{"model": state dict, ...}``; torchvision ResNet names are
        converted and tagged ``__author__="torchvision"`` with ``matching_heuristics``."""
        try:
            loaded = super()._load_file(filename)
        except CheckpointError:
            raise
        except Exception as e:  # any failure to parse the file: say which file and why
            raise CheckpointError(
                f"Cannot read weights file {filename}: {type(e).__name__}: {e}. "
                "Is it complete, and a Detectron2, Caffe2 (.pkl) or torchvision (.pth) checkpoint?"
            ) from e
        if not isinstance(loaded.get("model"), Mapping):
            raise CheckpointError(
                f"Weights file {filename} has no state dict: its 'model' entry is a "
                f"{type(loaded.get('model')).__name__}"
            )
        if "__author__" not in loaded and is_torchvision_resnet(loaded["model"]):
            self.logger.info(f"{filename} is a torchvision ResNet: renaming to Detectron2 names")
            loaded["model"] = convert_torchvision_resnet_names(loaded["model"])
            loaded["__author__"] = "torchvision"
            loaded["matching_heuristics"] = True
        return loaded

    def _torch_load(self, f: str) -> Dict[str, Any]:
        """``torch.load`` restricted to tensors and plain containers (``weights_only=True``)."""
        try:
            loaded = torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"Cannot read weights file {f} with torch.load(weights_only=True): "
                f"{type(e).__name__}: {e}. A truncated or corrupt file, or one holding Python "
                "objects other than tensors and plain containers (those are refused because "
                "loading them would run code)."
            ) from e
        if not isinstance(loaded, dict):
            raise CheckpointError(
                f"Weights file {f} holds a {type(loaded).__name__}, expected a dict "
                "(a state dict, or a checkpoint with a 'model' entry)"
            )
        return loaded

    def _load_model(self, checkpoint: Dict[str, Any]):
        """Load the weights (stock logic), warning about torchvision input conventions first and
        raising :class:`CheckpointError` if no backbone parameter was loaded (buffers such as
        BN ``num_batches_tracked`` counters fit any model and do not count)."""
        if checkpoint.get("__author__") == "torchvision":
            for problem in torchvision_preprocessing_mismatches(self.model):
                logger.warning(f"Loading torchvision ResNet weights, but {problem}.")
        incompatible = super()._load_model(checkpoint)
        backbone_keys = [k for k, _ in self.model.named_parameters() if k.startswith("backbone.")]
        missing = set(incompatible.missing_keys)
        if backbone_keys and all(k in missing for k in backbone_keys):
            url = self._parsed_url_during_load
            source = url.geturl() if url is not None else "the checkpoint"
            shapes = [
                f"{k}: {tuple(ckpt)} in checkpoint, {tuple(model)} in model"
                for k, ckpt, model in incompatible.incorrect_shapes
            ]
            raise CheckpointError(
                f"Weights {source} do not fit this model: not one backbone weight was loaded "
                "(a checkpoint of another architecture or width?).\n"
                f"  shape mismatches ({len(shapes)}): {_listed(shapes)}\n"
                f"  missing from the checkpoint ({len(missing)}): "
                f"{_listed(sorted(missing))}\n"
                f"  unused checkpoint keys ({len(incompatible.unexpected_keys)}): "
                f"{_listed(sorted(incompatible.unexpected_keys))}"
            )
        return incompatible


def install_qeeps_checkpointer(trainer) -> QEEPSCheckpointer:
    """Replace a ``DefaultTrainer``'s ``DetectionCheckpointer`` by a :class:`QEEPSCheckpointer`.

    Call at the end of the trainer's ``__init__`` (after ``super().__init__(cfg)``): the new
    checkpointer saves to ``cfg.OUTPUT_DIR`` with the trainer as checkpointable, exactly like the
    stock one, and also replaces it in the ``PeriodicCheckpointer`` hook, so ``resume_or_load``
    and periodic saves both go through it.

    Returns:
        the new checkpointer (also set as ``trainer.checkpointer``).
    """
    old = trainer.checkpointer
    checkpointer = QEEPSCheckpointer(
        trainer.model, trainer.cfg.OUTPUT_DIR, trainer=weakref.proxy(trainer)
    )
    for hook in trainer._hooks:
        if isinstance(hook, PeriodicCheckpointer) and hook.checkpointer is old:
            hook.checkpointer = checkpointer
    trainer.checkpointer = checkpointer
    return checkpointer
