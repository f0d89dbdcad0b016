"""``qeeps-export-onnx``: export a query-agnostic QEEPS model (the OIM baseline) to ONNX.

::

    qeeps-export-onnx --config-file C --weights W --output model.onnx
                      [--first-stage] [--sample-image IMG] [--no-check] [--opts KEY VALUE ...]

Writes one ``.onnx`` file (graph and metadata: :mod:`qeeps_d2.export.metadata`), checked with
``onnx.checker`` and, unless ``--no-check``, run once with onnxruntime against PyTorch on an
input of another size than the traced one (a file that fails the check is not written);
prints what was written. Query-guided configs are refused (only the query-agnostic path
exports). User errors (missing files, weights that do not fit the config, a config that cannot
export, bad options) and a failed check print one line on stderr and exit with status 2. ``--first-stage`` exports a query-guided model's query-agnostic first stage (the
cascade's: guidance off), e.g. for ``qeeps-index --backend onnx`` with a QEEPS model.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence

from ..checkpoint import CheckpointError
from ..utils.cli import ArgumentParser, UsageError, model_opts, run_cli
from .onnx_export import ExportCheckError

__all__ = ["main"]

PROG = "qeeps-export-onnx"


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Export the query-agnostic path of a QEEPS model "
                                              "(detector + re-id embedding) to ONNX.")
    p.add_argument("--config-file", "--config", dest="config_file", required=True,
                   metavar="FILE", help="the model's config file (YAML)")
    p.add_argument("--weights", required=True, metavar="FILE",
                   help="the trained model's weights (.pth/.pkl)")
    p.add_argument("--output", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--first-stage", action="store_true",
                   help="query-guided models: export the query-agnostic first stage (the "
                        "cascade's, guidance off)")
    p.add_argument("--sample-image", metavar="IMG",
                   help="a frame to trace with (default: seeded noise at the test size)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the onnxruntime-vs-PyTorch check after the export")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                   help="config overrides as KEY VALUE pairs, last on the command line")
    return p


def _read_bgr(path: str):
    """(H, W, 3) uint8 BGR of an image file (EXIF orientation applied, as the mapper reads)."""
    from detectron2.data import detection_utils

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--sample-image {path} not found")
    try:
        return detection_utils.read_image(path, format="BGR")
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"--sample-image {path}: not a readable image ({e})") from e


def _run(args) -> List[str]:
    from .model_files import load_export_model
    from .onnx_export import export_onnx

    if not args.output.endswith(".onnx"):
        raise UsageError(f"--output {args.output}: the file name must end in .onnx")
    if os.path.isdir(args.output):
        raise UsageError(f"--output {args.output} is a folder")
    model_opts(args)  # checks --opts pairs
    sample = _read_bgr(args.sample_image) if args.sample_image else None
    cfg, model = load_export_model(args.config_file, args.weights, args.opts, args.first_stage)
    meta = export_onnx(cfg, model, args.output, config_file=args.config_file,
                       weights=args.weights, sample_image=sample, check=not args.no_check,
                       first_stage=args.first_stage)
    size_mb = os.path.getsize(args.output) / 2**20
    lines = [f"wrote {args.output} ({size_mb:.1f} MB): {meta['graph']} graph, opset {meta['opset']}, "
             f"embedding dim {meta['embed_dim']}, DET_THRESH {meta['det_thresh']}, test size "
             f"{meta['min_size_test']} (max {meta['max_size_test']})"]
    if "check" in meta:
        c = meta["check"]
        diffs = ", ".join(f"{k[len('max_abs_diff_'):]} {v:.2g}" for k, v in c.items()
                          if k.startswith("max_abs_diff_"))
        lines.append(f"check: onnxruntime vs PyTorch on a {c['input_size'][0]}x"
                     f"{c['input_size'][1]} input ({c['detections']} detections): "
                     f"max |diff| {diffs}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(PROG, _parser(), _run, argv,
                   user_errors=(ValueError, OSError, CheckpointError, ExportCheckError))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
