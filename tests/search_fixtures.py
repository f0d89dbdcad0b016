"""Tiny trained-looking models saved as config + weights files, and small galleries on disk
(image folders, an MJPG video) for the qeeps-search tests."""
import os

import cv2
import numpy as np
import torch

from detectron2.modeling import build_model

import model_fixtures
from qeeps_d2.checkpoint import QEEPSCheckpointer

FRAME_H, FRAME_W = 64, 96
# detections below this are dropped by the search (some of the tiny models' detections are)
DET_THRESH = 0.3


def tiny_search_cfg(guided: bool):
    """The tiny test config (all three query-guidance blocks on or off) keeping low-score boxes."""
    cfg = model_fixtures.tiny_cfg(qsse=guided, qrpn=guided, qsimnet=guided)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    # the paper's ClsNet cut before the QSimNet NMS (not DET_THRESH): the guided model keeps
    # low-score boxes too, and the search's own DET_THRESH filter matters for it
    cfg.MODEL.QEEPS.QSIMNET.MIN_DET_SCORE = 0.01
    cfg.TEST.PERSON_SEARCH.DET_THRESH = DET_THRESH
    return cfg


def save_model_files(folder: str, guided: bool):
    """Build a seeded tiny model (BN statistics settled so that it detects), save it as
    ``folder/model.pth`` with its config ``folder/config.yaml``.

    Returns:
        (config path, weights path, cfg, model in eval mode)
    """
    os.makedirs(folder, exist_ok=True)
    cfg = tiny_search_cfg(guided)
    torch.manual_seed(0)
    model = build_model(cfg)
    model_fixtures.fill_oim_lut(model)
    inputs = model_fixtures.pair_inputs() if guided else model_fixtures.scene_inputs()
    model_fixtures.settle_batchnorm(model, inputs)
    QEEPSCheckpointer(model, folder).save("model")
    config = os.path.join(folder, "config.yaml")
    with open(config, "w") as f:
        f.write(cfg.dump())
    return config, os.path.join(folder, "model.pth"), cfg, model


def write_wider_config(path: str, guided: bool) -> str:
    """A config of the same model with twice the widths (its weights do not fit)."""
    cfg = tiny_search_cfg(guided)
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 16
    with open(path, "w") as f:
        f.write(cfg.dump())
    return path


def random_image(seed: int, h: int = FRAME_H, w: int = FRAME_W) -> np.ndarray:
    """A seeded (h, w, 3) uint8 BGR image of coloured blocks (it compresses, so JPEG/MJPG keep it
    recognisable)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:h, :w])


def write_image_folder(folder: str, count: int, ext: str = ".png") -> list:
    """``count`` seeded images ``img_00.png``... (lossless by default); returns their arrays."""
    os.makedirs(folder, exist_ok=True)
    images = [random_image(100 + i) for i in range(count)]
    for i, image in enumerate(images):
        assert cv2.imwrite(os.path.join(folder, f"img_{i:02d}{ext}"), image)
    return images


def write_video(path: str, count: int = 20) -> list:
    """An MJPG ``.avi`` of ``count`` 96x64 seeded frames; frame i has its top-left 16x16 block at
    grey level 10 * i + 5, so a decoded frame tells its index (see :func:`frame_level`).
    Returns the frames as written."""
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (FRAME_W, FRAME_H))
    assert writer.isOpened()
    frames = []
    for i in range(count):
        frame = random_image(200 + i)
        frame[:16, :16] = 10 * i + 5
        writer.write(frame)
        frames.append(frame)
    writer.release()
    return frames


def frame_level(image: np.ndarray) -> int:
    """The frame number written into a frame by :func:`write_video`."""
    return int(round((float(image[2:14, 2:14].mean()) - 5) / 10))
