"""MODEL.QEEPS.OIM.LUT_INIT "weights": the OIM table starts from each labeled identity's mean
embedding under the loaded weights (qeeps_d2.engine.hooks)."""
import types

import cv2
import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

import model_fixtures
from qeeps_d2.data.mapper import PersonSearchMapper
from qeeps_d2.engine.hooks import OIMTableInit, labeled_identity_means


def _records(tmp_path):
    rng = np.random.RandomState(0)
    out = []
    for i, anns in enumerate([[(0, [4, 4, 30, 60]), (1, [40, 8, 70, 62]), (-1, [72, 5, 94, 60])],
                              [(0, [10, 2, 40, 58]), (3, [50, 6, 80, 60])]]):
        path = str(tmp_path / f"s{i}.jpg")
        cv2.imwrite(path, rng.randint(0, 255, size=(64, 96, 3)).astype(np.uint8))
        out.append({"file_name": path, "image_id": f"s{i}.jpg", "height": 64, "width": 96,
                    "annotations": [{"bbox": b, "bbox_mode": 0, "category_id": 0, "person_id": p}
                                    for p, b in anns]})
    return out


def _embeds(model, mapper, record, boxes):
    r = {k: v for k, v in record.items() if k != "annotations"}
    r["given_boxes"] = boxes
    with torch.no_grad():
        return model([mapper(r)])[0]["instances"].pred_embeds


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    cfg = model_fixtures.tiny_cfg()
    model = build_model(cfg)
    model_fixtures.settle_batchnorm(model, model_fixtures.scene_inputs())
    return model, PersonSearchMapper(cfg, is_train=False), _records(tmp_path)


def test_rows_are_the_normalised_mean_of_each_identity(setup):
    model, mapper, records = setup
    model.train()
    means = labeled_identity_means(model, records, mapper, num_pids=5)
    assert model.training  # mode restored
    a = _embeds(model.eval(), mapper, records[0], [[4, 4, 30, 60], [40, 8, 70, 62]])
    b = _embeds(model, mapper, records[1], [[10, 2, 40, 58], [50, 6, 80, 60]])
    expected = torch.zeros(5, a.shape[1])
    expected[0] = torch.nn.functional.normalize(a[0] + b[0], dim=0)
    expected[1], expected[3] = a[1], b[1]  # unit embeddings already
    torch.testing.assert_close(means, expected, atol=1e-5, rtol=1e-5)


def _trainer(model, it=0):
    return types.SimpleNamespace(model=model, iter=it)


def test_hook_fills_an_empty_table_before_the_first_iteration(setup):
    model, mapper, records = setup
    hook = OIMTableInit(records, mapper)
    hook.trainer = _trainer(model)
    hook.before_train()
    lut = model.roi_heads.oim_loss.lut
    torch.testing.assert_close(lut, labeled_identity_means(model, records, mapper, 5))
    assert lut[0].norm() == pytest.approx(1.0) and lut[2].abs().sum() == 0


@pytest.mark.parametrize("case", ["resumed", "table_from_checkpoint"])
def test_hook_keeps_a_resumed_or_loaded_table(setup, case):
    model, mapper, records = setup
    lut = model.roi_heads.oim_loss.lut
    if case == "table_from_checkpoint":
        lut[1] = torch.nn.functional.normalize(torch.ones(lut.shape[1]), dim=0)
    before = lut.clone()
    hook = OIMTableInit(records, mapper)
    hook.trainer = _trainer(model, it=5 if case == "resumed" else 0)
    hook.before_train()
    assert torch.equal(lut, before)
