"""Identity pretraining of the trunk: the stand-in for the paper's ImageNet start on SynthPS.

The paper's models start from ImageNet ResNet weights; no model hub is reachable here, and a
trunk trained from scratch by the detection losses holds almost no identity (SynthPS OIM G100 mAP
about 4). This module trains the identity path of a QEEPS model (backbone res2..res4, the res5
head and the re-id embedding head) as an identity classifier on a SynthPS data set generated
with another seed, whose identities are disjoint from ``synthps_train`` and ``synthps_test``,
and writes a Detectron2 checkpoint that ``MODEL.WEIGHTS`` loads:

1. crops: person crops (``CROP_SIZE``) through backbone + res5 + embedding, many per step
   (cheap: most of the identity is learned here);
2. ROI path: whole scene images, the boxes pooled on res4 exactly as the detector pools its
   proposals (ROIAlign, res5, mean), so the features work in the model's own path (the crop
   stage alone scored annotated-box mAP 7 through it, measured by an earlier probe); with a
   person / background logit on the same features, so that the trunk still tells people from
   clutter and from shifted parts of people.

Both stages train a cosine classifier over the pretraining identities (normalised weights,
scale ``SCALE``); it and the person logit are dropped afterwards. Knobs: ``cfg.PRETRAIN``.

    python -m qeeps_d2.engine.pretrain --config-file configs/SynthPS/oim.yaml \
        [--out output/synthps/pretrain/model_final.pth] [--eval] [KEY VALUE ...]
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.utils.events import EventStorage
from torch import nn

__all__ = ["pretrain_identity", "ensure_pretrained", "main"]

logger = logging.getLogger("qeeps_d2.pretrain")


def pretrain_root(p) -> str:
    """``$DETECTRON2_DATASETS/synthps_pretrain_s<seed>_<ids>``: the pretraining set's folder."""
    from qeeps_d2.data.datasets.catalog import datasets_root

    return os.path.join(datasets_root(), f"synthps_pretrain_s{p.SEED}_{p.NUM_IDS}")


def _pretrain_records(p) -> List[Dict]:
    """Training dicts of the pretraining SynthPS (``cfg.PRETRAIN`` = ``p``; generated on first
    use, with the default SynthPS look and difficulty; its small test split is not used)."""
    from qeeps_d2.data.datasets.cuhk_sysu import load_cuhk_sysu
    from qeeps_d2.data.synthps import ensure_synthps

    if p.SEED == 0:
        raise ValueError("PRETRAIN.SEED must differ from 0, the seed of synthps_train/test: the "
                         "pretraining identities must be disjoint from theirs")
    root = ensure_synthps(pretrain_root(p), seed=p.SEED, num_train_ids=p.NUM_IDS,
                          train_images=p.IMAGES, num_test_ids=10, test_images=101,
                          gallery_sizes=(50,))
    return load_cuhk_sysu(root, "train")


class CosineClassifier(nn.Module):
    """(N, D) unit embeddings -> (N, K) logits ``scale * cos(x, w_k)``."""

    def __init__(self, dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x @ F.normalize(self.weight, dim=1).t()


def _load_images(records: Sequence[Dict]) -> List[np.ndarray]:
    return [cv2.imread(r["file_name"], cv2.IMREAD_COLOR) for r in records]


def _labeled(records: Sequence[Dict]) -> List[Tuple[int, np.ndarray, int]]:
    """(image index, XYXY box, pid) of every labeled person."""
    out = []
    for i, r in enumerate(records):
        for a in r["annotations"]:
            if a["person_id"] >= 0:
                out.append((i, np.asarray(a["bbox"], dtype=np.float32), int(a["person_id"])))
    return out


def _jitter(box: np.ndarray, rng: np.random.RandomState, frac: float, w: int, h: int) -> np.ndarray:
    bw, bh = box[2] - box[0], box[3] - box[1]
    d = rng.uniform(-frac, frac, size=4) * np.array([bw, bh, bw, bh])
    b = box + d
    b[[0, 2]] = np.clip(b[[0, 2]], 0, w - 1)
    b[[1, 3]] = np.clip(b[[1, 3]], 0, h - 1)
    if b[2] - b[0] < 4 or b[3] - b[1] < 4:
        return box
    return b


def _normalize(model, images_bgr: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float BGR 0..255 -> the model's normalised input."""
    return (images_bgr - model.pixel_mean) / model.pixel_std


def _crop_batch(images, samples, rng, size):
    w, h = size
    crops, pids = [], []
    for i, box, pid in samples:
        img = images[i]
        b = _jitter(box, rng, 0.08, img.shape[1], img.shape[0]).round().astype(int)
        crop = img[b[1]:b[3], b[0]:b[2]]
        crop = cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)
        if rng.rand() < 0.5:
            crop = crop[:, ::-1]
        crops.append(crop)
        pids.append(pid)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(crops))).permute(0, 3, 1, 2).float()
    return x, torch.as_tensor(pids)


def _crop_embed(model, x: torch.Tensor) -> torch.Tensor:
    """Crops (N, 3, h, w) -> (N, D) embeddings: backbone, res5, mean, re-id head; with
    MODEL.QEEPS.ID_POOLER, the backbone up to its stage, then the identity path's own."""
    heads = model.roi_heads
    x = _normalize(model, x)
    if heads.id_pooler is not None:
        feats = heads.identity_features(model.backbone.forward_to(x, heads.id_in_feature))
    else:
        feats = heads.res5(model.backbone(x)[heads.in_features[0]]).mean(dim=(2, 3))
    return heads.reid_head(feats)


def _share_identity_stages(model) -> None:
    """With MODEL.QEEPS.ID_POOLER.OWN_STAGES, start the backbone's stages (the detector's) from
    the identity path's copies that the crop stage trained, as the shared stages would be."""
    id_trunk = model.roi_heads.id_trunk
    if id_trunk is not None:
        for name, stage in id_trunk.items():
            getattr(model.backbone, name).load_state_dict(stage.state_dict(), strict=False)


def _background_boxes(rng, persons: np.ndarray, w: int, h: int, count: int) -> np.ndarray:
    """Up to ``count`` background boxes (K, 4): half are persons' boxes shifted or rescaled
    until their IoU with every person is below 0.5 (the part-of-a-person ROIs the detector must
    reject, so the features learn where a person is, not only that one is near), half random
    person-shaped boxes with IoU < 0.3 with every person (clutter)."""
    from qeeps_d2.evaluation.box_iou import box_iou

    out = []
    for attempt in range(8 * count):
        if len(out) == count:
            break
        if attempt % 2 == 0 and len(persons):
            p = persons[rng.randint(len(persons))]
            pw, ph = p[2] - p[0], p[3] - p[1]
            s = np.exp(rng.uniform(-0.7, 0.7))
            cx = (p[0] + p[2]) / 2 + rng.uniform(-0.8, 0.8) * pw
            cy = (p[1] + p[3]) / 2 + rng.uniform(-0.6, 0.6) * ph
            box = np.array([cx - s * pw / 2, cy - s * ph / 2, cx + s * pw / 2, cy + s * ph / 2])
            box = np.clip(box, 0, [w, h, w, h]).astype(np.float32)
            limit = 0.5
        else:
            bh = rng.uniform(0.2, 0.8) * h
            bw = bh * rng.uniform(0.3, 0.6)
            x0, y0 = rng.uniform(0, max(w - bw, 1)), rng.uniform(0, max(h - bh, 1))
            box = np.array([x0, y0, x0 + bw, y0 + bh], dtype=np.float32)
            limit = 0.3
        if box[2] - box[0] < 8 or box[3] - box[1] < 8:
            continue
        if all(box_iou(box, q) < limit for q in persons):
            out.append(box)
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def _scene_batch(images, records, idx, rng, num_background: int):
    """Scene images (same size assumed), randomly flipped, with their ROIs: every person's box,
    slightly jittered (pid -1 for unlabeled people), then ``num_background`` background boxes
    (:func:`_background_boxes`).

    Returns:
        images (N, 3, H, W) float BGR, list of N ``Boxes`` (R ROIs in all), pids (R,) int64
        (>= 0 only on labeled people), is_person (R,) bool, list of N (P_i, 4) float32 arrays
        (every person's annotated box, flipped with its image).
    """
    from detectron2.structures import Boxes

    xs, boxes, pids, person, people = [], [], [], [], []
    for i in idx:
        img = images[i]
        h, w = img.shape[:2]
        flip = rng.rand() < 0.5
        if flip:
            img = img[:, ::-1]
        gts, rois, p = [], [], []
        for a in records[i]["annotations"]:
            g = np.asarray(a["bbox"], dtype=np.float32)
            if flip:
                g = np.array([w - g[2], g[1], w - g[0], g[3]], dtype=np.float32)
            gts.append(g)
            rois.append(_jitter(g, rng, 0.05, w, h))
            p.append(a["person_id"])
        num_pos = len(rois)
        people.append(np.asarray(gts, np.float32).reshape(-1, 4))
        bg = _background_boxes(rng, np.asarray(gts), w, h, num_background)
        rois = np.concatenate([np.asarray(rois, np.float32).reshape(-1, 4), bg])
        xs.append(np.ascontiguousarray(img))
        boxes.append(Boxes(torch.as_tensor(rois)))
        pids.extend(p + [-1] * len(bg))
        person.extend([True] * num_pos + [False] * len(bg))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float()
    return x, boxes, torch.as_tensor(pids), torch.as_tensor(person), people


def _detection_loss(model, x: torch.Tensor, features: Dict[str, torch.Tensor],
                    people: Sequence[np.ndarray]) -> torch.Tensor:
    """The detector's own losses on a scene batch: RPN objectness + box regression, then ClsNet +
    RegNet (the detection head) on proposals sampled as in training. x: (N, 3, H, W) normalised
    images; people: N (P_i, 4) XYXY person boxes. Needs an ``EventStorage``."""
    from detectron2.structures import Boxes, ImageList, Instances

    h, w = x.shape[-2:]
    targets = []
    for boxes in people:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.as_tensor(boxes, device=x.device))
        inst.gt_classes = torch.zeros(len(boxes), dtype=torch.int64, device=x.device)
        targets.append(inst)
    proposals, losses = model.proposal_generator(ImageList(x, [(h, w)] * len(x)), features,
                                                 targets)
    heads = model.roi_heads
    sampled = heads.label_and_sample_proposals(proposals, targets)
    predictions = heads.box_predictor(
        heads.det_box_features(features, [p.proposal_boxes for p in sampled]))
    losses.update(heads.box_predictor.losses(predictions, sampled))
    return sum(losses.values())


def _optimizer(params, p, iters: int):
    opt = torch.optim.AdamW(params, lr=p.LR, weight_decay=p.WEIGHT_DECAY)
    warm = max(1, iters // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: min(1.0, (it + 1) / warm) * 0.5 * (1 + math.cos(math.pi * it / max(iters, 1))))
    return opt, sched


def _identity_params(model) -> List[nn.Parameter]:
    mods = [model.backbone, model.roi_heads.res5, model.roi_heads.reid_head]
    if model.roi_heads.id_trunk is not None:
        mods.append(model.roi_heads.id_trunk)
    return [p for m in mods for p in m.parameters() if p.requires_grad]


def _detector_params(model) -> List[nn.Parameter]:
    """The RPN and the detection head (its own res5 when MODEL.QEEPS.DET_HEAD is "separate")."""
    heads = model.roi_heads
    mods = [model.proposal_generator, heads.box_predictor]
    if heads.det_res5 is not None:
        mods.append(heads.det_res5)
    return [p for m in mods for p in m.parameters() if p.requires_grad]


def pretrain_identity(model, p, log_every: int = 50, echo=None) -> Dict[str, float]:
    """Train ``model``'s identity path in place with the knobs ``p`` (= ``cfg.PRETRAIN``; see
    the module docstring).

    Returns:
        ({"crop_s", "scene_s"}: wall time of each stage in seconds, {"crop", "scene"}: the
        loss of every step of each stage)."""
    records = [r for r in _pretrain_records(p) if any(a["person_id"] >= 0 for a in r["annotations"])]
    images = _load_images(records)
    if getattr(model, "input_format", "BGR") == "RGB":  # the model's INPUT.FORMAT
        images = [np.ascontiguousarray(im[:, :, ::-1]) for im in images]
    samples = _labeled(records)
    num_ids = 1 + max(p for _, _, p in samples)
    rng = np.random.RandomState(p.SEED)
    torch.manual_seed(p.SEED)
    dim = model.roi_heads.reid_head.proj.out_features
    classifier = CosineClassifier(dim, num_ids, p.SCALE).to(model.device)
    say = echo or logger.info
    model.train()
    times = {}
    losses = {"crop": [], "scene": []}

    def run_stage(name: str, iters: int, params, batch_loss) -> None:
        """``iters`` AdamW steps on ``batch_loss() -> (loss, logits, pids)``; logs, times."""
        opt, sched = _optimizer(params, p, iters)
        start = time.perf_counter()
        for it in range(iters):
            loss, logits, pids = batch_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses[name].append(loss.item())
            if (it + 1) % log_every == 0:
                acc = (logits.argmax(1) == pids).float().mean().item()
                say(f"{name}s {it + 1}/{iters}: loss {loss.item():.3f}, training accuracy "
                    f"{acc:.2f} ({time.perf_counter() - start:.0f} s)")
        times[f"{name}_s"] = time.perf_counter() - start

    def crop_loss():
        batch = [samples[j] for j in rng.randint(len(samples), size=p.CROP_BATCH)]
        x, pids = _crop_batch(images, batch, rng, tuple(p.CROP_SIZE))
        x, pids = x.to(model.device), pids.to(model.device)
        logits = classifier(_crop_embed(model, x))
        return F.cross_entropy(logits, pids, label_smoothing=0.1), logits, pids

    # stage 2's person / background logit on the same pooled features (dropped afterwards)
    # keeps the trunk telling people from clutter and from parts of people, which ClsNet needs
    # later. (Training the detector's own box predictor here, with its regression, was measured
    # worse: annotated-box mAP 30.0 instead of 38.9.)
    person_head = nn.Linear(model.roi_heads.res5[-1].out_channels, 1).to(model.device)

    def scene_loss():
        idx = rng.randint(len(records), size=p.ROI_BATCH)
        x, boxes, pids, is_person, people = _scene_batch(images, records, idx, rng,
                                                         p.ROI_BACKGROUND)
        x, pids, is_person = x.to(model.device), pids.to(model.device), is_person.to(model.device)
        boxes = [b.to(model.device) for b in boxes]
        x = _normalize(model, x)
        features = model.backbone(x)
        feats = model.roi_heads.box_features(features, boxes)
        labeled = pids >= 0
        logits, pids = classifier(model.roi_heads.reid_head(feats[labeled])), pids[labeled]
        loss = F.cross_entropy(logits, pids, label_smoothing=0.1)
        loss = loss + F.binary_cross_entropy_with_logits(person_head(feats)[:, 0],
                                                         is_person.float())
        if p.DETECTION:
            loss = loss + _detection_loss(model, x, features, people)
        return loss, logits, pids

    params = _identity_params(model) + list(classifier.parameters())
    run_stage("crop", p.CROP_ITERS, params, crop_loss)
    _share_identity_stages(model)
    scene_params = params + list(person_head.parameters())
    if p.DETECTION:
        scene_params += _detector_params(model)
    with EventStorage():  # the detector's losses log their statistics there
        run_stage("scene", p.ROI_ITERS, scene_params, scene_loss)
    model.eval()
    return times, losses


def _trainable_trunk(cfg):
    """The config with every trunk layer trainable: pretraining starts from scratch, so frozen
    stages (``MODEL.BACKBONE.FREEZE_AT``) would stay random and ``FrozenBN`` would keep identity
    statistics; it trains BatchNorm instead, whose statistics the target's ``FrozenBN`` loads."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    if cfg.MODEL.RESNETS.NORM == "FrozenBN":
        cfg.MODEL.RESNETS.NORM = "BN"
    cfg.freeze()
    return cfg


PRETRAINED_KEYS = ("backbone.", "roi_heads.res5.", "roi_heads.reid_head.", "roi_heads.id_trunk.")
# with PRETRAIN.DETECTION, the detector trained in stage 2 too
DETECTOR_KEYS = ("proposal_generator.", "roi_heads.det_res5.", "roi_heads.box_predictor.")


def _check_pretrained(path: str, detection: bool) -> None:
    """An existing checkpoint must hold what PRETRAIN asks for: one written before
    PRETRAIN.DETECTION (no detector) would silently start the detector from scratch."""
    if not detection:
        return
    state = torch.load(path, map_location="cpu", weights_only=True).get("model", {})
    if not any(k.startswith(DETECTOR_KEYS) for k in state):
        raise RuntimeError(
            f"{path} holds an identity pretraining without the detector, while "
            f"PRETRAIN.DETECTION is on: delete it to pretrain again (or pass "
            f"PRETRAIN.DETECTION False to use it as it is)")


def ensure_pretrained(config_file: str, path: str, opts: Sequence[str] = (), echo=None,
                      init: str = "") -> str:
    """``path`` if it exists, else pretrain the identity path of the model of ``config_file``
    and save it there (atomically) as a checkpoint that ``MODEL.WEIGHTS`` loads: the backbone,
    res5 and re-id head weights (``PRETRAINED_KEYS``)."""
    from detectron2.modeling import build_model

    from qeeps_d2.engine.trainer import setup_cfg
    from qeeps_d2.utils.atomic_write import write_atomically

    cfg = setup_cfg(config_file, list(opts), resolve_schedule=False)
    if os.path.isfile(path):
        _check_pretrained(path, cfg.PRETRAIN.DETECTION)
        return path
    cfg = _trainable_trunk(cfg)
    torch.manual_seed(cfg.PRETRAIN.SEED)
    model = build_model(cfg)
    if init:  # continue from earlier weights (experiments)
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(model).load(init)
    times, _ = pretrain_identity(model, cfg.PRETRAIN, echo=echo)
    keys = PRETRAINED_KEYS + (DETECTOR_KEYS if cfg.PRETRAIN.DETECTION else ())
    state = {k: v.cpu() for k, v in model.state_dict().items() if k.startswith(keys)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, lambda f: torch.save({"model": state, "pretrain_s": times}, f))
    (echo or logger.info)(f"identity pretraining done in {sum(times.values()) / 60:.1f} min: {path}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="the model to pretrain (e.g. "
                        "configs/SynthPS/oim.yaml); its PRETRAIN keys set the run")
    parser.add_argument("--out", default="output/synthps/pretrain/model_final.pth",
                        help="checkpoint to write (kept if it exists)")
    parser.add_argument("--eval", action="store_true",
                        help="then score search on the config's test set with the annotated "
                             "boxes (TEST.PERSON_SEARCH.USE_GT_BOXES)")
    parser.add_argument("--init", default="", help="start from these weights instead of from "
                        "scratch")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = ensure_pretrained(args.config_file, args.out, args.opts, init=args.init)
    if args.eval:  # the identity path alone: search with the annotated boxes
        from qeeps_d2.checkpoint import QEEPSCheckpointer
        from qeeps_d2.engine.trainer import Trainer, setup_cfg

        cfg = setup_cfg(args.config_file, [
            "MODEL.WEIGHTS", path, "TEST.PERSON_SEARCH.USE_GT_BOXES", "True",
            "OUTPUT_DIR", os.path.join(os.path.dirname(path), "eval"), *args.opts],
            resolve_schedule=False)
        model = Trainer.build_model(cfg)
        QEEPSCheckpointer(model).load(path)
        Trainer.test(cfg, model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
