"""``qeeps-index``: embed every detection of a folder of images or a video once, into an index
that ``qeeps-search --index`` answers queries from without running the network on the gallery.

::

    qeeps-index --config-file C --weights W --input DIR|VIDEO --output INDEX_DIR
                [--every N] [--confidence-threshold T] [--batch-size B] [--dtype float32|float16]
                [--chunk-frames F] [--device cpu|cuda]
                [--num-gpus N --num-machines M --machine-rank R --dist-url U]
                [--backend torch|onnx] [--onnx-file model.onnx] [--opts KEY VALUE ...]

Frames are split over ``--num-gpus`` processes per machine with Detectron2's ``launch`` (on a
machine without CUDA, CPU processes talking over gloo): each process embeds a contiguous share
of the chunks (``--chunk-frames`` frames each) and writes their files; the first machine's
process then merges them (``qeeps_d2.search.index.finalize_index``). The index is written chunk
by chunk: after Ctrl-C (exit status 130), a kill or a crash, the same command continues where it
stopped and gives the index an uninterrupted run gives (whatever the number of processes); run
again on a folder that gained images (sorting after the indexed ones), it appends them. Building
into an index made with another model, source or settings is a one-line error (exit status 2).

``--backend onnx --onnx-file model.onnx`` embeds with a ``qeeps-export-onnx`` file through
onnxruntime (``qeeps_d2.search.onnx_backend``) instead of PyTorch. The flags follow Detectron2's
``demo/demo.py`` where they mean the same (``--config-file``, ``--input``, ``--output``,
``--confidence-threshold``: ``TEST.PERSON_SEARCH.DET_THRESH``, ``--opts``).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from ..checkpoint import CheckpointError
from ..utils.cli import ArgumentParser, UsageError, model_opts, run_cli
from .gallery import count_gallery
from .index import (
    DEFAULT_CHUNK_FRAMES,
    DTYPES,
    IndexSettings,
    build_chunks,
    built_frames,
    finalize_index,
    plan_chunks,
    prepare_index,
    source_fingerprint,
    split_chunks,
)

__all__ = ["main", "make_embedder", "model_entry"]

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qeeps-index",
                       description="Index every detection of a folder of images or a video "
                                   "(boxes, scores, re-id embeddings) for qeeps-search --index.")
    p.add_argument("--config-file", "--config", dest="config_file",
                   help="the model's config file (YAML); --backend torch")
    p.add_argument("--weights", help="the trained model's weights (.pth/.pkl); --backend torch")
    p.add_argument("--input", required=True, help="folder of .jpg/.jpeg/.png/.bmp or a video file")
    p.add_argument("--output", required=True, help="the index folder (created, or continued)")
    p.add_argument("--every", type=int, default=1, help="index every N-th frame (default 1)")
    p.add_argument("--confidence-threshold", type=float, default=None,
                   help="keep detections scoring at least this (default: the config's "
                        "TEST.PERSON_SEARCH.DET_THRESH); searches may raise it, not lower it")
    p.add_argument("--batch-size", type=int, default=4, help="frames per forward (default 4)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="embeddings on disk (default float32; float16 halves the files)")
    p.add_argument("--chunk-frames", type=int, default=DEFAULT_CHUNK_FRAMES,
                   help=f"frames per chunk file, the unit of resuming (default "
                        f"{DEFAULT_CHUNK_FRAMES})")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="run the model in PyTorch (default) or from an ONNX export")
    p.add_argument("--onnx-file", help="the qeeps-export-onnx file (--backend onnx)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes per machine (one per GPU; CPU processes without CUDA)")
    p.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    p.add_argument("--machine-rank", type=int, default=0, help="this machine's rank")
    p.add_argument("--dist-url", default="auto",
                   help="URL of the process group, e.g. tcp://host:port (default auto: a free "
                        "local port, one machine)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides KEY VALUE ... (last on the command line)")
    return p


def _check_options(args) -> None:
    for name in ("every", "batch_size", "chunk_frames", "num_gpus", "num_machines"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.machine_rank < args.num_machines:
        raise UsageError(f"--machine-rank must be in 0..{args.num_machines - 1}, got "
                         f"{args.machine_rank}")
    if args.num_machines > 1 and args.dist_url == "auto":
        raise UsageError("--dist-url auto works on one machine only: give tcp://HOST:PORT of "
                         "machine 0")
    model_opts(args)  # checks --opts pairs and --confidence-threshold
    if args.backend == "torch":
        if not (args.config_file and args.weights):
            raise UsageError("--backend torch needs --config-file and --weights")
        if args.onnx_file:
            raise UsageError("--onnx-file goes with --backend onnx")
    else:
        if not args.onnx_file:
            raise UsageError("--backend onnx needs --onnx-file")
        if args.opts:
            raise UsageError("--opts configures the PyTorch model; an ONNX file is fixed")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"--output {args.output} exists and is not a folder")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def make_embedder(model: Dict, device: Optional[str] = None, det_thresh: Optional[float] = None,
                  threads: Optional[int] = None):
    """The :class:`~qeeps_d2.search.embedder.FrameEmbedder` of a manifest's ``model`` entry
    (:func:`model_entry`), ``det_thresh`` None: the model's own."""
    if model["backend"] == "onnx":
        try:
            from .onnx_backend import OnnxFrameEmbedder
        except ImportError as e:
            raise UsageError(f"--backend onnx is not available here ({e}); install the "
                             "'export' extra (onnx, onnxruntime)") from None
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"]
                     if device and device.startswith("cuda") else None)
        return OnnxFrameEmbedder(model["onnx_file"], det_thresh=det_thresh, providers=providers,
                                 threads=threads)
    from .embedder import TorchFrameEmbedder

    opts = list(model.get("opts", []))
    if det_thresh is not None:
        opts += ["TEST.PERSON_SEARCH.DET_THRESH", str(det_thresh)]
    return TorchFrameEmbedder.from_config(model["config"], model["weights"], device=device,
                                          opts=opts)


def model_entry(backend: str, embedder, config: Optional[str] = None,
                weights: Optional[str] = None, opts: Sequence[str] = (),
                onnx_file: Optional[str] = None) -> Dict:
    """The manifest's ``model`` entry: backend, signature and what rebuilds the model."""
    if backend == "onnx":
        return {"backend": "onnx", "onnx_file": os.path.abspath(onnx_file),
                "signature": _file_sha256(onnx_file)}
    weights = weights if "://" in weights else os.path.abspath(weights)
    return {"backend": "torch", "config": os.path.abspath(config), "weights": weights,
            "opts": list(opts), "signature": embedder.signature()}


def _worker(spec: Dict, embedder=None) -> None:
    """One process of the build (``launch``'s main function): its share of the pending chunks."""
    import torch
    from detectron2.utils import comm

    rank, world = comm.get_rank(), comm.get_world_size()
    if world > 1 and not torch.cuda.is_available():  # CPU processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    if embedder is None:
        threads = torch.get_num_threads() if world > 1 else None
        embedder = make_embedder(spec["model"], spec["device"], spec["det_thresh"], threads)
    # one plan for every process, made once the others are waiting for it
    plan = comm.all_gather(plan_chunks(spec["output"], spec["frames_hint"])
                           if rank == 0 else None)[0]
    chunks, open_end = split_chunks(plan, rank, world)
    desc = "index" if world == 1 else f"index (rank 0 of {world})"
    build_chunks(spec["output"], embedder, chunks, open_end, spec["batch_size"],
                 progress=rank == 0, desc=desc)
    comm.synchronize()


def _run(args) -> List[str]:
    from detectron2.engine import launch

    _check_options(args)
    source_fingerprint(args.input, args.every)  # a missing or unusable input: before the model
    world = args.num_gpus * args.num_machines
    # the parent checks the model (and, with several processes, lets each build its own)
    device = "cpu" if world > 1 else args.device
    model = ({"backend": "onnx", "onnx_file": args.onnx_file} if args.backend == "onnx" else
             {"backend": "torch", "config": args.config_file, "weights": args.weights,
              "opts": list(args.opts)})
    embedder = make_embedder(model, device, args.confidence_threshold)
    model = model_entry(args.backend, embedder, args.config_file, args.weights, args.opts,
                        args.onnx_file)
    det_thresh = getattr(embedder, "det_thresh", args.confidence_threshold)
    settings = IndexSettings(model=model, source=args.input, every=args.every,
                             det_thresh=None if det_thresh is None else float(det_thresh),
                             embed_dim=int(embedder.embed_dim), dtype=args.dtype,
                             chunk_frames=args.chunk_frames)
    if args.machine_rank == 0:
        manifest = prepare_index(args.output, settings)
        if manifest["status"] == "complete":
            return [f"index {args.output} is complete ({manifest['num_frames']} frames, "
                    f"{manifest['num_detections']} detections): nothing to do"]
    spec = {"model": model, "device": args.device, "det_thresh": settings.det_thresh,
            "output": args.output, "batch_size": args.batch_size,
            "frames_hint": count_gallery(args.input, args.every)}
    if world > 1:
        embedder = None  # each process builds its own, on its device
    before = built_frames(args.output) if args.machine_rank == 0 else 0
    start = time.perf_counter()
    launch(_worker, args.num_gpus, num_machines=args.num_machines,
           machine_rank=args.machine_rank, dist_url=args.dist_url, args=(spec, embedder))
    seconds = time.perf_counter() - start
    if args.machine_rank != 0:
        return [f"machine {args.machine_rank}: its share of {args.output} is written; machine 0 "
                "merges the index"]
    manifest = finalize_index(args.output)
    lines = [f"index {args.output}: {manifest['num_frames']} frames"
             + (f" ({len(manifest['skipped'])} unreadable, skipped)" if manifest["skipped"]
                else "")
             + f", {manifest['num_detections']} detections (score >= {manifest['det_thresh']}), "
             f"{manifest['chunks']} chunks, {manifest['embed_dim']}-d {manifest['dtype']} "
             "embeddings",
             f"this run: {manifest['num_frames'] - before} frames in {seconds:.1f} s "
             f"({(manifest['num_frames'] - before) / max(seconds, 1e-9):.1f} frames/s, model "
             f"loading included) with {world} process(es)"]
    if manifest.get("approximate"):
        lines.append(f"approximate search index: {manifest['approximate']['kind']} "
                     f"({manifest['approximate']['file']})")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``qeeps-index``; returns the exit status (0 ok, 2 user error, 130
    interrupted with Ctrl-C: the finished chunks are kept, the same command continues)."""
    try:
        return run_cli("qeeps-index", _parser(), _run, argv,
                       user_errors=(ValueError, OSError, CheckpointError))
    except KeyboardInterrupt:
        print("qeeps-index: interrupted; the finished chunks are kept: run the same command "
              "again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
