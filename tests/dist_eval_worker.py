"""Shared by tests/test_cascade.py and tests/test_distributed_eval.py: a tiny QEEPS model that
detects in both modes, its evaluation config on the CUHK-SYSU fixture, and the ``launch`` worker
that evaluates it with ``Trainer.test`` (the ``train_net.py --eval-only`` path).

The worker lives in its own module (not in a test file) so that ``torch.multiprocessing`` spawn
can import it by name in the child processes.
"""
import gzip
import json
import os

import torch
from detectron2.modeling import build_model

import model_fixtures
from qeeps_d2.engine import Trainer

# evaluation runs of eval_cfg: name -> (query-guided, TEST.PERSON_SEARCH.CASCADE_TOPK)
RUNS = {"agnostic": (False, 0), "pairs": (True, 0), "cascade": (True, 2)}


def eval_cfg(guided: bool, k: int, output_dir: str, batch_size: int = 1):
    """The tiny config (all three query-guidance blocks on or off) evaluated on
    ``cuhk_sysu_test`` (G100) with every detection kept (score threshold 0)."""
    cfg = model_fixtures.tiny_cfg(qsse=guided, qrpn=guided, qsimnet=guided)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.PERSON_SEARCH.DET_THRESH = 0.0
    cfg.TEST.PERSON_SEARCH.BATCH_SIZE = batch_size
    cfg.TEST.PERSON_SEARCH.CASCADE_TOPK = k
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATASETS.TEST = ("cuhk_sysu_test",)
    cfg.OUTPUT_DIR = output_dir
    return cfg


def guided_model():
    """A seeded tiny model with QSSE, QRPN and QSimNet whose BatchNorm statistics average a pair
    forward and a gallery-image forward, so that it detects people (scores well above 0) both in
    pair mode and query-agnostically (the cascade's two stages)."""
    torch.manual_seed(0)
    model = build_model(eval_cfg(True, 0, ""))
    model_fixtures.fill_oim_lut(model)
    model_fixtures.settle_batchnorm(model, model_fixtures.pair_inputs())
    return model_fixtures.settle_batchnorm(model, model_fixtures.scene_inputs(), momentum=0.5)


def read_results(output_dir: str) -> dict:
    """The results file a run wrote into ``output_dir``."""
    path = os.path.join(output_dir, "inference", "cuhk_sysu_test_results.json.gz")
    with gzip.open(path, "rt") as f:
        return json.load(f)


def evaluate_runs(weights: str, out_dir: str, batch_size: int = 1) -> None:
    """``launch`` main function: evaluate the weights of :func:`guided_model` in every run of
    RUNS (the agnostic run loads them into the OIM model) into ``out_dir/<run>/``, on every rank
    of the current process group (one thread per process, so that runs compare exactly)."""
    torch.set_num_threads(1)
    state = torch.load(weights, weights_only=True)
    for name, (guided, k) in RUNS.items():
        cfg = eval_cfg(guided, k, os.path.join(out_dir, name), batch_size)
        model = build_model(cfg)
        model.load_state_dict(state, strict=guided)
        Trainer.test(cfg, model.eval())
