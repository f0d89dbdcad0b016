#!/usr/bin/env python
"""Train and evaluate QEEPS / OIM person-search models (the Detectron2 way).

    python projects/QEEPS/train_net.py --config-file configs/SynthPS/qeeps.yaml
    python projects/QEEPS/train_net.py --config-file configs/SynthPS/qeeps.yaml --eval-only \
        MODEL.WEIGHTS output/synthps/qeeps/model_final.pth

The same command is installed as ``qeeps-train`` (:mod:`qeeps_d2.engine.train_cli`, which
documents its input checks).
"""
from qeeps_d2.engine.train_cli import invoke_main, main  # noqa: F401  (main: Detectron2 style)

if __name__ == "__main__":
    invoke_main()  # pragma: no cover
