"""``OnnxFrameEmbedder``: the query-agnostic path run from a ``qeeps-export-onnx`` file with
onnxruntime, behind the :class:`~qeeps_d2.search.embedder.FrameEmbedder` interface.

::

    from qeeps_d2.search.onnx_backend import OnnxFrameEmbedder

    embedder = OnnxFrameEmbedder("oim.onnx")          # DET_THRESH from the file
    found = embedder.embed_frames([frame])[0]          # boxes (N, 4), scores, embeddings (N, D)
    query = embedder.embed_query(query_image, (x1, y1, x2, y2))   # (D,)
    similarities = found.embeddings @ query

Everything the network does runs in the graph (see :mod:`qeeps_d2.export.onnx_export`); this
class does what stays outside it, exactly as the PyTorch path's test mapper does: the test
resize (Detectron2's ``ResizeShortestEdge`` with the sizes the file records, PIL bilinear), the
query box mapped into the resized image, and the ``det_thresh`` cut. One graph serves both
methods (one image per run): ``embed_frames`` passes no query box, ``embed_query`` one box and
reads only its embedding (the detector runs too, once per query).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from detectron2.data import transforms as T

from ..data.mapper import check_query_box
from ..export.metadata import INPUT_NAMES, OUTPUT_NAMES, decode_metadata
from .embedder import FrameDetections

__all__ = ["OnnxFrameEmbedder"]


def _check_image(image, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValueError(f"{what}: expected an HxWx3 uint8 BGR image, got {image.dtype} array "
                         f"of shape {image.shape}")
    return image


class OnnxFrameEmbedder:
    """Detections and re-id embeddings of frames from an exported model (onnxruntime).

    Attributes:
        embed_dim: D, the embedding size.
        det_thresh: detections scoring below it are dropped.
        metadata: the file's metadata (:mod:`qeeps_d2.export.metadata`): config, weights,
            test sizes, ...
    """

    def __init__(self, onnx_file: str, det_thresh: Optional[float] = None,
                 providers: Optional[Sequence[str]] = None, threads: Optional[int] = None):
        """
        Args:
            onnx_file: a file written by ``qeeps-export-onnx``.
            det_thresh: keep detections scoring at least this (default: the exported config's
                ``TEST.PERSON_SEARCH.DET_THRESH``).
            providers: onnxruntime execution providers, in order of preference (default
                ``["CPUExecutionProvider"]``; e.g. ``["CUDAExecutionProvider",
                "CPUExecutionProvider"]`` with onnxruntime-gpu).
            threads: onnxruntime's intra-op threads (default: onnxruntime's, all cores).
        Raises:
            FileNotFoundError: no such file.
            ValueError: not an ONNX model onnxruntime can load, or not a qeeps-export-onnx
                file (metadata or graph inputs/outputs missing).
        """
        import onnxruntime as ort

        if not os.path.isfile(onnx_file):
            raise FileNotFoundError(f"ONNX file {onnx_file} not found")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self._session = ort.InferenceSession(
                onnx_file, options, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise ValueError(f"{onnx_file}: onnxruntime cannot load it: "
                             f"{' '.join(str(e).split())}") from e
        self.metadata: Dict = decode_metadata(
            self._session.get_modelmeta().custom_metadata_map, onnx_file)
        inputs = tuple(i.name for i in self._session.get_inputs())
        outputs = tuple(o.name for o in self._session.get_outputs())
        if inputs != INPUT_NAMES or outputs != OUTPUT_NAMES:
            raise ValueError(f"{onnx_file}: graph inputs {list(inputs)} / outputs "
                             f"{list(outputs)}, expected {list(INPUT_NAMES)} / "
                             f"{list(OUTPUT_NAMES)}")
        if self.metadata["image_channels"] != "BGR":
            raise ValueError(f"{onnx_file}: graph takes {self.metadata['image_channels']} "
                             "images; this runtime feeds BGR")
        self.onnx_file = onnx_file
        self.embed_dim = int(self.metadata["embed_dim"])
        self.det_thresh = float(self.metadata["det_thresh"] if det_thresh is None
                                else det_thresh)
        self._min_size = int(self.metadata["min_size_test"])
        self._max_size = int(self.metadata["max_size_test"])
        self._no_boxes = np.zeros((0, 4), dtype=np.float32)

    def _transform(self, height: int, width: int) -> T.Transform:
        """The test mapper's resize of a ``height`` x ``width`` frame (its
        ``ResizeShortestEdge`` with one size, without drawing from numpy's RNG)."""
        if self._min_size <= 0:
            return T.NoOpTransform()
        newh, neww = T.ResizeShortestEdge.get_output_shape(height, width, self._min_size,
                                                           self._max_size)
        return T.ResizeTransform(height, width, newh, neww)

    def _run(self, image: np.ndarray, transform: T.Transform, query_boxes: np.ndarray):
        """The graph's outputs (boxes, scores, embeddings, query embeddings) for one frame."""
        resized = np.ascontiguousarray(transform.apply_image(image))
        feeds = {"image": resized,
                 "original_size": np.array(image.shape[:2], dtype=np.int64),
                 "query_boxes": query_boxes}
        return self._session.run(None, feeds)

    def embed_frames(self, images: Sequence[np.ndarray]) -> List[FrameDetections]:
        """Detect and embed the people of each (H, W, 3) uint8 BGR frame (one graph run each).

        Returns:
            one :class:`FrameDetections` per frame: boxes (N, 4) XYXY in the frame's pixels,
            scores (N,) >= ``det_thresh``, L2-normalised embeddings (N, D); float32.
        Raises:
            ValueError: a frame that is not an HxWx3 uint8 array.
        """
        found = []
        for i, image in enumerate(images):
            image = _check_image(image, f"frame {i}")
            boxes, scores, embeds, _ = self._run(image, self._transform(*image.shape[:2]),
                                                 self._no_boxes)
            keep = scores >= self.det_thresh
            found.append(FrameDetections(boxes[keep].astype(np.float32, copy=False),
                                         scores[keep].astype(np.float32, copy=False),
                                         embeds[keep].astype(np.float32, copy=False)))
        return found

    def embed_query(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """(D,) float32 L2-normalised embedding of the person in ``box`` (x1, y1, x2, y2 in
        ``image`` pixels) of the (H, W, 3) uint8 BGR ``image``, as the model embeds a query.

        Raises:
            ValueError: an image that is not HxWx3 uint8, a box that is not 4 numbers, empty,
                or outside the image (the PyTorch path's rules).
        """
        image = _check_image(image, "query image")
        height, width = image.shape[:2]
        values = np.asarray(box, dtype=np.float64).reshape(-1)
        if values.shape != (4,):
            raise ValueError(f"query box must be (x1, y1, x2, y2), got {list(box)}")
        checked = check_query_box(values, width, height, "query image")
        transform = self._transform(height, width)
        boxes = transform.apply_box(checked[None]).astype(np.float32)
        return self._run(image, transform, boxes)[3][0]
