"""``qeeps-search``: find a person (a box in a query image, or a crop) in a folder or a video.

::

    qeeps-search --config-file C --weights W --query IMG --box x1,y1,x2,y2 --gallery DIR|VIDEO
                 [--topk 10] [--every 1] [--out output/search] [--device cpu|cuda]
                 [--batch-size 4] [--cascade-topk K] [--save-every 200]
                 [--confidence-threshold T] [--opts KEY VALUE ...]
    qeeps-search --config-file C --weights W --query-crop CROP --gallery DIR|VIDEO ...
    qeeps-search --index INDEX_DIR --query IMG --box x1,y1,x2,y2 [--rerank K
                 [--config-file C --weights W]] [--topk 10] [--out output/search] ...

``--config`` is the old name of ``--config-file``; ``--confidence-threshold`` is
``TEST.PERSON_SEARCH.DET_THRESH`` and ``--opts`` config overrides, as in Detectron2's
``demo/demo.py``.

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

``--index INDEX_DIR`` (built by ``qeeps-index``): the query is embedded with the index's model
(one forward pass; ``--config-file/--weights`` may be given and must then be that model) and
matched against the stored detections with FAISS (``qeeps_d2.search.index.IndexSearcher``),
without running the network on the gallery; the frames of the report are read back from the
index's source. ``--rerank K``: the K frames with the best matches are re-scored as (query,
frame) pairs with a query-guided model (``--config-file/--weights``, default the index's own),
merged by the cascade's rule (``merge_cascade_matches``): with the index built by the same
model, the results of ``--cascade-topk K`` without an index. ``results.json`` then also has
``"index": {"path", "detections", "approximate", "rerank", "rerank_config", "query_seconds",
"search_seconds", "rerank_seconds"}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import List, Optional, Sequence

import cv2
import numpy as np

from ..checkpoint import CheckpointError
from .gallery import VIDEO_BACKENDS, count_gallery, is_stream, iter_gallery, read_image_bgr
from .progress import SearchInterrupted, discard_progress, file_signature, resumable_search
from .render import QUERY_COLOUR, draw_matches, match_strip, write_html_report
from .searcher import Match, PersonSearcher, merge_cascade_matches
from .video_output import AnnotatedVideoWriter
from ..utils.cli import ArgumentParser, UsageError, model_opts, run_cli

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qeeps-search",
                description="Search a person (query box or crop) in a folder of images or a video.")
    p.add_argument("--config-file", "--config", dest="config",
                   help="the model's config file (YAML); with --index: default the index's")
    p.add_argument("--weights", help="the trained model's weights (.pth/.pkl)")
    p.add_argument("--query", help="query image (with --box)")
    p.add_argument("--box", help="query person box x1,y1,x2,y2 in query-image pixels")
    p.add_argument("--query-crop", help="a crop of the query person (the whole image is the box)")
    p.add_argument("--gallery", "--input", dest="gallery",
                   help="folder of .jpg/.jpeg/.png/.bmp, a video file, a stream URL "
                        "(rtsp://, http://) or a camera index (0); or --index")
    p.add_argument("--index", help="search an index built by qeeps-index instead of a gallery")
    p.add_argument("--rerank", type=int, default=0,
                   help="with --index: re-score the K frames with the best matches as (query, "
                        "frame) pairs with a query-guided model (default 0: no re-ranking)")
    p.add_argument("--confidence-threshold", type=float, default=None,
                   help="keep detections scoring at least this (default: the config's "
                        "TEST.PERSON_SEARCH.DET_THRESH; with --index: the index's)")
    p.add_argument("--topk", type=int, default=10, help="matches to keep (default 10)")
    p.add_argument("--every", type=int, default=1, help="search every N-th frame (default 1)")
    p.add_argument("--out", "--output", dest="out", default="output/search",
                   help="output folder (default output/search)")
    p.add_argument("--output-video", metavar="FILE",
                   help="also write the searched frames as a video (.mp4/.avi/...), each "
                        "frame's best match drawn (green when its similarity reaches "
                        "--match-threshold); a search with it is not continued after an "
                        "interruption")
    p.add_argument("--match-threshold", type=float, default=None, metavar="S",
                   help="--output-video: similarity from which a frame's best match is marked "
                        "as the person (default: every frame's best is marked)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="search at most N frames (of those --every keeps); bounds a live stream")
    p.add_argument("--video-backend", choices=VIDEO_BACKENDS, default="auto",
                   help="video decoder: auto (OpenCV, then PyAV), opencv or pyav")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    p.add_argument("--batch-size", type=int, default=4, help="frames per forward (default 4)")
    p.add_argument("--save-every", type=int, default=200,
                   help="save the progress every N frames, so that an interrupted search "
                        "continues when the same command is run again (default 200)")
    p.add_argument("--cascade-topk", type=int, default=0,
                   help="query-guided models: run every frame once query-agnostically, then "
                        "re-score only the best K frames as pairs (default 0: every frame as a "
                        "pair)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides KEY VALUE ... (last on the command line)")
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
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.output_video and args.cascade_topk:
        raise UsageError("--output-video draws each frame as it is searched; with "
                         "--cascade-topk the final similarities come later: drop one of them")
    if args.index and (args.output_video or args.max_frames):
        raise UsageError("--output-video and --max-frames go with --gallery, not --index")
    for name in ("topk", "every", "batch_size", "save_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("cascade_topk", "rerank"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    model_opts(args)  # checks --opts pairs and --confidence-threshold
    if args.index:
        if args.gallery:
            raise UsageError("give --gallery or --index, not both (an index reads its own source)")
        if args.cascade_topk:
            raise UsageError("--cascade-topk runs on a gallery; with --index use --rerank K")
        if args.every != 1:
            raise UsageError("--every applies to a gallery; an index keeps the frames it was "
                             "built with (qeeps-index --every)")
        if bool(args.config) != bool(args.weights):
            raise UsageError("with --index, give both --config-file and --weights, or neither "
                             "(the index's model)")
        if args.opts and not args.config:
            raise UsageError("--opts configures --config-file; the index's model keeps its own")
    else:
        if not (args.config and args.weights and args.gallery):
            raise UsageError("give --config-file, --weights and --gallery (or --index INDEX_DIR)")
        if args.rerank:
            raise UsageError("--rerank re-ranks the matches of --index; on a gallery use "
                             "--cascade-topk K")
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
        "gallery": {"path": args.gallery, "every": args.every, "max_frames": args.max_frames,
                    "frames_searched": num_read, "skipped": list(skipped),
                    "output_video": args.output_video},
        "matches": _match_rows(matches),
    }


def _match_rows(matches) -> List[dict]:
    return [{"rank": r, "frame": m.frame, "index": m.index, "box": [round(v, 2) for v in m.box],
             "det_score": m.det_score, "similarity": m.similarity}
            for r, m in enumerate(matches, start=1)]


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
    if args.index:
        return _run_index(args)
    query_path, query_image, box, is_crop = _query(args)
    gallery = iter_gallery(args.gallery, args.every, max_frames=args.max_frames,
                           backend=args.video_backend)
    searcher = PersonSearcher.from_config(args.config, args.weights, device=args.device,
                                          opts=model_opts(args))
    out = os.path.abspath(args.out)
    progress_dir = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")
    video = None
    if args.output_video:
        every = args.every if gallery.is_video else 1
        video = AnnotatedVideoWriter(args.output_video, gallery.fps / every, args.match_threshold)
    if args.cascade_topk or video or gallery.is_stream or args.max_frames:
        # one pass (two for a cascade), not continued after an interruption: a cascade's first
        # pass, a stream and a video being written cannot be picked up half-way
        try:
            matches = searcher.search(
                query_path, box, gallery, topk=args.topk, batch_size=args.batch_size,
                progress=True, keep_frames=True, cascade_topk=args.cascade_topk or None,
                total=count_gallery(args.gallery, args.every, args.max_frames, args.video_backend),
                on_frame=None if video is None else (
                    lambda frame, found: video.write(frame.image, found, frame.index)))
        finally:
            if video is not None:
                video.close()
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
    lines = [f"{num_read} frames searched ({mode}), {len(skipped)} skipped; "
             f"results in {args.out}"]
    if video is not None:
        lines.append(f"annotated video ({video.frames_written} frames) in {args.output_video}")
    return lines + _table(matches)


def _index_models(args, manifest: dict, det_thresh: Optional[float]):
    """(query embedder, re-rank searcher or None) for a search in an index (module docstring).

    The query is embedded by the index's model: the one given (``--config-file/--weights``)
    when its signature is the index's, else the one the manifest names. A given model of
    another signature is only accepted as the re-ranking model (``--rerank``)."""
    from .index import IndexMismatch, describe_model
    from .index_cli import make_embedder

    stored = manifest["model"]
    given = None
    if args.config:
        given = make_embedder({"backend": "torch", "config": args.config,
                               "weights": args.weights, "opts": list(args.opts)},
                              args.device, det_thresh)
    if given is not None and stored["backend"] == "torch" and \
            given.signature() == stored["signature"]:
        embedder = given
    else:
        if given is not None and not args.rerank:
            raise IndexMismatch(
                f"index {args.index} was built with another model ({describe_model(stored)}): "
                "its queries are embedded by that model (leave out --config-file/--weights, "
                "or give them with --rerank K for a re-ranking model)")
        for key in ("config", "weights", "onnx_file"):
            path = stored.get(key)
            if path and "://" not in path and not os.path.isfile(path):
                raise FileNotFoundError(f"the model of index {args.index} is gone: {key} {path} "
                                        "not found; give --config-file and --weights of that "
                                        "model")
        embedder = make_embedder(stored, args.device, det_thresh)
    reranker = None
    if args.rerank:
        reranker = getattr(given if given is not None else embedder, "searcher", None)
        if reranker is None or not reranker.query_guided:
            raise UsageError("--rerank needs a query-guided model (QSSE, QRPN or QSimNet on): "
                             "give its --config-file and --weights")
    return embedder, reranker


def _rerank(args, index_searcher, query_vec, query_image, box, reranker, topk):
    """The cascade over the index: the K frames with the best matches re-scored as pairs."""
    from .gallery import GalleryFrame
    from .index import read_frames
    from ..evaluation.cascade import shortlist_images

    data = index_searcher.data
    start = time.perf_counter()
    candidates = index_searcher.best_frames(query_vec, args.rerank, topk)
    search_seconds = time.perf_counter() - start
    rows = {}
    for m in candidates:
        rows.setdefault(m.position, []).append([*m.box, m.det_score, m.similarity])
    chosen = shortlist_images(sorted(rows), {p: np.array(r) for p, r in rows.items()},
                              args.rerank, index_searcher.det_thresh or 0.0)
    images = read_frames(data, chosen)
    frames = [GalleryFrame(data.frames[p], images[p], data.frame_index(p))
              for p in sorted(chosen) if p in images]
    if len(frames) < len(chosen):
        raise ValueError(f"index source {data.manifest['source']['path']}: "
                         f"{len(chosen) - len(frames)} frame(s) to re-rank can no longer be read")
    rescored = reranker.rescore(query_image, box, frames, batch_size=args.batch_size,
                                progress=True, keep_frames=True)
    chosen_set = set(chosen)
    others = [_as_match(m) for m in candidates if m.position not in chosen_set][:topk]
    return merge_cascade_matches(rescored, others, topk), len(frames), search_seconds


def _as_match(m, image=None) -> Match:
    return Match(m.frame, m.index, m.box, m.det_score, m.similarity, image)


def _run_index(args) -> List[str]:
    """``qeeps-search --index``: embed the query, search the index, optionally re-rank."""
    from .index import IndexSearcher, load_index, read_frames

    query_path, query_image, box, is_crop = _query(args)
    data = load_index(args.index)
    manifest = data.manifest
    det_thresh = (args.confidence_threshold if args.confidence_threshold is not None
                  else manifest["det_thresh"])
    embedder, reranker = _index_models(args, manifest, det_thresh)
    index_searcher = IndexSearcher(data, det_thresh=args.confidence_threshold)
    start = time.perf_counter()
    query_vec = embedder.embed_query(query_image, box)
    query_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if args.rerank:
        found, rescored, search_seconds = _rerank(args, index_searcher, query_vec, query_image,
                                                  box, reranker, args.topk)
    else:
        found, rescored = [_as_match(m) for m in index_searcher.search(query_vec, args.topk)], 0
        search_seconds = time.perf_counter() - start
    rerank_seconds = time.perf_counter() - start - search_seconds if args.rerank else 0.0
    # the report's frames, read back from the source (re-scored ones are already there)
    by_index = {m.index: m.image for m in found if m.image is not None}
    wanted = [m.index // data.every for m in found if m.index not in by_index]
    for position, image in read_frames(data, wanted).items():
        by_index[data.frame_index(position)] = image
    matches = [Match(m.frame, m.index, m.box, m.det_score, m.similarity, by_index.get(m.index))
               for m in found]
    source = manifest["source"]
    results = {
        "query": {"image": query_path, "box": box, "crop": is_crop},
        "model": {"config": manifest["model"].get("config", args.config),
                  "weights": manifest["model"].get("weights", args.weights),
                  "backend": manifest["model"]["backend"],
                  "query_guided": bool(args.rerank), "device": args.device,
                  "det_thresh": index_searcher.det_thresh, "cascade_topk": 0},
        "gallery": {"path": source["path"], "every": source["every"],
                    "frames_searched": manifest["num_frames"],
                    "skipped": list(manifest["skipped"])},
        "index": {"path": os.path.abspath(args.index),
                  "detections": index_searcher.num_detections,
                  "approximate": index_searcher.approximate, "rerank": args.rerank,
                  "rerank_config": args.config if args.rerank else None,
                  "query_seconds": query_seconds, "search_seconds": search_seconds,
                  "rerank_seconds": rerank_seconds},
        "matches": _match_rows(matches),
    }
    shown = [m for m in matches if m.image is not None]
    if len(shown) < len(matches):
        logger.warning("%d matched frame(s) could not be read back from %s: not in the report",
                       len(matches) - len(shown), source["path"])
    title = f"qeeps-search: {os.path.basename(query_path)} in the index {args.index}"

    def write(tmp):
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        _write_report(os.path.join(tmp, "report"), query_image, box, shown, title)

    _publish(os.path.abspath(args.out), write)
    how = "approximate (HNSW)" if index_searcher.approximate else "exact"
    lines = [f"{index_searcher.num_detections} detections of {manifest['num_frames']} frames "
             f"searched in the index ({how}) in {1e3 * search_seconds:.1f} ms after the "
             f"query's forward ({1e3 * query_seconds:.0f} ms)"
             + (f", the best {rescored} frames re-scored as pairs in {rerank_seconds:.2f} s"
                if args.rerank else "")
             + f"; results in {args.out}"]
    return lines + _table(matches)


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
