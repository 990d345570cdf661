"""Small clips for the video tests, made here: lines of text that appear and disappear at known times."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_clip(
    path: Path,
    shown: list[tuple[float, float, str, str]],
    duration: float,
    fps: float = 10,
    size: tuple[int, int] = (640, 360),
    codec: str = "libx264",
) -> Path:
    """A clip of `duration` seconds: each (start, end, text, lang) is drawn in the middle while start <= t < end."""
    import av

    from atelier.models.ocr.render import fonts_for

    fonts = {lang: fonts_for(lang, 36)[0] for _, _, _, lang in shown}
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(int(round(duration * fps))):
            t = i / fps
            img = Image.new("RGB", size, (250, 250, 245))
            draw = ImageDraw.Draw(img)
            y = size[1] // 3
            for start, end, text, lang in shown:
                if start <= t < end:
                    draw.text((40, y), text, font=fonts[lang], fill=(10, 10, 10))
                    y += 60
            frame = av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
