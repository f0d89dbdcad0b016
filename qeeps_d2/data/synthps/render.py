"""Procedural drawing for SynthPS: person appearances, people, backgrounds, occluders, camera.

Numpy + OpenCV only (no torch). Images are ``(H, W, 3)`` BGR (OpenCV order); float32 in
[0, 255] while a scene is composed, uint8 once :func:`apply_camera` has run. A person is drawn
on its own canvas of ``height x person_canvas_width(height)`` pixels, feet on the bottom row, and then
pasted into the scene; all proportions of :class:`Appearance` are fractions of the person's
height, so the same identity looks the same at every scale.

The layout (who stands where, who is occluded) is decided by :mod:`qeeps_d2.data.synthps`; this
module only draws what it is told, with the random generator it is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    "Appearance",
    "Pose",
    "LOOKALIKE_ATTRIBUTES",
    "sample_appearance",
    "lookalike_variant",
    "sample_pose",
    "person_canvas_width",
    "render_person",
    "paste_person",
    "draw_background",
    "draw_occluder",
    "apply_camera",
]

Colour = Tuple[int, int, int]

UPPER_PATTERNS = ("plain", "hstripes", "vstripes", "dstripes", "checks", "dots")
LOWER_PATTERNS = ("plain", "hstripes", "vstripes", "checks")
LOGOS = ("none", "circle", "triangle", "square", "star", "cross", "diamond")
HATS = ("none", "cap", "beanie")
BAGS = ("none", "shoulder", "backpack")

# Part labels of a person canvas (0 = empty).
_SKIN, _HAIR, _UPPER, _LOWER, _SHOES, _BAG, _HAT = range(1, 8)

# The single local attribute that distinguishes the members of a look-alike group, with the
# values it may take.
LOOKALIKE_ATTRIBUTES = {
    "logo": LOGOS[1:],
    "upper_pattern": UPPER_PATTERNS[1:],
    "lower_pattern": LOWER_PATTERNS[1:],
    "hat": HATS,
}


@dataclass(frozen=True)
class Appearance:
    """The persistent look of one person. Lengths are fractions of the person's height.

    Attributes:
        head: head radius (~0.06). shoulders / hips: widths (~0.26 / ~0.2). torso: shoulder to
            hip length (~0.3). pattern_period: period of garment patterns (~0.06).
        skin, hair, upper, upper_alt, lower, lower_alt, shoes, logo_colour, bag_colour,
            hat_colour: BGR colours (``*_alt`` is the second colour of a garment's pattern).
        long_hair: hair down to the shoulders. long_sleeves: sleeves down to the wrists.
        upper_pattern: one of ``UPPER_PATTERNS``; lower_pattern: one of ``LOWER_PATTERNS``.
        lower_style: ``"trousers"``, ``"shorts"`` or ``"skirt"``.
        logo: chest emblem, one of ``LOGOS``; hat: one of ``HATS``; bag: one of ``BAGS``.
    """

    head: float
    shoulders: float
    hips: float
    torso: float
    pattern_period: float
    skin: Colour
    hair: Colour
    long_hair: bool
    upper: Colour
    upper_alt: Colour
    upper_pattern: str
    long_sleeves: bool
    lower: Colour
    lower_alt: Colour
    lower_pattern: str
    lower_style: str
    shoes: Colour
    logo: str
    logo_colour: Colour
    hat: str
    hat_colour: Colour
    bag: str
    bag_colour: Colour


@dataclass(frozen=True)
class Pose:
    """How a person stands in one picture.

    Attributes:
        facing: +1 facing right, -1 facing left (the canvas is mirrored).
        stance: horizontal distance between the feet, fraction of the height (0..0.12).
        arm_angles: (back arm, front arm) angle away from the body in degrees (0..35).
        elbow_bends: (back arm, front arm) extra forearm bend in degrees (0..90).
    """

    facing: int
    stance: float
    arm_angles: Tuple[float, float]
    elbow_bends: Tuple[float, float]


def _colour(rng: np.random.Generator, saturation=(0.2, 0.9), value=(0.2, 0.95)) -> Colour:
    """A random BGR colour from a hue and saturation/value ranges."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*saturation) * 255,
                      rng.uniform(*value) * 255]]], np.float32).astype(np.uint8)
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _skin(rng: np.random.Generator) -> Colour:
    """A skin tone: a point between a dark and a light reference tone (BGR)."""
    t = rng.uniform()
    dark, light = np.array([45, 70, 110]), np.array([170, 200, 235])
    return tuple(int(c) for c in dark + t * (light - dark))


def _hair(rng: np.random.Generator) -> Colour:
    """A hair colour: mostly dark, sometimes brown, blond or grey (BGR)."""
    tones = ((20, 20, 25), (30, 45, 70), (60, 110, 160), (150, 150, 150))
    base = np.array(tones[rng.choice(4, p=[0.55, 0.25, 0.12, 0.08])])
    return tuple(int(c) for c in np.clip(base + rng.integers(-12, 13, 3), 0, 255))


def sample_appearance(rng: np.random.Generator) -> Appearance:
    """Draws a random :class:`Appearance` (body, clothes, textures, accessories)."""
    return Appearance(
        head=rng.uniform(0.055, 0.07),
        shoulders=rng.uniform(0.22, 0.30),
        hips=rng.uniform(0.17, 0.23),
        torso=rng.uniform(0.27, 0.32),
        pattern_period=rng.uniform(0.04, 0.08),
        skin=_skin(rng),
        hair=_hair(rng),
        long_hair=bool(rng.uniform() < 0.35),
        upper=_colour(rng),
        upper_alt=_colour(rng),
        upper_pattern=str(rng.choice(UPPER_PATTERNS, p=[0.4, 0.15, 0.12, 0.08, 0.13, 0.12])),
        long_sleeves=bool(rng.uniform() < 0.6),
        lower=_colour(rng, saturation=(0.1, 0.7), value=(0.15, 0.8)),
        lower_alt=_colour(rng),
        lower_pattern=str(rng.choice(LOWER_PATTERNS, p=[0.7, 0.1, 0.1, 0.1])),
        lower_style=str(rng.choice(("trousers", "shorts", "skirt"), p=[0.65, 0.2, 0.15])),
        shoes=_colour(rng, saturation=(0.0, 0.5), value=(0.05, 0.6)),
        logo=str(rng.choice(LOGOS, p=[0.5] + [0.5 / 6] * 6)),
        logo_colour=_colour(rng, value=(0.6, 1.0)),
        hat=str(rng.choice(HATS, p=[0.7, 0.18, 0.12])),
        hat_colour=_colour(rng),
        bag=str(rng.choice(BAGS, p=[0.55, 0.25, 0.2])),
        bag_colour=_colour(rng, value=(0.1, 0.7)),
    )


def lookalike_variant(base: Appearance, attribute: str, value: str) -> Appearance:
    """``base`` with only ``attribute`` (a key of ``LOOKALIKE_ATTRIBUTES``) set to ``value``."""
    if value not in LOOKALIKE_ATTRIBUTES.get(attribute, ()):
        raise ValueError(f"look-alike attribute {attribute!r} cannot take the value {value!r}")
    fields = dict(base.__dict__)
    fields[attribute] = value
    return Appearance(**fields)


def sample_pose(rng: np.random.Generator) -> Pose:
    """Draws a random :class:`Pose` (facing, stance width, arm angles and elbow bends)."""
    return Pose(
        facing=int(rng.choice((-1, 1))),
        stance=rng.uniform(0.0, 0.12),
        arm_angles=(rng.uniform(3, 35), rng.uniform(3, 35)),
        elbow_bends=(rng.uniform(0, 40), rng.uniform(0, 90) if rng.uniform() < 0.3 else 0.0),
    )


def _limb(canvas: np.ndarray, points: Sequence[Tuple[float, float]], thickness: float, label: int):
    """Draws a polyline of thick round-capped segments with ``label`` into ``canvas``."""
    pts = [(int(round(x)), int(round(y))) for x, y in points]
    t = max(1, int(round(thickness)))
    for a, b in zip(pts[:-1], pts[1:]):
        cv2.line(canvas, a, b, label, t, cv2.LINE_8)


def _arm(canvas, shoulder, side, angle, bend, length, thickness, long_sleeves):
    """Draws one arm hanging from ``shoulder`` on ``side`` (-1 left, +1 right) of the body."""
    a1 = np.deg2rad(angle)
    a2 = np.deg2rad(angle + bend)
    elbow = (shoulder[0] + side * np.sin(a1) * length * 0.5, shoulder[1] + np.cos(a1) * length * 0.5)
    hand = (elbow[0] + side * np.sin(a2) * length * 0.48, elbow[1] + np.cos(a2) * length * 0.48)
    _limb(canvas, [shoulder, elbow], thickness, _UPPER)
    _limb(canvas, [elbow, hand], thickness * 0.9, _UPPER if long_sleeves else _SKIN)
    cv2.circle(canvas, (int(round(hand[0])), int(round(hand[1]))),
               max(1, int(round(thickness * 0.55))), _SKIN, -1)


def person_canvas_width(height: int) -> int:
    """Width of the canvas :func:`render_person` draws a person ``height`` pixels tall on."""
    return int(round(0.75 * height))


def _person_labels(app: Appearance, pose: Pose, h: int) -> np.ndarray:
    """The part-label canvas ``(h, person_canvas_width(h))`` uint8 of a person facing right."""
    w = person_canvas_width(h)
    canvas = np.zeros((h, w), np.uint8)
    cx = w / 2.0
    hr = app.head * h
    ys = 2.0 * hr + 0.03 * h            # shoulder line
    yh = ys + app.torso * h             # hip line
    foot = h - 1 - 0.02 * h             # ankle height
    sw, hw = app.shoulders * h, app.hips * h
    arm_t = 0.055 * h
    leg_t = 0.45 * hw
    # Backpack behind the body, on the back (left) side.
    if app.bag == "backpack":
        cv2.rectangle(canvas, (int(cx - 0.62 * sw), int(ys + 0.03 * h)),
                      (int(cx + 0.1 * sw), int(ys + 0.24 * h)), _BAG, -1)
    # Long hair falls behind the shoulders.
    if app.long_hair:
        cv2.rectangle(canvas, (int(cx - 0.95 * hr), int(hr)), (int(cx + 0.5 * hr), int(ys + 0.06 * h)),
                      _HAIR, -1)
    # Legs (garment first; skin for shorts / skirt), then shoes pointing forward.
    for side in (-1, 1):
        hip = (cx + side * hw * 0.25, yh)
        ankle = (cx + side * (hw * 0.25 + pose.stance * h / 2), foot)
        knee = ((hip[0] + ankle[0]) / 2, (hip[1] + ankle[1]) / 2)
        if app.lower_style == "trousers":
            _limb(canvas, [hip, knee, ankle], leg_t, _LOWER)
        else:
            _limb(canvas, [hip, knee, ankle], leg_t * 0.8, _SKIN)
            if app.lower_style == "shorts":
                _limb(canvas, [hip, (hip[0] * 0.45 + ankle[0] * 0.55, hip[1] * 0.55 + ankle[1] * 0.45)],
                      leg_t * 1.05, _LOWER)
        cv2.ellipse(canvas, (int(round(ankle[0] + 0.02 * h)), int(round(h - 1 - 0.02 * h))),
                    (max(1, int(0.045 * h)), max(1, int(0.02 * h))), 0, 0, 360, _SHOES, -1)
    if app.lower_style == "skirt":
        skirt = np.array([[cx - hw * 0.5, yh - 0.02 * h], [cx + hw * 0.5, yh - 0.02 * h],
                          [cx + hw * 0.75, yh + 0.2 * h], [cx - hw * 0.75, yh + 0.2 * h]])
        cv2.fillPoly(canvas, [np.round(skirt).astype(np.int32)], _LOWER)
    else:
        cv2.rectangle(canvas, (int(cx - hw * 0.5), int(yh - 0.03 * h)),
                      (int(cx + hw * 0.5), int(yh + 0.05 * h)), _LOWER, -1)
    # Back arm (left side), torso, front arm (right side).
    arm_len = 0.38 * h
    _arm(canvas, (cx - sw / 2 + arm_t / 2, ys + arm_t / 2), -1, pose.arm_angles[0],
         pose.elbow_bends[0], arm_len, arm_t, app.long_sleeves)
    torso = np.array([[cx - sw * 0.42, ys], [cx + sw * 0.42, ys], [cx + sw / 2, ys + 0.04 * h],
                      [cx + hw / 2, yh + 0.02 * h], [cx - hw / 2, yh + 0.02 * h],
                      [cx - sw / 2, ys + 0.04 * h]])
    neck_w = 0.6 * hr
    cv2.rectangle(canvas, (int(cx - neck_w / 2), int(1.6 * hr)), (int(cx + neck_w / 2), int(ys + 2)),
                  _SKIN, -1)
    cv2.fillPoly(canvas, [np.round(torso).astype(np.int32)], _UPPER)
    _arm(canvas, (cx + sw / 2 - arm_t / 2, ys + arm_t / 2), 1, pose.arm_angles[1],
         pose.elbow_bends[1], arm_len, arm_t, app.long_sleeves)
    # Head: hair cap towards the back, face towards the front, a nose.
    head_c = (cx + 0.12 * hr, hr)
    axes = (max(1, int(round(0.82 * hr))), max(1, int(round(hr))))
    cv2.ellipse(canvas, (int(round(head_c[0] - 0.1 * hr)), int(round(head_c[1]))), axes, 0, 0, 360,
                _HAIR, -1)
    cv2.ellipse(canvas, (int(round(head_c[0] + 0.12 * hr)), int(round(head_c[1] + 0.22 * hr))),
                (max(1, int(round(0.72 * hr))), max(1, int(round(0.8 * hr)))), 0, 0, 360, _SKIN, -1)
    nose = np.array([[head_c[0] + 0.8 * hr, head_c[1]], [head_c[0] + 1.05 * hr, head_c[1] + 0.3 * hr],
                     [head_c[0] + 0.8 * hr, head_c[1] + 0.4 * hr]])
    cv2.fillPoly(canvas, [np.round(nose).astype(np.int32)], _SKIN)
    if app.hat == "cap":
        cv2.ellipse(canvas, (int(round(head_c[0])), int(round(head_c[1] - 0.05 * hr))), axes, 0, 180,
                    360, _HAT, -1)
        cv2.rectangle(canvas, (int(head_c[0]), int(head_c[1] - 0.25 * hr)),
                      (int(head_c[0] + 1.45 * hr), int(head_c[1] - 0.05 * hr)), _HAT, -1)
    elif app.hat == "beanie":
        cv2.ellipse(canvas, (int(round(head_c[0])), int(round(head_c[1] - 0.1 * hr))),
                    (axes[0] + 1, axes[1]), 0, 170, 370, _HAT, -1)
    # Shoulder bag: a strap across the chest and the bag on the front hip.
    if app.bag == "shoulder":
        _limb(canvas, [(cx - sw * 0.35, ys), (cx + hw * 0.55, yh - 0.04 * h)], max(1, 0.012 * h), _BAG)
        cv2.rectangle(canvas, (int(cx + hw * 0.35), int(yh - 0.07 * h)),
                      (int(cx + hw * 0.35 + 0.13 * h), int(yh + 0.05 * h)), _BAG, -1)
    return canvas


def _pattern(kind: str, period: int, shape: Tuple[int, int]) -> np.ndarray:
    """Boolean ``shape`` map of a garment pattern (True = second colour), in canvas pixels."""
    yy, xx = np.indices(shape)
    half = period / 2.0
    if kind == "plain":
        return np.zeros(shape, bool)
    if kind == "hstripes":
        return (yy % period) < half
    if kind == "vstripes":
        return (xx % period) < half
    if kind == "dstripes":
        return ((xx + yy) % period) < half
    if kind == "checks":
        return ((yy % period) < half) ^ ((xx % period) < half)
    if kind == "dots":
        return ((xx % period - half) ** 2 + (yy % period - half) ** 2) < (0.32 * period) ** 2
    raise ValueError(f"unknown garment pattern {kind!r}")


def _draw_logo(image: np.ndarray, kind: str, centre: Tuple[float, float], radius: float,
               colour: Colour):
    """Draws the chest emblem ``kind`` (one of ``LOGOS``) on ``image`` in place."""
    cx, cy = centre
    r = max(1.5, radius)
    if kind == "circle":
        cv2.circle(image, (int(round(cx)), int(round(cy))), int(round(r)), colour, -1)
        return
    if kind == "square":
        poly = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif kind == "triangle":
        poly = [(0, -1), (0.95, 0.75), (-0.95, 0.75)]
    elif kind == "diamond":
        poly = [(0, -1), (0.75, 0), (0, 1), (-0.75, 0)]
    elif kind == "star":
        ang = np.deg2rad(np.arange(10) * 36 - 90)
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        poly = list(zip(rad * np.cos(ang), rad * np.sin(ang)))
    elif kind == "cross":
        poly = [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
                (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]
    else:
        raise ValueError(f"unknown logo {kind!r}")
    pts = np.round(np.array(poly) * r + (cx, cy)).astype(np.int32)
    cv2.fillPoly(image, [pts], colour)


def render_person(app: Appearance, pose: Pose, height: int) -> Tuple[np.ndarray, np.ndarray]:
    """Draws one person ``height`` pixels tall.

    Returns:
        image: ``(height, person_canvas_width(height), 3)`` float32 BGR, shaded, zero outside
            the person.
        mask: ``(height, person_canvas_width(height))`` bool, True on the person.
    """
    if height < 8:
        raise ValueError(f"a person must be at least 8 pixels tall, got {height}")
    labels = _person_labels(app, pose, height)
    if pose.facing < 0:
        labels = labels[:, ::-1].copy()
    palette = np.zeros((8, 3), np.float32)
    for label, colour in ((_SKIN, app.skin), (_HAIR, app.hair), (_UPPER, app.upper),
                          (_LOWER, app.lower), (_SHOES, app.shoes), (_BAG, app.bag_colour),
                          (_HAT, app.hat_colour)):
        palette[label] = colour
    image = palette[labels]
    period = max(3, int(round(app.pattern_period * height)))
    for label, kind, alt in ((_UPPER, app.upper_pattern, app.upper_alt),
                             (_LOWER, app.lower_pattern, app.lower_alt)):
        if kind != "plain":
            image[(labels == label) & _pattern(kind, period, labels.shape)] = alt
    if app.logo != "none":
        w = labels.shape[1]
        chest_y = 2.0 * app.head * height + 0.03 * height + 0.1 * height
        _draw_logo(image, app.logo, (w / 2.0, chest_y), 0.045 * height, app.logo_colour)
    mask = labels > 0
    # Parts outlined (darker where the label changes) and a cylinder shading across the body.
    edge = np.zeros_like(mask)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    xs = (np.arange(labels.shape[1]) - labels.shape[1] / 2.0) / (0.25 * height)
    shade = (1.08 - 0.3 * np.clip(xs, -1.5, 1.5) ** 2).astype(np.float32)
    image *= shade[None, :, None]
    image[edge & mask] *= 0.6
    image[~mask] = 0
    return image, mask


def paste_person(scene: np.ndarray, person: np.ndarray, mask: np.ndarray, x0: int, y0: int):
    """Copies the ``mask`` pixels of ``person`` into float ``scene`` at top-left ``(x0, y0)``.

    Parts outside the scene are cut off. Returns the visible box ``(x1, y1, x2, y2)`` (exclusive
    right/bottom) of the person's mask inside the scene, or ``None`` when nothing is visible.
    """
    H, W = scene.shape[:2]
    h, w = mask.shape
    sx1, sy1, sx2, sy2 = max(0, x0), max(0, y0), min(W, x0 + w), min(H, y0 + h)
    if sx2 <= sx1 or sy2 <= sy1:
        return None
    m = mask[sy1 - y0:sy2 - y0, sx1 - x0:sx2 - x0]
    if not m.any():
        return None
    region = scene[sy1:sy2, sx1:sx2]
    region[m] = person[sy1 - y0:sy2 - y0, sx1 - x0:sx2 - x0][m]
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    return (sx1 + int(cols[0]), sy1 + int(rows[0]), sx1 + int(cols[-1]) + 1, sy1 + int(rows[-1]) + 1)


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cell: int) -> np.ndarray:
    """(H, W, 1) float32 low-frequency noise in about [-1, 1], features ~``cell`` pixels wide."""
    small = rng.normal(size=(max(2, height // cell + 2), max(2, width // cell + 2))).astype(np.float32)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)[:, :, None]


def _draw_distractor(scene: np.ndarray, rng: np.random.Generator, x: float, bottom: float,
                     size: float, colours: Sequence[Colour]):
    """Draws one non-person object (pole, box, sign, tree, bin) standing on ``bottom``."""
    kind = rng.choice(("pole", "box", "sign", "tree", "bin"))
    colour = colours[rng.integers(len(colours))]
    dark = tuple(int(c * 0.6) for c in colour)
    xi, bi, s = int(x), int(bottom), max(4.0, size)
    if kind == "pole":
        t = max(2, int(0.05 * s))
        cv2.rectangle(scene, (xi, int(bottom - s)), (xi + t, bi), colour, -1)
    elif kind == "box":
        bw, bh = int(s * rng.uniform(0.3, 0.7)), int(s * rng.uniform(0.2, 0.5))
        cv2.rectangle(scene, (xi, bi - bh), (xi + bw, bi), colour, -1)
        cv2.rectangle(scene, (xi, bi - bh), (xi + bw, bi), dark, max(1, int(s * 0.02)))
        cv2.line(scene, (xi, bi - bh), (xi + bw, bi), dark, 1)
    elif kind == "sign":
        t = max(2, int(0.04 * s))
        cv2.rectangle(scene, (xi, int(bottom - s)), (xi + t, bi), (90, 90, 90), -1)
        sw, sh = int(s * 0.35), int(s * 0.3)
        top = int(bottom - s)
        cv2.rectangle(scene, (xi - sw // 2, top), (xi + sw // 2, top + sh), colour, -1)
        other = colours[rng.integers(len(colours))]
        for k in range(1, 4):
            y = top + k * sh // 4
            cv2.line(scene, (xi - sw // 2, y), (xi + sw // 2, y), other, max(1, sh // 10))
    elif kind == "tree":
        t = max(2, int(0.07 * s))
        cv2.rectangle(scene, (xi, int(bottom - 0.6 * s)), (xi + t, bi), (40, 60, 90), -1)
        cv2.circle(scene, (xi + t // 2, int(bottom - 0.7 * s)), int(0.25 * s),
                   tuple(int(c) for c in rng.integers(20, 140, 3)), -1)
    else:  # bin: a rounded column with a lid, roughly person-coloured.
        bw, bh = int(s * 0.22), int(s * 0.4)
        cv2.rectangle(scene, (xi, bi - bh), (xi + bw, bi), colour, -1)
        cv2.rectangle(scene, (xi - 2, bi - bh - 3), (xi + bw + 2, bi - bh), dark, -1)


def draw_background(rng: np.random.Generator, width: int, height: int,
                    colours: Sequence[Colour]) -> Tuple[np.ndarray, float]:
    """A cluttered street-like background with non-person distractors.

    Args:
        colours: BGR colours the distractors may take (pass clothing colours so that signs and
            boxes look like people in colour).
    Returns:
        scene: ``(height, width, 3)`` float32 BGR.
        horizon: the y of the horizon (top of the ground plane), in pixels.
    """
    horizon = height * rng.uniform(0.28, 0.5)
    yy = np.arange(height, dtype=np.float32)[:, None, None]
    top_a, top_b = np.array(_colour(rng, value=(0.5, 1.0)), np.float32), np.array(
        _colour(rng, saturation=(0.0, 0.4)), np.float32)
    sky = top_a + (top_b - top_a) * np.clip(yy / max(horizon, 1.0), 0, 1)
    ground_c = np.array(_colour(rng, saturation=(0.0, 0.35), value=(0.25, 0.7)), np.float32)
    scene = np.where(yy < horizon, sky, ground_c).astype(np.float32) * np.ones((1, width, 1), np.float32)
    # Buildings with window grids along the horizon.
    x = -rng.uniform(0, 0.1) * width
    while x < width:
        bw = rng.uniform(0.15, 0.45) * width
        top = rng.uniform(0.0, 0.8) * horizon
        colour = np.array(_colour(rng, saturation=(0.05, 0.5), value=(0.3, 0.9)), np.float32)
        x1, x2, y1, y2 = int(max(0, x)), int(min(width, x + bw)), int(top), int(horizon)
        scene[y1:y2, x1:x2] = colour
        win = np.array(_colour(rng, saturation=(0.0, 0.4), value=(0.1, 0.9)), np.float32)
        step = int(rng.uniform(10, 22))
        wy, wx = np.indices((y2 - y1, x2 - x1))
        windows = ((wy % step) > step * 0.35) & ((wx % step) > step * 0.4)
        scene[y1:y2, x1:x2][windows] = win
        x += bw + rng.uniform(0, 30)
    # Ground lines converging to a vanishing point, kerb, textured noise everywhere.
    vx = rng.uniform(0.2, 0.8) * width
    line_c = tuple(float(c) for c in np.clip(ground_c * rng.uniform(0.6, 1.4), 0, 255))
    for k in range(int(rng.integers(3, 8))):
        end = (int(rng.uniform(-0.5, 1.5) * width), height)
        cv2.line(scene, (int(vx), int(horizon)), end, line_c, 1)
    cv2.line(scene, (0, int(horizon)), (width, int(horizon)), tuple(float(c) * 0.7 for c in ground_c), 2)
    scene += _smooth_noise(rng, width, height, 6) * 10 + _smooth_noise(rng, width, height, 40) * 18
    for _ in range(int(rng.integers(2, 7))):
        size = rng.uniform(0.25, 0.8) * height
        bottom = rng.uniform(horizon + 5, height)
        _draw_distractor(scene, rng, rng.uniform(0, width), bottom, size * (bottom / height), colours)
    return scene, horizon


def draw_occluder(scene: np.ndarray, rng: np.random.Generator, box: Tuple[int, int, int, int],
                  colours: Sequence[Colour]):
    """Draws an object in front of the person in ``box`` (XYXY) that hides part of it.

    The object is a crate or wall across the lower body, or a pole / sign post down one side.
    """
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    colour = colours[rng.integers(len(colours))]
    dark = tuple(int(c * 0.6) for c in colour)
    if rng.uniform() < 0.6:  # crate / low wall over the lower 25..50 % of the body
        top = int(y2 - h * rng.uniform(0.25, 0.5))
        left = int(x1 - w * rng.uniform(0.1, 0.6))
        right = int(x2 + w * rng.uniform(-0.3, 0.6))
        cv2.rectangle(scene, (left, top), (right, y2 + 2), colour, -1)
        cv2.rectangle(scene, (left, top), (right, y2 + 2), dark, max(1, h // 40))
    else:  # post on one side covering 25..45 % of the width
        cover = int(w * rng.uniform(0.25, 0.45))
        left = x1 - 1 if rng.uniform() < 0.5 else x2 - cover
        cv2.rectangle(scene, (left, int(y1 - h * 0.2)), (left + cover, y2 + 2), colour, -1)
        cv2.rectangle(scene, (left, int(y1 - h * 0.2)), (left + cover, y2 + 2), dark, 1)


def apply_camera(scene: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Global illumination, colour cast, side light, sensor noise and blur -> uint8 image.

    ``strength`` scales the illumination gain, colour cast and side-light spread (0 = neutral).
    """
    h, w = scene.shape[:2]
    gain = np.exp(rng.normal(0.0, 0.3 * strength))
    cast = np.exp(rng.normal(0.0, 0.12 * strength, 3)).astype(np.float32)
    slope = rng.uniform(-0.3, 0.3) * strength
    side = 1.0 + slope * np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    image = scene * (np.float32(gain) * cast[None, None, :] * side)
    sigma = np.float32(rng.uniform(1.0, 6.0))
    image += rng.standard_normal(image.shape, dtype=np.float32) * sigma
    if rng.uniform() < 0.35:
        k = int(rng.choice((3, 5)))
        image = cv2.GaussianBlur(image, (k, k), 0)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)
