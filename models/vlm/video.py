"""Judging a clip as GLM-4.5V takes it: one input, a sequence of frames with their timing.

A judge that takes video (`ask_video`: the HTTP judge) is asked about the whole clip once, as the file
(`video`) or as its sampled frames after their timestamps (`frames`). A judge that reads images only
(the local and embedded ones) is asked about each sampled frame; the clip's score is the mean of its
best quarter of frames (a clip shows something when a good part of it does, and one odd frame does
not decide), and the result names the frames that decided it. Cache keys cover the clip's content
hash and its sampling, so a rerun asks nothing and a new sampling asks again.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from atelier.models.video.frames import Sampling, probe, sample

MIME = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".avi": "video/x-msvideo",
    ".mpg": "video/mpeg",
    ".mpeg": "video/mpeg",
    ".ts": "video/mp2t",
}
MAX_INLINE = 50_000_000  # bytes of a clip sent as one data URL; a larger clip goes as its frames
FRAME_SIDE = 896  # frames are sent to a judge at most this many pixels on a side


@dataclass(frozen=True)
class Clip:
    path: str
    sha256: str
    mime: str
    duration: float
    sampling: str  # Sampling.key()
    frames: list[tuple[float, bytes]]  # (time in seconds, PNG)
    data: bytes | None  # the file itself, where small enough to send inline

    def identity(self) -> bytes:
        """What a judgment of the clip depends on besides the question: its content and its sampling."""
        return f"clip:{self.sha256}:{self.sampling}".encode()


def _png(rgb) -> bytes:
    img = Image.fromarray(rgb)
    img.thumbnail((FRAME_SIDE, FRAME_SIDE))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def load_clip(path: Path, sampling: Sampling) -> Clip:
    """The clip's sampled frames (as PNGs, with their times) and, where small enough, its bytes. A clip
    that cannot be read is a BadVideo naming it."""
    path = Path(path)
    info = probe(path, sampling)
    frames = [(f.t, _png(f.image)) for f in sample(path, sampling, info)]
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    data = path.read_bytes() if size <= MAX_INLINE else None
    return Clip(str(path), digest.hexdigest(), MIME.get(path.suffix.lower(), "video/mp4"), info.duration, sampling.key(), frames, data)


def judge_clip(scorer, clip: Clip, prompt: str, mode: str = "video", caption: bool = True) -> dict:
    """One row for the clip: P(yes) that it shows `prompt`, how it was decided, and a caption."""
    question = f'Does this video show "{prompt}"?'
    row: dict = {
        "video": clip.path,
        "kind": "video",
        "prompt": prompt,
        "sampling": clip.sampling,
        "frames": [round(t, 3) for t, _ in clip.frames],
    }
    ask_video = getattr(scorer.judge, "ask_video", None)
    if ask_video is not None:
        how = mode if (mode == "frames" or clip.data is not None) else "frames"
        s = scorer.yes_no(
            f"clip-{how}",
            [clip.identity()],
            question,
            clip.path,
            ask=lambda q, max_tokens: ask_video(clip, q, how, max_tokens=max_tokens),
        )
        row.update(
            prompt_score=s["score"],
            answer=s["answer"],
            decided_by=f"the whole clip, sent as {'the video' if how == 'video' else 'its frames'}",
        )
        if caption:
            c = scorer.caption(clip.frames[len(clip.frames) // 2][1], f"{clip.path}@middle")
            row.update(caption=c.get("caption"), caption_frame=round(clip.frames[len(clip.frames) // 2][0], 3))
        return row
    scored = []
    for t, png in clip.frames:
        s = scorer.prompt_score(png, prompt, f"{clip.path}@{t:.2f}s")
        if s["score"] is not None:
            scored.append((s["score"], t, png))
    if not scored:
        row.update(prompt_score=None, answer="no frame was judged", decided_by=[])
        return row
    best = sorted(scored, key=lambda x: (-x[0], x[1]))[: max(1, len(scored) // 4)]
    row.update(
        prompt_score=sum(s for s, _, _ in best) / len(best),
        answer=f"mean of the best {len(best)} of {len(scored)} frames",
        decided_by=[round(t, 3) for _, t, _ in best],
        frame_scores=[{"t": round(t, 3), "score": round(s, 4)} for s, t, _ in sorted(scored, key=lambda x: x[1])],
    )
    if caption:
        c = scorer.caption(best[0][2], f"{clip.path}@{best[0][1]:.2f}s")
        row.update(caption=c.get("caption"), caption_frame=round(best[0][1], 3))
    return row
