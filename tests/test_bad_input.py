"""Bad input at every user-facing entry point: one line naming the input on stderr, exit status 2,
no traceback, nothing (half-)written in the output folder."""
import json
import os
import runpy
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import scipy.io

import dataset_fixtures
import search_fixtures
from model_fixtures import REPO, tiny_cfg
from qeeps_d2.data.synthps import main as synthps_main
from qeeps_d2.engine.input_checks import check_train_net_inputs
from qeeps_d2.evaluation.cli import main as eval_main
from qeeps_d2.search.cli import main as search_main
from qeeps_d2.search.gallery import iter_gallery, read_image_bgr

TRAIN_NET = os.path.join(REPO, "projects", "QEEPS", "train_net.py")


def _one_line_error(capsys, prog):
    """The one error line on stderr (progress bars and library warnings aside)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if f"{prog}: error: " in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------- train_net.py
@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    dataset_fixtures.make_cuhk_sysu_fixture(str(root / "CUHK-SYSU"))
    return root


def _train_config(folder):
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("cuhk_sysu_train",)
    cfg.DATASETS.TEST = ("cuhk_sysu_test",)
    cfg.TEST.PERSON_SEARCH.GALLERY_SIZE = 50
    cfg.SOLVER.EPOCHS = 0
    path = folder / "good.yaml"
    path.write_text(cfg.dump())
    return str(path)


TRAIN_NET_CASES = {
    # case: (config file content or None = the good one, overrides, text the message must hold)
    "missing-config": ("MISSING", [], "config file {tmp}/missing.yaml not found"),
    "yaml-syntax": ("MODEL: [unclosed\n", [], "config file {tmp}/bad.yaml: "),
    "unknown-key-in-file": ("MODEL:\n  FOO: 1\n", [],
                            "config file {tmp}/bad.yaml: Non-existent config key: MODEL.FOO"),
    "unknown-override": (None, ["FOO.BAR", "1"], "command-line override FOO.BAR 1: "
                                                 "Non-existent key: FOO.BAR"),
    "wrong-type-override": (None, ["SOLVER.MAX_ITER", "abc"], "SOLVER.MAX_ITER abc: Type mismatch"),
    "unknown-train-set": (None, ["DATASETS.TRAIN", "('cuhk_sysu_trian',)"],
                          "DATASETS.TRAIN: unknown data set 'cuhk_sysu_trian'"),
    "unknown-test-set": (None, ["DATASETS.TEST", "('prw_tset',)"],
                         "DATASETS.TEST: unknown data set 'prw_tset'"),
    "eval-only-no-test-set": (None, ["--eval-only", "DATASETS.TEST", "()"],
                              "--eval-only with an empty DATASETS.TEST evaluates nothing"),
    "wrong-mat-layout": (None, [], "Images.mat: expected a variable named 'Img'"),
    "missing-data-set": (None, [], "{tmp}/nowhere/CUHK-SYSU"),
}


@pytest.mark.parametrize("case", list(TRAIN_NET_CASES))
def test_train_net_user_errors(case, datasets, tmp_path, monkeypatch, capsys):
    content, opts, expected = TRAIN_NET_CASES[case]
    config = _train_config(tmp_path)
    if content == "MISSING":
        config = str(tmp_path / "missing.yaml")
    elif content is not None:
        config = str(tmp_path / "bad.yaml")
        open(config, "w").write(content)
    root = datasets
    if case == "wrong-mat-layout":
        root = tmp_path / "data"
        shutil.copytree(datasets, root)
        scipy.io.savemat(str(root / "CUHK-SYSU" / "annotation" / "Images.mat"),
                         {"Images": np.zeros((1, 3))})
    elif case == "missing-data-set":
        root = tmp_path / "nowhere"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [TRAIN_NET, "--config-file", config, *opts,
                                      "OUTPUT_DIR", str(out)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(TRAIN_NET, run_name="__main__")
    assert exit_.value.code == 2
    assert expected.format(tmp=tmp_path) in _one_line_error(capsys, "train_net.py")
    assert not out.exists()


def test_train_net_checks_accept_a_good_config(datasets, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    check_train_net_inputs(_train_config(tmp_path), ["SOLVER.MAX_ITER", "3"], eval_only=False)
    check_train_net_inputs(_train_config(tmp_path), [], eval_only=True)


def test_train_net_script_exit_status_and_stderr(datasets, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets))
    run = subprocess.run(
        [sys.executable, TRAIN_NET, "--config-file", _train_config(tmp_path),
         "DATASETS.TRAIN", "('nope',)", "OUTPUT_DIR", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        "train_net.py: error: DATASETS.TRAIN: unknown data set 'nope'")
    assert not out.exists()


# ---------------------------------------------------------------------------- qeeps-synthps
@pytest.mark.parametrize("case", ["bad-knob", "root-is-a-file"])
def test_synthps_user_errors(case, tmp_path, capsys):
    root = tmp_path / "synthps"
    args = ["--root", str(root), "--num-train-ids", "0"]
    expected = "num_train_ids must be >= 1, got 0"
    if case == "root-is-a-file":
        root.write_text("not a folder")
        args, expected = ["--root", str(root)], f"{root}: it is a file"
    assert synthps_main(args) == 2
    assert expected in _one_line_error(capsys, "qeeps-synthps")
    assert sorted(os.listdir(tmp_path)) == (["synthps"] if case == "root-is-a-file" else [])


# ---------------------------------------------------------------------------- qeeps-search
def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def search_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_bad")
    config, weights, _, _ = search_fixtures.save_model_files(str(root / "model"), guided=False)
    folder = root / "gallery"
    search_fixtures.write_image_folder(str(folder), 3, ext=".jpg")
    query = str(root / "query.png")
    cv2.imwrite(query, search_fixtures.random_image(7))
    return {"config": config, "weights": weights, "folder": str(folder), "query": query}


def test_truncated_jpeg_is_refused_by_name(tmp_path):
    path = str(tmp_path / "cut.jpg")
    cv2.imwrite(path, search_fixtures.random_image(1))
    _truncate(path)
    assert cv2.imread(path) is not None  # OpenCV would hand back a half-grey image
    with pytest.raises(ValueError, match="cannot read image .*cut.jpg: .*truncated"):
        read_image_bgr(path)


def test_truncated_gallery_image_is_skipped(search_files, tmp_path):
    folder = tmp_path / "gallery"
    shutil.copytree(search_files["folder"], folder)
    _truncate(str(folder / "img_01.jpg"))
    gallery = iter_gallery(str(folder))
    assert [f.name for f in gallery] == ["img_00.jpg", "img_02.jpg"]
    assert gallery.skipped == ["img_01.jpg"]


@pytest.mark.parametrize("case", ["truncated-query", "no-readable-gallery-image",
                                  "negative-box", "reversed-box", "nan-box"])
def test_search_user_errors(case, search_files, tmp_path, capsys):
    query, box, gallery = search_files["query"], "10,8,40,60", search_files["folder"]
    if case == "truncated-query":
        query = str(tmp_path / "query.jpg")
        cv2.imwrite(query, search_fixtures.random_image(7))
        _truncate(query)
        expected = f"cannot read image {query}"
    elif case == "no-readable-gallery-image":
        gallery = str(tmp_path / "broken")
        os.makedirs(gallery)
        shutil.copy(os.path.join(search_files["folder"], "img_00.jpg"), gallery)
        _truncate(os.path.join(gallery, "img_00.jpg"))
        open(os.path.join(gallery, "notes.png"), "w").write("text, not an image")
        expected = f"gallery folder {gallery}: none of its 2 image(s) could be read"
    elif case == "negative-box":
        box, expected = "-5,8,40,60", "lies outside the 96x64 image"
    elif case == "reversed-box":
        box, expected = "40,8,10,60", "is empty or not x1<x2, y1<y2"
    else:
        box, expected = "10,nan,40,60", "is empty or not x1<x2, y1<y2"
    out = tmp_path / "out"
    code = search_main(["--config", search_files["config"], "--weights", search_files["weights"],
                        "--query", query, f"--box={box}", "--gallery", gallery, "--out", str(out),
                        "--device", "cpu"])
    assert code == 2
    assert expected in _one_line_error(capsys, "qeeps-search")
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


# ---------------------------------------------------------------------------- qeeps-eval
@pytest.mark.parametrize("query, expected", [
    ({"index": "0", "image": "s5.jpg", "gallery": {}}, "index must be a non-negative integer"),
    ({"index": 0, "image": 5, "gallery": {}}, "image must be a non-empty string"),
    ({"index": 0, "image": "s5.jpg", "gallery": []}, "gallery must be an object"),
    ({"index": 0, "image": "s5.jpg", "gallery": {"s6.jpg": [["1", 2, 3, 4, 0.9, 0.1]]}},
     "rows must hold numbers only"),
    ({"index": 0, "image": "s5.jpg", "gallery": {"s6.jpg": [[1, 2, 3, 4, 0.9, None]]}},
     "rows must hold numbers only"),
    ({"index": 0, "image": "s5.jpg", "gallery": {"s6.jpg": [[30, 2, 3, 4, 0.9, 0.1]]}},
     "x2 < x1"),
])
def test_eval_results_with_wrong_types(query, expected, tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"format": "qeeps-results/1", "dataset": "cuhk_sysu_test",
                                "queries": [query]}))
    assert eval_main(["--dataset", "cuhk_sysu_test", str(path)]) == 2
    message = _one_line_error(capsys, "qeeps-eval")
    assert str(path) in message and expected in message
