#!/usr/bin/env python
"""Peak memory (RSS) of ``qeeps-search`` on generated videos of different lengths.

Writes MJPG videos of moving coloured blocks (default 1 and 10 minutes, 5 fps, 160x120) and a
randomly initialised SynthPS OIM model (``configs/SynthPS/oim.yaml``, input short side
``--min-size``, default the frames')
into ``--workdir`` (default ``/tmp/qeeps_video_rss``, not the repository), then runs
``qeeps-search`` on each video in its own process, sampling that process's RSS
(``/proc/self/status`` VmRSS) twice a second, and prints per video: frames, wall time, peak RSS
(``getrusage``), RSS after a quarter of the run and at the end. With streamed frames the peak
does not grow with the video's length. With ``--kill-resume`` the longest video is then searched
again, SIGKILLed at a random moment (30-70% of the uninterrupted run's wall time, seeded) and
rerun with the same command, which continues from its saved progress; the resumed results must
equal the uninterrupted run's (same frames searched, same matches)::

    python benchmarks/video_rss.py [--minutes 1 10 60] [--fps 5] [--size 160 120] [--min-size 64]
        [--every 1] [--kill-resume] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in the child: sample RSS in a thread while qeeps-search runs, print one JSON line.
_CHILD = r"""
import json, resource, sys, threading, time
samples = []
def sample():
    while True:
        with open("/proc/self/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        samples.append((time.perf_counter(), rss))
        time.sleep(0.5)
threading.Thread(target=sample, daemon=True).start()
from qeeps_d2.search.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
wall = time.perf_counter() - start
rss = [r for t, r in samples if t >= start]
print(json.dumps({"code": code, "wall_s": wall,
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "quarter_kb": rss[len(rss) // 4] if rss else 0,
                  "end_kb": rss[-1] if rss else 0}))
"""


def write_video(path: str, frames: int, fps: float, width: int, height: int) -> None:
    """MJPG video of ``frames`` frames: a few coloured blocks drifting over a grey background."""
    import cv2

    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write {path}")
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (4, 3))
    for i in range(frames):
        frame = np.full((height, width, 3), 110, np.uint8)
        for k, colour in enumerate(colours):
            x = int((i * (k + 1) * 2 + 40 * k) % (width - 24))
            y = int((height - 60) * (0.5 + 0.4 * np.sin(0.05 * i + k)))
            frame[y:y + 56, x:x + 22] = colour
        writer.write(frame)
    writer.release()


def write_model(folder: str, width: int, height: int, min_size: int):
    """A randomly initialised SynthPS OIM model resizing frames to ``min_size`` (short side):
    (config, weights)."""
    import torch
    from detectron2.modeling import build_model

    from qeeps_d2.checkpoint import QEEPSCheckpointer
    from qeeps_d2.engine import setup_cfg

    cfg = setup_cfg(os.path.join(REPO, "configs", "SynthPS", "oim.yaml"),
                    ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
                     "INPUT.MIN_SIZE_TEST", str(min_size),
                     "INPUT.MAX_SIZE_TEST", str(max(width, height)),
                     "TEST.PERSON_SEARCH.DET_THRESH", "0.0"], resolve_schedule=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    QEEPSCheckpointer(model, folder).save("model")
    config = os.path.join(folder, "config.yaml")
    with open(config, "w") as f:
        f.write(cfg.dump())
    return config, os.path.join(folder, "model.pth")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 10])
    p.add_argument("--fps", type=float, default=5)
    p.add_argument("--size", type=int, nargs=2, default=[160, 120], metavar=("W", "H"))
    p.add_argument("--workdir", default="/tmp/qeeps_video_rss")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--every", type=int, default=1,
                   help="search every N-th frame (qeeps-search --every; the others are skipped "
                        "undecoded)")
    p.add_argument("--min-size", type=int, default=None,
                   help="model input short side (default: the frames' own, no resize)")
    p.add_argument("--kill-resume", action="store_true",
                   help="also kill the longest video's search at a random moment and resume it")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moment")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    width, height = args.size
    min_size = args.min_size or min(width, height)
    config, weights = write_model(args.workdir, width, height, min_size)
    query = os.path.join(args.workdir, "query.png")
    import cv2

    video0 = os.path.join(args.workdir, "query_source.avi")
    write_video(video0, 1, args.fps, width, height)
    ok, frame = cv2.VideoCapture(video0).read()
    cv2.imwrite(query, frame)

    rows = []
    for minutes in args.minutes:
        frames = int(round(minutes * 60 * args.fps))
        video = os.path.join(args.workdir, f"video_{minutes:g}min.avi")
        write_video(video, frames, args.fps, width, height)
        out = os.path.join(args.workdir, f"out_{minutes:g}min")
        cmd = [sys.executable, "-c", _CHILD, "--config", config, "--weights", weights,
               "--query", query, "--box", f"2,2,{width // 4},{height // 2}", "--gallery", video,
               "--topk", "10", "--device", "cpu", "--batch-size", str(args.batch_size),
               "--every", str(args.every),
               "--out", out]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr[-2000:], file=sys.stderr)
            return 1
        result = json.loads(run.stdout.strip().splitlines()[-1])
        with open(os.path.join(out, "results.json")) as f:
            searched = json.load(f)["gallery"]["frames_searched"]
        rows.append((minutes, frames, searched, result, os.path.getsize(video), cmd, out))

    print(f"qeeps-search --every {args.every} RSS, {width}x{height} MJPG at {args.fps:g} fps, "
          f"SynthPS OIM model "
          f"(random weights, input short side {min_size}), CPU, torch threads "
          f"{__import__('torch').get_num_threads()}")
    print(f"{'video':>7} {'frames':>7} {'searched':>8} {'file MB':>8} {'wall s':>7} "
          f"{'peak RSS MB':>11} {'RSS@25% MB':>10} {'RSS end MB':>10}")
    for minutes, frames, searched, r, size, _, _ in rows:
        print(f"{minutes:>5g}min {frames:>7} {searched:>8} {size / 2**20:>8.1f} "
              f"{r['wall_s']:>7.1f} {r['peak_kb'] / 1024:>11.1f} {r['quarter_kb'] / 1024:>10.1f} "
              f"{r['end_kb'] / 1024:>10.1f}")
    if args.kill_resume:
        return kill_and_resume(max(rows, key=lambda row: row[0]), args.seed)
    return 0


def _search_outcome(out: str):
    with open(os.path.join(out, "results.json")) as f:
        doc = json.load(f)
    return doc["gallery"]["frames_searched"], doc["matches"]


def kill_and_resume(row, seed: int) -> int:
    """Run ``row``'s search again into a new folder, SIGKILL it at a random moment, rerun the
    same command to completion and compare with the uninterrupted run; 0 when equal."""
    import numpy as np

    minutes, _, _, result, _, cmd, out = row
    resumed_out = out + "_killed"
    shutil.rmtree(resumed_out, ignore_errors=True)
    progress = os.path.join(os.path.dirname(resumed_out),
                            f".{os.path.basename(resumed_out)}.partial")
    shutil.rmtree(progress, ignore_errors=True)
    cmd = cmd[:-1] + [resumed_out]
    delay = float(np.random.default_rng(seed).uniform(0.3, 0.7)) * result["wall_s"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = len(os.listdir(progress)) if os.path.isdir(progress) else 0
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    resume_s = time.perf_counter() - start
    if run.returncode != 0:
        print(run.stderr[-2000:], file=sys.stderr)
        return 1
    same = _search_outcome(resumed_out) == _search_outcome(out)
    print(f"\n{minutes:g}-minute video: search "
          f"{'SIGKILLed' if killed else 'finished before the kill'} after {delay:.1f} s "
          f"({saved} progress file(s) kept), rerun finished in {resume_s:.1f} s "
          f"(uninterrupted: {result['wall_s']:.1f} s); results "
          f"{'identical to' if same else 'DIFFERENT from'} the uninterrupted run")
    return 0 if same and killed else 1


if __name__ == "__main__":
    sys.exit(main())
