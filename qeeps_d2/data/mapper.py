"""``PersonSearchMapper``: one Detectron2 mapper for every kind of person-search record.

Record kinds (flat Detectron2-style dicts):
- scene image: ``file_name`` [+ ``annotations`` with ``person_id``] -> ``image`` (+ ``instances``
  with ``gt_boxes``, ``gt_classes``, ``gt_pids``);
- query box: a scene image + ``query_box`` [x1, y1, x2, y2] (original pixels) -> ``query_box``
  tensor in the transformed image's pixels;
- pair: a gallery scene image + ``query_file_name`` + ``query_box`` [+ ``query_pid``] -> also
  ``query_image`` and ``query_box`` (query-image pixels) and, in training,
  ``instances.gt_is_query``. Both images get the same resize policy and the same flip. In
  training the query box is jittered first (``DATALOADER.PAIRS.QUERY_BOX_JITTER``, see
  :func:`jitter_box`);
- given boxes (evaluation with ground-truth boxes): ``given_boxes`` [[x1, y1, x2, y2], ...]
  (original pixels) -> (M, 4) float32 tensor in the transformed image's pixels.
Every other record key (``query_index``, ``image_id`` ...) is passed through.

In training (``is_train``) a record whose image (or query image) cannot be read -- missing,
truncated, not an image -- is skipped: the mapper logs a warning naming the file with the count
of images skipped so far (:attr:`PersonSearchMapper.num_skipped`) and returns ``None``, and the
training loader takes another record. At test time the error is raised.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..utils.records import record_kind

__all__ = ["PersonSearchMapper", "UNREADABLE_IMAGE_ERRORS", "check_query_box", "jitter_box"]

logger = logging.getLogger(__name__)

# What reading a bad image file raises (PIL: OSError incl. UnidentifiedImageError and truncated
# data, SyntaxError for some broken headers; ValueError / FileNotFoundError from our readers).
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def check_query_box(box, width: int, height: int, where: str) -> np.ndarray:
    """``box`` (4,) XYXY as float64, checked to be a non-empty box inside a ``width`` x
    ``height`` image (1 pixel of slack); ``ValueError`` naming ``where`` otherwise."""
    box = np.asarray(box, dtype=np.float64).reshape(4)
    if not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"{where}: query box {box.tolist()} is empty or not x1<x2, y1<y2")
    if box[0] < 0 or box[1] < 0 or box[2] > width + 1 or box[3] > height + 1:
        raise ValueError(f"{where}: query box {box.tolist()} lies outside the {width}x{height} image")
    return box


def jitter_box(box: np.ndarray, fraction: float, width: int, height: int) -> np.ndarray:
    """A randomly shifted and scaled copy of ``box`` (query-box jittering, paper Sec. 4.4).

    Each side moves independently by ``U(-fraction, fraction)`` times the box width (x1, x2) or
    height (y1, y2), drawn from numpy's global RNG (seeded per sample by the training stream),
    then the box is clipped to the ``width`` x ``height`` image. With ``fraction`` < 0.5 the
    jittered box keeps more than ``1 - 2 * fraction`` of each side; should clipping leave it
    empty (a box lying on the border), the box is returned unchanged.

    Args:
        box: (4,) XYXY, original pixels.
        fraction: in [0, 0.5).
    Returns:
        (4,) float64 XYXY.
    """
    if not 0 <= fraction < 0.5:
        raise ValueError(f"query-box jitter must be in [0, 0.5), got {fraction}")
    box = np.asarray(box, dtype=np.float64).reshape(4)
    w, h = box[2] - box[0], box[3] - box[1]
    moved = box + np.random.uniform(-fraction, fraction, size=4) * np.array([w, h, w, h])
    moved = np.clip(moved, 0, [width, height, width, height])
    if moved[2] <= moved[0] or moved[3] <= moved[1]:
        return box
    return moved


class _ImageReadError(ValueError):
    """An image file of a record could not be read (the message names the file)."""


class PersonSearchMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` extended to person ids, query boxes and image pairs.

    Build it like the stock mapper: ``PersonSearchMapper(cfg, is_train)``; with a config it
    also reads ``DATALOADER.PAIRS.QUERY_BOX_JITTER`` (training only; 0 at test time).

    Attributes:
        num_skipped: training records skipped so far because an image could not be read
            (counted per process: each data-loading worker has its own).
    """

    num_skipped = 0

    @configurable
    def __init__(self, is_train: bool, *, query_box_jitter: float = 0.0, **kwargs):
        """
        Args:
            is_train, kwargs: as for Detectron2's ``DatasetMapper``.
            query_box_jitter: training pairs: jitter fraction of the query box (see
                :func:`jitter_box`); ignored (no jitter) when ``is_train`` is False.
        """
        super().__init__(is_train, **kwargs)
        if not 0 <= query_box_jitter < 0.5:
            raise ValueError(
                f"DATALOADER.PAIRS.QUERY_BOX_JITTER must be in [0, 0.5), got {query_box_jitter}"
            )
        self.query_box_jitter = float(query_box_jitter) if is_train else 0.0

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["query_box_jitter"] = cfg.DATALOADER.PAIRS.QUERY_BOX_JITTER
        return ret

    def _read(self, file_name: str) -> np.ndarray:
        return utils.read_image(file_name, format=self.image_format)

    def __call__(self, record):
        """The model input of ``record``; ``None`` in training if one of its images cannot be
        read (see the module docstring)."""
        if not self.is_train:
            return self._map(record)
        try:
            return self._map(record)
        except _ImageReadError as e:
            self.num_skipped += 1
            logger.warning("skipping unreadable training image (%d skipped so far): %s",
                           self.num_skipped, e)
            return None

    def _read_checked(self, file_name: str) -> np.ndarray:
        """``_read``; in training a failure becomes an ``_ImageReadError`` naming the file."""
        try:
            return self._read(file_name)
        except UNREADABLE_IMAGE_ERRORS as e:
            if not self.is_train:
                raise
            raise _ImageReadError(f"{file_name}: {type(e).__name__}: {e}") from e

    def _map(self, record):
        record = copy.deepcopy(record)
        image = self._read_checked(record["file_name"])
        utils.check_image_size(record, image)
        height, width = image.shape[:2]
        record.setdefault("height", height)
        record.setdefault("width", width)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        record["image"] = _to_tensor(aug_input.image)
        image_shape = aug_input.image.shape[:2]

        kind = record_kind(record)
        if kind == "pair":
            flipped = any(isinstance(t, T.HFlipTransform) for t in transforms.transforms)
            self._map_query_image(record, flipped)
        elif kind == "query":
            box = check_query_box(record["query_box"], width, height, record["file_name"])
            record["query_box"] = torch.as_tensor(transforms.apply_box(box[None])[0]).float()
        if "given_boxes" in record:
            boxes = np.asarray(record["given_boxes"], dtype=np.float64).reshape(-1, 4)
            record["given_boxes"] = torch.as_tensor(transforms.apply_box(boxes)).float()

        annotations = record.pop("annotations", None)
        if self.is_train and annotations is not None:
            record["instances"] = self._instances(annotations, transforms, image_shape, record)
        return record

    def _map_query_image(self, record, flipped: bool) -> None:
        image = self._read_checked(record["query_file_name"])
        height, width = image.shape[:2]
        box = check_query_box(record["query_box"], width, height, record["query_file_name"])
        if self.is_train and self.query_box_jitter > 0:
            box = jitter_box(box, self.query_box_jitter, width, height)
        resize = [a for a in self.augmentations.augs if not isinstance(a, T.RandomFlip)]
        aug_input = T.AugInput(image)
        transforms = T.AugmentationList(resize)(aug_input)
        image = aug_input.image
        if flipped:
            flip = T.HFlipTransform(image.shape[1])
            transforms = T.TransformList(transforms.transforms + [flip])
            image = flip.apply_image(image)
        record["query_image"] = _to_tensor(image)
        record["query_box"] = torch.as_tensor(transforms.apply_box(box[None])[0]).float()

    def _instances(self, annotations, transforms, image_shape, record):
        annos = [
            utils.transform_instance_annotations(obj, transforms, image_shape)
            for obj in annotations
            if obj.get("iscrowd", 0) == 0
        ]
        instances = utils.annotations_to_instances(annos, image_shape)
        instances.gt_pids = torch.tensor([a.get("person_id", -1) for a in annos], dtype=torch.int64)
        if "query_pid" in record:
            instances.gt_is_query = instances.gt_pids == int(record["query_pid"])
        return utils.filter_empty_instances(instances)
