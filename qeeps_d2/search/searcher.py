"""``PersonSearcher``: find the person of a query box in a stream of gallery frames.

Search modes, chosen by the config (``qeeps_d2.config.is_query_guided``) and ``search``:

- query-agnostic model (the OIM baseline): the query box is embedded once, every gallery frame is
  run once (detections with L2-normalised embeddings), similarity = ``pred_embeds @ query_embed``;
- query-guided model (QSSE / QRPN / QSimNet on): every gallery frame is run as a (query, frame)
  pair, ``batch_size`` pairs per forward, similarity = the model's ``pred_sims``;
- cascade (``search(..., cascade_topk=K)``, query-guided models): the same network first runs
  query-agnostically (as the OIM baseline: every frame once, embeddings; with a fitted local
  similarity head its score of the cells those forwards also give,
  :func:`~qeeps_d2.modeling.local_similarity.agnostic_similarity`), keeping the K frames
  with the best detection similarity (ties: earlier frame; only those K frames are held in
  memory), then re-scores those K frames as pairs. As in cascade evaluation
  (:mod:`qeeps_d2.evaluation.cascade`), matches of the other frames keep their first-stage
  similarity minus ``FIRST_STAGE_OFFSET`` (3), so they rank below the re-scored matches, except
  re-scored ones below the floor (the lowest best similarity of the shortlisted frames), shifted
  by ``-LOW_RESCORED_OFFSET`` (6) below them; a similarity below -1 marks either.

Model inputs are built by :class:`~qeeps_d2.data.PersonSearchMapper` (same resizing as in
evaluation), fed with in-memory images instead of files. Of each ``batch_size`` frames, only
inputs of one size (frame and, for pairs, query image after resizing) share a forward pass, so
that a frame's matches do not depend on its neighbours in the stream (padding to a common size
would change them; :mod:`qeeps_d2.data.size_batching`).
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import yaml
from PIL import Image
from tqdm import tqdm

from detectron2.data import detection_utils as utils
from detectron2.modeling import build_model

from ..checkpoint import QEEPSCheckpointer
from ..config import is_query_guided
from ..data.mapper import PersonSearchMapper
from ..data.size_batching import group_by_shape
from ..engine.trainer import setup_cfg
from ..evaluation.cascade import FIRST_STAGE_OFFSET, LOW_RESCORED_OFFSET, rescored_floor
from ..modeling.local_similarity import agnostic_similarity
from .gallery import GalleryFrame, read_image_bgr

__all__ = ["Match", "PersonSearcher", "merge_cascade_matches", "resolve_device"]

Box = Tuple[float, float, float, float]


@dataclass
class Match:
    """One detection in a gallery frame, scored against the query.

    Attributes:
        frame: the frame's name (file name, or ``frame_000123`` for a video).
        index: the frame's index (position in the folder, or frame number in the video).
        box: (x1, y1, x2, y2) in the frame's original pixels.
        det_score: detection (person) score.
        similarity: similarity to the query (higher = more likely the same person).
        image: the frame (H, W, 3) BGR, kept only with ``search(..., keep_frames=True)``;
            matches in one frame share the array.
    """

    frame: str
    index: int
    box: Box
    det_score: float
    similarity: float
    image: Optional[np.ndarray] = field(default=None, repr=False, compare=False)


def resolve_device(device: Optional[str]) -> str:
    """``None`` -> ``"cuda"`` if available else ``"cpu"``; ``cpu``, ``cuda``, ``cuda:N`` as given.

    Raises:
        ValueError: any other name.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise ValueError(f"unknown device {device!r}: expected cpu, cuda or cuda:N")
    return str(device)


def _model_format(image: np.ndarray, image_format: str) -> np.ndarray:
    """A BGR uint8 array converted to the model's ``INPUT.FORMAT`` (as ``read_image`` would)."""
    if image_format == "BGR":
        return image
    return utils.convert_PIL_to_numpy(Image.fromarray(image[:, :, ::-1]), image_format)


def _check_bgr(image, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValueError(
            f"{what}: expected an HxWx3 uint8 BGR image, got {image.dtype} array of shape "
            f"{image.shape}"
        )
    return image


class _ArrayMapper(PersonSearchMapper):
    """``PersonSearchMapper`` whose ``file_name`` / ``query_file_name`` are keys of an in-memory
    ``{name: image in the model's format}`` mapping given to :meth:`map`."""

    _images: Optional[Mapping[str, np.ndarray]] = None

    def _read(self, file_name: str) -> np.ndarray:
        return self._images[file_name]

    def map(self, record: Dict, images: Mapping[str, np.ndarray]) -> Dict:
        """Map ``record`` reading its images from ``images``."""
        self._images = images
        try:
            return self(record)
        finally:
            self._images = None


class _FrameShortlist:
    """Cascade bookkeeping while the gallery streams: the ``k`` frames with the best first-stage
    similarity so far (ties: the earlier frame) with their first-stage matches, and the best
    ``topk`` first-stage matches of every other frame (:attr:`others`, unshifted;
    :func:`merge_cascade_matches` shifts them). A frame that leaves the shortlist never returns
    to it (the frames that pushed it out stay ahead), so trimming the others to ``topk`` loses
    nothing."""

    def __init__(self, k: int, topk: Optional[int]):
        self._k, self._topk = k, topk
        self._heap: list = []  # (best similarity, -arrival, arrival, frame, matches); min = worst
        self._arrivals = 0
        self.others: List[Match] = []

    def add(self, frame: GalleryFrame, matches: List[Match]) -> None:
        """Offer a frame with its first-stage matches (``det_score >= DET_THRESH``)."""
        arrival, self._arrivals = self._arrivals, self._arrivals + 1
        item = (max((m.similarity for m in matches), default=-math.inf), -arrival, arrival,
                frame, matches)
        if len(self._heap) < self._k:
            heapq.heappush(self._heap, item)
            return
        if item[:2] > self._heap[0][:2]:
            item = heapq.heapreplace(self._heap, item)
        # ties: gallery order (frame indices grow along the gallery)
        self.others = sorted(self.others + item[4],
                             key=lambda m: (-m.similarity, m.index))[: self._topk]

    def frames(self) -> List[GalleryFrame]:
        """The shortlisted frames in gallery order."""
        return [item[3] for item in sorted(self._heap, key=lambda item: item[2])]


@dataclass(frozen=True)
class _Query:
    """A checked query: its name, box, ``{name: image in the model's format}`` and mapped input."""

    name: str
    box: List[float]
    images: Dict[str, np.ndarray]
    input: Dict


def merge_cascade_matches(
    rescored: Sequence[Sequence[Match]], others: Sequence[Match], topk: Optional[int]
) -> List[Match]:
    """The cascade's ranking of one query's matches (the rule of
    :mod:`qeeps_d2.evaluation.cascade`): re-scored matches first, each frame's pair-mode matches
    as they are, except those below the floor (the lowest best similarity of the re-scored
    frames, set only when other frames have matches), shifted by ``-LOW_RESCORED_OFFSET``; then
    the first-stage matches of the other frames shifted by ``-FIRST_STAGE_OFFSET``.

    Args:
        rescored: per re-scored frame (in gallery order), its pair-mode matches.
        others: first-stage matches of the frames that were not re-scored (at least their best
            ``topk``), unshifted, in gallery order among equal similarities.
        topk: matches to keep (None: all).

    Returns:
        the merged matches, similarity descending (ties: re-scored before others, then the
        order given).
    """
    floor = rescored_floor(max((m.similarity for m in found), default=-math.inf)
                           for found in rescored) if others else -math.inf
    merged = [m if m.similarity >= floor
              else dataclasses.replace(m, similarity=m.similarity - LOW_RESCORED_OFFSET)
              for found in rescored for m in found]
    merged += [dataclasses.replace(m, similarity=m.similarity - FIRST_STAGE_OFFSET)
               for m in others]
    merged.sort(key=lambda m: -m.similarity)  # stable: ties keep the order above
    return merged[:topk]


class PersonSearcher:
    """Search a person, given by a box in a query image, in a gallery of frames.

    Example::

        from qeeps_d2.search import PersonSearcher, iter_gallery

        searcher = PersonSearcher.from_config(
            "configs/SynthPS/qeeps.yaml", "output/qeeps/model_final.pth")
        matches = searcher.search("query.jpg", (120, 40, 180, 230), iter_gallery("clip.mp4",
                                  every=5), topk=10)
        for m in matches:
            print(m.frame, m.box, f"{m.similarity:.3f}")

    The model is used in eval mode without gradients. Build it yourself and pass it with its
    config (``PersonSearcher(cfg, model)``), or let :meth:`from_config` build and load it.
    """

    def __init__(self, cfg, model: torch.nn.Module):
        """
        Args:
            cfg: the model's (frozen) config; gives the input resizing and format,
                ``TEST.PERSON_SEARCH.DET_THRESH`` and the search mode (``is_query_guided``).
            model: a built ``QEEPS`` model with its weights loaded (put in eval mode here).
        """
        self.cfg = cfg
        self.model = model.eval()
        self.query_guided = is_query_guided(cfg)
        self.det_thresh = float(cfg.TEST.PERSON_SEARCH.DET_THRESH)
        self._mapper = _ArrayMapper(cfg, is_train=False)

    @classmethod
    def from_config(
        cls,
        config_file: str,
        weights: str,
        device: Optional[str] = None,
        opts: Sequence[str] = (),
    ) -> "PersonSearcher":
        """Build the model of ``config_file`` (+ ``opts``, ``KEY VALUE`` pairs) on ``device``
        (``"cpu"``, ``"cuda"``, ``"cuda:N"``, None = CUDA if available) and load ``weights``.

        Raises:
            FileNotFoundError: a missing config or (local) weights file.
            ValueError: an unknown device, a config that does not parse or is not a QEEPS model.
            qeeps_d2.checkpoint.CheckpointError: weights that cannot be read or do not fit the
                model: any missing, unused or mis-shaped key (e.g. an OIM model's weights with a
                QEEPS config, or the config of another architecture or width).
        """
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file {config_file} not found")
        if "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file {weights} not found")
        opts = list(opts) + ["MODEL.DEVICE", resolve_device(device), "MODEL.WEIGHTS", weights]
        try:
            cfg = setup_cfg(config_file, opts, resolve_schedule=False)
        except (KeyError, ValueError, AssertionError, yaml.YAMLError) as e:
            raise ValueError(f"config {config_file}: {type(e).__name__}: {e}") from e
        if cfg.MODEL.META_ARCHITECTURE != "QEEPS":
            raise ValueError(
                f"config {config_file}: MODEL.META_ARCHITECTURE is "
                f"{cfg.MODEL.META_ARCHITECTURE!r}, not a QEEPS person-search model"
            )
        model = build_model(cfg)
        QEEPSCheckpointer(model, strict=True).load(weights)
        return cls(cfg, model)

    # ------------------------------------------------------------------ search
    def search(
        self,
        query_image: Union[str, np.ndarray],
        query_box: Sequence[float],
        gallery: Iterable[GalleryFrame],
        topk: Optional[int] = None,
        batch_size: int = 4,
        progress: bool = True,
        total: Optional[int] = None,
        keep_frames: bool = False,
        cascade_topk: Optional[int] = None,
        on_frame: Optional[Callable[[GalleryFrame, List[Match]], None]] = None,
    ) -> List[Match]:
        """Rank the gallery's detections by similarity to the query person.

        Args:
            query_image: an image path, or an (H, W, 3) uint8 BGR array.
            query_box: (x1, y1, x2, y2) of the query person in ``query_image`` pixels.
            gallery: :class:`GalleryFrame` s, streamed (e.g. ``iter_gallery(path)``).
            topk: keep the best ``topk`` matches (None: all).
            batch_size: frames (or pairs) per forward pass at most (only frames of one size
                share a pass).
            progress: show a tqdm progress bar (stderr) over the frames.
            total: number of frames for the bar's total and ETA (e.g. ``count_gallery``).
            keep_frames: attach each kept match's frame as ``Match.image`` (for rendering).
                Only the frames of the running top ``topk`` are held, so set ``topk`` for long
                galleries.
            cascade_topk: query-guided models only: search in cascade (module docstring), the
                ``cascade_topk`` best frames of the query-agnostic pass re-scored as pairs;
                None = every frame as a pair.
            on_frame: called as each frame is searched, with the frame and all its matches
                (``det_score >= DET_THRESH``, their final similarities), e.g. to write an
                annotated video (not with ``cascade_topk``, whose similarities come later).

        Returns:
            matches with ``det_score >= TEST.PERSON_SEARCH.DET_THRESH``, similarity descending
            (ties: gallery order).

        Raises:
            ValueError: a query box that is empty or outside the query image, a query image or
                frame that is not an HxWx3 uint8 array, ``topk``, ``batch_size`` or
                ``cascade_topk`` < 1, ``cascade_topk`` with a query-agnostic model.
            FileNotFoundError: a missing query image file.
        """
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be >= 1 (or None for all), got {topk}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if cascade_topk is not None:
            if cascade_topk < 1:
                raise ValueError(f"cascade_topk must be >= 1, got {cascade_topk}")
            if not self.query_guided:
                raise ValueError("cascade search needs a query-guided model; this one is "
                                 "query-agnostic (it already runs each frame once)")
            if on_frame is not None:
                raise ValueError("on_frame is called with final similarities, which a cascade "
                                 "search only has at its end")
        query = self._prepare_query(query_image, query_box)
        matches: List[Match] = []
        shortlist = _FrameShortlist(cascade_topk, topk) if cascade_topk else None
        pairs = self.query_guided and shortlist is None  # else query-agnostic: frames once
        frames = iter(gallery)
        desc = "search" if shortlist is None else "cascade stage 1"
        with torch.no_grad(), tqdm(total=total, unit="frame", desc=desc,
                                   disable=not progress) as bar:
            query_out = None if pairs else self.model([query.input])[0]
            while True:
                batch = list(itertools.islice(frames, batch_size))
                if not batch:
                    break
                if pairs:
                    outputs = self._run_pairs(batch, query)
                else:
                    outputs = self._run_gallery(batch)
                for frame, out in zip(batch, outputs):
                    found = self._matches(frame, out["instances"], query_out, keep_frames)
                    if on_frame is not None:
                        on_frame(frame, found)
                    if shortlist is None:
                        matches.extend(found)
                    else:
                        shortlist.add(frame, found)
                matches.sort(key=lambda m: -m.similarity)  # stable: ties keep gallery order
                if topk is not None:
                    del matches[topk:]
                bar.update(len(batch))
        if shortlist is None:
            return matches
        # stage 2: the shortlisted frames as pairs, merged with the others' first-stage matches
        rescored = self._rescore(query, shortlist.frames(), batch_size, progress, keep_frames)
        return merge_cascade_matches(rescored, shortlist.others, topk)

    def embed_query(self, query_image: Union[str, np.ndarray],
                    query_box: Sequence[float]) -> torch.Tensor:
        """The (D,) L2-normalised query-agnostic embedding of the person in ``query_box``
        (x1, y1, x2, y2) of ``query_image`` (a path or an (H, W, 3) uint8 BGR array), as
        :meth:`search` embeds the query of a query-agnostic model (one forward pass).

        Raises:
            ValueError, FileNotFoundError: as :meth:`search` for the query.
        """
        query = self._prepare_query(query_image, query_box)
        with torch.no_grad():
            return self.model([query.input])[0]["query_embed"]

    def detect(self, frames: Sequence[GalleryFrame]) -> List:
        """The query-agnostic detections of each frame: ``Instances`` with ``pred_boxes`` (frame
        pixels), ``scores`` >= ``DET_THRESH`` and ``pred_embeds`` (N, D) L2-normalised; frames of
        one size share a forward pass, so a frame's result does not depend on the others."""
        with torch.no_grad():
            outputs = self._run_gallery(list(frames))
        return [out["instances"][out["instances"].scores >= self.det_thresh] for out in outputs]

    def rescore(
        self,
        query_image: Union[str, np.ndarray],
        query_box: Sequence[float],
        frames: Sequence[GalleryFrame],
        batch_size: int = 4,
        progress: bool = True,
        keep_frames: bool = False,
    ) -> List[List[Match]]:
        """Query-guided models: run each frame as a (query, frame) pair; per frame, its matches
        with ``det_score >= DET_THRESH`` (similarity = ``pred_sims``), in the frames' order: the
        cascade's second stage (merge with :func:`merge_cascade_matches`).

        Raises:
            ValueError: a query-agnostic model, ``batch_size`` < 1, a bad query (as
                :meth:`search`).
        """
        if not self.query_guided:
            raise ValueError("re-scoring frames as (query, frame) pairs needs a query-guided "
                             "model; this one is query-agnostic")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        query = self._prepare_query(query_image, query_box)
        return self._rescore(query, list(frames), batch_size, progress, keep_frames)

    def _rescore(self, query: "_Query", frames: List[GalleryFrame], batch_size: int,
                 progress: bool, keep_frames: bool) -> List[List[Match]]:
        rescored: List[List[Match]] = []
        with torch.no_grad(), tqdm(total=len(frames), unit="frame", desc="re-score",
                                   disable=not progress) as bar:
            for start in range(0, len(frames), batch_size):
                batch = frames[start : start + batch_size]
                outputs = self._run_pairs(batch, query)
                for frame, out in zip(batch, outputs):
                    rescored.append(self._matches(frame, out["instances"], None, keep_frames))
                bar.update(len(batch))
        return rescored

    def _prepare_query(self, query_image, query_box) -> "_Query":
        """Read / check the query image and box and map the query record (which checks the box
        against the image)."""
        if isinstance(query_image, (str, os.PathLike)):
            name = f"query image {query_image}"
            image = read_image_bgr(str(query_image))
        else:
            name = "query image"
            image = _check_bgr(query_image, name)
        box = [float(v) for v in np.asarray(query_box, dtype=np.float64).reshape(-1)]
        if len(box) != 4:
            raise ValueError(f"query box must be (x1, y1, x2, y2), got {list(query_box)}")
        images = {name: _model_format(image, self._mapper.image_format)}
        # mapping the query record checks the box against the image in both modes
        record = self._mapper.map({"file_name": name, "query_box": box}, images)
        return _Query(name, box, images, record)

    def _frame_images(self, frame: GalleryFrame) -> Dict[str, np.ndarray]:
        image = _check_bgr(frame.image, f"gallery frame {frame.name}")
        return {frame.name: _model_format(image, self._mapper.image_format)}

    def _forward(self, inputs: List[Dict]) -> List[Dict]:
        """The model's outputs for ``inputs``, one forward pass per input size (in order)."""
        outputs: List[Optional[Dict]] = [None] * len(inputs)
        for group in group_by_shape(inputs):
            for i, out in zip(group, self.model([inputs[i] for i in group])):
                outputs[i] = out
        return outputs

    def _run_gallery(self, batch: List[GalleryFrame]) -> List[Dict]:
        inputs = [self._mapper.map({"file_name": f.name}, self._frame_images(f)) for f in batch]
        return self._forward(inputs)

    def _run_pairs(self, batch, query: "_Query") -> List[Dict]:
        inputs = [
            self._mapper.map(
                {"file_name": f.name, "query_file_name": query.name, "query_box": query.box},
                {**query.images, **self._frame_images(f)},
            )
            for f in batch
        ]
        return self._forward(inputs)

    def _matches(self, frame: GalleryFrame, instances, query_out, keep_frames) -> List[Match]:
        """The frame's detections with score >= DET_THRESH as matches (boxes in frame pixels);
        similarity = ``pred_sims`` (pairs: ``query_out`` None) or, to the query-agnostic query
        output ``query_out``, :func:`agnostic_similarity` (``pred_embeds @ query_embed``, or
        the fitted local head's score)."""
        instances = instances[instances.scores >= self.det_thresh]
        if query_out is None:
            sims = instances.pred_sims
        else:
            cells = instances.pred_cells if instances.has("pred_cells") else None
            sims = agnostic_similarity(query_out, instances.pred_embeds, cells)
        boxes = instances.pred_boxes.tensor.cpu().tolist()
        scores = instances.scores.cpu().tolist()
        image = frame.image if keep_frames else None
        return [
            Match(frame.name, int(frame.index), tuple(b), s, sim, image)
            for b, s, sim in zip(boxes, scores, sims.cpu().tolist())
        ]
