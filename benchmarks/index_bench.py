#!/usr/bin/env python
"""Cost of the gallery index (``qeeps-index``, ``qeeps-search --index``) on this machine.

1. *Build rate*: ``--frames`` SynthPS images (``$DETECTRON2_DATASETS/synthps/Image/SSM``, the
   first ones by name, 360x240) indexed with the SynthPS OIM model (``--config``, ``--weights``;
   ``--weights random`` builds it with random weights, BatchNorm as initialised): model loading
   and embedding timed apart (frames/s of the embedding), through the library calls
   ``qeeps-index`` makes with one process, then the command itself with ``--num-gpus 1`` and
   ``--procs`` processes (wall time including model loading and, for several, spawning; on a
   machine without CUDA each of N processes runs 1/N of the cores' threads, so its index
   differs from the one-process index in the last bits, as any change of torch's thread count
   does: the largest differences are reported). The query's own forward pass
   (``embed_query``) is timed too.
2. *Search*: indexes of ``--sizes`` detections. They are **synthesised**: each detection is a
   real embedding of step 1 plus Gaussian noise (``--noise``, cosine to its seed about 0.9,
   re-normalised), written through the real build path (a numpy embedder over a tiny MJPG
   video, ``--dets-per-frame`` detections per frame, 128 frames per chunk), so the files,
   loading and search are those of a real index. Queries: ``--queries`` held-out noisy copies
   of real embeddings. Each index is loaded in a fresh process: load time (chunks + FAISS),
   resident memory added (VmRSS), median ``IndexSearcher.search(q, 10)`` latency, exact
   (``IndexFlatIP``) and, up to ``--approx-max`` detections, approximate (the stored HNSW
   index, its build time and recall@10 against exact, at the default efSearch and at ``--ef``).
   Bytes on disk per detection: the index folder without the HNSW file / detections.
3. *float16*: the largest size again with ``--dtype float16`` (disk, memory), and on the real
   embeddings the largest similarity error of float16 storage and its top-10 agreement.

Prints a table and writes JSON (``--json``, default ``output/index_bench.json``)::

    python benchmarks/index_bench.py [--config configs/SynthPS/oim.yaml] [--weights W|random]
        [--frames 120] [--procs 2] [--sizes 1000 10000 100000 1000000] [--approx-max 100000]
        [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from qeeps_d2.utils.json_files import write_json_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WEIGHTS = "/work/runs/s15_after/oim/model_final.pth"


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, n))
               for root, _, names in os.walk(folder) for n in names)


# ---------------------------------------------------------------------------- step 1
def _random_weights(config: str, out: str) -> str:
    from detectron2.modeling import build_model

    from qeeps_d2.checkpoint import QEEPSCheckpointer
    from qeeps_d2.engine.trainer import setup_cfg

    import torch

    torch.manual_seed(0)
    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""], resolve_schedule=False)
    QEEPSCheckpointer(build_model(cfg), os.path.dirname(out)).save(
        os.path.splitext(os.path.basename(out))[0])
    return out


def build_rate(args, work: str) -> dict:
    """Index the SynthPS frames; returns rates, the real embeddings and held-out queries."""
    from qeeps_d2.search import index as ix
    from qeeps_d2.search.embedder import TorchFrameEmbedder
    from qeeps_d2.search.gallery import read_image_bgr
    from qeeps_d2.search.index_cli import main as index_main
    from qeeps_d2.search.index_cli import model_entry

    images = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "synthps", "Image",
                          "SSM")
    if not os.path.isdir(images):
        raise SystemExit(f"no SynthPS images in {images}: set DETECTRON2_DATASETS")
    names = sorted(n for n in os.listdir(images) if n.endswith(".jpg"))[: args.frames]
    frames = os.path.join(work, "frames")
    os.makedirs(frames)
    for n in names:
        os.symlink(os.path.join(images, n), os.path.join(frames, n))
    weights = args.weights
    if weights == "random":
        weights = _random_weights(args.config, os.path.join(work, "random.pth"))

    start = time.perf_counter()
    embedder = TorchFrameEmbedder.from_config(args.config, weights, device="cpu")
    load_s = time.perf_counter() - start
    model = model_entry("torch", embedder, args.config, weights)
    settings = ix.IndexSettings(model=model, source=frames, det_thresh=embedder.det_thresh,
                                embed_dim=embedder.embed_dim)
    out = os.path.join(work, "real_index")
    ix.prepare_index(out, settings)
    plan = ix.plan_chunks(out)
    start = time.perf_counter()
    ix.build_chunks(out, embedder, plan.chunks, plan.open_end, batch_size=4, progress=False)
    embed_s = time.perf_counter() - start
    manifest = ix.finalize_index(out)
    data = ix.load_index(out)

    # the query's own forward pass: the best detection of a few frames as query boxes
    times = []
    for p in range(min(8, len(names))):
        rows = np.flatnonzero(data.positions == p)
        if len(rows):
            box = data.boxes[rows[np.argmax(data.scores[rows])]]
            image = read_image_bgr(os.path.join(frames, names[p]))
            start = time.perf_counter()
            embedder.embed_query(image, box)
            times.append(time.perf_counter() - start)

    cli = {}
    for procs in sorted({1, args.procs}):
        target = os.path.join(work, f"cli_index_{procs}")
        start = time.perf_counter()
        code = index_main(["--config-file", args.config, "--weights", weights, "--input", frames,
                           "--output", target, "--device", "cpu", "--num-gpus", str(procs)])
        cli[procs] = {"exit": code, "wall_s": time.perf_counter() - start}
        cli[procs]["frames_per_s"] = len(names) / cli[procs]["wall_s"]
        if procs > 1:  # each process runs with 1/procs of the threads (module docstring)
            cli[procs].update(_compare_chunks(target, out))
    return {
        "frames": len(names), "frame_size": "360x240", "config": args.config, "weights": weights,
        "detections": manifest["num_detections"],
        "detections_per_frame": manifest["num_detections"] / len(names),
        "det_thresh": manifest["det_thresh"], "embed_dim": manifest["embed_dim"],
        "model_load_s": load_s, "embed_s": embed_s, "frames_per_s": len(names) / embed_s,
        "query_forward_s": float(np.median(times)) if times else None,
        "cli": cli, "bytes_per_detection_on_disk": _folder_bytes(out) / manifest["num_detections"],
        "_embeddings": data.embeddings,
    }


def _compare_chunks(a: str, b: str) -> dict:
    """Whether two indexes' chunk files are the same bytes, and the largest embedding / box
    difference between their detections."""
    names = sorted(os.listdir(os.path.join(a, "chunks")))
    same = names == sorted(os.listdir(os.path.join(b, "chunks"))) and all(
        open(os.path.join(a, "chunks", n), "rb").read()
        == open(os.path.join(b, "chunks", n), "rb").read() for n in names)
    rows = [np.concatenate([np.load(os.path.join(d, "chunks", n)) for n in names
                            if n.endswith(".npy")]) for d in (a, b)]
    if len(rows[0]) != len(rows[1]):
        return {"same_bytes_as_one_process": same, "same_detection_count": False}
    return {"same_bytes_as_one_process": same, "same_detection_count": True,
            "max_embedding_difference": float(np.abs(rows[0]["embedding"]
                                                     - rows[1]["embedding"]).max()),
            "max_box_difference_px": float(np.abs(rows[0]["box"] - rows[1]["box"]).max())}


# ---------------------------------------------------------------------------- step 2
class _SyntheticEmbedder:
    """A numpy FrameEmbedder giving ``per_frame`` synthetic detections per frame, in order."""

    def __init__(self, seeds: np.ndarray, per_frame: int, noise: float, seed: int = 0):
        self.embed_dim = seeds.shape[1]
        self.det_thresh = 0.5
        self._seeds, self._per_frame, self._noise = seeds, per_frame, noise
        self._rng = np.random.default_rng(seed)

    def embed_frames(self, images):
        from qeeps_d2.search.embedder import FrameDetections

        found = []
        for _ in images:
            n, d = self._per_frame, self.embed_dim
            x = self._seeds[self._rng.integers(0, len(self._seeds), n)]
            x = x + self._noise * self._rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            boxes = self._rng.uniform(0, 200, (n, 4)).astype(np.float32)
            boxes[:, 2:] += boxes[:, :2]
            found.append(FrameDetections(boxes, self._rng.uniform(0.5, 1, n).astype(np.float32),
                                         x.astype(np.float32)))
        return found

    def embed_query(self, image, box):
        raise NotImplementedError


def synthetic_index(work: str, seeds: np.ndarray, size: int, args, dtype: str,
                    approximate: bool) -> dict:
    import cv2

    from qeeps_d2.search import index as ix

    frames = -(-size // args.dets_per_frame)
    video = os.path.join(work, f"frames_{frames}.avi")
    if not os.path.exists(video):
        writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (16, 16))
        tile = np.full((16, 16, 3), 128, np.uint8)
        for _ in range(frames):
            writer.write(tile)
        writer.release()
    out = os.path.join(work, f"index_{size}_{dtype}")
    embedder = _SyntheticEmbedder(seeds, args.dets_per_frame, args.noise, seed=size)
    settings = ix.IndexSettings(model={"backend": "synthetic", "signature": str(size)},
                                source=video, det_thresh=0.5, embed_dim=embedder.embed_dim,
                                dtype=dtype)
    ix.prepare_index(out, settings)
    plan = ix.plan_chunks(out, frames)
    ix.build_chunks(out, embedder, plan.chunks, plan.open_end, batch_size=64, progress=False)
    start = time.perf_counter()
    manifest = ix.finalize_index(out, approximate=approximate)
    finalize_s = time.perf_counter() - start
    # trim to exactly ``size`` detections is not needed: report the real count
    approx_bytes = (os.path.getsize(os.path.join(out, ix.APPROXIMATE_FILE))
                    if approximate else 0)
    return {"dir": out, "detections": manifest["num_detections"], "finalize_s": finalize_s,
            "bytes_on_disk": _folder_bytes(out) - approx_bytes, "approx_bytes": approx_bytes}


_CHILD = r"""
import json, sys, time
import numpy as np
index_dir, queries_file, mode, efs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
from qeeps_d2.search.index import IndexSearcher
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
queries = np.load(queries_file)
before = rss()
start = time.perf_counter()
searcher = IndexSearcher(index_dir, approximate=(mode == "approx"))
load_s = time.perf_counter() - start
after = rss()
def run():
    searcher.search(queries[0], 10)  # warm-up
    times, results = [], []
    for q in queries:
        start = time.perf_counter()
        found = searcher.search(q, 10)
        times.append(time.perf_counter() - start)
        results.append([m.row for m in found])
    return {"median_ms": 1e3 * float(np.median(times)),
            "p90_ms": 1e3 * float(np.percentile(times, 90)), "rows": results}
out = {"load_s": load_s, "rss_added_kb": after - before, **run()}
if mode == "approx":
    out["ef_search"] = searcher.ef_search
    out["other_ef"] = {}
    default = searcher.ef_search
    for ef in efs:
        searcher.ef_search = int(ef)
        out["other_ef"][ef] = run()
    searcher.ef_search = default
print(json.dumps(out))
"""


def measure(index_dir: str, queries_file: str, mode: str, efs=()) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, index_dir, queries_file, mode,
                           *map(str, efs)], capture_output=True, text=True, cwd=REPO,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- main
def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "SynthPS", "oim.yaml"))
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="weights, or 'random'")
    p.add_argument("--frames", type=int, default=120, help="SynthPS frames indexed for real")
    p.add_argument("--procs", type=int, default=2, help="also run qeeps-index with N processes")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    p.add_argument("--approx-max", type=int, default=100000,
                   help="build and measure the HNSW index up to this many detections")
    p.add_argument("--ef", type=int, nargs="*", default=[32, 128, 256],
                   help="HNSW efSearch values measured besides the default")
    p.add_argument("--dets-per-frame", type=int, default=8)
    p.add_argument("--noise", type=float, default=0.5,
                   help="Gaussian noise (x 1/sqrt(D) per value) added to real embeddings")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--threads", type=int, default=None,
                   help="torch and FAISS threads (default: theirs, all cores)")
    p.add_argument("--workdir", default="/tmp/qeeps_index_bench")
    p.add_argument("--json", default=os.path.join(REPO, "output", "index_bench.json"))
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import faiss
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the measuring processes
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    report = {"load_average_start": _load_average(), "torch_threads": torch.get_num_threads(),
              "faiss_threads": faiss.omp_get_max_threads(), "cpus": os.cpu_count()}
    real = build_rate(args, args.workdir)
    seeds = real.pop("_embeddings")
    report["build"] = real
    print(f"build: {real['frames']} SynthPS frames (360x240), {real['detections']} detections "
          f"({real['detections_per_frame']:.1f}/frame, score >= {real['det_thresh']}): "
          f"{real['frames_per_s']:.1f} frames/s embedding (model load {real['model_load_s']:.1f} "
          f"s); query forward {1e3 * real['query_forward_s']:.0f} ms; qeeps-index wall: "
          + ", ".join(f"{p} process(es) {c['wall_s']:.1f} s ({c['frames_per_s']:.1f} frames/s)"
                      for p, c in real["cli"].items()), flush=True)

    rng = np.random.default_rng(12345)
    dim = seeds.shape[1]
    queries = seeds[rng.integers(0, len(seeds), args.queries)]
    noise = rng.standard_normal(queries.shape).astype(np.float32) / np.sqrt(dim)
    queries = queries + args.noise * noise
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    queries_file = os.path.join(args.workdir, "queries.npy")
    np.save(queries_file, queries)
    noisy = seeds + args.noise * rng.standard_normal(seeds.shape).astype(np.float32) / np.sqrt(dim)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    report["synthetic_cosine_to_seed"] = float(np.mean(np.sum(noisy * seeds, axis=1)))

    rows = []
    largest = max(args.sizes)
    for size in args.sizes + [("float16", largest)]:
        dtype, size = ("float16", size[1]) if isinstance(size, tuple) else ("float32", size)
        approximate = size <= args.approx_max and dtype == "float32"
        built = synthetic_index(args.workdir, seeds, size, args, dtype, approximate)
        row = {"size": size, "dtype": dtype, "detections": built["detections"],
               "disk_bytes_per_detection": built["bytes_on_disk"] / built["detections"],
               "exact": measure(built["dir"], queries_file, "exact")}
        row["ram_bytes_per_detection"] = 1024 * row["exact"]["rss_added_kb"] / built["detections"]
        if approximate:
            row["hnsw_build_s"] = built["finalize_s"]
            row["hnsw_bytes_per_detection"] = built["approx_bytes"] / built["detections"]
            approx = measure(built["dir"], queries_file, "approx", args.ef)
            row["approx"] = approx

            def recall(found):
                return float(np.mean([len(set(a) & set(e)) / 10
                                      for a, e in zip(found, row["exact"]["rows"])]))

            row["recall_at_10"] = recall(approx.pop("rows"))
            for other in approx["other_ef"].values():
                other["recall_at_10"] = recall(other.pop("rows"))
        row["exact"].pop("rows")
        rows.append(row)
        shutil.rmtree(built["dir"])
        print(json.dumps(row), flush=True)
    report["search"] = rows

    # float16 storage on the real embeddings: similarity error and top-10 agreement
    half = seeds.astype(np.float16).astype(np.float32)
    sims, sims16 = queries @ seeds.T, queries @ half.T
    top = np.argsort(-sims, axis=1)[:, :10]
    top16 = np.argsort(-sims16, axis=1)[:, :10]
    report["float16_real"] = {
        "max_abs_similarity_error": float(np.abs(sims - sims16).max()),
        "top10_agreement": float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, top16)])),
        "detections": int(len(seeds))}
    report["load_average_end"] = _load_average()

    print()
    print("| detections | dtype | disk B/det | RAM B/det (exact) | load (s) | exact query (ms) | "
          "HNSW build (s) | HNSW query (ms) | recall@10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a = r.get("approx")
        print(f"| {r['detections']:,} | {r['dtype']} | {r['disk_bytes_per_detection']:.0f} | "
              f"{r['ram_bytes_per_detection']:.0f} | {r['exact']['load_s']:.2f} | "
              f"{r['exact']['median_ms']:.2f} | "
              + (f"{r['hnsw_build_s']:.1f} | {a['median_ms']:.2f} | {r['recall_at_10']:.3f} |"
                 if a else "- | - | - |"))
    for r in rows:
        for ef, other in r.get("approx", {}).get("other_ef", {}).items():
            print(f"HNSW efSearch {ef} at {r['detections']:,}: {other['median_ms']:.2f} ms, "
                  f"recall@10 {other['recall_at_10']:.3f}")
    f16 = report["float16_real"]
    print(f"\nfloat16 on the {f16['detections']} real embeddings: largest similarity error "
          f"{f16['max_abs_similarity_error']:.2e}, top-10 agreement {f16['top10_agreement']:.3f}")
    print(f"load average {report['load_average_start']} -> {report['load_average_end']} "
          f"({report['cpus']} CPUs, torch {report['torch_threads']} / faiss "
          f"{report['faiss_threads']} threads)")
    write_json_file(args.json, report)
    print(f"JSON in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
