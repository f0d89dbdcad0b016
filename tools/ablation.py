#!/usr/bin/env python
"""Train and evaluate a list of configs and print the paper's Table 1 for them.

    python tools/ablation.py configs/SynthPS/{oim,qrpn,qsimnet,qrpn_qsimnet,qeeps}.yaml \\
        --gallery-sizes 50 100 --output output/synthps/table1.md

With `--opts TEST.PERSON_SEARCH.USE_GT_BOXES True` the same models are scored with the annotated
gallery boxes (re-identification alone; rows labelled "GT boxes", evaluated in their own folder).
Each config is trained unless its OUTPUT_DIR holds model_final.pth (an interrupted run resumes),
evaluated once on the largest gallery size, and scored on every size from that one results file
(see qeeps_d2/engine/experiments.py).
"""
import argparse
import json
import os
import sys

from qeeps_d2.engine.experiments import format_table, run_config
from qeeps_d2.utils.cli import add_output_argument


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--gallery-sizes", type=int, nargs="+", default=[50, 100])
    add_output_argument(parser, None, help="also write the markdown table (and a .json) here")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE overrides applied to every config")
    args = parser.parse_args(argv)
    rows = []
    for config in args.configs:
        rows.append(run_config(config, args.gallery_sizes, args.opts))
        print(format_table(rows[-1:], args.gallery_sizes).splitlines()[-1], flush=True)
    table = format_table(rows, args.gallery_sizes)
    print(table)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(table + "\n")
        with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
