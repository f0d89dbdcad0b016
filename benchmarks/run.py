#!/usr/bin/env python
"""Speed benchmark of OIM vs QEEPS (run by hand or ``make bench``; never part of the tests).

For each model size it builds the OIM baseline and QEEPS (all three query-guidance blocks) with
random weights on synthetic inputs and measures, median of ``--runs`` runs after ``--warmup``:

- OIM: training step (``--batch`` images), inference per gallery image, per query box;
- QEEPS: training step (``--batch`` pairs), inference per (query, gallery) pair with 1 and with
  ``--batch`` gallery images per forward pass;
- peak host RSS (and peak device memory on CUDA);
- the dense fp32 matmul rate of the machine, measured in the same run, for reference.

Detection heads do data-dependent work (NMS, number of detections), so random weights are
"settled" by a few training steps on the synthetic boxes first. Prints a table and writes JSON.

    python benchmarks/run.py --sizes synthps r50_600 --out output/bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from qeeps_d2.engine import setup_cfg  # noqa: E402

# name -> (config, (height, width) of the network input, extra overrides)
SIZES = {
    "synthps": ("configs/SynthPS/Base-SynthPS.yaml", (240, 360), []),
    "r50_600": ("configs/Base-QEEPS-C4.yaml", (600, 1000), ["MODEL.QEEPS.OIM.NUM_PIDS", "5532"]),
    "r50_900": ("configs/Base-QEEPS-C4.yaml", (900, 1500), ["MODEL.QEEPS.OIM.NUM_PIDS", "5532"]),
}


def _cfg(size, qeeps, device):
    config, _, extra = SIZES[size]
    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, "MODEL.QEEPS.OIM.NUM_PIDS", "100"] + extra
    for block in ("QSSE", "QRPN", "QSIMNET"):
        opts += [f"MODEL.QEEPS.{block}.ENABLED", str(qeeps)]
    return setup_cfg(os.path.join(REPO, config), opts, resolve_schedule=False)


def _inputs(hw, n, pairs, train, gen):
    h, w = hw
    out = []
    for _ in range(n):
        x = {"image": torch.randint(0, 255, (3, h, w), generator=gen).float(), "height": h,
             "width": w}
        boxes = torch.tensor([[0.05, 0.1, 0.2, 0.9], [0.3, 0.2, 0.45, 0.95],
                              [0.6, 0.05, 0.72, 0.8], [0.8, 0.3, 0.9, 0.7]]) * torch.tensor(
            [w, h, w, h])
        if pairs:
            x["query_image"] = torch.randint(0, 255, (3, h, w), generator=gen).float()
            x["query_box"] = boxes[0]
            x["query_index"] = 0
        if train:
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(boxes)
            inst.gt_classes = torch.zeros(4, dtype=torch.int64)
            inst.gt_pids = torch.tensor([1, 2, -1, 3])
            inst.gt_is_query = inst.gt_pids == 1
            x["instances"] = inst
        out.append(x)
    return out


def _time(fn, runs, warmup, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_gflops(device, n=2048, runs=5):
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sec = _time(lambda: a @ b, runs, 2, device)
    return 2 * n ** 3 / sec / 1e9


def bench_size(size, args):
    hw = SIZES[size][1]
    gen = torch.Generator().manual_seed(0)
    row = {"size": size, "input_hw": list(hw)}
    for qeeps in (False, True):
        torch.manual_seed(0)
        cfg = _cfg(size, qeeps, args.device)
        model = build_model(cfg)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        train_batch = _inputs(hw, args.batch, qeeps, True, gen)

        def step():
            with EventStorage():
                loss = sum(model(train_batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()

        model.train()
        name = "qeeps" if qeeps else "oim"
        row[f"{name}_train_step_s"] = _time(step, args.runs, args.warmup, args.device)
        model.eval()
        with torch.no_grad():
            if qeeps:
                for b in (1, args.batch):
                    pairs = _inputs(hw, b, True, False, gen)
                    row[f"qeeps_pair_s_b{b}"] = _time(
                        lambda: model(pairs), args.runs, args.warmup, args.device) / b
            else:
                images = _inputs(hw, args.batch, False, False, gen)
                row["oim_gallery_image_s"] = _time(
                    lambda: model(images), args.runs, args.warmup, args.device) / args.batch
                queries = [{**x, "query_box": torch.tensor([10.0, 10, 60, 150])} for x in images]
                row["oim_query_box_s"] = _time(
                    lambda: model(queries), args.runs, args.warmup, args.device) / args.batch
        del model, opt
    row["train_ratio"] = row["qeeps_train_step_s"] / row["oim_train_step_s"]
    row["pair_vs_gallery_image"] = row[f"qeeps_pair_s_b{args.batch}"] / row["oim_gallery_image_s"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["synthps", "r50_600"], choices=list(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2, help="images / pairs per step")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="output/bench.json")
    args = parser.parse_args(argv)
    info = {"device": args.device, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "matmul_fp32_gflops": matmul_gflops(args.device)}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    rows = []
    for size in args.sizes:
        rows.append(bench_size(size, args))
        print(json.dumps(rows[-1]), flush=True)
    info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        info["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print(f"\n{info['device']}, {info['threads']} threads, fp32 matmul "
          f"{info['matmul_fp32_gflops']:.0f} GFLOP/s, peak RSS {info['peak_rss_mib']:.0f} MiB; "
          f"median of {args.runs} runs, batch {args.batch}")
    b = args.batch
    print(f"| size | OIM train step | QEEPS train step | ratio | OIM / gallery image | "
          f"OIM / query box | QEEPS / pair (B=1) | QEEPS / pair (B={b}) | pair / image |")
    print("|" + "---|" * 9)
    for r in rows:
        print(f"| {r['size']} {r['input_hw'][0]}x{r['input_hw'][1]} | {r['oim_train_step_s']:.2f} s"
              f" | {r['qeeps_train_step_s']:.2f} s | {r['train_ratio']:.2f} | "
              f"{r['oim_gallery_image_s']:.3f} s | {r['oim_query_box_s']:.3f} s | "
              f"{r['qeeps_pair_s_b1']:.3f} s | {r[f'qeeps_pair_s_b{b}']:.3f} s | "
              f"{r['pair_vs_gallery_image']:.2f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"info": info, "rows": rows, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
