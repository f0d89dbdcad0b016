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
   file). With ``strict=True`` (inference and evaluation: ``qeeps-search``,
   ``train_net.py --eval-only``) *any* missing, unused or mis-shaped key raises, e.g. an OIM
   model's weights given to a QEEPS config, whose QSSE/QRPN/QSimNet layers would stay random.
   Only state that inference does not use is exempt: BatchNorm ``num_batches_tracked`` counters
   and the OIM loss's lookup table and queue (``roi_heads.oim_loss``). The message is one line
   naming the groups of keys (:func:`describe_key_groups`)::

       weights oim.pth do not fit the config: missing: backbone.qsse (24 keys),
       proposal_generator.query_excitation (4), proposal_generator.query_head (4),
       roi_heads.qsimnet (6) (...)

   Without ``strict`` (training: fine-tuning a QEEPS model from OIM weights, an OIM model from
   identity-pretrained or ImageNet weights) partial fits load, and what starts fresh or is left
   unused is logged in one line naming the groups (instead of fvcore's per-key listing).

4. **Saving is atomic**: a checkpoint (and the ``last_checkpoint`` tag) is written to a temporary
   file in the same folder, flushed to disk and renamed over the final name, so a crash or a
   SIGKILL while saving leaves the previous checkpoint, and the tag pointing to it, intact.

Model-zoo files (``detectron2://ImageNetPretrained/MSRA/R-50.pkl``, Caffe2 names such as
``res2_0_branch2a_w``) load exactly as with the stock checkpointer (Caffe2 renames + suffix
matching). **Security**: ``.pkl`` files are Python pickles, and unpickling runs code chosen by
whoever wrote the file: load ``.pkl`` weights only from a trusted source. Before a ``.pkl`` file
is unpickled a WARNING line names it (once per file and process; the environment variable
``QEEPS_TRUST_PICKLE=1`` silences it), and the error for an unreadable ``.pkl`` says it is a
pickle.
"""
from __future__ import annotations

import collections
import logging
import os
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Set
from urllib.parse import urlparse

import torch
# fvcore's own filter of missing keys that were loaded under another name (shared modules)
from fvcore.common.checkpoint import _filter_reused_missing_keys

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling.backbone.resnet import BottleneckBlock

from qeeps_d2.utils.atomic_write import write_atomically

__all__ = [
    "CheckpointError",
    "QEEPSCheckpointer",
    "TORCHVISION_PIXEL_MEAN",
    "TORCHVISION_PIXEL_STD",
    "convert_torchvision_resnet_names",
    "describe_key_groups",
    "is_torchvision_resnet",
    "key_group",
    "read_weights",
    "torchvision_preprocessing_mismatches",
    "trusts_pickles",
    "warn_before_unpickling",
]

logger = logging.getLogger(__name__)

# Input normalisation that torchvision's ImageNet ResNets were trained with (RGB, 0-255 scale).
TORCHVISION_PIXEL_MEAN = (123.675, 116.280, 103.530)
TORCHVISION_PIXEL_STD = (58.395, 57.120, 57.375)

# Set to 1 (or true / yes) to load .pkl weights without the warning that they are pickles.
TRUST_PICKLE_ENV = "QEEPS_TRUST_PICKLE"

# BatchNorm step counters: used by no forward pass with a set momentum, absent from some files.
_COUNTER = re.compile(r"(^|\.)num_batches_tracked$")
# The OIM loss's lookup table and queue: training state, unused at inference (an identity-
# pretrained trunk has none; another data set's config sizes them differently).
_TRAINING_STATE = re.compile(r"(^|\.)oim_loss\.")
# Layers that sit inside the ResNet blocks: grouped as <top module>.<name>, not by stage.
_NESTED_LAYERS = ("qsse",)

# .pkl files already warned about in this process (real paths).
_WARNED_PICKLES: Set[str] = set()

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


def key_group(key: str) -> str:
    """The module a state-dict key belongs to, for one-line reports: its first two module names
    without block indices (``backbone.res3.1.conv2.weight`` -> ``backbone.res3``,
    ``proposal_generator.query_head.conv.bias`` -> ``proposal_generator.query_head``,
    ``roi_heads.qsimnet.cls.weight`` -> ``roi_heads.qsimnet``), except that the QSSE blocks inside
    the ResNet stages form one group (``backbone.res2.0.qsse.fc1.weight`` -> ``backbone.qsse``);
    a top-level name is its own group (``pixel_mean``, ``fc`` of ``fc.weight``)."""
    modules = [part for part in key.split(".")[:-1] if not part.isdigit()]
    for name in _NESTED_LAYERS:
        if name in modules[1:]:
            return f"{modules[0]}.{name}"
    return ".".join(modules[:2]) or key


def describe_key_groups(keys: Iterable[str]) -> str:
    """``keys`` grouped by :func:`key_group`, in one line: ``"backbone.qsse (24 keys),
    roi_heads.qsimnet (6)"`` (groups sorted by name)."""
    counts = sorted(collections.Counter(key_group(key) for key in keys).items())
    return ", ".join(
        f"{group} ({n}{(' key' if n == 1 else ' keys') if i == 0 else ''})"
        for i, (group, n) in enumerate(counts)
    )


def _misfit(model: torch.nn.Module, incompatible, ignore: Callable[[str], bool]) -> Dict[str, str]:
    """What of a load did not fit: ``{"missing": groups, "shape mismatches": groups (e.g. ...),
    "unused": groups}`` (:func:`describe_key_groups`; only the non-empty ones), leaving out the
    keys ``ignore`` accepts and missing keys that were loaded under another name."""
    missing = [k for k in _filter_reused_missing_keys(model, list(incompatible.missing_keys))
               if not ignore(k)]
    shapes = [s for s in incompatible.incorrect_shapes if not ignore(s[0])]
    unused = [k for k in incompatible.unexpected_keys if not ignore(k)]
    found = {}
    if missing:
        found["missing"] = describe_key_groups(missing)
    if shapes:
        key, in_file, in_model = shapes[0]  # the first in the file's order
        example = f"{key}: {tuple(in_file)} in the file, {tuple(in_model)} in the model"
        groups = describe_key_groups(k for k, _, _ in shapes)
        found["shape mismatches"] = f"{groups} (e.g. {example})"
    if unused:
        found["unused"] = describe_key_groups(unused)
    return found


def _joined(misfit: Dict[str, str]) -> str:
    return "; ".join(f"{what}: {groups}" for what, groups in misfit.items())


def _reason(error: BaseException) -> str:
    """``"<ExceptionType>: <message>"`` without a trailing period (a sentence follows)."""
    return f"{type(error).__name__}: {str(error).rstrip('. ')}"


def _is_counter(key: str) -> bool:
    return _COUNTER.search(key) is not None


def _unused_at_inference(key: str) -> bool:
    return _is_counter(key) or _TRAINING_STATE.search(key) is not None


def trusts_pickles() -> bool:
    """True if the environment says ``.pkl`` weights are trusted (``QEEPS_TRUST_PICKLE=1``)."""
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def warn_before_unpickling(filename: str, source: str = "", log: logging.Logger = logger) -> None:
    """Log one WARNING that ``filename`` (from ``source``, e.g. its ``detectron2://`` URL) is a
    pickle whose loading runs code, unless it is not a ``.pkl`` file, ``QEEPS_TRUST_PICKLE=1``
    is set, or the file was already named in this process."""
    if not filename.endswith(".pkl") or trusts_pickles():
        return
    real = os.path.realpath(filename)
    if real in _WARNED_PICKLES:
        return
    _WARNED_PICKLES.add(real)
    named = filename if not source or source == filename else f"{source} ({filename})"
    log.warning(f"Loading {named}: a .pkl file is a Python pickle, and loading it runs any code "
                f"its author put in it; load .pkl weights from trusted sources only (set "
                f"{TRUST_PICKLE_ENV}=1 to silence this warning)")


def read_weights(filename: str) -> Mapping[str, Any]:
    """The state dict of a weights file, read as :class:`QEEPSCheckpointer` reads it (tensors
    only for ``.pth``, torchvision names converted, clear :class:`CheckpointError` otherwise)."""
    checkpointer = QEEPSCheckpointer(torch.nn.Module())
    # what DetectionCheckpointer.load sets around its own _load_file call
    checkpointer._parsed_url_during_load = urlparse(filename)
    try:
        return checkpointer._load_file(checkpointer.path_manager.get_local_path(filename))["model"]
    finally:
        checkpointer._parsed_url_during_load = None


class QEEPSCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that also reads torchvision ResNets, loads ``.pth`` files with
    ``weights_only=True``, warns before unpickling ``.pkl`` files and refuses checkpoints that do
    not fit the model (module docstring).

    Same constructor as ``DetectionCheckpointer(model, save_dir="", *, save_to_disk=None,
    **checkpointables)``, plus ``strict``: for inference and evaluation, refuse weights with
    missing, unused or mis-shaped keys (:class:`CheckpointError`, one line naming the groups of
    keys) instead of loading what fits. Saving writes the same content, atomically.
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = False, **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        self.strict = strict

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

    def _source(self) -> str:
        """The path or URL being loaded, as given to :meth:`load`."""
        url = self._parsed_url_during_load
        return url.geturl() if url is not None else "the checkpoint"

    def _load_file(self, filename: str) -> Dict[str, Any]:
        """Read ``filename`` into ``{"model": state dict, ...}``; torchvision ResNet names are
        converted and tagged ``__author__="torchvision"`` with ``matching_heuristics``. A ``.pkl``
        file is unpickled after a warning (:func:`warn_before_unpickling`)."""
        warn_before_unpickling(filename, self._source(), self.logger)
        try:
            loaded = super()._load_file(filename)
        except CheckpointError:
            raise
        except Exception as e:  # any failure to parse the file: say which file and why
            pickle_note = (" A .pkl file is a Python pickle: loading one runs code its author put "
                           "in it, so use .pkl files from trusted sources only."
                           if filename.endswith(".pkl") else "")
            raise CheckpointError(
                f"Cannot read weights file {filename}: {_reason(e)}. "
                "Is it complete, and a Detectron2, Caffe2 (.pkl) or torchvision (.pth) checkpoint?"
                + pickle_note
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
                f"{_reason(e)}. A truncated or corrupt file, or one holding Python "
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
        """Load the weights (stock logic), warning about torchvision input conventions first.

        Raises:
            CheckpointError: not one backbone parameter was loaded (buffers such as BN
                ``num_batches_tracked`` counters fit any model and do not count); with
                ``strict``, any missing, unused or mis-shaped key other than the state that
                inference does not use (BN counters, ``roi_heads.oim_loss``).
        """
        if checkpoint.get("__author__") == "torchvision":
            for problem in torchvision_preprocessing_mismatches(self.model):
                logger.warning(f"Loading torchvision ResNet weights, but {problem}.")
        incompatible = super()._load_model(checkpoint)
        backbone_keys = [k for k, _ in self.model.named_parameters() if k.startswith("backbone.")]
        missing = set(incompatible.missing_keys)
        nothing_fits = bool(backbone_keys) and all(k in missing for k in backbone_keys)
        if self.strict:
            misfit = _misfit(self.model, incompatible, _unused_at_inference)
            if misfit:
                raise CheckpointError(
                    f"weights {self._source()} do not fit the config: {_joined(misfit)}"
                    + (" (not one backbone weight was loaded: another architecture or width?)"
                       if nothing_fits else
                       " (evaluate weights with the config they were trained with)")
                )
        elif nothing_fits:
            raise CheckpointError(
                f"weights {self._source()} do not fit the config: not one backbone weight was "
                "loaded (a checkpoint of another architecture or width?); "
                + _joined(_misfit(self.model, incompatible, _is_counter))
            )
        return incompatible

    def _log_incompatible_keys(self, incompatible) -> None:
        """One log line naming the groups of keys that start fresh (missing from the file or
        of another shape) and that the model does not use, in place of fvcore's per-key lines;
        INFO when keys are only missing (new layers), WARNING when some are unused or mis-shaped.
        BN ``num_batches_tracked`` counters are left out."""
        misfit = _misfit(self.model, incompatible, _is_counter)
        if not misfit:
            return
        fresh = " and ".join(name for key, name in (("missing", "missing"),
                                                    ("shape mismatches", "mis-shaped"))
                             if key in misfit)
        self.logger.log(
            logging.INFO if list(misfit) == ["missing"] else logging.WARNING,
            f"weights {self._source()} loaded; {_joined(misfit)}"
            + (f"; the {fresh} layers start fresh" if fresh else ""),
        )
