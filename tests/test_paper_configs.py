"""The paper's query-guided configs (CUHK-SYSU and PRW): one (query, gallery) pair per step at
lr 0.001, query-box jittering on, and the 2-epoch schedule resolved over the pairs."""
import glob
import os

import pytest

import dataset_fixtures
from qeeps_d2.engine import setup_cfg
from qeeps_d2.data.build import build_train_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDED = sorted(
    c for d in ("CUHK-SYSU", "PRW") for m in ("qrpn", "qsimnet", "qrpn_qsimnet", "qeeps")
    for c in glob.glob(os.path.join(REPO, "configs", d, f"{m}_R_50_C4*.yaml"))
)
OIM = sorted(glob.glob(os.path.join(REPO, "configs", "*", "oim_R_50_C4*.yaml")))


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    dataset_fixtures.make_cuhk_sysu_fixture(str(root / "CUHK-SYSU"))
    dataset_fixtures.make_prw_fixture(str(root / "PRW"))
    return str(root)


def test_the_paper_configs_are_all_there():
    assert len(GUIDED) == 10 and len(OIM) == 6  # 4 Table-1 rows + the 900 QEEPS, per data set


@pytest.mark.parametrize("config", GUIDED, ids=lambda c: os.path.relpath(c, REPO))
def test_query_guided_paper_config_one_pair_per_step(config, datasets_root, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", datasets_root)
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    cfg = setup_cfg(config, opts)  # resolves SOLVER.EPOCHS over the training pairs
    assert cfg.SOLVER.IMS_PER_BATCH == 1 and cfg.SOLVER.BASE_LR == 0.001
    assert cfg.DATALOADER.PAIRS.QUERY_BOX_JITTER == 0.1
    pairs = len(build_train_records(cfg))
    assert pairs > 1
    assert (cfg.SOLVER.EPOCHS, cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (2, 2 * pairs, (pairs,))


@pytest.mark.parametrize("config", OIM, ids=lambda c: os.path.relpath(c, REPO))
def test_oim_configs_keep_two_images_per_step_and_no_jitter(config):
    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu"], resolve_schedule=False)
    assert cfg.SOLVER.IMS_PER_BATCH == 2 and cfg.DATALOADER.PAIRS.QUERY_BOX_JITTER == 0.0
