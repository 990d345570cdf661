"""OCR of a video: the routed engine reads each sampled frame; the lines become a text track."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

from atelier.kernel.errors import AtelierError
from atelier.models.video.frames import Sampling, probe, sample
from atelier.models.video.track import text_track

CHUNK = 8  # frames read together (the engine batches their lines)


def read_video(
    engine, path: Path, sampling: Sampling, lang: str | None = None, on_frames: Callable[[int, int], None] | None = None
) -> dict:
    """One result for the clip: its cues (start, end, text, language, confidence, frame times), its
    text (the cues' texts in order of appearance) and how it was sampled. A clip that cannot be read
    gives a result with `error` naming it and the fix, and no cues. `on_frames(read, expected)` follows
    the frames as they are read."""
    from atelier.models.ocr.router import Request

    base = {"path": str(path), "kind": "video", "text": "", "language": "", "confidence": 0.0, "flagged": True, "cues": []}
    try:
        info = probe(Path(path), sampling)
        expected = max(1, min(sampling.max_frames, int(info.duration / info.interval) + 1)) if info.duration else sampling.max_frames
        seen: list[tuple[float, list[dict]]] = []
        batch = []

        def read(frames) -> None:
            readings = engine.read([Request(f.image, "page", lang) for f in frames])
            for frame, reading in zip(frames, readings):
                lines = [{"text": x.text, "language": x.lang or reading.language or "", "confidence": x.confidence} for x in reading.lines]
                seen.append((frame.t, lines))
            if on_frames:
                on_frames(min(len(seen), expected), expected)

        for frame in sample(Path(path), sampling, info):
            batch.append(frame)
            if len(batch) >= CHUNK:
                read(batch)
                batch = []
        if batch:
            read(batch)
    except AtelierError as exc:
        return {**base, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 (a backend's own failure on a frame: this clip's error, the other files are read)
        problem = f"the OCR engine failed on a frame ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        return {**base, "error": f"{path}: {problem}. Fix: check the clip, or leave it out; the other files were read"}
    cues = text_track(seen, info.interval, info.duration)
    languages = Counter(c.language for c in cues if c.language)
    return {
        **base,
        "text": "\n".join(dict.fromkeys(c.text for c in cues)),
        "language": languages.most_common(1)[0][0] if languages else "",
        "confidence": min((c.confidence for c in cues), default=0.0),
        "flagged": not cues,
        "cues": [c.as_dict() for c in cues],
        "duration": round(info.duration, 3),
        "interval": round(info.interval, 3),
        "frames": len(seen),
        "sampling": sampling.key(),
        "error": "",
    }
