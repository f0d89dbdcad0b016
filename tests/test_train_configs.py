"""Every YAML merges; every leaf config trains one step and evaluates on CPU at tiny sizes.

Data: a tiny SynthPS for the SynthPS leaves, the official-format fixtures of
``dataset_fixtures`` for the CUHK-SYSU and PRW leaves (``$DETECTRON2_DATASETS`` points at them).
"""
import glob
import math
import os

import pytest
import torch

from qeeps_d2.data.synthps import generate_synthps
from qeeps_d2.engine import Trainer, setup_cfg

import dataset_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
LEAVES = [c for c in CONFIGS if not os.path.basename(c).startswith("Base-")]

TINY = [
    "MODEL.WEIGHTS", "",
    "MODEL.DEVICE", "cpu",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "100",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "100",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32", "MODEL.RPN.POST_NMS_TOPK_TEST", "16",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "MODEL.QEEPS.OIM.QUEUE_SIZE", "8",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.EPOCHS", "0", "SOLVER.MAX_ITER", "1",
    "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.PERSON_SEARCH.MAX_QUERIES", "2", "TEST.PERSON_SEARCH.BATCH_SIZE", "2",
    "MODEL.QEEPS.QSIMNET.LOCAL.FIT_ITERS", "3", "MODEL.QEEPS.QSIMNET.LOCAL.FIT_BATCH", "8",
]


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    generate_synthps(
        str(root / "synthps"), seed=0, num_train_ids=4, num_test_ids=3, train_images=8,
        test_images=51, image_size=(96, 72), persons_per_image=(2, 3), gallery_sizes=(50,),
        appearances_per_id=(2, 6), illumination=1.0,
    )
    dataset_fixtures.make_cuhk_sysu_fixture(str(root / "CUHK-SYSU"))
    dataset_fixtures.make_prw_fixture(str(root / "PRW"))
    return str(root)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.relpath(c, REPO))
def test_every_yaml_merges(config):
    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu"], resolve_schedule=False)
    assert cfg.MODEL.META_ARCHITECTURE == "QEEPS"
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[32, 64, 128, 256, 512]]


@pytest.mark.parametrize("config", LEAVES, ids=lambda c: os.path.relpath(c, REPO))
def test_leaf_trains_one_step_and_evaluates(config, datasets_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", datasets_root)
    opts = TINY + ["OUTPUT_DIR", str(tmp_path)]
    if "/PRW/" in config:
        opts += ["DATASETS.TEST", "('prw_test',)"]
    if "/CUHK-SYSU/" in config:
        opts += ["TEST.PERSON_SEARCH.GALLERY_SIZE", "50"]
    torch.manual_seed(0)
    cfg = setup_cfg(config, opts)
    trainer = Trainer(cfg)
    trainer.train()  # one iteration, then the final evaluation of the EvalHook
    results = trainer._last_eval_results
    losses = trainer.storage.latest()
    assert math.isfinite(losses["total_loss"][0])
    expected = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_oim"}
    q = cfg.MODEL.QEEPS
    if q.QRPN.ENABLED:
        expected.add("loss_qrpn")
    if q.QSIMNET.ENABLED:
        expected.add("loss_sim")
    assert expected <= set(losses), sorted(losses)

    final = os.path.join(str(tmp_path), "model_final.pth")
    assert os.path.isfile(final)
    if q.QSIMNET.LOCAL.ENABLED:  # fitted after the last step, before the final checkpoint
        saved = torch.load(final, map_location="cpu", weights_only=False)["model"]
        assert int(saved["roi_heads.local_sim.fitted_flag"]) == 1
        assert trainer.model.roi_heads.local_sim.fitted
    search = results["person_search"]
    assert 1 <= search["num_queries"] <= 2
    for key in ("mAP", "top1", "top5", "top10"):
        assert 0.0 <= search[key] <= 100.0
    written = glob.glob(os.path.join(str(tmp_path), "inference", "*_results.json.gz"))
    assert len(written) == 1
