"""Reading order of the lines a detector found on a page.

Columns are found first from where lines start: three or more lines starting at one x, right of the
page's left edge, with a blank gutter before it, start a column. A box the detector drew across such a
gutter (scan noise bridges it) is cut there when its image is blank in the gutter; one that is not
blank there (a title over both columns) stays whole. Pieces of one text line (a detector splits a line
at a wide space) are joined, never across a gutter. Then lines that
span most of the text's width (a title, a line of a single-column page) divide the page into bands,
top to bottom; inside a band the remaining lines form columns by their horizontal overlap, read left
to right, each top to bottom. A single-column page reads top to bottom; a title over two columns
reads title, left column, right column.
"""

from __future__ import annotations

import cv2
import numpy as np

from atelier.models.ocr.detector import Box

WIDE = 0.6  # a line at least this share of the text's width spans the page: it separates bands


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def same_line(a: Box, b: Box) -> bool:
    """Two pieces of one text line: they share most of their height and the gap between them is
    under 0.6 of the line's height (a two-column page's gutter is wider)."""
    ax0, ay0, ax1, ay1 = a.bounds
    bx0, by0, bx1, by1 = b.bounds
    height = min(ay1 - ay0, by1 - by0)
    if height <= 0 or _overlap(ay0, ay1, by0, by1) < 0.6 * height:
        return False
    gap = max(bx0 - ax1, ax0 - bx1)
    return gap < 0.6 * height


def gutters(boxes: list[Box]) -> list[tuple[float, float]]:
    """(x0, x1) of each gap between columns: left of where 3+ lines start, right of where the lines of
    the column before them end."""
    if len(boxes) < 4:
        return []
    bounds = [b.bounds for b in boxes]
    left = min(b[0] for b in bounds)
    right = max(b[2] for b in bounds)
    height = float(np.median([b[3] - b[1] for b in bounds]))
    tol = max(0.5 * height, 0.01 * (right - left))
    starts = sorted(b[0] for b in bounds)
    out: list[tuple[float, float]] = []
    i = 0
    while i < len(starts):
        j = i
        while j + 1 < len(starts) and starts[j + 1] - starts[i] <= tol:
            j += 1
        x = starts[i]
        if j - i + 1 >= 3 and x > left + 0.25 * (right - left):
            ends = [b[2] for b in bounds if b[2] < x - tol and b[0] < x - tol]
            if len(ends) >= 2:
                g0 = max(ends)
                if x - g0 >= 0.5 * height and not any(g0 <= o[0] <= x for o in out):
                    out.append((g0, x))
        i = j + 1
    return out


def _blank_columns(image: np.ndarray) -> np.ndarray:
    """Columns of a line image without ink, once specks of scan noise (components smaller than a
    fiftieth of the line's height squared, or so) are ignored."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    _, ink = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    if ink.mean() > 0.5:
        ink = 1 - ink
    count, labels, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    speck = stats[:, cv2.CC_STAT_AREA] < max(4, int((0.15 * image.shape[0]) ** 2))
    speck[0] = True  # the background
    solid = ~speck[labels]
    return ~solid.any(axis=0)


def split_across(box: Box, gutter: tuple[float, float]) -> list[Box]:
    """`box` cut in two at `gutter` when its image has a blank run at least the line's height long
    there (a word space is a third of that; a title's text runs on across the gutter)."""
    x0, _, x1, _ = box.bounds
    g0, g1 = gutter
    if not (x0 < g0 and x1 > g1):
        return [box]
    h, w = box.image.shape[:2]
    a, b = int((g0 - x0) / (x1 - x0) * w), int((g1 - x0) / (x1 - x0) * w)
    blank = _blank_columns(box.image)
    run, best, best_end = 0, 0, 0
    for x in range(max(0, a - h), min(w, b + h)):
        run = run + 1 if blank[x] else 0
        if run > best:
            best, best_end = run, x + 1
    if best < h:
        return [box]
    cut = best_end - best // 2
    tl, tr, br, bl = (np.array(c, np.float64) for c in box.corners)
    f = cut / w
    top, bottom = (tl + (tr - tl) * f).tolist(), (bl + (br - bl) * f).tolist()
    # the page corners follow the same cut (the box's edges are the same lines on a turned page)
    ptl, ptr, pbr, pbl = (np.array(c, np.float64) for c in box.page_corners)
    ptop, pbottom = (ptl + (ptr - ptl) * f).tolist(), (pbl + (pbr - pbl) * f).tolist()
    first = Box(
        [tl.tolist(), top, bottom, bl.tolist()],
        np.ascontiguousarray(box.image[:, :cut]),
        None if box.on_page is None else [ptl.tolist(), ptop, pbottom, pbl.tolist()],
    )
    second = Box(
        [top, tr.tolist(), br.tolist(), bottom],
        np.ascontiguousarray(box.image[:, cut:]),
        None if box.on_page is None else [ptop, ptr.tolist(), pbr.tolist(), pbottom],
    )
    return [first, second]


def reading_order(boxes: list[Box]) -> list[list[Box]]:
    """Lines in reading order; each line is its pieces, left to right."""
    gaps = gutters(boxes)
    for gutter in gaps:
        boxes = [piece for box in boxes for piece in split_across(box, gutter)]
    lines = _join_pieces(boxes, gaps)
    if not lines:
        return []
    x0 = min(_bounds(line)[0] for line in lines)
    x1 = max(_bounds(line)[2] for line in lines)
    width = max(x1 - x0, 1.0)
    ordered: list[list[Box]] = []
    band: list[list[Box]] = []
    for line in sorted(lines, key=lambda ln: _bounds(ln)[1]):
        b = _bounds(line)
        if b[2] - b[0] >= WIDE * width:
            ordered.extend(_columns(band))
            ordered.append(line)
            band = []
        else:
            band.append(line)
    ordered.extend(_columns(band))
    return ordered


def _bounds(line: list[Box]) -> tuple[float, float, float, float]:
    bs = [b.bounds for b in line]
    return min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs), max(b[3] for b in bs)


def _join_pieces(boxes: list[Box], gaps: list[tuple[float, float]] = ()) -> list[list[Box]]:
    lines: list[list[Box]] = []
    for box in sorted(boxes, key=lambda b: b.bounds[0]):
        for line in lines:
            across = any(line[-1].bounds[2] <= g1 and box.bounds[0] >= g0 for g0, g1 in gaps)
            if same_line(line[-1], box) and not across:
                line.append(box)
                break
        else:
            lines.append([box])
    return lines


def _columns(band: list[list[Box]]) -> list[list[Box]]:
    """Group a band's lines into columns by horizontal overlap; columns left to right, lines top to bottom."""
    columns: list[dict] = []
    for line in sorted(band, key=lambda ln: _bounds(ln)[0]):
        x0, _, x1, _ = _bounds(line)
        for col in columns:
            if _overlap(x0, x1, col["x0"], col["x1"]) >= 0.3 * min(x1 - x0, col["x1"] - col["x0"]):
                col["lines"].append(line)
                col["x0"], col["x1"] = min(col["x0"], x0), max(col["x1"], x1)
                break
        else:
            columns.append({"x0": x0, "x1": x1, "lines": [line]})
    out: list[list[Box]] = []
    for col in sorted(columns, key=lambda c: c["x0"]):
        out.extend(sorted(col["lines"], key=lambda ln: _bounds(ln)[1]))
    return out
