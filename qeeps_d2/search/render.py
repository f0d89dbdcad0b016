"""Rendering of search results: boxes on frames, a query + top-K "match strip", an HTML report.

All images are (H, W, 3) uint8 BGR arrays (OpenCV's convention); colours are BGR tuples.
Numpy / OpenCV only (no torch): a match is anything with the attributes of
:class:`qeeps_d2.search.Match` (``frame``, ``box``, ``det_score``, ``similarity``, ``image``).
"""
from __future__ import annotations

import html
import os
import urllib.parse
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    "CORRECT_COLOUR",
    "MATCH_COLOUR",
    "QUERY_COLOUR",
    "REPORT_CSS",
    "WRONG_COLOUR",
    "draw_matches",
    "match_strip",
    "write_html_report",
]

Colour = Tuple[int, int, int]

QUERY_COLOUR: Colour = (200, 120, 20)  # blue
MATCH_COLOUR: Colour = (0, 150, 255)  # orange: correctness unknown
CORRECT_COLOUR: Colour = (60, 170, 40)  # green
WRONG_COLOUR: Colour = (50, 40, 220)  # red
_BACKGROUND: Colour = (246, 246, 246)
_TEXT: Colour = (40, 40, 40)
_MUTED: Colour = (120, 120, 120)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _thickness(image: np.ndarray) -> int:
    return max(1, round(min(image.shape[:2]) / 150))


def _text_size(text: str, scale: float) -> Tuple[int, int]:
    """(width, height above the baseline) of ``text`` in pixels."""
    (w, h), _ = cv2.getTextSize(text, _FONT, scale, 1)
    return w, h


def _put_text(image, text: str, origin, scale: float, colour: Colour) -> None:
    """Anti-aliased text with its baseline-left corner at ``origin`` (in place)."""
    x, y = (int(round(v)) for v in origin)
    cv2.putText(image, text, (x, y), _FONT, scale, colour, 1, cv2.LINE_AA)


def draw_matches(
    image: np.ndarray,
    boxes: Sequence[Sequence[float]],
    labels: Optional[Sequence[Optional[str]]] = None,
    colours: Optional[Sequence[Colour]] = None,
    thickness: Optional[int] = None,
) -> np.ndarray:
    """A copy of ``image`` with ``boxes`` drawn, each with its label on a filled tab above it.

    Args:
        image: (H, W, 3) uint8 BGR.
        boxes: (x1, y1, x2, y2) per box, in ``image`` pixels.
        labels: text per box (None or "" = no label).
        colours: BGR colour per box (default :data:`MATCH_COLOUR`).
        thickness: line width in pixels (default: from the image size).

    Returns:
        the drawn (H, W, 3) uint8 copy; text size follows the image size.
    """
    out = np.ascontiguousarray(image).copy()
    labels = list(labels) if labels is not None else [None] * len(boxes)
    colours = list(colours) if colours is not None else [MATCH_COLOUR] * len(boxes)
    if not len(labels) == len(colours) == len(boxes):
        raise ValueError(
            f"draw_matches: {len(boxes)} boxes but {len(labels)} labels, {len(colours)} colours"
        )
    thick = thickness if thickness is not None else _thickness(out)
    scale = max(0.35, min(out.shape[:2]) / 600)
    for box, label, colour in zip(boxes, labels, colours):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick)
        if label:
            w, h = _text_size(label, scale)
            pad = max(2, h // 3)
            top = y1 - h - 2 * pad if y1 - h - 2 * pad >= 0 else y1  # inside the box at the top
            left = min(max(0, x1), max(0, out.shape[1] - w - 2 * pad))
            cv2.rectangle(out, (left, top), (left + w + 2 * pad, top + h + 2 * pad), colour, -1)
            _put_text(out, label, (left + pad, top + h + pad), scale, (255, 255, 255))
    return out


def _context_crop(image: np.ndarray, box, context: Optional[float]):
    """The region of ``image`` around ``box`` (``context`` x the box's size added on each side,
    None = the whole image) and the box in the region's pixels."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if context is None:
        return image, (x1, y1, x2, y2)
    height, width = image.shape[:2]
    mw, mh = context * (x2 - x1), context * (y2 - y1)
    left, top = int(max(0, np.floor(x1 - mw))), int(max(0, np.floor(y1 - mh)))
    right, bottom = int(min(width, np.ceil(x2 + mw))), int(min(height, np.ceil(y2 + mh)))
    if right <= left or bottom <= top:  # box outside the image: show the whole image
        return image, (x1, y1, x2, y2)
    return image[top:bottom, left:right], (x1 - left, y1 - top, x2 - left, y2 - top)


def _tile(
    image: np.ndarray,
    box,
    box_colour: Colour,
    frame_colour: Optional[Colour],
    lines: Sequence[Tuple[str, Colour]],
    height: int,
    context: Optional[float],
) -> np.ndarray:
    """One strip tile: the crop around ``box`` scaled to ``height`` with the box drawn, caption
    ``lines`` below, and a coloured frame around it (None: a thin grey one)."""
    crop, (x1, y1, x2, y2) = _context_crop(image, box, context)
    f = height / crop.shape[0]
    width = max(1, int(round(crop.shape[1] * f)))
    interpolation = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    crop = cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=interpolation)
    crop = draw_matches(crop, [(x1 * f, y1 * f, x2 * f, y2 * f)], colours=[box_colour],
                        thickness=max(2, height // 96))

    scale = height / 420
    leading = max(4, height // 40)
    line_h = _text_size("Ag", scale)[1] + leading
    pad = max(4, height // 32)
    border = max(3, height // 48) if frame_colour is not None else 1
    text_w = max(_text_size(text, scale)[0] for text, _ in lines)
    inner_w = max(width, text_w + 2 * pad)
    inner_h = height + pad + line_h * len(lines)
    edge = frame_colour if frame_colour is not None else (200, 200, 200)
    tile = np.full((inner_h + 2 * border, inner_w + 2 * border, 3), edge, np.uint8)
    tile[border:-border, border:-border] = _BACKGROUND
    x0 = border + (inner_w - width) // 2
    tile[border:border + height, x0:x0 + width] = crop
    for i, (text, colour) in enumerate(lines):
        y = border + height + pad + line_h * (i + 1) - leading // 2
        _put_text(tile, text, (border + (inner_w - _text_size(text, scale)[0]) / 2, y), scale,
                  colour)
    return tile


def _shorten(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def match_strip(
    query_image: np.ndarray,
    query_box: Sequence[float],
    matches: Sequence,
    correct: Optional[Sequence[Optional[bool]]] = None,
    title: Optional[str] = None,
    height: int = 192,
    context: Optional[float] = 0.4,
) -> np.ndarray:
    """One row: the query person on the left, then the ranked matches, as a BGR image.

    Every tile shows the region around the box (the box plus ``context`` times its size on each
    side; None = the whole frame) scaled to ``height`` pixels, with the box drawn and a caption:
    the query tile "query"; match ``i`` "#rank  sim S" / "det D  <frame name>". A match tile gets a
    green frame when ``correct[i]`` is True, red when False, none when None (unknown).

    Args:
        query_image: (H, W, 3) uint8 BGR; query_box: (x1, y1, x2, y2) in its pixels.
        matches: ranked matches (``Match``-like, with ``image`` set: the frame, BGR).
        correct: per match True / False / None, or None for all unknown.
        title: optional text over the row (e.g. "QEEPS  query 12  AP 0.83").
        height: tile image height in pixels.
        context: margin around the boxes, as a fraction of the box size.

    Returns:
        (H', W', 3) uint8 BGR, W' growing with the number of matches.

    Raises:
        ValueError: a match without ``image``, or ``correct`` of another length than ``matches``.
    """
    correct = list(correct) if correct is not None else [None] * len(matches)
    if len(correct) != len(matches):
        raise ValueError(f"match_strip: {len(matches)} matches but {len(correct)} correct flags")
    tiles = [_tile(query_image, query_box, QUERY_COLOUR, QUERY_COLOUR, [("query", _TEXT)],
                   height, context)]
    for rank, (m, ok) in enumerate(zip(matches, correct), start=1):
        if getattr(m, "image", None) is None:
            raise ValueError(f"match_strip: match #{rank} ({m.frame}) has no image")
        colour = MATCH_COLOUR if ok is None else CORRECT_COLOUR if ok else WRONG_COLOUR
        lines = [(f"#{rank}  sim {m.similarity:.3f}", _TEXT),
                 (f"det {m.det_score:.2f}  {_shorten(str(m.frame), 18)}", _MUTED)]
        tiles.append(_tile(m.image, m.box, colour, None if ok is None else colour, lines, height,
                           context))

    gap, separator = max(6, height // 24), max(16, height // 8)
    title_scale, note_scale = height / 320, height / 420
    title_h = _text_size("Ag", title_scale)[1] + 2 * gap if title else 0
    note = None if matches else "no match"
    rows = max(t.shape[0] for t in tiles)
    strip_w = (sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1) + separator - gap
               + 2 * gap + (_text_size(note, note_scale)[0] if note else 0))
    if title:
        strip_w = max(strip_w, _text_size(title, title_scale)[0] + 2 * gap)
    strip = np.full((title_h + rows + 2 * gap, strip_w, 3), 255, np.uint8)
    if title:
        _put_text(strip, title, (gap, gap + _text_size("Ag", title_scale)[1]), title_scale, _TEXT)
    x, y = gap, title_h + gap
    for i, tile in enumerate(tiles):
        strip[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
        x += tile.shape[1] + (separator if i == 0 else gap)
        if i == 0:  # vertical rule between the query and the matches
            cv2.line(strip, (x - separator // 2, y), (x - separator // 2, y + rows),
                     (190, 190, 190), 1)
    if note:
        _put_text(strip, note, (x, y + height // 2), note_scale, _MUTED)
    return strip


def _page_link(path: str, out_dir: str) -> str:
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))
    return urllib.parse.quote(relative.replace(os.sep, "/"))


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       background: #f4f4f4; color: #222; }
header { background: #263238; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; font-weight: 600; }
main { padding: 8px 32px 32px; max-width: 1600px; }
section { background: #fff; border-radius: 6px; padding: 12px 20px 16px; margin-top: 20px;
          box-shadow: 0 1px 3px rgba(0, 0, 0, 0.12); }
section h2 { font-size: 17px; margin: 4px 0 10px; }
figure { margin: 0 0 12px; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; display: block; }
p.caption { color: #555; font-size: 14px; margin: 6px 0 0; white-space: pre-wrap; }
"""
REPORT_CSS = _CSS  # the report pages' style sheet (shared by the results viewer)


def write_html_report(
    out_dir: str, title: str, sections: Sequence[Tuple[str, Sequence[str], str]]
) -> str:
    """Write ``out_dir/index.html``: a static page (no external assets) of titled sections.

    Args:
        out_dir: the report folder (created if missing).
        title: the page title.
        sections: ``(heading, image paths, caption)`` each; image paths are file-system paths
            (absolute or relative to the current directory) of images that exist, linked
            relative to ``out_dir`` so the folder can be moved; the caption may be "".

    Returns:
        the path of ``index.html``.

    Raises:
        FileNotFoundError: an image that does not exist.
    """
    os.makedirs(out_dir, exist_ok=True)
    body = []
    for heading, images, caption in sections:
        figures = []
        for path in images:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"report image {path} not found")
            link = _page_link(path, out_dir)
            alt = html.escape(os.path.basename(path))
            figures.append(f'<figure><a href="{link}"><img src="{link}" alt="{alt}" '
                           f'loading="lazy"></a></figure>')
        text = f'<p class="caption">{html.escape(caption)}</p>' if caption else ""
        body.append(f"<section><h2>{html.escape(heading)}</h2>{''.join(figures)}{text}</section>")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body><header><h1>"
        f"{html.escape(title)}</h1></header>\n<main>\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
