"""Character error rate and its per-language summary."""

from __future__ import annotations

import re
from collections import defaultdict

from atelier.models.ocr.langs import NO_SPACES


def normalise(text: str, lang: str | None) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text.replace(" ", "") if lang in NO_SPACES else text


def edit_distance(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer_counts(predicted: str, truth: str, lang: str | None) -> tuple[int, int]:
    """(edits, reference characters) after whitespace normalisation."""
    p, t = normalise(predicted, lang), normalise(truth, lang)
    return edit_distance(p, t), max(len(t), 1)


def summarise(rows: list[dict]) -> dict:
    """rows: {lang, text, predicted}. CER is total edits over total reference characters."""
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # edits, chars, lines, exact
    for r in rows:
        edits, chars = cer_counts(r["predicted"], r["text"], r["lang"])
        for key in (r["lang"], "overall"):
            per[key][0] += edits
            per[key][1] += chars
            per[key][2] += 1
            per[key][3] += edits == 0
    return {k: {"cer": e / c, "lines": n, "exact": x / n} for k, (e, c, n, x) in sorted(per.items())}
