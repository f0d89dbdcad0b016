"""``qeeps-synthps [--root R] [--seed S] [--force] [knobs]`` (or ``python -m
qeeps_d2.data.synthps``): generate the SynthPS data set if needed and print its statistics."""
from __future__ import annotations

import argparse
import logging
import os
from typing import List, Optional, Sequence

from ...utils.cli import run_cli
from .generator import (DEFAULT_KNOBS, is_complete, ensure_synthps, format_synthps_stats,
                        synthps_stats)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    d = DEFAULT_KNOBS
    p = argparse.ArgumentParser(
        prog="qeeps-synthps",
        description="Generate the SynthPS person-search data set (CUHK-SYSU layout) if missing, "
                    "and print its statistics.")
    p.add_argument("--root", default=os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"),
                                                  "synthps"), help="data set folder")
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    p.add_argument("--force", action="store_true", help="regenerate even if the data set exists")
    p.add_argument("--num-train-ids", type=int, default=d["num_train_ids"])
    p.add_argument("--num-test-ids", type=int, default=d["num_test_ids"], help="= number of queries")
    p.add_argument("--train-images", type=int, default=d["train_images"])
    p.add_argument("--test-images", type=int, default=d["test_images"], help="pool size")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"), default=d["image_size"])
    p.add_argument("--persons-per-image", type=int, nargs=2, metavar=("MIN", "MAX"),
                   default=d["persons_per_image"])
    p.add_argument("--appearances-per-id", type=int, nargs=2, metavar=("MIN", "MAX"),
                   default=d["appearances_per_id"], help="images each identity appears in")
    p.add_argument("--lookalike-fraction", type=float, default=d["lookalike_fraction"])
    p.add_argument("--occlusion-rate", type=float, default=d["occlusion_rate"])
    p.add_argument("--illumination", type=float, default=d["illumination"])
    p.add_argument("--gallery-sizes", type=int, nargs="+", default=d["gallery_sizes"])
    return p


def _run(args) -> List[str]:
    knobs = {name: getattr(args, name) for name in DEFAULT_KNOBS}
    existed = is_complete(args.root) and not args.force
    root = ensure_synthps(args.root, args.seed, force=args.force, **knobs)
    stats = synthps_stats(root)
    lines = [format_synthps_stats(stats)]
    if existed:
        lines.insert(0, f"SynthPS already present at {root} (seed {stats['seed']}); use --force "
                        "to regenerate")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``qeeps-synthps``; returns the exit status (0 ok, 2 user error: a bad
    knob, or a --root that exists and is not a SynthPS folder, reported in one line)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_cli("qeeps-synthps", _parser(), _run, argv,
                   user_errors=(ValueError, OSError, RuntimeError))

