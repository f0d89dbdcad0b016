"""``qeeps-search``: find a person (a box in a query image, or a crop) in a folder or a video.

::

    qeeps-search --config C --weights W --query IMG --box x1,y1,x2,y2 --gallery DIR|VIDEO
                 [--topk 10] [--every 1] [--out output/search] [--device cpu|cuda]
                 [--batch-size 4] [--cascade-topk K] [--save-every 200]
    qeeps-search --config C --weights W --query-crop CROP --gallery DIR|VIDEO ...

Shows a progress bar over the gallery frames (with ETA when the frame count is known), prints
the top matches as a table and writes ``OUT/results.json``::

    {"query": {"image", "box", "crop"},
     "model": {"config", "weights", "query_guided", "device", "det_thresh", "cascade_topk"},
     "gallery": {"path", "every", "frames_searched", "skipped"},
     "matches": [{"rank", "frame", "index", "box", "det_score", "similarity"}, ...]}

and ``OUT/report/``: the query and each top-K frame with its box drawn, the match strip and an
``index.html``. OUT is written in a temporary folder beside it and renamed at the end (an
existing OUT is replaced), so a failed run leaves nothing half-written. User errors (missing
or unreadable files, a box that is empty or outside the query image, weights that do not fit the
config, an unknown device, bad options) print one line on stderr and exit with status 2.

``--cascade-topk K`` (query-guided models): every frame runs once query-agnostically, then only
the K best frames run as (query, frame) pairs; matches of the other frames keep their
first-stage similarity minus 3 (below -1, ranked after every re-scored match).

Long galleries: frames are streamed (memory stays flat) and, without ``--cascade-topk``, the
progress is saved every ``--save-every`` frames in ``.OUT.partial/`` beside OUT
(``qeeps_d2.search.progress``); after Ctrl-C (exit status 130), a kill or a crash, running the
same command again continues from the last save and gives the results of an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import List, Optional, Sequence

import cv2

from ..checkpoint import CheckpointError
from .gallery import count_gallery, iter_gallery, read_image_bgr
from .progress import SearchInterrupted, discard_progress, file_signature, resumable_search
from .render import QUERY_COLOUR, draw_matches, match_strip, write_html_report
from .searcher import Match, PersonSearcher
from ..utils.cli import ArgumentParser, UsageError, run_cli

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qeeps-search",
                description="Search a person (query box or crop) in a folder of images or a video.")
    p.add_argument("--config", required=True, help="the model's config file (YAML)")
    p.add_argument("--weights", required=True, help="the trained model's weights (.pth/.pkl)")
    p.add_argument("--query", help="query image (with --box)")
    p.add_argument("--box", help="query person box x1,y1,x2,y2 in query-image pixels")
    p.add_argument("--query-crop", help="a crop of the query person (the whole image is the box)")
    p.add_argument("--gallery", required=True, help="folder of .jpg/.jpeg/.png/.bmp or a video")
    p.add_argument("--topk", type=int, default=10, help="matches to keep (default 10)")
    p.add_argument("--every", type=int, default=1, help="search every N-th frame (default 1)")
    p.add_argument("--out", default="output/search", help="output folder (default output/search)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    p.add_argument("--batch-size", type=int, default=4, help="frames per forward (default 4)")
    p.add_argument("--save-every", type=int, default=200,
                   help="save the progress every N frames, so that an interrupted search "
                        "continues when the same command is run again (default 200)")
    p.add_argument("--cascade-topk", type=int, default=0,
                   help="query-guided models: run every frame once query-agnostically, then "
                        "re-score only the best K frames as pairs (default 0: every frame as a "
                        "pair)")
    return p


def _parse_box(text: str) -> List[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise UsageError(f"--box must be four numbers x1,y1,x2,y2, got {text!r}")
    return box


def _query(args):
    """(query image path, BGR image, box, is_crop) from --query/--box or --query-crop."""
    if args.query_crop:
        if args.query or args.box:
            raise UsageError("give either --query-crop, or --query with --box, not both")
        image = read_image_bgr(args.query_crop)
        height, width = image.shape[:2]
        return args.query_crop, image, [0.0, 0.0, float(width), float(height)], True
    if not (args.query and args.box):
        raise UsageError("give --query IMAGE with --box x1,y1,x2,y2, or --query-crop CROP")
    box = _parse_box(args.box)
    return args.query, read_image_bgr(args.query), box, False


def _check_options(args) -> None:
    for name in ("topk", "every", "batch_size", "save_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.cascade_topk < 0:
        raise UsageError(f"--cascade-topk must be >= 0, got {args.cascade_topk}")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {args.out} exists and is not a folder")


def _results(args, query_path, box, is_crop, searcher, num_read, skipped, matches) -> dict:
    cfg = searcher.cfg
    return {
        "query": {"image": query_path, "box": box, "crop": is_crop},
        "model": {"config": args.config, "weights": args.weights,
                  "query_guided": searcher.query_guided, "device": cfg.MODEL.DEVICE,
                  "det_thresh": searcher.det_thresh, "cascade_topk": args.cascade_topk},
        "gallery": {"path": args.gallery, "every": args.every,
                    "frames_searched": num_read, "skipped": list(skipped)},
        "matches": [
            {"rank": r, "frame": m.frame, "index": m.index,
             "box": [round(v, 2) for v in m.box], "det_score": m.det_score,
             "similarity": m.similarity}
            for r, m in enumerate(matches, start=1)
        ],
    }


def _write_report(report_dir: str, query_image, box, matches: Sequence[Match], title: str) -> None:
    """The query and each match's frame with boxes drawn, the match strip and index.html."""
    os.makedirs(report_dir)

    def save(name, image):
        path = os.path.join(report_dir, name)
        if not cv2.imwrite(path, image):
            raise OSError(f"cannot write {path}")
        return path

    query_path = save("query.jpg", draw_matches(query_image, [box], ["query"], [QUERY_COLOUR]))
    strip_path = save("strip.jpg", match_strip(query_image, box, matches))
    sections = [("Query", [query_path], f"box {[round(v, 1) for v in box]}"),
                (f"Top {len(matches)} matches", [strip_path],
                 "similarity descending" if matches else "no detection above the threshold")]
    for rank, m in enumerate(matches, start=1):
        label = f"#{rank} sim {m.similarity:.3f}"
        path = save(f"rank_{rank:03d}.jpg", draw_matches(m.image, [m.box], [label]))
        sections.append((f"#{rank}: {m.frame}", [path],
                         f"frame index {m.index}, similarity {m.similarity:.4f}, detection "
                         f"score {m.det_score:.3f}, box {[round(v, 1) for v in m.box]}"))
    write_html_report(report_dir, title, sections)


def _publish(out: str, write) -> None:
    """Run ``write(tmp_dir)`` in a temporary folder beside ``out``, then move it to ``out``
    (replacing an existing one); on any error the temporary folder is removed."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        write(tmp)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "out"))
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _table(matches: Sequence[Match]) -> List[str]:
    if not matches:
        return ["no detection above the detection threshold"]
    width = max(5, max(len(m.frame) for m in matches))
    lines = [f"{'rank':>4}  {'similarity':>10}  {'det':>5}  {'frame':<{width}}  {'index':>6}  box"]
    for r, m in enumerate(matches, start=1):
        box = ", ".join(f"{v:.0f}" for v in m.box)
        lines.append(f"{r:>4}  {m.similarity:>10.4f}  {m.det_score:>5.2f}  {m.frame:<{width}}  "
                     f"{m.index:>6}  [{box}]")
    return lines


def _run(args) -> List[str]:
    _check_options(args)
    query_path, query_image, box, is_crop = _query(args)
    gallery = iter_gallery(args.gallery, args.every)
    searcher = PersonSearcher.from_config(args.config, args.weights, device=args.device)
    out = os.path.abspath(args.out)
    progress_dir = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")
    if args.cascade_topk:  # two passes over the gallery: not continued after an interruption
        matches = searcher.search(query_path, box, gallery, topk=args.topk,
                                  batch_size=args.batch_size, progress=True,
                                  total=count_gallery(args.gallery, args.every), keep_frames=True,
                                  cascade_topk=args.cascade_topk)
        num_read, skipped = gallery.num_read, list(gallery.skipped)
    else:
        signature = {"config": file_signature(args.config), "weights": file_signature(args.weights),
                     "query": file_signature(query_path), "box": box, "crop": is_crop,
                     "gallery": file_signature(args.gallery), "every": args.every,
                     "topk": args.topk}
        found = resumable_search(searcher, query_path, box, args.gallery, progress_dir, signature,
                                 args.every, args.topk, args.batch_size, args.save_every)
        matches, num_read, skipped = found.matches, found.num_read, found.skipped
    results = _results(args, query_path, box, is_crop, searcher, num_read, skipped, matches)
    title = f"qeeps-search: {os.path.basename(query_path)} in {args.gallery}"

    def write(tmp):
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        _write_report(os.path.join(tmp, "report"), query_image, box, matches, title)

    _publish(out, write)
    discard_progress(progress_dir)
    mode = "query-guided (pairs)" if searcher.query_guided else "query-agnostic"
    if args.cascade_topk:
        mode = f"cascade: query-agnostic, then the best {args.cascade_topk} frames as pairs"
    return [f"{num_read} frames searched ({mode}), {len(skipped)} skipped; "
            f"results in {args.out}"] + _table(matches)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``qeeps-search``; returns the exit status (0 ok, 2 user error,
    130 interrupted with Ctrl-C: the progress is kept, the same command continues)."""
    try:
        return run_cli("qeeps-search", _parser(), _run, argv,
                       user_errors=(ValueError, OSError, CheckpointError))
    except SearchInterrupted as e:
        print(f"qeeps-search: {e}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
