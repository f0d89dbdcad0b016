"""Export of the query-agnostic path (detector + re-id embedding) to ONNX: :func:`export_onnx`,
the ``qeeps-export-onnx`` command (:mod:`qeeps_d2.export.cli`) and the metadata an exported file
carries (:mod:`qeeps_d2.export.metadata`). Its runtime is
:class:`qeeps_d2.search.onnx_backend.OnnxFrameEmbedder`. Needs the ``export`` extra (onnx,
onnxruntime)."""
from .graph import QueryAgnosticGraph
from .metadata import FORMAT, INPUT_NAMES, OUTPUT_NAMES, decode_metadata, encode_metadata
from .model_files import load_export_model
from .onnx_export import (OPSET, ExportCheckError, check_exportable, export_metadata, export_onnx,
                          inference_resize)

__all__ = [
    "ExportCheckError",
    "FORMAT",
    "INPUT_NAMES",
    "OPSET",
    "OUTPUT_NAMES",
    "QueryAgnosticGraph",
    "check_exportable",
    "decode_metadata",
    "encode_metadata",
    "export_metadata",
    "export_onnx",
    "inference_resize",
    "load_export_model",
]
