"""Trainer pieces: epoch schedule, optimizer choice, CPU fallback."""
import pytest
import torch

from qeeps_d2.config import resolve_epoch_schedule
from qeeps_d2.engine import Trainer

import model_fixtures


@pytest.mark.parametrize("records,batch,epochs,steps,expected", [
    (434, 4, 2, (1,), (218, (109,))),       # ceil(434 / 4) = 109 iterations per epoch
    (400, 4, 8, (6,), (800, (600,))),
    (5, 16, 1.5, (), (2, ())),             # at least one iteration per epoch, rounded
])
def test_epoch_schedule(records, batch, epochs, steps, expected):
    cfg = model_fixtures.tiny_cfg()
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.EPOCHS, cfg.SOLVER.EPOCH_STEPS = batch, epochs, steps
    resolve_epoch_schedule(cfg, records)
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == expected


def test_epoch_schedule_off_keeps_max_iter():
    cfg = model_fixtures.tiny_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 123, (100,)
    resolve_epoch_schedule(cfg, 1000)
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (123, (100,))


def test_command_line_max_iter_replaces_the_configs_epochs(caplog):
    """configs/SynthPS/oim.yaml trains 6 epochs with a step after 5; SOLVER.MAX_ITER on the
    command line wins, said in the log, with the step scaled (5/6 of 40); both at once: error."""
    from qeeps_d2.engine.trainer import setup_cfg

    config = f"{model_fixtures.REPO}/configs/SynthPS/oim.yaml"
    with caplog.at_level("WARNING", logger="qeeps_d2"):
        cfg = setup_cfg(config, ["SOLVER.MAX_ITER", "40"], resolve_schedule=False)
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.SOLVER.EPOCHS) == (40, (33,), 0)
    assert "SOLVER.MAX_ITER 40 from the command line replaces" in caplog.text
    cfg = setup_cfg(config, ["SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(10,)"],
                    resolve_schedule=False)
    assert tuple(cfg.SOLVER.STEPS) == (10,)
    with pytest.raises(ValueError, match="not both"):
        setup_cfg(config, ["SOLVER.MAX_ITER", "40", "SOLVER.EPOCHS", "2"], resolve_schedule=False)


@pytest.mark.parametrize("name,cls", [("SGD", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_choice(name, cls):
    cfg = model_fixtures.tiny_cfg()
    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY = name, 0.003, 0.0002
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = Trainer.build_optimizer(cfg, model)
    assert isinstance(opt, cls)
    assert {g["lr"] for g in opt.param_groups} == {0.003}
    # norm layers get WEIGHT_DECAY_NORM (0 by default), the linear weight WEIGHT_DECAY
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.0002]


def test_unknown_optimizer_is_rejected():
    cfg = model_fixtures.tiny_cfg()
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        Trainer.build_optimizer(cfg, torch.nn.Linear(2, 2))


def test_query_guidance_parameters_are_exactly_those_an_oim_model_lacks():
    from detectron2.modeling import build_model

    from qeeps_d2.engine.trainer import is_query_guidance_parameter

    oim = {n for n, _ in build_model(model_fixtures.tiny_cfg()).named_parameters()}
    qeeps = {n for n, _ in build_model(
        model_fixtures.tiny_cfg(qsse=True, qrpn=True, qsimnet=True)).named_parameters()}
    assert qeeps - oim and oim <= qeeps
    assert {n for n in qeeps if is_query_guidance_parameter(n)} == qeeps - oim


@pytest.mark.parametrize("optimizer", ["SGD", "ADAMW"])
def test_base_model_lr_factor_scales_all_but_the_query_guidance_parameters(optimizer):
    from detectron2.modeling import build_model

    from qeeps_d2.engine.trainer import Trainer, is_query_guidance_parameter

    cfg = model_fixtures.tiny_cfg(qsse=True, qrpn=True, qsimnet=True)
    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.BASE_MODEL_LR_FACTOR = optimizer, 0.01, 0.1
    model = build_model(cfg)
    opt = Trainer.build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(lr_of) == len(named)
    for name, p in named:
        expected = 0.01 if is_query_guidance_parameter(name) else 0.001
        assert lr_of[id(p)] == pytest.approx(expected), name
    cfg.SOLVER.BASE_MODEL_LR_FACTOR = 0.0
    with pytest.raises(ValueError, match="BASE_MODEL_LR_FACTOR"):
        Trainer.build_optimizer(cfg, model)


def test_trunk_lr_factor_scales_the_trunk_but_not_the_qsse_layers_inside_it():
    from detectron2.modeling import build_model

    from qeeps_d2.engine.trainer import Trainer

    cfg = model_fixtures.tiny_cfg(qsse=True, qrpn=True, qsimnet=True)
    cfg.MODEL.QEEPS.DET_HEAD = "separate"  # its res5 is a detection head: the heads' rate
    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR = "ADAMW", 0.01
    cfg.SOLVER.BASE_MODEL_LR_FACTOR, cfg.SOLVER.TRUNK_LR_FACTOR = 0.5, 0.1
    model = build_model(cfg)
    lr_of = {id(p): g["lr"] for g in Trainer.build_optimizer(cfg, model).param_groups
             for p in g["params"]}
    seen = set()
    for name, p in model.named_parameters():
        if ".qsse." in name or name.startswith(("proposal_generator.query_", "roi_heads.qsimnet.")):
            expected, kind = 0.01, "new"                    # new layers: base rate
        elif name.startswith(("backbone.", "roi_heads.res5.")):
            expected, kind = 0.01 * 0.5 * 0.1, "trunk"      # both factors
        else:  # RPN, detection res5 + box predictor, re-id head
            expected, kind = 0.01 * 0.5, "det_res5" if ".det_res5." in name else "heads"
        assert lr_of[id(p)] == pytest.approx(expected), name
        seen.add(kind)
    assert seen == {"new", "trunk", "heads", "det_res5"}
    cfg.SOLVER.TRUNK_LR_FACTOR = -1.0
    with pytest.raises(ValueError, match="TRUNK_LR_FACTOR"):
        Trainer.build_optimizer(cfg, model)
