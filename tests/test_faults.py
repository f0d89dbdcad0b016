"""Numerical faults and unreadable training data: a NaN / infinite loss stops training naming the
iteration and the term; degenerate batches give finite losses; an unreadable training image is
skipped with a warning and a count."""
import logging
import os

import pytest
import torch

from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import dataset_fixtures
import model_fixtures as mf
from qeeps_d2.data.mapper import PersonSearchMapper
from qeeps_d2.engine import Trainer
from qeeps_d2.engine.hooks import non_finite_terms


@pytest.fixture(scope="module")
def cuhk_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    dataset_fixtures.make_cuhk_sysu_fixture(str(root / "CUHK-SYSU"))
    return root


def _train_cfg(out, max_iter):
    cfg = mf.tiny_cfg()
    cfg.DATASETS.TRAIN = ("cuhk_sysu_train",)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.EPOCHS = 0
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.TEST.EVAL_PERIOD = 0
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 1
    cfg.OUTPUT_DIR = str(out)
    os.makedirs(out, exist_ok=True)
    return cfg


class _PoisonLUT(HookBase):
    """Fills the OIM lookup table with NaN before iteration ``at``; remembers the weights then."""

    def __init__(self, at):
        self.at = at
        self.weights = None

    def before_step(self):
        if self.trainer.iter == self.at:
            model = self.trainer.model
            self.weights = {k: v.clone() for k, v in model.named_parameters()}
            with torch.no_grad():
                model.roi_heads.oim_loss.lut.fill_(float("nan"))


def test_nan_loss_stops_training_naming_iteration_and_term(cuhk_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(cuhk_root))
    trainer = Trainer(_train_cfg(tmp_path, max_iter=5))
    poison = _PoisonLUT(at=3)
    trainer.register_hooks([poison])
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    message = str(err.value)
    assert message.startswith("non-finite loss at iteration 3: loss_oim=nan (finite: ")
    assert "loss_cls=" in message.split("(finite: ")[1]  # the finite terms are listed apart
    assert message.endswith("last checkpoint: " + str(tmp_path / "model_0000001.pth"))
    # stopped before backward / optimizer step: the weights are those of iteration 2's end
    for name, value in trainer.model.named_parameters():
        assert torch.equal(value, poison.weights[name]), name
    assert not os.path.exists(tmp_path / "model_final.pth")


def test_non_finite_terms_lists_only_the_bad_ones():
    losses = {"loss_a": torch.tensor(0.5), "loss_b": torch.tensor(float("inf")),
              "loss_c": torch.tensor(float("nan"))}
    assert non_finite_terms(losses) == ["loss_b=inf", "loss_c=nan"]
    assert non_finite_terms({"loss_a": torch.tensor(1.0)}) == []


def _empty_gt(inputs):
    for x in inputs:
        x["instances"] = mf.random_instances(x["height"], x["width"], [], [], query_pid=0)
    return inputs


def _losses(cfg, inputs):
    torch.manual_seed(0)
    model = build_model(cfg)
    mf.fill_oim_lut(model)
    model.train()
    with EventStorage():
        losses = model(inputs)
    sum(losses.values()).backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters()
                       if p.grad is not None)
    return {k: float(v.detach()) for k, v in losses.items()}, grads_finite


def _no_proposals(cfg):
    cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE = 10000  # every RPN proposal is filtered out
    return cfg


DEGENERATE = {
    "oim-gallery-without-person": (lambda: mf.tiny_cfg(), lambda: _empty_gt(mf.scene_inputs())),
    "pair-gallery-without-person": (lambda: mf.tiny_cfg(True, True, True),
                                    lambda: _empty_gt(mf.pair_inputs())),
    "pair-zero-area-query-box": (
        lambda: mf.tiny_cfg(True, True, True),
        lambda: [dict(x, query_box=b) for x, b in zip(
            mf.pair_inputs(), [torch.tensor([10.0, 8.0, 10.0, 60.0]),
                               torch.tensor([50.0, 4.0, 80.0, 4.0])])]),
    "oim-all-proposals-filtered": (lambda: _no_proposals(mf.tiny_cfg()), mf.scene_inputs),
    "oim-all-proposals-filtered-no-person": (lambda: _no_proposals(mf.tiny_cfg()),
                                             lambda: _empty_gt(mf.scene_inputs())),
    "pair-all-proposals-filtered": (lambda: _no_proposals(mf.tiny_cfg(True, True, True)),
                                    mf.pair_inputs),
    "pair-all-proposals-filtered-no-person": (lambda: _no_proposals(mf.tiny_cfg(True, True, True)),
                                              lambda: _empty_gt(mf.pair_inputs())),
}


@pytest.mark.parametrize("make_cfg, make_inputs", DEGENERATE.values(), ids=list(DEGENERATE))
def test_degenerate_batch_gives_finite_losses(make_cfg, make_inputs):
    losses, grads_finite = _losses(make_cfg(), make_inputs())
    bad = [k for k, v in losses.items() if not torch.isfinite(torch.tensor(v))]
    assert not bad, losses
    assert grads_finite


def _corrupt(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])  # a truncated JPEG


def test_unreadable_training_image_is_skipped_with_a_count(cuhk_root, tmp_path, monkeypatch,
                                                           caplog):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(cuhk_root, root)
    image = root / "CUHK-SYSU" / "Image" / "SSM" / "s2.jpg"
    _corrupt(image)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    cfg = _train_cfg(tmp_path / "out", max_iter=4)
    mapper = PersonSearchMapper(cfg, is_train=True)
    record = {"file_name": str(image), "height": 90, "width": 120, "annotations": []}
    with caplog.at_level(logging.WARNING, logger="qeeps_d2.data.mapper"):
        assert mapper(record) is None
        assert mapper(dict(record, file_name=str(tmp_path / "missing.jpg"))) is None
    assert mapper.num_skipped == 2
    assert "skipping unreadable training image (1 skipped so far): " + str(image) in caplog.text
    assert "(2 skipped so far)" in caplog.text
    with pytest.raises(OSError):  # at test time the error is raised
        PersonSearchMapper(cfg, is_train=False)(record)

    caplog.clear()
    trainer = Trainer(cfg)  # s2 is one of the 4 training images: the run goes on without it
    trainer.resume_or_load(resume=False)
    with caplog.at_level(logging.WARNING, logger="qeeps_d2.data.mapper"):
        trainer.train()
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")
    assert "s2.jpg" in caplog.text and "skipped so far" in caplog.text
