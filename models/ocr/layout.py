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

Two things come before that. A page photographed or scanned at a slant (a few degrees) is levelled:
the lines' own angle (the median of their top edges) turns their coordinates, so a row of a tilted
table is still one row and a column's lines still start at one x. And a band whose columns are not
columns of text but of cells (a table, a timetable, a receipt: see `_table_rows`) is read row by row, each
row's cells left to right as one line; each of those boxes carries its (row, column).
"""

from __future__ import annotations

import cv2
import numpy as np

from atelier.models.ocr.detector import Box

WIDE = 0.6  # a line at least this share of the text's width spans the page: it separates bands
CELL = 0.3  # a column narrower than this share of the band's width may hold cells, not text...
UNEVEN = 0.6  # ...when it is also narrower than this share of the band's widest column
SHORT = 4.5  # lines side by side shorter than this many times their height are cells, not lines of text
LEVEL_DEGREES = 0.2  # a page tilted less than this is read as it is


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


def tilt(boxes: list[Box]) -> float:
    """The page's slant in radians: the median angle of the top edges of its lines at least twice as
    long as they are high (short boxes' angles are noise)."""
    angles = []
    for b in boxes:
        (x0, y0), (x1, y1) = b.corners[0], b.corners[1]
        height = ((b.corners[3][0] - x0) ** 2 + (b.corners[3][1] - y0) ** 2) ** 0.5
        if x1 - x0 >= 2 * max(height, 1.0):
            angles.append(np.arctan2(y1 - y0, x1 - x0))
    return float(np.median(angles)) if angles else 0.0


def level(boxes: list[Box]) -> list[Box]:
    """The boxes with their coordinates turned so the page's lines lie level (each keeps its corners on
    the page as given, and its image, which the detector already levelled)."""
    angle = tilt(boxes)
    if abs(np.degrees(angle)) < LEVEL_DEGREES:
        return boxes
    c, s = np.cos(angle), np.sin(angle)
    return [Box([[x * c + y * s, -x * s + y * c] for x, y in b.corners], b.image, b.page_corners) for b in boxes]


def reading_order(boxes: list[Box]) -> list[list[Box]]:
    """Lines in reading order; each line is its pieces, left to right."""
    boxes = level(boxes)
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
        if b[2] - b[0] >= WIDE * width and not any(other is not line and _same_row(line, other) for other in lines):
            ordered.extend(_columns(band))
            ordered.append(line)
            band = []
        else:
            band.append(line)
    ordered.extend(_columns(band))
    return ordered


def _same_row(a: list[Box], b: list[Box]) -> bool:
    """Side by side: their vertical centres within half the lower line's height (a receipt's long item
    and its price: a row of a table, not a title that divides the page)."""
    _, ay0, _, ay1 = _bounds(a)
    _, by0, _, by1 = _bounds(b)
    return abs((ay0 + ay1) - (by0 + by1)) / 2 < 0.5 * min(ay1 - ay0, by1 - by0)


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
    """Group a band's lines into columns by horizontal overlap; columns left to right, lines top to
    bottom; or, when the columns hold cells, the band's rows (`_cells`)."""
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
    columns.sort(key=lambda c: c["x0"])
    rows = _table_rows(band, columns)
    if rows:
        return _cells(rows, columns)
    out: list[list[Box]] = []
    for col in columns:
        out.extend(sorted(col["lines"], key=lambda ln: _bounds(ln)[1]))
    return out


def _row_groups(band: list[list[Box]]) -> list[list[list[Box]]]:
    """The band's lines grouped into rows: a line joins the row whose members' mean centre is within
    half a line's height of its own (rows do not grow into their neighbours on a tightly set receipt)."""
    rows: list[dict] = []
    for line in sorted(band, key=lambda ln: (_bounds(ln)[1] + _bounds(ln)[3]) / 2):
        _, y0, _, y1 = _bounds(line)
        centre, height = (y0 + y1) / 2, y1 - y0
        for row in rows:
            if abs(centre - np.mean(row["centres"])) < 0.5 * min(height, float(np.median(row["heights"]))):
                row["lines"].append(line)
                row["centres"].append(centre)
                row["heights"].append(height)
                break
        else:
            rows.append({"centres": [centre], "heights": [height], "lines": [line]})
    return [r["lines"] for r in sorted(rows, key=lambda r: np.mean(r["centres"]))]


def _table_rows(band: list[list[Box]], columns: list[dict]) -> list[list[list[Box]]] | None:
    """The band's rows where its columns are a table's (or a receipt's, a timetable's): at least half its rows,
    three or more, hold two lines or more side by side, and either those lines are short (by median
    under `SHORT` times their height: figures, a word or two) or the narrowest column is under CELL of
    the band's width and far narrower than the widest (under UNEVEN of it). Columns of running text
    have long lines and are as wide as each other, however many a page has. None: not a table."""
    if len(columns) < 2:
        return None
    rows = _row_groups(band)
    side_by_side = [ln for r in rows if len(r) >= 2 for ln in r]
    multi = sum(len(r) >= 2 for r in rows)
    if multi < 3 or multi < 0.5 * len(rows):
        return None
    aspect = float(np.median([(b[2] - b[0]) / max(b[3] - b[1], 1.0) for b in (_bounds(ln) for ln in side_by_side)]))
    extents = [c["x1"] - c["x0"] for c in columns]
    width = max(max(c["x1"] for c in columns) - min(c["x0"] for c in columns), 1.0)
    table = aspect < SHORT or (min(extents) < CELL * width and min(extents) < UNEVEN * max(extents))
    return rows if table else None


def _cells(rows: list[list[list[Box]]], columns: list[dict]) -> list[list[Box]]:
    """A table's rows top to bottom, each one line of its cells left to right; every box is tagged
    with its (row, column) in `cell`."""
    out: list[list[Box]] = []
    for r, row in enumerate(rows):
        line: list[Box] = []
        for piece_line in sorted(row, key=lambda ln: _bounds(ln)[0]):
            x0, _, x1, _ = _bounds(piece_line)
            col = max(range(len(columns)), key=lambda i: _overlap(x0, x1, columns[i]["x0"], columns[i]["x1"]))
            for box in piece_line:
                box.cell = (r, col)
                line.append(box)
        out.append(line)
    return out
