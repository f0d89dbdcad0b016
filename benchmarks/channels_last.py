#!/usr/bin/env python
"""Channels-last (MODEL.QEEPS.CHANNELS_LAST) vs the default NCHW layout, side by side.

For the SynthPS OIM and QEEPS configs (random weights, synthetic 240 x 360 inputs as
``benchmarks/run.py`` makes them) it builds each model twice, NCHW and channels-last, from the
same seed, and times in interleaved rounds (each round runs both layouts once, so they share
the machine's load), median of ``--runs`` after ``--warmup``:

- a training step (``--batch`` images or pairs; forward, backward, an SGD step at learning
  rate 0);
- inference: ``--infer-batch`` gallery images (OIM) or pairs (QEEPS) per forward.

Prints a table with the ratio channels-last / NCHW (below 1: channels-last is faster) and
writes JSON. Never part of the tests.

    python benchmarks/channels_last.py --runs 7 --out output/bench_channels_last.json
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qeeps_d2.engine import setup_cfg  # noqa: E402
from qeeps_d2.utils.json_files import write_json_file  # noqa: E402
from run import _inputs, _time_interleaved  # noqa: E402

CONFIGS = {"oim": "configs/SynthPS/oim.yaml", "qeeps": "configs/SynthPS/qeeps.yaml"}
HW = (240, 360)


def _model(name: str, channels_last: bool, device: str):
    cfg = setup_cfg(os.path.join(REPO, CONFIGS[name]),
                    ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, "MODEL.QEEPS.OIM.NUM_PIDS", "100",
                     "MODEL.QEEPS.CHANNELS_LAST", str(channels_last)], resolve_schedule=False)
    torch.manual_seed(0)
    return build_model(cfg)


def bench(name: str, args):
    """{"<name>_train_step_s_nchw": ..., ..._nhwc, "<name>_infer_s_nchw": ..., ...}: seconds
    per training step and per inference input."""
    gen = torch.Generator().manual_seed(0)
    pairs = name == "qeeps"
    train_batch = _inputs(HW, args.batch, pairs, True, gen)
    infer_batch = _inputs(HW, args.infer_batch, pairs, False, gen)
    steps, forwards = {}, {}
    for layout, cl in (("nchw", False), ("nhwc", True)):
        model = _model(name, cl, args.device)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

        def step(model=model, opt=opt):
            model.train()
            with EventStorage():
                loss = sum(model(train_batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()

        def forward(model=model):
            model.eval()
            with torch.no_grad():
                model(infer_batch)

        steps[f"{name}_train_step_s_{layout}"] = step
        forwards[f"{name}_infer_s_{layout}"] = forward
    row = _time_interleaved(steps, args.runs, args.warmup, args.device)
    for key, seconds in _time_interleaved(forwards, args.runs, args.warmup, args.device).items():
        row[key] = seconds / args.infer_batch
    return row


def format_table(rows, args) -> str:
    lines = [f"channels-last vs NCHW, {args.device} ({torch.get_num_threads()} threads), "
             f"median of {args.runs} interleaved runs; train: {args.batch} per step, inference: "
             f"{args.infer_batch} per forward",
             "| model | measure | NCHW (s) | channels-last (s) | ratio |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        for measure, key in (("training step", "train_step_s"),
                             ("inference per image / pair", "infer_s")):
            a, b = row[f"{name}_{key}_nchw"], row[f"{name}_{key}_nhwc"]
            lines.append(f"| {name} | {measure} | {a:.4f} | {b:.4f} | {b / a:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4, help="images / pairs per training step")
    parser.add_argument("--infer-batch", type=int, default=8,
                        help="gallery images / pairs per inference forward")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="output/bench_channels_last.json")
    args = parser.parse_args(argv)
    rows = {name: bench(name, args) for name in args.models}
    table = format_table(rows, args)
    print(table)
    write_json_file(args.out, {"machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(), "args": vars(args),
                               "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
