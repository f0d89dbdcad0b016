#!/usr/bin/env python
"""Speed benchmark of OIM vs QEEPS (run by hand or ``make bench``; never part of the tests).

For each model size it builds the OIM baseline and QEEPS (all three query-guidance blocks) with
random weights on synthetic inputs and measures, median of ``--runs`` runs after ``--warmup``:

- stock Detectron2 Faster R-CNN R-50-C4 (r50 sizes: the model zoo's
  ``COCO-Detection/faster_rcnn_R_50_C4_1x.yaml``, one class, the same input size and proposal
  budget): inference per image, the reference the ratios are taken against;
- OIM: training step (``--batch`` images), inference per gallery image, per query box;
- QEEPS: training step (``--batch`` pairs), inference per (query, gallery) pair with 1 and with
  ``--batch`` gallery images per forward pass;
- peak host RSS (and peak device memory on CUDA);

The inference timings of one size are interleaved (each round runs the stock image, the OIM
image, the OIM query box and the QEEPS pairs once, ``--runs`` rounds after ``--warmup``), so the
ratios compare runs made under the same machine load;
- achieved GFLOP/s of pair inference (FLOPs = 2 x the multiply-accumulates fvcore counts on
  the same inputs) next to the dense fp32 matmul rate of the machine measured in the same run.

Weights are random. A random R-50 with frozen BatchNorm (the paper configs) has exploding
activations, which makes RPN boxes degenerate: the proposal budget would not be filled and the
res5 head would run on a handful of boxes. So frozen-BN models are built with BatchNorm,
calibrated (running statistics of a few forward passes on the synthetic inputs) and then frozen:
the same architecture and cost, with sane activations. The timed optimizer steps use learning
rate 0 (the same computation, weights unchanged). The rows report the proposals per image the
inference actually used. Prints a table and writes JSON.

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

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from qeeps_d2.engine import setup_cfg  # noqa: E402
from qeeps_d2.utils.json_files import write_json_file  # noqa: E402

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


STOCK_CONFIG = "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"


def _stock_cfg(ours):
    """Detectron2's own R-50-C4 from its model zoo config, one class, ``ours``'s input size,
    proposal budget and device; None where the size is not an R-50 (SynthPS)."""
    if ours.MODEL.RESNETS.DEPTH != 50:
        return None
    import detectron2
    from detectron2.config import get_cfg

    cfg = get_cfg()
    # the file model_zoo.get_config_file names (that module needs pkg_resources, absent here)
    cfg.merge_from_file(os.path.join(os.path.dirname(detectron2.__file__), "model_zoo",
                                     "configs", STOCK_CONFIG))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = ours.MODEL.DEVICE
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    for key in ("PRE_NMS_TOPK_TEST", "POST_NMS_TOPK_TEST"):
        setattr(cfg.MODEL.RPN, key, getattr(ours.MODEL.RPN, key))
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = ours.INPUT.MIN_SIZE_TEST, ours.INPUT.MAX_SIZE_TEST
    return cfg


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


def _precision(args):
    """Context of the forward passes: fp32 (TF32 off), tf32 (CUDA TF32 matmuls/convs) or bf16
    (CUDA autocast)."""
    import contextlib

    tf32 = args.precision == "tf32"
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if args.precision == "bf16":
        return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def _time_interleaved(fns, runs, warmup, device):
    """``{name: median seconds}`` of ``fns`` (name -> callable) run in rounds, each round
    calling every function once in order."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(_time(fn, 1, 0, device))
    return {name: statistics.median(t) for name, t in times.items()}


def count_gflop(model, inputs) -> float:
    """GFLOP of one inference forward on ``inputs`` (2 x fvcore's multiply-accumulates).

    Counted with autocast off: the count does not depend on the precision, and fvcore's JIT
    trace fails under autocast (bf16 weight casts that require grad become trace constants)."""
    with torch.no_grad(), torch.autocast(model.device.type, enabled=False):
        analysis = FlopCountAnalysis(model, inputs)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return 2 * analysis.total() / 1e9


def matmul_gflops(device, n=2048, runs=5, dtype=torch.float32):
    """Dense matmul rate (GFLOP/s) of ``n x n`` matrices of ``dtype`` (TF32 as currently set)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = _time(lambda: a @ b, runs, 2, device)
    return 2 * n ** 3 / sec / 1e9


def _build(cfg, calib_inputs):
    """build_model; frozen-BN models get calibrated statistics (see the module docstring)."""
    if cfg.MODEL.RESNETS.NORM != "FrozenBN":
        return build_model(cfg)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration passes
    model.train()
    with torch.no_grad(), EventStorage():
        for _ in range(3):
            model(calib_inputs)
    return FrozenBatchNorm2d.convert_frozen_batchnorm(model)


def _num_proposals(model, inputs) -> float:
    """Mean number of proposals per gallery image in an inference pass."""
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)
    return sum(len(o["proposal_boxes"]) for o in outputs) / len(outputs)


def bench_size(size, args):
    hw = SIZES[size][1]
    gen = torch.Generator().manual_seed(0)
    row = {"size": size, "input_hw": list(hw)}
    models, timed = {}, {}
    for qeeps in (False, True):
        torch.manual_seed(0)
        cfg = _cfg(size, qeeps, args.device)
        train_batch = _inputs(hw, args.batch, qeeps, True, gen)
        model = _build(cfg, train_batch)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

        def step():
            with EventStorage(), _precision(args):
                loss = sum(model(train_batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()

        model.train()
        name = "qeeps" if qeeps else "oim"
        row[f"{name}_train_step_s"] = _time(step, args.runs, args.warmup, args.device)
        model.eval()
        del opt
        models[name] = model
        if not qeeps:
            stock_cfg = _stock_cfg(cfg)
            if stock_cfg is not None:
                torch.manual_seed(0)
                models["stock"] = _build(stock_cfg, train_batch).eval()
    images = _inputs(hw, args.batch, False, False, gen)
    queries = [{**x, "query_box": torch.tensor([10.0, 10, 60, 150])} for x in images]
    pairs = {b: _inputs(hw, b, True, False, gen) for b in (1, args.batch)}

    def run(model, inputs):
        def forward():
            with torch.no_grad(), _precision(args):
                model(inputs)
        return forward

    if "stock" in models:
        timed["stock_image_s"] = run(models["stock"], images)
    timed["oim_gallery_image_s"] = run(models["oim"], images)
    timed["oim_query_box_s"] = run(models["oim"], queries)
    for b in (1, args.batch):
        timed[f"qeeps_pair_s_b{b}"] = run(models["qeeps"], pairs[b])
    per_input = {"qeeps_pair_s_b1": 1}
    for name, seconds in _time_interleaved(timed, args.runs, args.warmup, args.device).items():
        row[name] = seconds / per_input.get(name, args.batch)
    with torch.no_grad(), _precision(args):
        row["qeeps_pair_gflop"] = count_gflop(models["qeeps"], pairs[args.batch]) / args.batch
        row["qeeps_proposals"] = _num_proposals(models["qeeps"], pairs[args.batch])
        row["oim_gallery_image_gflop"] = count_gflop(models["oim"], images) / args.batch
        row["oim_proposals"] = _num_proposals(models["oim"], images)
        if "stock" in models:
            row["stock_image_gflop"] = count_gflop(models["stock"], images) / args.batch
    del models
    # ru_maxrss only grows: with sizes run small to large this is each size's own peak
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        row["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        torch.cuda.reset_peak_memory_stats()
    return derive(row, args.batch)


def derive(row, batch):
    """Ratios of a measured row: training step QEEPS / OIM, per pair (at the faster of B=1 and
    B=batch gallery images per forward, ``best_b``) / OIM per gallery image, the GFLOP/s of
    pair inference at that B and, with a stock row, OIM image / stock image and pair / stock
    image."""
    row["train_ratio"] = row["qeeps_train_step_s"] / row["oim_train_step_s"]
    best_b = min((1, batch), key=lambda b: row[f"qeeps_pair_s_b{b}"])
    row["best_b"] = best_b
    row["pair_vs_gallery_image"] = row[f"qeeps_pair_s_b{best_b}"] / row["oim_gallery_image_s"]
    row["qeeps_pair_gflops"] = row["qeeps_pair_gflop"] / row[f"qeeps_pair_s_b{best_b}"]
    if row.get("stock_image_s"):  # against stock Detectron2's image (r50 sizes)
        row["oim_vs_stock"] = row["oim_gallery_image_s"] / row["stock_image_s"]
        row["pair_vs_stock"] = row[f"qeeps_pair_s_b{best_b}"] / row["stock_image_s"]
    return row


def format_table(info, rows, args) -> str:
    """The markdown table of the README (one row per size)."""
    b = args.batch
    peak = "peak RSS" + (" / device" if args.device.startswith("cuda") else "")
    lines = [
        f"{info['device']} ({info.get('gpu', info['cpu'])}), {info['precision']}, "
        f"{info['threads']} threads, "
        f"dense {'bf16' if args.precision == 'bf16' else 'fp32'} matmul "
        f"{info['matmul_fp32_gflops']:.0f} GFLOP/s; median of {args.runs} "
        f"runs after {args.warmup} warm-up, batch {b}",
        "",
        f"| size | OIM train step | QEEPS train step | ratio | stock D2 / image | "
        f"OIM / gallery image | OIM / query box | QEEPS / pair (B=1) | QEEPS / pair (B={b}) | "
        f"OIM / stock | pair / stock | pair / image | image / pair GFLOP | "
        f"pair GFLOP/s (% of matmul) | proposals | {peak} |",
        "|" + "---|" * 16,
    ]
    for r in rows:
        mem = f"{r['peak_rss_mib']:.0f} MiB"
        if "peak_device_mib" in r:
            mem += f" / {r['peak_device_mib']:.0f} MiB"
        stock = "stock_image_s" in r
        lines.append(
            f"| {r['size']} {r['input_hw'][0]}x{r['input_hw'][1]} | {r['oim_train_step_s']:.2f} s"
            f" | {r['qeeps_train_step_s']:.2f} s | {r['train_ratio']:.2f} | "
            + (f"{r['stock_image_s']:.3f} s | " if stock else "- | ")
            + f"{r['oim_gallery_image_s']:.3f} s | {r['oim_query_box_s']:.3f} s | "
            f"{r['qeeps_pair_s_b1']:.3f} s | {r[f'qeeps_pair_s_b{b}']:.3f} s | "
            + (f"{r['oim_vs_stock']:.2f} | {r['pair_vs_stock']:.2f} | " if stock else "- | - | ")
            + f"{r['pair_vs_gallery_image']:.2f} (B={r['best_b']}) | "
            f"{r['oim_gallery_image_gflop']:.0f} / "
            f"{r['qeeps_pair_gflop']:.0f} | {r['qeeps_pair_gflops']:.0f} "
            f"({100 * r['qeeps_pair_gflops'] / info['matmul_fp32_gflops']:.0f}%) | "
            f"{r['oim_proposals']:.0f} / {r['qeeps_proposals']:.0f} | {mem} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["synthps", "r50_600"], choices=list(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2, help="images / pairs per step")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                        help="tf32 / bf16 (autocast) apply on CUDA")
    parser.add_argument("--out", default="output/bench.json")
    parser.add_argument("--table", metavar="JSON",
                        help="only print the table of an earlier run's JSON file")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            saved = json.load(f)
        args = argparse.Namespace(**saved["args"])
        print(format_table(saved["info"], [derive(r, args.batch) for r in saved["rows"]], args))
        return 0
    if args.precision != "fp32" and not args.device.startswith("cuda"):
        parser.error("--precision tf32 / bf16 need --device cuda")
    _precision(args)  # sets the TF32 switches for the matmul reference too
    info = {"device": args.device, "precision": args.precision, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "matmul_fp32_gflops": matmul_gflops(
                args.device, n=2048 if args.device == "cpu" else 8192,
                dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    rows = []
    for size in args.sizes:
        rows.append(bench_size(size, args))
        print(json.dumps(rows[-1]), flush=True)
    print(format_table(info, rows, args))
    write_json_file(args.out, {"info": info, "rows": rows, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
