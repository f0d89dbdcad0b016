"""What an exported ``.onnx`` file says about itself: its ``metadata_props``.

A runtime needs no config to use an export: the file carries the input and output names, the
test resize, the channel order and normalisation (folded into the graph), the detection
threshold, the embedding size and where the model came from. Every value is stored as JSON text
under its key; :func:`encode_metadata` writes them, :func:`decode_metadata` reads and checks them.

``graph`` is "query-agnostic" (an OIM model) or "query-agnostic first stage" (a query-guided
model's cascade first stage, ``qeeps-export-onnx --first-stage``); the pair path never exports.

Graph inputs (one image per run):

- ``image``: (H, W, 3) uint8, **BGR**, the frame already resized as the model's test mapper
  resizes it (Detectron2's ``ResizeShortestEdge(min_size_test, max_size_test)``); the graph
  converts it to the model's ``input_format`` and normalises it with ``pixel_mean`` /
  ``pixel_std``;
- ``original_size``: (2,) int64, the frame's (height, width) before resizing;
- ``query_boxes``: (M, 4) float32 XYXY boxes in ``image`` (resized) pixels to embed, M >= 0.

Graph outputs:

- ``boxes``: (N, 4) float32 XYXY detections in ``original_size`` pixels (clipped to the frame);
- ``scores``: (N,) float32 person scores, all above the model's ``score_thresh_test``;
  a search keeps those >= ``det_thresh``;
- ``embeddings``: (N, D) float32 L2-normalised re-id embeddings of the detections;
- ``query_embeddings``: (M, D) float32 L2-normalised embeddings of ``query_boxes``.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Mapping

__all__ = [
    "FORMAT",
    "FORMAT_KEY",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "REQUIRED_KEYS",
    "encode_metadata",
    "decode_metadata",
]

FORMAT_KEY = "qeeps_format"
FORMAT = "qeeps-onnx/1"
INPUT_NAMES = ("image", "original_size", "query_boxes")
OUTPUT_NAMES = ("boxes", "scores", "embeddings", "query_embeddings")
# what a runtime reads (other keys are provenance: config, weights, exporter)
REQUIRED_KEYS = ("graph", "image_channels", "input_format", "min_size_test", "max_size_test",
                 "det_thresh", "embed_dim")


def encode_metadata(values: Mapping[str, Any]) -> Dict[str, str]:
    """``{key: JSON text}`` for ``metadata_props``, the format key first."""
    out = {FORMAT_KEY: json.dumps(FORMAT)}
    out.update({k: json.dumps(v) for k, v in values.items() if k != FORMAT_KEY})
    return out


def decode_metadata(props: Mapping[str, str], source: str) -> Dict[str, Any]:
    """Parse and check the ``metadata_props`` of an export.

    Args:
        props: ``{key: text}`` as stored (``onnx.ModelProto.metadata_props`` or onnxruntime's
            ``custom_metadata_map``).
        source: the file, named in errors.
    Returns:
        ``{key: value}`` with the JSON values decoded.
    Raises:
        ValueError: not a ``qeeps-export-onnx`` file, another format version, a value that is
            not JSON, or a required key missing.
    """
    if FORMAT_KEY not in props:
        raise ValueError(f"{source}: not a qeeps-export-onnx file (no {FORMAT_KEY!r} in its "
                         "metadata); export the model with qeeps-export-onnx")
    values = {}
    for key, text in props.items():
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: metadata {key!r} is not JSON ({e})") from e
    if values[FORMAT_KEY] != FORMAT:
        raise ValueError(f"{source}: metadata {FORMAT_KEY} is {values[FORMAT_KEY]!r}, this "
                         f"version reads {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in values]
    if missing:
        raise ValueError(f"{source}: metadata lacks {', '.join(missing)}")
    return values
