"""SynthPS: the embedded procedural person-search benchmark, written in the CUHK-SYSU layout.

A data set is generated deterministically from a seed (numpy + OpenCV only, no torch):

- identities with a persistent :class:`~qeeps_d2.data.synthps.render.Appearance` (body
  proportions, clothing colours and textures, logo, hat, bag, skin and hair), each seen in 4..10
  images (``appearances_per_id``) at different scales, poses, facing directions and occlusions;
- look-alike groups: 2..3 identities that share everything but one local attribute (logo shape,
  the pattern of one garment, or the hat), so that global colour is not enough;
- unlabeled passers-by (random appearance, in no identity list) in every image;
- cluttered backgrounds, non-person distractors with clothing colours, per-image illumination
  gain, colour cast, side light, noise and blur.

Train and test identities are disjoint, and so are train images and test (pool) images. The
files are the ones of CUHK-SYSU (``Image/SSM/s<N>.jpg``, ``annotation/Images.mat``,
``annotation/pool.mat``, ``annotation/test/train_test/{Train,TestG50,TestG100}.mat``), written by
:func:`qeeps_d2.data.datasets.cuhk_sysu.write_cuhk_sysu`, plus ``synthps.json`` (seed, knobs, statistics).
Each test identity has one query (``ishard`` = 1 when the query person is occluded); its gallery
lists hold all its other appearances first, then pool images without it.

Command line: :mod:`qeeps_d2.data.synthps.cli`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..datasets.cuhk_sysu import GALLERY_SIZES, write_cuhk_sysu
from .render import (
    LOOKALIKE_ATTRIBUTES,
    Appearance,
    apply_camera,
    draw_background,
    draw_occluder,
    lookalike_variant,
    paste_person,
    person_canvas_width,
    render_person,
    sample_appearance,
    sample_pose,
)

__all__ = ["DEFAULT_KNOBS", "generate_synthps", "ensure_synthps", "knob_differences", "synthps_stats",
           "format_synthps_stats", "main"]

logger = logging.getLogger(__name__)

META_FILE = "synthps.json"
_FORMAT = "synthps/1"
_JPEG_QUALITY = 90

# Defaults sized for the CPU demo (training in minutes on two cores).
DEFAULT_KNOBS = {
    "num_train_ids": 120,           # labeled training identities
    "num_test_ids": 60,             # test identities = queries
    "train_images": 400,            # training scene images
    "test_images": 200,             # test (pool) scene images
    "image_size": (360, 240),       # (width, height) in pixels
    "persons_per_image": (3, 7),    # inclusive range of people per image
    "appearances_per_id": (4, 10),  # inclusive range of images each identity appears in
    "lookalike_fraction": 0.3,      # fraction of identities in look-alike groups
    "occlusion_rate": 0.3,          # chance that a person is occluded (object, person, border)
    "illumination": 0.5,            # strength of illumination gain / colour cast (0 = none)
    "gallery_sizes": (50, 100),     # TestG<N>.mat files written
}


@dataclass
class _ImageLayout:
    """The people of one scene image before rendering: appearances and identity indices."""

    appearances: List[Appearance]
    identities: List[int]  # index into the identity list, -1 for an unlabeled person


def _check_knobs(knobs: Dict) -> Dict:
    """Completes ``knobs`` with the defaults and checks them; raises ValueError naming the knob."""
    unknown = sorted(set(knobs) - set(DEFAULT_KNOBS))
    if unknown:
        raise ValueError(f"unknown SynthPS knob(s) {unknown}; known: {sorted(DEFAULT_KNOBS)}")
    k = {**DEFAULT_KNOBS, **knobs}
    k["image_size"] = tuple(int(v) for v in k["image_size"])
    k["persons_per_image"] = tuple(int(v) for v in k["persons_per_image"])
    k["appearances_per_id"] = tuple(int(v) for v in k["appearances_per_id"])
    k["gallery_sizes"] = tuple(sorted(int(v) for v in k["gallery_sizes"]))
    width, height = k["image_size"]
    lo, hi = k["persons_per_image"]
    if width < 64 or height < 64:
        raise ValueError(f"image_size must be at least 64x64, got {width}x{height}")
    if not 2 <= lo <= hi:
        raise ValueError(f"persons_per_image must satisfy 2 <= min <= max, got {(lo, hi)}")
    lo, hi = k["appearances_per_id"]
    if not 2 <= lo <= hi:
        raise ValueError(f"appearances_per_id must satisfy 2 <= min <= max, got {(lo, hi)}")
    for name in ("num_train_ids", "num_test_ids", "train_images", "test_images"):
        if int(k[name]) < 1:
            raise ValueError(f"{name} must be >= 1, got {k[name]}")
        k[name] = int(k[name])
    for name in ("lookalike_fraction", "occlusion_rate"):
        if not 0.0 <= float(k[name]) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {k[name]}")
    if float(k["illumination"]) < 0:
        raise ValueError(f"illumination must be >= 0, got {k['illumination']}")
    if 50 not in k["gallery_sizes"] or not set(k["gallery_sizes"]) <= set(GALLERY_SIZES):
        raise ValueError(f"gallery_sizes must include 50 and be among {GALLERY_SIZES} (the "
                         f"CUHK-SYSU TestG files), got {k['gallery_sizes']}")
    if k["test_images"] < k["gallery_sizes"][-1] + 1:
        raise ValueError(f"test_images={k['test_images']} is too small for a gallery of "
                         f"{k['gallery_sizes'][-1]} images plus the query image")
    return k


def _sample_identities(rng: np.random.Generator, count: int, lookalike_fraction: float
                       ) -> List[Appearance]:
    """``count`` appearances; about ``lookalike_fraction`` of them in look-alike groups of 2..3."""
    appearances: List[Appearance] = []
    in_groups = int(round(lookalike_fraction * count))
    while len(appearances) < in_groups:
        size = min(int(rng.integers(2, 4)), in_groups - len(appearances))
        base = sample_appearance(rng)
        if size < 2:
            appearances.append(base)
            break
        attributes = sorted(LOOKALIKE_ATTRIBUTES)
        attribute = attributes[int(rng.integers(len(attributes)))]
        values = rng.choice(LOOKALIKE_ATTRIBUTES[attribute], size=size, replace=False)
        appearances.extend(lookalike_variant(base, attribute, str(v)) for v in values)
    while len(appearances) < count:
        appearances.append(sample_appearance(rng))
    return [appearances[i] for i in rng.permutation(count)]


def _allocate(rng: np.random.Generator, num_ids: int, images: Sequence[int],
              capacity: np.ndarray, split: str, appearances: Tuple[int, int]
              ) -> List[List[int]]:
    """Chooses the images each identity appears in (``lo + Poisson(3/8 (hi - lo))`` distinct
    images, at most ``hi``, for ``appearances = (lo, hi)``; at most one appearance per image),
    using at most ``capacity[i]`` labeled slots of image ``i``.

    Returns, per identity, the sorted image indices. Raises ValueError when the images lack room.
    """
    images = np.asarray(images)
    lo, hi = appearances
    result = []
    for identity in range(num_ids):
        wanted = int(min(lo + rng.poisson(0.375 * (hi - lo)), hi))
        free = images[capacity[images] > 0]
        if len(free) < 2:
            raise ValueError(f"SynthPS {split}: not enough images / persons per image for "
                             f"{num_ids} identities (ran out at identity {identity}); add images "
                             f"or persons_per_image, or use fewer identities")
        weights = capacity[free].astype(np.float64)
        chosen = rng.choice(free, size=min(wanted, len(free)), replace=False, p=weights / weights.sum())
        capacity[chosen] -= 1
        result.append(sorted(int(i) for i in chosen))
    return result


def _place_people(rng: np.random.Generator, appearances: Sequence[Appearance], width: int,
                  height: int, horizon: float, occlusion_rate: float):
    """Chooses size, pose and position of each person so that every one stays visible: at
    least half of it inside the image, and its body box at most 20 % covered by the others' (55 %
    for the ``occlusion_rate`` share placed next to another person on purpose; limits relax in
    crowded images).

    Returns a list over persons of ``(image, mask, x0, y0, feet, cut)``: the rendered person,
    its top-left corner in the scene, its feet row (drawing order) and whether the image border
    cuts it.
    """
    scale = height / 240.0
    hmin, hmax = 50.0 * scale, min(200.0 * scale, 0.95 * height)
    placed = []
    bodies: List[Tuple[float, float, float, float]] = []
    for app in appearances:
        best = None
        for attempt in range(25):
            h = int(round(np.exp(rng.uniform(np.log(hmin), np.log(hmax)))))
            t = (h - hmin) / max(hmax - hmin, 1.0)
            feet = horizon + (height - horizon) * (0.2 + 0.8 * t) + rng.normal(0, 0.04 * height)
            feet = float(np.clip(feet, h * 0.98, height))
            pose = sample_pose(rng)
            w = person_canvas_width(h)
            x0 = rng.uniform(-0.15 * w, width - 0.85 * w)
            cut = rng.uniform() < 0.3 * occlusion_rate
            if cut:
                side = rng.integers(3)
                if side == 0:
                    x0 = -rng.uniform(0.35, 0.5) * w
                elif side == 1:
                    x0 = width - rng.uniform(0.5, 0.65) * w
                else:
                    feet = height + rng.uniform(0.15, 0.35) * h
            x0, y0 = int(round(x0)), int(round(feet)) - h
            body = (x0 + 0.2 * w, y0, x0 + 0.8 * w, y0 + h)
            near = rng.uniform() < 0.4 * occlusion_rate
            overlap = max((_overlap(body, b) for b in bodies), default=0.0)
            allowed = (0.55 if near else 0.2) + 0.04 * attempt  # relaxed in crowded images
            if overlap > allowed or (near and bodies and overlap < 0.15 and attempt < 20):
                continue
            image, mask = render_person(app, pose, h)
            visible = _visible_fraction(mask, x0, y0, width, height)
            if visible < 0.5:
                continue
            best = (image, mask, x0, y0, feet, cut or visible < 0.9)
            bodies.append(body)
            break
        if best is None:
            raise RuntimeError(f"SynthPS: could not place {len(appearances)} persons in a "
                               f"{width}x{height} image; use a larger image_size or fewer persons")
        placed.append(best)
    return placed


def _overlap(a, b) -> float:
    """Intersection of two XYXY boxes over the area of the smaller one (1 = one inside the other)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller > 0 else 0.0


def _visible_fraction(mask: np.ndarray, x0: int, y0: int, width: int, height: int) -> float:
    """Fraction of the person's mask pixels that fall inside a ``width x height`` image."""
    h, w = mask.shape
    inside = mask[max(0, -y0):max(0, min(h, height - y0)), max(0, -x0):max(0, min(w, width - x0))]
    return float(inside.sum()) / max(1, int(mask.sum()))


def _render_image(rng: np.random.Generator, layout: _ImageLayout, width: int, height: int,
                  occlusion_rate: float, illumination: float):
    """Renders one scene.

    Returns:
        image: (height, width, 3) uint8 BGR.
        boxes: (n, 4) int64 XYWH of the persons (in ``layout`` order), inside the image.
        occluded: (n,) bool, True where a person is cut by the border (over 10 % of its
            pixels), has over 40 % of its box covered by a closer person, or stands behind an
            occluding object.
    """
    colours = [c for a in layout.appearances for c in (a.upper, a.lower, a.upper_alt)]
    scene, horizon = draw_background(rng, width, height, colours)
    placed = _place_people(rng, layout.appearances, width, height, horizon, occlusion_rate)
    n = len(placed)
    boxes = np.zeros((n, 4), np.int64)
    occluded = np.array([p[5] for p in placed], bool)
    order = sorted(range(n), key=lambda i: placed[i][4])  # far (feet high up) first
    for rank, i in enumerate(order):
        image, mask, x0, y0, _, _ = placed[i]
        x1, y1, x2, y2 = paste_person(scene, image, mask, x0, y0)
        boxes[i] = (x1, y1, x2 - x1, y2 - y1)
        for j in order[:rank]:  # persons drawn before (farther) are hidden in part by this one
            bj = boxes[j]
            a = (bj[0], bj[1], bj[0] + bj[2], bj[1] + bj[3])
            iw = max(0, min(a[2], x2) - max(a[0], x1))
            ih = max(0, min(a[3], y2) - max(a[1], y1))
            if iw * ih > 0.4 * bj[2] * bj[3]:
                occluded[j] = True
    for i in range(n):
        if rng.uniform() < 0.4 * occlusion_rate:
            x, y, w, h = boxes[i]
            draw_occluder(scene, rng, (int(x), int(y), int(x + w), int(y + h)), colours)
            occluded[i] = True
    return apply_camera(scene, rng, illumination), boxes, occluded


def generate_synthps(root: str, seed: int = 0, **knobs) -> Dict:
    """Writes a SynthPS data set into ``root`` (created if needed; existing files are overwritten).

    Args:
        root: output folder (the CUHK-SYSU root: ``Image/SSM``, ``annotation``).
        seed: the generation seed; the same seed and knobs give byte-identical files.
        knobs: any of ``DEFAULT_KNOBS``: ``num_train_ids``, ``num_test_ids``, ``train_images``,
            ``test_images``, ``image_size`` (W, H), ``persons_per_image`` (min, max),
            ``appearances_per_id`` (min, max),
            ``lookalike_fraction``, ``occlusion_rate``, ``illumination``, ``gallery_sizes``.
    Returns:
        the statistics dict (see :func:`synthps_stats`), also stored in ``root/synthps.json``.
    Raises:
        ValueError: a knob is unknown or out of range, or the images cannot hold the identities.
    """
    k = _check_knobs(knobs)
    width, height = k["image_size"]
    n_train, n_test = k["num_train_ids"], k["num_test_ids"]
    n_images = k["train_images"] + k["test_images"]
    rng = np.random.default_rng(seed)

    # Identities (train and test disjoint, look-alike groups inside each split) and their names.
    appearances = (_sample_identities(rng, n_train, k["lookalike_fraction"])
                   + _sample_identities(rng, n_test, k["lookalike_fraction"]))
    names = [f"p{i + 1}" for i in rng.permutation(n_train + n_test)]
    # Images: which are test (pool) images, how many people each, who appears where.
    is_test = np.zeros(n_images, bool)
    is_test[rng.choice(n_images, size=k["test_images"], replace=False)] = True
    lo, hi = k["persons_per_image"]
    persons = rng.integers(lo, hi + 1, size=n_images)
    capacity = persons - 1  # keep at least one unlabeled person in every image
    train_images, test_images = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    per_id = k["appearances_per_id"]
    where = (_allocate(rng, n_train, train_images, capacity, "train", per_id)
             + _allocate(rng, n_test, test_images, capacity, "test", per_id))
    layouts = [_ImageLayout([], []) for _ in range(n_images)]
    for identity, image_ids in enumerate(where):
        for i in image_ids:
            layouts[i].appearances.append(appearances[identity])
            layouts[i].identities.append(identity)

    # Render (one generator per image, so that images do not depend on each other's draws).
    image_names = [f"s{i + 1}.jpg" for i in range(n_images)]
    image_dir = os.path.join(root, "Image", "SSM")
    os.makedirs(image_dir, exist_ok=True)
    boxes, occluded = [], []
    for i, layout in enumerate(layouts):
        image_rng = np.random.default_rng([seed, i + 1])
        while len(layout.appearances) < persons[i]:
            layout.appearances.append(sample_appearance(image_rng))
            layout.identities.append(-1)
        image, b, o = _render_image(image_rng, layout, width, height, k["occlusion_rate"],
                                    k["illumination"])
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {image_names[i]}")
        with open(os.path.join(image_dir, image_names[i]), "wb") as f:
            f.write(data.tobytes())
        boxes.append(b)
        occluded.append(o)

    def appearances_of(identity: int) -> List[Tuple[str, np.ndarray, bool]]:
        """(image name, XYWH box, occluded) of every appearance of ``identity``, in image order."""
        out = []
        for i in where[identity]:
            j = layouts[i].identities.index(identity)
            out.append((image_names[i], boxes[i][j], bool(occluded[i][j])))
        return out

    train = [(names[t], [(im, box) for im, box, _ in appearances_of(t)]) for t in range(n_train)]
    pool = [image_names[i] for i in test_images]
    test: Dict[int, list] = {g: [] for g in k["gallery_sizes"]}
    positives = 0
    for t in range(n_train, n_train + n_test):
        seen = appearances_of(t)
        q = int(rng.integers(len(seen)))
        query = (seen[q][0], seen[q][1], names[t], int(seen[q][2]))
        pos = [(im, box) for j, (im, box, _) in enumerate(seen) if j != q]
        containing = {im for im, _, _ in seen}
        negatives = [image_names[i] for i in rng.permutation(test_images)
                     if image_names[i] not in containing]
        for g in k["gallery_sizes"]:
            test[g].append((query, pos + [(im, None) for im in negatives[:g - len(pos)]]))
        positives += len(pos)
    write_cuhk_sysu(root, list(zip(image_names, boxes)), pool, train, test)

    labeled = sum(len(w) for w in where)
    n_boxes = int(sum(len(b) for b in boxes))
    stats = {
        "seed": int(seed),
        "images": n_images,
        "train_images": int(len(train_images)),
        "test_images": int(len(test_images)),
        "boxes": n_boxes,
        "labeled_boxes": labeled,
        "unlabeled_boxes": n_boxes - labeled,
        "occluded_boxes": int(sum(o.sum() for o in occluded)),
        "train_ids": n_train,
        "test_ids": n_test,
        "queries": n_test,
        "mean_positives_per_query": round(positives / n_test, 4),
        "gallery_sizes": list(k["gallery_sizes"]),
        "image_size": list(k["image_size"]),
    }
    meta = {"format": _FORMAT, "seed": int(seed),
            "knobs": {name: list(v) if isinstance(v, tuple) else v for name, v in k.items()},
            "stats": stats}
    with open(os.path.join(root, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return stats


def is_complete(root: str) -> bool:
    """True when ``root`` holds a finished data set (the Images.mat written last is there)."""
    return os.path.isfile(os.path.join(root, "annotation", "Images.mat"))


# knobs added after data sets were generated without them, with the value those data sets used
_LEGACY_KNOBS = {"appearances_per_id": [2, 6]}


def knob_differences(root: str, seed: int = 0, **knobs) -> List[str]:
    """How the SynthPS data set in ``root`` differs from the one ``seed`` and ``knobs`` (the
    defaults completed) would generate: ``["illumination: 1.0 here, 0.5 asked", ...]``, empty
    when they match. Raises like :func:`synthps_stats` when ``root`` holds no description."""
    meta = _read_meta(root)
    stored = {**_LEGACY_KNOBS, **meta.get("knobs", {})}
    asked = {name: list(v) if isinstance(v, tuple) else v for name, v in _check_knobs(knobs).items()}
    out = [f"seed: {meta.get('seed')} here, {seed} asked"] if meta.get("seed") != seed else []
    out += [f"{name}: {stored.get(name)} here, {value} asked" for name, value in asked.items()
            if stored.get(name) != value]
    return out


def ensure_synthps(root: str, seed: int = 0, force: bool = False, replace_different: bool = False,
                   **knobs) -> str:
    """Returns ``root`` after generating SynthPS there if it is missing (or if ``force``).

    A data set already in ``root`` that was generated with another seed or other knobs (e.g.
    by an older version with other defaults) is kept with a warning naming the differences, or
    regenerated when ``replace_different`` is set.

    Generation goes to a temporary sibling folder that is renamed to ``root`` at the end, so an
    interrupted generation never leaves a half data set, and two processes racing to create the
    same root are safe: the loser discards its copy and uses the winner's. With ``force`` an
    existing data set is replaced (also atomically). Logs one line with the time taken.

    Raises:
        RuntimeError: ``root`` exists, is not empty and holds no SynthPS data set.
    """
    root = os.path.abspath(root)
    if is_complete(root) and not force:
        different = knob_differences(root, seed, **knobs)
        if not different:
            return root
        if not replace_different:
            logger.warning("SynthPS in %s was generated differently from what is asked (%s); "
                           "it is used as it is. Regenerate with: qeeps-synthps --root %s --force",
                           root, "; ".join(different), root)
            return root
        logger.info("SynthPS in %s differs from what is asked (%s): regenerating",
                    root, "; ".join(different))
        force = True
    if os.path.exists(root) and not os.path.isdir(root):
        raise RuntimeError(f"cannot create SynthPS at {root}: it is a file, not a folder")
    if os.path.isdir(root) and os.listdir(root) and not is_complete(root):
        raise RuntimeError(f"cannot create SynthPS at {root}: the folder exists and holds no "
                           f"annotation/Images.mat; remove it or choose another root")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        stats = generate_synthps(tmp, seed, **knobs)
        if force and is_complete(root):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.old-", dir=parent)
            os.rename(root, os.path.join(old, "data"))
            os.rename(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _publish(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("SynthPS (seed %d): %d images, %d boxes, %d queries generated in %s in %.1f s",
                seed, stats["images"], stats["boxes"], stats["queries"], root,
                time.perf_counter() - start)
    return root


def _publish(tmp: str, root: str) -> None:
    """Renames the finished ``tmp`` folder to ``root``; if another process got there first,
    drops ``tmp`` and keeps the other's data set."""
    try:
        os.rename(tmp, root)  # atomic; replaces an empty folder, fails on a non-empty one
    except OSError as e:
        if not is_complete(root):
            raise RuntimeError(f"cannot create SynthPS at {root}: the folder exists and holds no "
                               f"annotation/Images.mat ({e}); remove it or choose another root") from e
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("SynthPS at %s was generated by another process; using it", root)


def synthps_stats(root: str) -> Dict:
    """The statistics of the SynthPS data set in ``root`` (from its ``synthps.json``).

    Keys: seed, images, train_images, test_images, boxes, labeled_boxes, unlabeled_boxes,
    occluded_boxes, train_ids, test_ids, queries, mean_positives_per_query, gallery_sizes,
    image_size.

    Raises:
        FileNotFoundError: no ``synthps.json`` in ``root``.
        ValueError: the file is not a SynthPS description.
    """
    return _read_meta(root)["stats"]


def _read_meta(root: str) -> Dict:
    """The checked contents of ``root/synthps.json`` (raises as :func:`synthps_stats` says)."""
    path = os.path.join(root, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SynthPS description {path}: not a SynthPS data set")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != _FORMAT or "stats" not in meta:
        raise ValueError(f"{path} is not a {_FORMAT} description (format={meta.get('format')!r})")
    return meta


def format_synthps_stats(stats: Dict) -> str:
    """A two-column text table of :func:`synthps_stats`."""
    rows = [(key.replace("_", " "), "x".join(map(str, value)) if isinstance(value, list) else str(value))
            for key, value in stats.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
