"""A text track from the OCR of sampled frames: each line of text that stays on screen is one cue with
the time it appeared and the time it was gone, as JSON lines or WebVTT subtitles.

A line seen in a frame continues a cue of the previous frame when it reads the same (after the
normalisation CER uses) or nearly (character error rate under `SAME_LINE`, for OCR noise between
frames); a line missing from one frame and back in the next is the same cue (a frame the OCR
misread). A cue starts at the first frame that showed it and ends at the first frame that no longer
did, so both ends are right to within one sampling interval; its text is the reading most of its
frames agree on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from atelier.models.ocr.metrics import edit_distance, normalise

SAME_LINE = 0.25  # character error rate between two frames' readings of one line


@dataclass
class Cue:
    start: float
    end: float
    text: str
    language: str
    confidence: float  # the best frame's
    frames: list[float] = field(default_factory=list)  # times of the frames that showed it
    readings: list[tuple[str, float]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "text": self.text,
            "language": self.language,
            "confidence": round(self.confidence, 4),
            "frames": [round(t, 3) for t in self.frames],
        }


def _key(text: str, lang: str | None) -> str:
    return normalise(text, lang)


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    longest = max(len(a), len(b))
    return longest >= 4 and edit_distance(a, b) / longest <= SAME_LINE


def text_track(frames: list[tuple[float, list[dict]]], interval: float, duration: float = 0.0) -> list[Cue]:
    """frames: (time, lines) in time order, each line {text, language, confidence}; the cues, by start."""
    done: list[Cue] = []
    open_: list[tuple[Cue, str, float | None]] = []  # (cue, key, time of the first frame that missed it)
    last_t = 0.0
    for t, lines in frames:
        last_t = t
        seen: set[int] = set()
        for line in lines:
            text = (line.get("text") or "").strip()
            key = _key(text, line.get("language"))
            if not key:
                continue
            match = next((i for i, (_, k, _m) in enumerate(open_) if i not in seen and _same(k, key)), None)
            if match is None:
                open_.append((Cue(t, t, text, line.get("language") or "", float(line.get("confidence") or 0.0)), key, None))
                match = len(open_) - 1
            cue = open_[match][0]
            cue.frames.append(t)
            cue.readings.append((text, float(line.get("confidence") or 0.0)))
            open_[match] = (cue, key, None)
            seen.add(match)
        still = []
        for i, (cue, key, missed) in enumerate(open_):
            if i in seen:
                still.append((cue, key, None))
            elif missed is None:
                still.append((cue, key, t))  # gone in this frame: ends here unless it is back in the next
            else:
                cue.end = missed
                done.append(cue)
        open_ = still
    for cue, _, missed in open_:
        cue.end = missed if missed is not None else (min(last_t + interval, duration) if duration else last_t + interval)
        done.append(cue)
    for cue in done:
        counts = Counter(text for text, _ in cue.readings)
        best = max(counts.items(), key=lambda kv: (kv[1], max(c for x, c in cue.readings if x == kv[0])))[0]
        cue.text = best
        cue.confidence = max(c for _, c in cue.readings)
    return sorted(done, key=lambda c: (c.start, c.end))


def timestamp(seconds: float) -> str:
    """HH:MM:SS.mmm, as WebVTT writes times."""
    ms = int(round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def webvtt(cues: list[dict]) -> str:
    """WebVTT subtitles from cues (`Cue.as_dict`): lines on screen over the same times are one cue, top to bottom."""
    merged: dict[tuple[float, float], list[str]] = {}
    for cue in cues:
        merged.setdefault((cue["start"], cue["end"]), []).append(cue["text"].replace("-->", "->"))
    out = ["WEBVTT", ""]
    for n, ((start, end), texts) in enumerate(sorted(merged.items()), start=1):
        out += [str(n), f"{timestamp(start)} --> {timestamp(end)}", *texts, ""]
    return "\n".join(out)
