"""Weights that do not fit the config (issue #16 items 3, 5, 6): inference and evaluation
(``qeeps-search``, ``train_net.py --eval-only``) refuse missing or unused keys in one line naming
the groups of keys (exit 2, no OUTPUT_DIR); training loads partial fits and says once which
groups start fresh; ``.pkl`` weights are loaded after one warning that they are pickles."""
import logging
import os
import pickle
import runpy
import sys

import cv2
import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

import dataset_fixtures
import search_fixtures
from model_fixtures import REPO, tiny_cfg
from qeeps_d2.checkpoint import CheckpointError, QEEPSCheckpointer
from qeeps_d2.engine.input_checks import check_train_net_inputs
from qeeps_d2.search import PersonSearcher
from qeeps_d2.search.cli import main as search_main

TRAIN_NET = os.path.join(REPO, "projects", "QEEPS", "train_net.py")
GUIDED = {"qsse": True, "qrpn": True, "qsimnet": True}
# the groups an OIM model's weights lack for the tiny QEEPS config (QSSE: 4 keys per block)
QUERY_GUIDANCE_GROUPS = ("backbone.qsse (", "proposal_generator.query_excitation (4)",
                         "proposal_generator.query_head (4)", "roi_heads.qsimnet (")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny OIM and QEEPS configs (CUHK-SYSU fixture sets) with their own weights, and the data
    sets' root."""
    root = tmp_path_factory.mktemp("weights_fit")
    dataset_fixtures.make_cuhk_sysu_fixture(str(root / "data" / "CUHK-SYSU"))
    found = {"data": root / "data"}
    for name, switches in (("oim", {}), ("qeeps", GUIDED)):
        cfg = tiny_cfg(**switches)
        cfg.TEST.PERSON_SEARCH.GALLERY_SIZE = 50
        cfg.SOLVER.EPOCHS = 0
        config = root / f"{name}.yaml"
        config.write_text(cfg.dump())
        torch.manual_seed(0)
        QEEPSCheckpointer(build_model(cfg), str(root)).save(name)
        found[name] = (str(config), str(root / f"{name}.pth"))
    return found


def _fit_records(caplog):
    return [r for r in caplog.records if r.name == "fvcore.common.checkpoint"
            and "loaded;" in r.getMessage()]


# ---------------------------------------------------------------------------- item 3
@pytest.mark.parametrize("config, weights, expected", [
    ("qeeps", "oim", "do not fit the config: missing: "),
    ("oim", "qeeps", "do not fit the config: unused: "),
], ids=["oim-weights-qeeps-config", "qeeps-weights-oim-config"])
def test_searcher_refuses_weights_of_the_other_variant(files, config, weights, expected):
    with pytest.raises(CheckpointError) as err:
        PersonSearcher.from_config(files[config][0], files[weights][1], device="cpu")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"weights {files[weights][1]} {expected}")
    for group in QUERY_GUIDANCE_GROUPS:
        assert group in message
    assert "backbone.res" not in message and "oim_loss" not in message


def test_search_cli_one_line_exit_2(files, tmp_path, capsys):
    query = str(tmp_path / "query.png")
    cv2.imwrite(query, search_fixtures.random_image(7))
    search_fixtures.write_image_folder(str(tmp_path / "gallery"), 2)
    code = search_main(["--config", files["qeeps"][0], "--weights", files["oim"][1],
                        "--query", query, "--box", "10,8,40,60",
                        "--gallery", str(tmp_path / "gallery"), "--out", str(tmp_path / "out"),
                        "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"qeeps-search: error: weights {files['oim'][1]} do not fit the "
                          "config: missing: backbone.qsse (")
    assert not (tmp_path / "out").exists()


def test_matching_weights_load_strictly_and_quietly(files, tmp_path, caplog):
    """Own weights fit; so do weights without the state inference does not use (BN counters,
    the OIM table and queue: what a real trained / identity-pretrained checkpoint lacks)."""
    for name, switches in (("oim", {}), ("qeeps", GUIDED)):
        with caplog.at_level(logging.INFO):
            QEEPSCheckpointer(build_model(tiny_cfg(**switches)), strict=True).load(files[name][1])
        assert not _fit_records(caplog)
    state = torch.load(files["qeeps"][1], weights_only=True)["model"]
    torch.save({k: v for k, v in state.items()
                if not k.endswith("num_batches_tracked") and ".oim_loss." not in k},
               tmp_path / "lean.pth")
    QEEPSCheckpointer(build_model(tiny_cfg(**GUIDED)), strict=True).load(str(tmp_path / "lean.pth"))


def test_training_loads_partial_fits_with_one_line(files, tmp_path, caplog):
    """Fine-tuning QEEPS from OIM weights, OIM from trunk weights without the OIM table: loaded,
    one INFO line naming the groups that start fresh, no per-key listing."""
    torch.manual_seed(1)
    qeeps = build_model(tiny_cfg(**GUIDED))
    with caplog.at_level(logging.INFO):
        QEEPSCheckpointer(qeeps).load(files["oim"][1])
    (record,) = _fit_records(caplog)
    message = record.getMessage()
    assert record.levelno == logging.INFO and "\n" not in message
    assert message.startswith(f"weights {files['oim'][1]} loaded; missing: backbone.qsse (")
    assert all(group in message for group in QUERY_GUIDANCE_GROUPS)
    assert message.endswith("the missing layers start fresh")
    assert "not found in the checkpoint" not in caplog.text

    caplog.clear()
    state = torch.load(files["oim"][1], weights_only=True)["model"]
    torch.save({k: v for k, v in state.items() if ".oim_loss." not in k}, tmp_path / "trunk.pth")
    with caplog.at_level(logging.INFO):
        QEEPSCheckpointer(build_model(tiny_cfg())).load(str(tmp_path / "trunk.pth"))
    assert [r.getMessage() for r in _fit_records(caplog)] == [
        f"weights {tmp_path / 'trunk.pth'} loaded; missing: roi_heads.oim_loss (3 keys); "
        "the missing layers start fresh"]


# ---------------------------------------------------------------------------- items 3 and 5
def _truncated(files, tmp_path):
    data = open(files["qeeps"][1], "rb").read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


EVAL_ONLY_CASES = {
    # case: (config, weights (a name in files, or a function making the file), message start)
    "truncated": ("qeeps", _truncated, "Cannot read weights file {weights}"),
    "oim-weights-qeeps-config": ("qeeps", "oim",
                                 "weights {weights} do not fit the config: missing: backbone.qsse"),
    "qeeps-weights-oim-config": ("oim", "qeeps",
                                 "weights {weights} do not fit the config: unused: backbone.qsse"),
}


@pytest.mark.parametrize("case", list(EVAL_ONLY_CASES))
def test_train_net_eval_only_one_line_exit_2_no_output_dir(case, files, tmp_path, monkeypatch,
                                                            capsys):
    config, weights, expected = EVAL_ONLY_CASES[case]
    weights = weights(files, tmp_path) if callable(weights) else files[weights][1]
    monkeypatch.setenv("DETECTRON2_DATASETS", str(files["data"]))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [TRAIN_NET, "--config-file", files[config][0], "--eval-only",
                                      "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(out)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(TRAIN_NET, run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if "train_net.py: error: " in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("train_net.py: error: " + expected.format(weights=weights))
    assert not out.exists()


def test_train_net_checks_weights_for_training_too(files, tmp_path, monkeypatch):
    """Training accepts OIM weights for a QEEPS config (new layers start fresh), refuses an
    unreadable or missing weights file before anything is written."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(files["data"]))
    qeeps_config, oim_weights = files["qeeps"][0], files["oim"][1]
    check_train_net_inputs(qeeps_config, ["MODEL.WEIGHTS", oim_weights], eval_only=False)
    with pytest.raises(CheckpointError, match="Cannot read weights file"):
        check_train_net_inputs(qeeps_config, ["MODEL.WEIGHTS", _truncated(files, tmp_path)],
                               eval_only=False)
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS: weights file .*nope.pth not found"):
        check_train_net_inputs(qeeps_config, ["MODEL.WEIGHTS", str(tmp_path / "nope.pth")],
                               eval_only=False)


# ---------------------------------------------------------------------------- item 6
def _write_d2_pkl(path, model):
    """``model``'s weights as a Detectron2 model-zoo ``.pkl`` (numpy arrays, ``__author__``)."""
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()},
                     "__author__": "qeeps-test"}, f)


def _pickle_warnings(caplog):
    return [r for r in caplog.records
            if r.levelno == logging.WARNING and "pickle" in r.getMessage()]


def test_pkl_weights_load_after_one_warning(files, tmp_path, monkeypatch, caplog):
    torch.manual_seed(2)
    source = build_model(tiny_cfg())
    path = str(tmp_path / "model.pkl")
    _write_d2_pkl(path, source)
    monkeypatch.delenv("QEEPS_TRUST_PICKLE", raising=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(files["data"]))
    with caplog.at_level(logging.WARNING):
        # train_net.py's input check, then its own load (same process): one warning in all
        check_train_net_inputs(files["oim"][0], ["MODEL.WEIGHTS", path], eval_only=True)
        model = build_model(tiny_cfg())
        QEEPSCheckpointer(model, strict=True).load(path)
    (warning,) = _pickle_warnings(caplog)
    message = warning.getMessage()
    assert path in message and "runs any code" in message and "QEEPS_TRUST_PICKLE=1" in message
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    caplog.clear()
    trusted = str(tmp_path / "trusted.pkl")
    _write_d2_pkl(trusted, source)
    monkeypatch.setenv("QEEPS_TRUST_PICKLE", "1")
    with caplog.at_level(logging.WARNING):
        QEEPSCheckpointer(build_model(tiny_cfg())).load(trusted)
    assert not _pickle_warnings(caplog)


def test_broken_pkl_error_mentions_the_pickle_risk(tmp_path):
    payload = pickle.dumps({"model": {"w": np.ones((4, 4), np.float32)}, "__author__": "x"})
    path = tmp_path / "broken.pkl"
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(CheckpointError) as err:
        QEEPSCheckpointer(build_model(tiny_cfg())).load(str(path))
    message = str(err.value)
    assert str(path) in message and "A .pkl file is a Python pickle" in message
    assert "trusted sources only" in message
