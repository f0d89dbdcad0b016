"""ONNX export of the query-agnostic path (qeeps-export-onnx) and its runtime OnnxFrameEmbedder:
parity with PyTorch on SynthPS images (detections, scores, embeddings, query embeddings) at
several frame sizes, the metadata, empty results, the CLI's and the runtime's user errors.

Tolerances, from what was measured on these frames (largest absolute differences over the 10
frames): boxes 9.2e-5 px (SynthPS-like model), 3.9e-4 px (RGB shared-head model), 5.8e-4 px
(the guided model's first stage; its frames go up to 216 x 288 px: a few float32 ulps of the
box deltas times the box size); scores 3.8e-6; embedding components 4.0e-6, query embeddings
2.2e-6 (on the export's noise check input up to 6.7e-5). The trained SynthPS OIM model
(benchmarks/onnx_parity.py, 50 test images at two scales) stays within the same bounds: boxes
1.2e-4 px, scores 1.9e-6, embedding cosines >= 0.9999996.
The bounds below are 3-4x the largest box and score differences and 25x the embedding ones;
every mutation tried (normalisation skipped, channel order, resize skipped, boxes left in the
resized frame, threshold, query box not mapped, L2 norm dropped, MAX_SIZE_TEST ignored) breaks
them by orders of magnitude or changes the detection counts.
"""
import os
import warnings

import cv2
import numpy as np
import onnx
import pytest
import torch

from detectron2.export.torchscript_patch import patch_builtin_len
from detectron2.modeling import build_model
from detectron2.structures import Boxes

import model_fixtures
from qeeps_d2.checkpoint import QEEPSCheckpointer
from qeeps_d2.data.mapper import PersonSearchMapper
from qeeps_d2.data.synthps import generate_synthps
from qeeps_d2.export import FORMAT, decode_metadata, load_export_model
from qeeps_d2.export.cli import main
from qeeps_d2.search.embedder import FrameDetections
from qeeps_d2.search.onnx_backend import OnnxFrameEmbedder

BOX_ATOL = 2e-3  # px
SCORE_ATOL = 3e-5
EMBED_ATOL = 1e-4  # per component of a unit vector
# keep most of the random models' detections (scores about 0.12-0.55, RGB model 0.06-0.35)
DET_THRESH = 0.25
DET_THRESH_RGB = 0.08
SYNTHPS = dict(num_train_ids=4, num_test_ids=3, train_images=8, test_images=51,
               image_size=(96, 72), persons_per_image=(2, 4), appearances_per_id=(2, 6),
               illumination=1.0, gallery_sizes=(50,))


def _cfg(kind: str = "synthps"):
    """Tiny test configs. "synthps": configs/SynthPS/oim.yaml (BasicBlock ResNet, separate
    detection head, identity path pooled from res2 with its own stages, BGR); "rgb": the base
    config (bottleneck ResNet, shared head) with RGB input, to cover the other ROI path and the
    channel conversion; "guided": the base config with QSSE, QRPN and QSimNet on."""
    config = (os.path.join(model_fixtures.REPO, "configs", "SynthPS", "oim.yaml")
              if kind == "synthps" else None)
    guided = kind == "guided"
    cfg = model_fixtures.tiny_cfg(qsse=guided, qrpn=guided, qsimnet=guided, config_file=config)
    cfg.TEST.PERSON_SEARCH.DET_THRESH = DET_THRESH if kind == "synthps" else DET_THRESH_RGB
    if kind == "rgb":
        cfg.INPUT.FORMAT = "RGB"
        cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
        cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    return cfg


def _save_model(folder, kind: str):
    """Seeded tiny model with BatchNorm settled on scene images (so that it detects), saved as
    ``folder/config.yaml`` + ``folder/model.pth``; returns (config path, weights path)."""
    os.makedirs(folder, exist_ok=True)
    cfg = _cfg(kind)
    torch.manual_seed(0)
    model = build_model(cfg)
    model_fixtures.fill_oim_lut(model)
    model_fixtures.settle_batchnorm(model, model_fixtures.scene_inputs())
    if kind == "guided":  # its random detector scores people low: raise the person logit
        with torch.no_grad():
            model.roi_heads.box_predictor.cls_score.bias[0] += 2.5
    QEEPSCheckpointer(model, folder).save("model")
    config = os.path.join(folder, "config.yaml")
    with open(config, "w") as f:
        f.write(cfg.dump())
    return config, os.path.join(folder, "model.pth")


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """SynthPS frames (BGR) at several sizes, each also written as a lossless PNG for the
    PyTorch path's mapper: as generated (72 x 96), upscaled 1.5x, a portrait crop (whose resize
    hits MAX_SIZE_TEST) and a 3x upscale. Returns [(png path, image, annotated boxes)]."""
    root = tmp_path_factory.mktemp("onnx_frames")
    generate_synthps(str(root / "synthps"), seed=5, **SYNTHPS)
    folder = root / "synthps" / "Image" / "SSM"
    names = sorted(os.listdir(folder))[:4]
    out = []
    for k, name in enumerate(names):
        image = cv2.imread(str(folder / name))
        h, w = image.shape[:2]
        variants = [image, cv2.resize(image, (int(w * 1.5), int(h * 1.5)))]
        if k == 0:
            variants += [np.ascontiguousarray(image[:, 20:60]), cv2.resize(image, (3 * w, 3 * h))]
        for i, img in enumerate(variants):
            path = str(root / f"{k}_{i}.png")
            cv2.imwrite(path, img)
            ih, iw = img.shape[:2]
            boxes = np.array([[0.1 * iw, 0.2 * ih, 0.45 * iw, 0.95 * ih],
                              [0.5 * iw, 0.05 * ih, 0.9 * iw, 0.6 * ih]])
            out.append((path, img, boxes))
    return out


def _export(folder, kind: str):
    config, weights = _save_model(str(folder), kind)
    onnx_file = str(folder / "model.onnx")
    assert main(["--config-file", config, "--weights", weights, "--output", onnx_file]) == 0
    cfg, model = load_export_model(config, weights)
    return {"config": config, "weights": weights, "onnx": onnx_file, "cfg": cfg, "model": model,
            "mapper": PersonSearchMapper(cfg, is_train=False),
            "embedder": OnnxFrameEmbedder(onnx_file)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The SynthPS-like model exported through the CLI, and the same model in PyTorch."""
    return _export(tmp_path_factory.mktemp("onnx_synthps"), "synthps")


@pytest.fixture(scope="module")
def exported_rgb(tmp_path_factory):
    """The shared-head RGB model exported."""
    return _export(tmp_path_factory.mktemp("onnx_rgb"), "rgb")


def _pytorch_frame(exp, path):
    """The PyTorch path (mapper + model, as qeeps-search runs it): detections >= DET_THRESH."""
    with torch.no_grad():
        inst = exp["model"]([exp["mapper"]({"file_name": path})])[0]["instances"]
    inst = inst[inst.scores >= exp["cfg"].TEST.PERSON_SEARCH.DET_THRESH]
    return inst.pred_boxes.tensor.numpy(), inst.scores.numpy(), inst.pred_embeds.numpy()


def _pytorch_query(exp, path, box):
    with torch.no_grad():
        return exp["model"]([exp["mapper"]({"file_name": path, "query_box": list(box)})])[0][
            "query_embed"].numpy()


def _assert_frames_match(exp, frames):
    embedder = exp["embedder"]
    got = embedder.embed_frames([img for _, img, _ in frames])
    total = 0
    for (path, img, _), found in zip(frames, got):
        boxes, scores, embeds = _pytorch_frame(exp, path)
        assert isinstance(found, FrameDetections)
        assert len(found) == len(boxes), path
        np.testing.assert_allclose(found.boxes, boxes, rtol=0, atol=BOX_ATOL, err_msg=path)
        np.testing.assert_allclose(found.scores, scores, rtol=0, atol=SCORE_ATOL, err_msg=path)
        np.testing.assert_allclose(found.embeddings, embeds, rtol=0, atol=EMBED_ATOL,
                                   err_msg=path)
        np.testing.assert_allclose(np.linalg.norm(found.embeddings, axis=1), 1.0, atol=1e-5)
        assert (found.scores >= embedder.det_thresh).all()
        assert found.boxes.dtype == found.scores.dtype == found.embeddings.dtype == np.float32
        h, w = img.shape[:2]
        assert (found.boxes >= 0).all() and (found.boxes[:, [2, 3]] <= [w, h]).all()
        total += len(boxes)
    assert total >= 2 * len(frames)  # the comparison saw real detections


def test_detections_match_pytorch(exported, frames):
    _assert_frames_match(exported, frames)


def test_shared_head_rgb_model_matches_pytorch(exported_rgb, frames):
    _assert_frames_match(exported_rgb, frames)


@pytest.mark.parametrize("which", ["exported", "exported_rgb"])
def test_query_embeddings_match_pytorch(which, frames, request):
    exp = request.getfixturevalue(which)
    embedder = exp["embedder"]
    for path, img, boxes in frames[:4]:
        for box in boxes:
            got = embedder.embed_query(img, box)
            want = _pytorch_query(exp, path, box)
            assert got.shape == (embedder.embed_dim,) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=0, atol=EMBED_ATOL)
            assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


def test_metadata_carries_what_the_runtime_needs(exported):
    proto = onnx.load(exported["onnx"])
    onnx.checker.check_model(proto, full_check=True)
    meta = decode_metadata({p.key: p.value for p in proto.metadata_props}, exported["onnx"])
    cfg = exported["cfg"]
    assert meta["qeeps_format"] == FORMAT
    assert meta["graph"] == "query-agnostic" and meta["image_channels"] == "BGR"
    assert meta["input_format"] == "BGR"
    assert (meta["min_size_test"], meta["max_size_test"]) == (cfg.INPUT.MIN_SIZE_TEST,
                                                             cfg.INPUT.MAX_SIZE_TEST)
    assert meta["det_thresh"] == DET_THRESH and meta["embed_dim"] == cfg.MODEL.QEEPS.EMBED_DIM
    assert meta["pixel_mean"] == list(cfg.MODEL.PIXEL_MEAN)
    assert meta["config_file"] == exported["config"] and meta["weights"] == exported["weights"]
    assert len(meta["weights_sha256"]) == 64 and "QEEPS" in meta["config"]
    assert [i.name for i in proto.graph.input] == ["image", "original_size", "query_boxes"]
    embedder = exported["embedder"]
    assert embedder.embed_dim == cfg.MODEL.QEEPS.EMBED_DIM
    assert embedder.det_thresh == DET_THRESH


def test_det_thresh_override_and_empty_frames(exported, frames):
    _, img, _ = frames[0]
    default = exported["embedder"].embed_frames([img])[0]
    strict = OnnxFrameEmbedder(exported["onnx"], det_thresh=0.4).embed_frames([img])[0]
    assert (strict.scores >= 0.4).all() and len(strict) < len(default)
    np.testing.assert_array_equal(strict.boxes, default.boxes[default.scores >= 0.4])
    # a threshold nothing reaches: empty, well-shaped results (the graph runs the identity
    # path on no box at all)
    none = OnnxFrameEmbedder(exported["onnx"], det_thresh=1.1).embed_frames([img, img])
    for found in none:
        assert found.boxes.shape == (0, 4) and found.embeddings.shape == (0, 16)


def test_traced_identity_path_serves_any_box_count(exported):
    """The identity path traced on NO box must still embed boxes at run time (the trace takes
    QEEPSROIHeads._embed_per_image's general path, not the branch of the traced input)."""
    class Embed(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model  # a submodule: its weights are the traced module's

        def forward(self, res2, res4, boxes):
            features = {"res2": res2, "res4": res4}
            return self.model.roi_heads._embed_per_image(features, [Boxes(boxes)])[0]

    module = Embed(exported["model"]).eval()
    torch.manual_seed(0)
    res2, res4 = torch.rand(1, 32, 16, 24), torch.rand(1, 128, 4, 6)
    with torch.no_grad(), patch_builtin_len(["qeeps_d2.modeling.roi_heads"]), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (res2, res4, torch.zeros(0, 4)), check_trace=False)
    boxes = torch.tensor([[4.0, 4.0, 40.0, 60.0], [50.0, 10.0, 90.0, 62.0]])
    with torch.no_grad():
        got = traced(res2, res4, boxes)
        want = module(res2, res4, boxes)
    assert got.shape == (2, 16)
    torch.testing.assert_close(got, want)


def test_first_stage_of_a_query_guided_model(frames, tmp_path):
    """--first-stage: a QEEPS model (QSSE, QRPN, QSimNet on) exports its query-agnostic first
    stage, which equals the PyTorch model's gallery-image inference (no query)."""
    config, weights = _save_model(str(tmp_path), "guided")
    onnx_file = str(tmp_path / "first_stage.onnx")
    argv = ["--config-file", config, "--weights", weights, "--output", onnx_file]
    assert main(argv) == 2  # refused without the flag
    assert main(argv + ["--first-stage"]) == 0
    cfg, model = load_export_model(config, weights, first_stage=True)
    exp = {"cfg": cfg, "model": model, "mapper": PersonSearchMapper(cfg, is_train=False),
           "embedder": OnnxFrameEmbedder(onnx_file)}
    _assert_frames_match(exp, frames)
    embedder = exp["embedder"]
    assert embedder.metadata["graph"] == "query-agnostic first stage"
    path, img, boxes = frames[0]
    np.testing.assert_allclose(embedder.embed_query(img, boxes[0]),
                               _pytorch_query(exp, path, boxes[0]), rtol=0, atol=EMBED_ATOL)


# ---------------------------------------------------------------------------- user errors
def test_cli_user_errors_are_one_line(exported, tmp_path, capsys):
    config, weights = exported["config"], exported["weights"]
    out = str(tmp_path / "m.onnx")
    guided = model_fixtures.tiny_cfg(qsse=True, qrpn=True, qsimnet=True)
    guided_file = str(tmp_path / "guided.yaml")
    with open(guided_file, "w") as f:
        f.write(guided.dump())
    wider = _cfg("synthps")
    wider.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    wider_file = str(tmp_path / "wider.yaml")
    with open(wider_file, "w") as f:
        f.write(wider.dump())
    cases = [
        (["--config-file", str(tmp_path / "no.yaml"), "--weights", weights, "--output", out],
         "config file"),
        (["--config-file", config, "--weights", str(tmp_path / "no.pth"), "--output", out],
         "weights file"),
        (["--config-file", wider_file, "--weights", weights, "--output", out],
         "do not fit the config"),
        (["--config-file", guided_file, "--weights", weights, "--output", out],
         "query-guided model (MODEL.QEEPS.{QSSE,QRPN,QSIMNET}.ENABLED)"),
        (["--config-file", config, "--weights", weights, "--output", str(tmp_path / "m.txt")],
         "must end in .onnx"),
        (["--config-file", config, "--weights", weights, "--output", out, "--opts", "A"],
         "KEY VALUE pairs"),
        (["--config-file", config, "--weights", weights, "--output", out,
          "--opts", "MODEL.NO_SUCH_KEY", "1"], "NO_SUCH_KEY"),
        (["--config-file", config, "--weights", weights, "--output", out,
          "--sample-image", str(tmp_path / "none.png")], "--sample-image"),
        (["--config-file", config, "--output", out], "--weights"),
    ]
    for argv, words in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("qeeps-export-onnx: error: ") and words in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out)  # nothing written by a failed export


def test_a_failed_check_writes_nothing(exported, tmp_path, monkeypatch, capsys):
    from qeeps_d2.export import onnx_export

    monkeypatch.setattr(onnx_export, "_CHECK_TOLERANCE", dict.fromkeys(onnx_export.OUTPUT_NAMES,
                                                                        -1.0))
    out = str(tmp_path / "m.onnx")
    argv = ["--config-file", exported["config"], "--weights", exported["weights"], "--output",
            out]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "export check: boxes differ by" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary one


def test_runtime_rejects_files_that_are_not_exports(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        OnnxFrameEmbedder(str(tmp_path / "none.onnx"))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.onnx: onnxruntime cannot load it"):
        OnnxFrameEmbedder(str(garbage))
    # a valid ONNX model without the export's metadata
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    plain = str(tmp_path / "plain.onnx")
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
              plain)
    with pytest.raises(ValueError, match="not a qeeps-export-onnx file"):
        OnnxFrameEmbedder(plain)


def test_runtime_input_errors(exported, frames):
    embedder = exported["embedder"]
    _, img, _ = frames[0]
    h, w = img.shape[:2]
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        embedder.embed_frames([img.astype(np.float32)])
    with pytest.raises(ValueError, match="outside"):
        embedder.embed_query(img, (0, 0, w + 10, h))
    with pytest.raises(ValueError, match="empty"):
        embedder.embed_query(img, (30, 10, 20, 40))
    with pytest.raises(ValueError, match=r"\(x1, y1, x2, y2\)"):
        embedder.embed_query(img, (1, 2, 3))
