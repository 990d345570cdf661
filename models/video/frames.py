"""Frames of a video, sampled by time: what the OCR engine and the judge read of a clip.

Decoding is PyAV's (its wheel ships FFmpeg, so nothing is installed beside the lock). Frames are taken
every `every` seconds of presentation time (each frame's own timestamp, so a variable frame rate is
sampled by time, not by count), plus a frame where the picture changes (a cut, or text appearing:
the mean difference of 32x18 grey thumbnails), at most `max_frames` per clip: a longer clip is
sampled more sparsely, and says so. Each frame keeps its timestamp, so every result traces to it.

A file that is not a video, has no video stream (audio only), no frames, a picture over the size
limit or a duration over the limit, or that breaks off before its stated end is a `BadVideo` naming
the file and the fix, before or instead of any result from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atelier.kernel.errors import AtelierError

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts")
MAX_SIDE = 8192  # pixels on a side (8K is 7680)
MAX_PIXELS = 40_000_000  # a frame, as for a document page
MAX_SECONDS = 6 * 3600
SCENE_CHANGE = 10.0  # mean absolute difference of grey thumbnails (0-255) that counts as a new picture
THUMB = (32, 18)


class BadVideo(AtelierError):
    """A video that cannot be read as one (exit 2)."""


@dataclass(frozen=True)
class Sampling:
    """How a clip is sampled: every `every` seconds and at picture changes, at most `max_frames`."""

    every: float = 1.0
    max_frames: int = 300
    scene_changes: bool = True

    def __post_init__(self) -> None:
        if not (0.04 <= self.every <= 3600):
            raise ValueError(f"every must be between 0.04 and 3600 seconds, not {self.every}")
        if not (1 <= self.max_frames <= 10_000):
            raise ValueError(f"max_frames must be between 1 and 10000, not {self.max_frames}")

    def key(self) -> str:
        """What results depend on, for cache keys and exactly-once ids."""
        return f"every={self.every:g},max={self.max_frames},scenes={int(self.scene_changes)}"


@dataclass(frozen=True)
class VideoInfo:
    path: str
    duration: float  # seconds (0.0 where the container does not say)
    width: int
    height: int
    fps: float  # the stream's average rate (0.0 where unknown)
    codec: str
    interval: float  # the sampling interval used: `every`, or wider where `max_frames` needed it


@dataclass(frozen=True)
class Frame:
    t: float  # presentation time in seconds
    image: np.ndarray  # RGB uint8, height x width x 3
    scene_change: bool  # taken because the picture changed, not on the clock


def is_video(path: str | Path) -> bool:
    return str(path).lower().endswith(VIDEO_SUFFIXES)


def _open(path: Path):
    import av

    if not path.is_file():
        raise BadVideo(str(path), "is not a regular file", "pass a video file")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except Exception as exc:  # noqa: BLE001 (FFmpeg's errors, and PyAV's own on an empty container: IndexError, EOFError)
        raise BadVideo(
            str(path),
            f"is not a video Atelier can read, or holds no frames ({type(exc).__name__}: {str(exc).replace(str(path), 'the file')[:120]})",
            "re-encode it (e.g. H.264 in MP4)",
        ) from None
    if not container.streams.video:
        what = "an audio-only file" if container.streams.audio else "an empty clip, or no picture"
        container.close()
        raise BadVideo(str(path), f"has no video stream ({what})", "pass a file with a video track")
    return container


def probe(path: Path, sampling: Sampling) -> VideoInfo:
    """The clip's size, duration and rate, checked against the limits; the interval sampling will use."""
    container = _open(Path(path))
    try:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        duration = 0.0  # the picture's own length where the stream says (an audio track may run longer), else the container's
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1_000_000
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        codec = stream.codec_context.name
    finally:
        container.close()
    if width <= 0 or height <= 0:
        raise BadVideo(str(path), "has a video stream with no picture size", "re-encode it")
    if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
        raise BadVideo(
            str(path),
            f"is {width}x{height} pixels, over the {MAX_SIDE} px side / {MAX_PIXELS // 1_000_000} MP a frame Atelier reads",
            "scale it down (e.g. ffmpeg -vf scale=1920:-2)",
        )
    if duration > MAX_SECONDS:
        raise BadVideo(
            str(path),
            f"lasts {duration / 3600:.1f} hours, over the {MAX_SECONDS // 3600} hours Atelier reads in one go",
            "cut it into parts (e.g. ffmpeg -ss/-t) and read those",
        )
    interval = sampling.every
    if duration > 0 and duration / interval > sampling.max_frames:
        interval = duration / sampling.max_frames
    return VideoInfo(str(path), duration, width, height, fps, codec, interval)


def _thumb(frame) -> np.ndarray:
    return frame.reformat(width=THUMB[0], height=THUMB[1], format="gray").to_ndarray().astype(np.float32)


def sample(path: Path, sampling: Sampling, info: VideoInfo | None = None) -> Iterator[Frame]:
    """The sampled frames in time order (a generator: one decoded frame is held at a time)."""
    import av

    path = Path(path)
    info = info or probe(path, sampling)
    container = _open(path)
    taken, last_t, last_thumb, next_t = 0, None, None, 0.0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        index = 0
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else (index / info.fps if info.fps else float(index))
                index += 1
                thumb = _thumb(frame) if sampling.scene_changes else None
                on_clock = t + 1e-6 >= next_t
                changed = (
                    thumb is not None
                    and last_thumb is not None
                    and last_t is not None
                    and t - last_t >= info.interval / 4
                    and float(np.abs(thumb - last_thumb).mean()) >= SCENE_CHANGE
                )
                if not (on_clock or changed):
                    continue
                yield Frame(t, frame.to_ndarray(format="rgb24"), changed and not on_clock)
                taken += 1
                last_t, last_thumb = t, thumb
                while next_t <= t + 1e-6:
                    next_t += info.interval
                if taken >= sampling.max_frames:
                    break
        except av.error.FFmpegError as exc:
            at = f"{last_t:.2f} s" if last_t is not None else "its start"
            raise BadVideo(str(path), f"is damaged or truncated after {at} ({type(exc).__name__})", "re-encode or re-download it") from None
    finally:
        container.close()
    if taken == 0:
        raise BadVideo(str(path), "has no video frames (a zero-length clip)", "pass a clip with at least one frame")
    if taken < sampling.max_frames and info.duration and last_t is not None and last_t < info.duration - max(2 * info.interval, 1.0):
        raise BadVideo(
            str(path),
            f"breaks off at {last_t:.1f} s of its stated {info.duration:.1f} s (truncated)",
            "re-encode or re-download it",
        )
