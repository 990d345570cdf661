"""Video: frames sampled by time, the OCR text track of clips made here (text appearing and disappearing
at known times, in two languages), bad clips named, and the HTTP judge's video request."""

from __future__ import annotations

import json
import os
from fractions import Fraction

import numpy as np
import pytest

from atelier.models.ocr.metrics import edit_distance, normalise
from atelier.models.video.frames import BadVideo, Sampling, probe, sample
from tests.video_clips import make_clip

av = pytest.importorskip("av")
EVERY = 0.5
SHOWN = [  # (start, end, text, language): two languages, two lines on screen at once from 5.0 to 6.5 s
    (1.0, 3.5, "HELLO WORLD 2026", "en"),
    (4.0, 6.5, "你好世界欢迎光临", "zh"),
    (5.0, 7.5, "TOTAL 42.50 EUR", "en"),
]


@pytest.fixture(scope="module")
def engine():
    from atelier.models.ocr.engine import load_engine, shipped_engine_files
    from atelier.models.ocr.render import missing_fonts

    if missing_fonts():
        pytest.skip("needs Debian's fonts (make ocr-system-deps)")
    files, spec = shipped_engine_files({"en": "ppocr", "zh": "ppocr"})
    return load_engine(files, spec, {})


def _cer(a: str, b: str, lang: str) -> float:
    a, b = normalise(a, lang), normalise(b, lang)
    return edit_distance(a, b) / max(1, len(b))


def test_the_text_track_of_a_two_language_clip_is_right_to_one_sampling_interval(engine, tmp_path):
    from atelier.models.video.ocr import read_video
    from atelier.models.video.track import webvtt

    clip = make_clip(tmp_path / "clip.mp4", SHOWN, duration=8.5)
    row = read_video(engine, clip, Sampling(every=EVERY))
    assert row["error"] == "" and row["duration"] == pytest.approx(8.5, abs=0.15) and row["frames"] >= 8.5 / EVERY
    cues = row["cues"]
    for start, end, text, lang in SHOWN:
        found = [c for c in cues if _cer(c["text"], text, lang) <= 0.2]
        assert len(found) == 1, (text, cues)
        cue = found[0]
        # it starts at the first frame that showed it, ends at the first that did not: within one interval, never early
        assert start - 1e-6 <= cue["start"] <= start + EVERY and end - 1e-6 <= cue["end"] <= end + EVERY, (text, cue)
        assert all(start - 1e-6 <= t < end for t in cue["frames"])
    assert len(cues) == len(SHOWN), cues
    subtitles = webvtt(cues)
    assert subtitles.startswith("WEBVTT\n") and subtitles.count(" --> ") == 3 and "00:00:01.000 --> " in subtitles


def test_frames_are_sampled_by_their_own_time_in_a_variable_frame_rate_clip(tmp_path):
    path = tmp_path / "vfr.mkv"
    times_ms = [0, 100, 150, 900, 1000, 1700, 2050, 2900, 3000, 3400]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mjpeg", rate=1000)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for ms in times_ms:
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 128, np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    taken = [round(f.t, 3) for f in sample(path, Sampling(every=1.0, scene_changes=False))]
    assert taken == [0.0, 1.0, 2.05, 3.0]
    # a cap on frames widens the interval over the clip's duration instead of stopping early
    assert probe(path, Sampling(every=0.1, max_frames=4)).interval == pytest.approx(3.4 / 4, rel=0.2)


def _write(path, frames_ms: list[int], size=(64, 48), codec="mjpeg", pix_fmt="yuvj420p"):
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=1000)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
        stream.codec_context.time_base = Fraction(1, 1000)
        out.start_encoding()  # the header, even for a clip of no frames
        for ms in frames_ms:
            frame = av.VideoFrame.from_ndarray(np.zeros((size[1], size[0], 3), np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _silence(out, stream, frames: int) -> None:
    """`frames` frames of 1024 silent samples at 16 kHz, muxed into `out`."""
    for i in range(frames):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, i * 1024
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def _audio_only(path):
    with av.open(str(path), "w") as out:
        _silence(out, out.add_stream("aac", rate=16000), 10)
    return path


def test_bad_clips_are_named_with_the_fix_and_never_raise(engine, tmp_path):
    from atelier.models.video.ocr import read_video

    good = make_clip(tmp_path / "good.mkv", SHOWN[:1], duration=4.0)
    truncated = tmp_path / "truncated.mkv"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 5])
    fifo = tmp_path / "fifo.mp4"
    os.mkfifo(fifo)
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(4096))
    (tmp_path / "empty.mp4").write_bytes(b"")
    cases = {
        "garbage.mp4": "not a video",
        "empty.mp4": "not a video",
        "fifo.mp4": "not a regular file",
        _audio_only(tmp_path / "audio.m4a").name: "audio-only",
        _write(tmp_path / "none.mp4", [], codec="libx264", pix_fmt="yuv420p").name: "an empty clip",  # a zero-length clip
        _write(tmp_path / "huge.avi", [0], size=(8200, 16)).name: "8200x16 pixels",
        _write(tmp_path / "long.mkv", [0, 7 * 3600 * 1000]).name: "7.0 hours",
        truncated.name: "truncated",
    }
    for name, problem in cases.items():
        row = read_video(engine, tmp_path / name, Sampling(every=EVERY))
        assert problem in row["error"] and name in row["error"] and "Fix:" in row["error"], (name, row["error"])
        assert row["cues"] == [] and row["kind"] == "video"
    with pytest.raises(BadVideo):
        probe(tmp_path / "garbage.mp4", Sampling())
    assert read_video(engine, good, Sampling(every=EVERY))["error"] == ""  # the rest is still read


def test_a_clip_whose_sound_runs_longer_than_its_picture_is_not_called_truncated(engine, tmp_path):
    from atelier.models.video.ocr import read_video

    path = tmp_path / "talk.mp4"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=16000)
        for _ in range(20):  # 2 s of picture
            for packet in video.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 200, np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        _silence(out, audio, 80)  # 5 s of sound
    row = read_video(engine, path, Sampling(every=0.5))
    assert row["error"] == "" and row["duration"] == pytest.approx(2.0, abs=0.2) and row["cues"] == []


def test_sampling_limits_are_checked():
    for every, cap in ((0.0, 10), (-1.0, 10), (1.0, 0), (1.0, 10**6), (float("nan"), 10)):
        with pytest.raises(ValueError):
            Sampling(every, cap)
    assert Sampling(2.0, 10).key() != Sampling(1.0, 10).key()


def test_the_http_judge_sends_a_clip_as_one_video_input_and_caches_by_content_and_sampling(tmp_path):
    from atelier.models.vlm.http import HttpJudge
    from atelier.models.vlm.scoring import Cache, Scorer
    from atelier.models.vlm.video import judge_clip, load_clip
    from tests.judge_server import Server, make_app

    clip = make_clip(tmp_path / "clip.mp4", SHOWN[:1], duration=3.0)
    app = make_app(judge=None)
    with Server(app) as server:
        judge = HttpJudge(server.url, "glm-4.5v", api_key="k", backoff=0.01)
        scorer = Scorer(judge, Cache(tmp_path / "cache"))
        app.state.faults.extend(["yes:0.9", "text:" + json.dumps({"caption": "white text on a light background", "objects": []})])
        one = load_clip(clip, Sampling(every=1.0))
        row = judge_clip(scorer, one, "a greeting", mode="video")
        body = app.state.bodies[0]
        parts = body["messages"][0]["content"]
        video = [p for p in parts if p["type"] == "video_url"]
        assert len(video) == 1 and video[0]["video_url"]["url"].startswith("data:video/mp4;base64,")
        assert __import__("base64").b64decode(video[0]["video_url"]["url"].split(",", 1)[1]) == clip.read_bytes()
        assert parts[-1]["type"] == "text" and 'Does this video show "a greeting"?' in parts[-1]["text"]
        assert row["prompt_score"] == pytest.approx(0.9) and row["kind"] == "video" and row["frames"] == [0.0, 1.0, 2.0]
        assert row["caption"] == "white text on a light background"
        asked = len(app.state.bodies)
        judge_clip(scorer, one, "a greeting", mode="video", caption=False)  # cached: same clip, same sampling
        assert len(app.state.bodies) == asked
        app.state.faults.append("yes:0.2")
        frames = judge_clip(scorer, load_clip(clip, Sampling(every=0.5)), "a greeting", mode="frames", caption=False)
        parts = app.state.bodies[-1]["messages"][0]["content"]
        assert [p["text"] for p in parts[:-1] if p["type"] == "text"][:2] == ["t=0.00s", "t=0.50s"]
        assert sum(p["type"] == "image_url" for p in parts) == len(frames["frames"]) >= 6
        assert frames["prompt_score"] == pytest.approx(0.2)


def test_a_judge_of_images_scores_each_frame_and_names_the_frames_that_decided(tmp_path):
    from atelier.models.vlm.scoring import Cache, Scorer
    from atelier.models.vlm.video import judge_clip, load_clip

    class Frames:  # an image-only judge (the edge of the world: a model's answers), yes only on frames with text
        name, calibrated, concurrency = "frames-judge", True, 1

        def ask(self, images, prompt, max_tokens=16, logprobs=True):
            from PIL import Image

            from atelier.models.vlm.base import Answer

            dark = np.asarray(Image.open(__import__("io").BytesIO(images[-1])).convert("L")).min() < 100
            return Answer("yes" if dark else "no", None)

    clip = make_clip(tmp_path / "clip.mp4", [(2.0, 4.0, "HELLO", "en")], duration=6.0)
    row = judge_clip(Scorer(Frames(), Cache(None)), load_clip(clip, Sampling(every=1.0)), "text", caption=False)
    assert row["prompt_score"] == 1.0 and set(row["decided_by"]) <= {2.0, 3.0}
    assert [f["score"] for f in row["frame_scores"]] == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
