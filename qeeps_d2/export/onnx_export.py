"""Export the query-agnostic path of a QEEPS model (the OIM baseline) to one ONNX file.

The whole network is in the graph: input layout and channel order, normalisation (and padding
if the config asks for it), backbone, RPN with its NMS, the ROI box head (ClsNet / RegNet and
their NMS), the re-id head on the final boxes, the L2 norm, and the rescaling of the boxes to
the frame's own size. Outside it, in the runtime (:class:`qeeps_d2.search.onnx_backend.
OnnxFrameEmbedder`), stay only the test resize (Detectron2's ``ResizeShortestEdge``, PIL
bilinear, which no ONNX operator reproduces exactly) and the ``DET_THRESH`` cut.

How: ``torch.onnx.export(..., dynamo=False)``, i.e. the TorchScript tracer, opset 17 (ONNX
``RoiAlign`` with ``half_pixel`` coordinates, which the aligned ``ROIAlignV2`` pooler needs,
exists from opset 16). The dynamo exporter (``torch.export``) stops at Detectron2's
data-dependent Python branches (``if not valid_mask.all()`` in ``find_top_rpn_proposals``, the
first of several). Under the tracer those branches are recorded as taken on the traced input:

- the non-finite-box filters of the RPN and of ``fast_rcnn_inference`` (taken when every box is
  finite, which holds for finite inputs: box deltas are clamped);
- every count of boxes is traced as a tensor (Detectron2's ``patch_builtin_len``, extended to
  ``qeeps_d2.modeling.roi_heads``), so the graph serves any number of proposals, detections and
  query boxes, none included (``QEEPSROIHeads._embed_per_image`` takes its general path while
  tracing).

:func:`export_onnx` checks the written file with ``onnx.checker`` and, by default, runs it with
onnxruntime on an input of another size than the traced one against PyTorch.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from contextlib import contextmanager
from typing import Any, Dict, Optional

import numpy as np
import torch

from detectron2.data import transforms as T
from detectron2.export.torchscript_patch import patch_builtin_len

from ..config import is_query_guided
from ..data.mapper import PersonSearchMapper
from ..utils.atomic_write import write_atomically
from .graph import QueryAgnosticGraph
from .metadata import INPUT_NAMES, OUTPUT_NAMES, encode_metadata

__all__ = ["OPSET", "ExportCheckError", "check_exportable", "export_metadata", "export_onnx",
           "inference_resize"]

OPSET = 17
# modules whose len() must stay a traced value (box counts); Detectron2's own list is added
_LEN_TRACED_MODULES = ["qeeps_d2.modeling.roi_heads"]
# largest differences between the exported graph and PyTorch on the check input: a check for
# gross export errors (a size or count recorded as a constant moves boxes by pixels or changes
# the detections), loose enough for random weights on a noise image (up to 7e-3 px seen); the
# parity figures come from tests/test_onnx_export.py and benchmarks/onnx_parity.py
_CHECK_TOLERANCE = {"boxes": 0.05, "scores": 1e-3, "embeddings": 1e-3, "query_embeddings": 1e-3}


class ExportCheckError(RuntimeError):
    """The exported graph and PyTorch disagree on the check input (nothing is written)."""


@contextmanager
def _quiet_tracing():
    """Silence what tracing Detectron2 says about itself: the tracer's warnings name the
    branches recorded as constants (module docstring), and torch.fx logs that
    ``is_fx_tracing`` is ambiguous (Detectron2 asks it; irrelevant to the TorchScript tracer)."""
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    level = fx_log.level
    fx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # boxes[filter_inds[:, 0], 0] in fast_rcnn_inference: the indices are never negative
            warnings.filterwarnings("ignore", message=r"Exporting aten::index operator")
            # Detectron2's anchor generator (eager inference says it too)
            warnings.filterwarnings("ignore", message=r"torch\.meshgrid")
            yield
    finally:
        fx_log.setLevel(level)


def check_exportable(cfg, source: str = "config", first_stage: bool = False) -> None:
    """Raise ``ValueError`` naming ``source`` and the key when the config's model cannot be
    exported: not a QEEPS model, query-guided (the pair path: QSSE, QRPN, QSimNet) unless
    ``first_stage``, an input format other than BGR/RGB, or a test mapper that does more than
    one shortest-edge resize.

    ``first_stage``: a query-guided model exports its query-agnostic first stage (the
    cascade's: guidance off, the QSSE blocks as plain residual blocks, the stock RPN, cosine
    similarity of the re-id embeddings); for a query-agnostic model it changes nothing."""
    if cfg.MODEL.META_ARCHITECTURE != "QEEPS":
        raise ValueError(f"{source}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}, "
                         "not a QEEPS person-search model")
    if is_query_guided(cfg) and not first_stage:
        on = [k for k in ("QSSE", "QRPN", "QSIMNET") if cfg.MODEL.QEEPS.get(k).ENABLED]
        raise ValueError(
            f"{source}: query-guided model (MODEL.QEEPS.{{{','.join(on)}}}.ENABLED): only the "
            "query-agnostic path (detector + re-id embedding, the OIM baseline) exports; the "
            "pair path runs the query image with every frame and is not exported (README "
            "'Export to ONNX'); --first-stage exports its query-agnostic first stage (the "
            "cascade's, guidance off)")
    if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
        raise ValueError(f"{source}: INPUT.FORMAT {cfg.INPUT.FORMAT!r}: only BGR and RGB "
                         "models export")
    inference_resize(cfg, source)


def inference_resize(cfg, source: str = "config") -> Dict[str, int]:
    """``{"min_size_test", "max_size_test"}`` of the test mapper's resize (0: no resize).

    Raises:
        ValueError: the test mapper has other augmentations than one bilinear
            ``ResizeShortestEdge`` (the runtime reproduces only that one).
    """
    augs = PersonSearchMapper(cfg, is_train=False).augmentations.augs
    if len(augs) != 1 or not isinstance(augs[0], T.ResizeShortestEdge):
        raise ValueError(f"{source}: the test mapper applies {[type(a).__name__ for a in augs]}; "
                         "only one ResizeShortestEdge exports")
    (resize,) = augs
    sizes = set(int(s) for s in resize.short_edge_length)
    if resize.is_range or len(sizes) != 1 or resize.interp != T.Resize(1).interp:
        raise ValueError(f"{source}: INPUT.MIN_SIZE_TEST must be one size with the default "
                         "(bilinear) resize to export")
    return {"min_size_test": sizes.pop(), "max_size_test": int(resize.max_size)}


def _sha256(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_metadata(cfg, model: torch.nn.Module, config_file: str = "", weights: str = ""
                    ) -> Dict[str, Any]:
    """The values :func:`export_onnx` stores in the file (see :mod:`qeeps_d2.export.metadata`).
    """
    guided = is_query_guided(cfg)
    return {
        # a query-guided model exports its first stage (check_exportable's first_stage)
        "graph": "query-agnostic first stage" if guided else "query-agnostic",
        "query_guided_model": guided,
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "image_channels": "BGR",
        "input_format": cfg.INPUT.FORMAT,
        # folded into the graph (recorded for reference)
        "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
        "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
        **inference_resize(cfg),
        "resize": "detectron2 ResizeShortestEdge, PIL bilinear (in the runtime)",
        "size_divisibility": int(model.backbone.size_divisibility),  # padding in the graph
        "det_thresh": float(cfg.TEST.PERSON_SEARCH.DET_THRESH),
        "score_thresh_test": float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
        "nms_thresh_test": float(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST),
        "detections_per_image": int(cfg.TEST.DETECTIONS_PER_IMAGE),
        "post_nms_topk_test": int(cfg.MODEL.RPN.POST_NMS_TOPK_TEST),
        "embed_dim": int(cfg.MODEL.QEEPS.EMBED_DIM),
        "config_file": config_file,
        "weights": weights or cfg.MODEL.WEIGHTS,
        "weights_sha256": _sha256(weights or cfg.MODEL.WEIGHTS),
        "config": cfg.dump(),
        "exporter": "torch.onnx.export (TorchScript tracer, dynamo=False)",
        "torch_version": torch.__version__,
        "opset": OPSET,
    }


def _sample_inputs(min_size: int, max_size: int, sample_image: Optional[np.ndarray],
                   portrait: bool = False):
    """Graph inputs for a (BGR uint8) image resized as at test time, with two query boxes; a
    seeded noise image of the test size (landscape 2:3, or ``portrait`` 3:2, for a check at
    another size than the traced one) when None."""
    if sample_image is None:
        short = min_size or 240
        long_side = min(int(short * 1.5), max_size) if max_size else int(short * 1.5)
        shape = (long_side, short, 3) if portrait else (short, long_side, 3)
        sample_image = np.random.default_rng(int(portrait)).integers(0, 256, shape,
                                                                     dtype=np.uint8)
    h, w = sample_image.shape[:2]
    if min_size:
        newh, neww = T.ResizeShortestEdge.get_output_shape(h, w, min_size, max_size)
        sample_image = T.ResizeTransform(h, w, newh, neww).apply_image(sample_image)
    rh, rw = sample_image.shape[:2]
    boxes = np.array([[0.1 * rw, 0.1 * rh, 0.4 * rw, 0.9 * rh],
                      [0.5 * rw, 0.2 * rh, 0.7 * rw, 0.8 * rh]], dtype=np.float32)
    return (torch.from_numpy(np.array(sample_image, dtype=np.uint8)), torch.tensor([h, w]),
            torch.as_tensor(boxes))


def _check_with_onnxruntime(graph: QueryAgnosticGraph, path: str, inputs) -> Dict[str, Any]:
    """Run the file with onnxruntime and the module with PyTorch on ``inputs``; raise
    :class:`ExportCheckError` when they disagree (detection count, or any value beyond the
    tolerance)."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})
    with torch.no_grad():
        want = [t.numpy() for t in graph(*inputs)]
    stats = {"input_size": list(inputs[0].shape[:2]), "detections": int(len(want[0]))}
    if got[0].shape != want[0].shape:
        raise ExportCheckError(f"export check: onnxruntime found {len(got[0])} detections on the "
                           f"check input, PyTorch {len(want[0])} (--no-check skips this check)")
    for name, a, b in zip(OUTPUT_NAMES, got, want):
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        stats[f"max_abs_diff_{name}"] = diff
        if not diff <= _CHECK_TOLERANCE[name]:
            raise ExportCheckError(f"export check: {name} differ by {diff:.3g} between onnxruntime "
                               f"and PyTorch (more than {_CHECK_TOLERANCE[name]:g}; --no-check "
                               "skips this check)")
    return stats


def export_onnx(cfg, model: torch.nn.Module, path: str, *, config_file: str = "",
                weights: str = "", sample_image: Optional[np.ndarray] = None,
                check: bool = True, first_stage: bool = False) -> Dict[str, Any]:
    """Export the query-agnostic path of ``model`` to the ONNX file ``path``.

    Args:
        cfg: the model's config (see :func:`check_exportable`).
        model: the built ``QEEPS`` model with its weights (CPU; put in eval mode here).
        path: the ``.onnx`` file to write (atomically: a failed export leaves no file).
        config_file, weights: recorded in the metadata (weights default: ``MODEL.WEIGHTS``).
        sample_image: an (H, W, 3) uint8 BGR frame to trace with (default: seeded noise at
            the test size); the traced graph does not depend on its content.
        check: also run the file with onnxruntime against PyTorch on a second input of another
            size before writing it (:class:`ExportCheckError` if they disagree).
        first_stage: allow a query-guided model and export its query-agnostic first stage
            (:func:`check_exportable`).
    Returns:
        the metadata written (:func:`export_metadata`) plus, with ``check``, ``"check"``: the
        input size, detection count and largest absolute difference of each output.
    """
    import onnx

    check_exportable(cfg, first_stage=first_stage)
    model.eval()
    graph = QueryAgnosticGraph(model, cfg.INPUT.FORMAT).eval()
    meta = export_metadata(cfg, model, config_file, weights)
    inputs = _sample_inputs(meta["min_size_test"], meta["max_size_test"], sample_image)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    traced = os.path.join(folder, f".{os.path.basename(path)}.traced.tmp")
    try:
        with torch.no_grad(), patch_builtin_len(_LEN_TRACED_MODULES), _quiet_tracing():
            torch.onnx.export(
                graph, inputs, traced, dynamo=False, opset_version=OPSET,
                input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                dynamic_axes={"image": {0: "height", 1: "width"},
                              "query_boxes": {0: "num_queries"},
                              "boxes": {0: "num_detections"}, "scores": {0: "num_detections"},
                              "embeddings": {0: "num_detections"},
                              "query_embeddings": {0: "num_queries"}},
            )
        proto = onnx.load(traced)
    finally:
        if os.path.exists(traced):
            os.remove(traced)
    for key, value in encode_metadata(meta).items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = ("QEEPS-D2 query-agnostic person search (detector + re-id embedding); "
                        "see the metadata_props")
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    if check:  # on a temporary copy: a file that fails it is not written
        checked = os.path.join(folder, f".{os.path.basename(path)}.check.tmp")
        try:
            with open(checked, "wb") as f:
                f.write(data)
            second = _sample_inputs(meta["min_size_test"], meta["max_size_test"], None,
                                    portrait=True)
            meta["check"] = _check_with_onnxruntime(graph, checked, second)
        finally:
            os.remove(checked)
    write_atomically(path, lambda f: f.write(data))
    return meta
