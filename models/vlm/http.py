"""OpenAI-compatible chat completions over HTTP (GLM-4.5V via Z.ai, or GLM-4.5V/4.1V served by vLLM
or SGLang). Images go as base64 data URLs. 429 and 5xx answers and timeouts are retried with
exponential backoff that honours Retry-After; at most `concurrency` requests are in flight. The API
key is sent in the Authorization header and never logged or returned."""

from __future__ import annotations

import base64
import email.utils
import threading
import time

import httpx

from atelier.models.vlm.base import Answer, JudgeError, JudgeUnavailable, Usage


def _image(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


def _retry_after(value: str | None, default: float) -> float:
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else default


class HttpJudge:
    calibrated = True

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_wait: float = 60.0,
        concurrency: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url, self.model = base_url.rstrip("/"), model
        self.max_retries, self.backoff, self.max_wait = max_retries, backoff, max_wait
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        self.concurrency = concurrency  # judge_images sends this many requests at once
        self._slots = threading.Semaphore(concurrency)
        self.usage = Usage()
        self.name = f"{model} @ {self.base_url}"

    def ask(self, images: list[bytes], prompt: str, max_tokens: int = 16, logprobs: bool = True) -> Answer:
        return self._complete([_image(png) for png in images], prompt, max_tokens, logprobs)

    def ask_video(self, clip, prompt: str, mode: str = "video", max_tokens: int = 16, logprobs: bool = True) -> Answer:
        """Ask about a clip (models/vlm/video.Clip) as one input: `video` sends the file as a video_url
        data URL (GLM-4.5V's API, vLLM, SGLang); `frames` sends its sampled frames as images, each after
        a text part with its time, for servers that take images only. A clip too large to send inline
        goes as frames."""
        if mode == "video" and clip.data is not None:
            url = f"data:{clip.mime};base64," + base64.b64encode(clip.data).decode()
            content = [{"type": "video_url", "video_url": {"url": url}}]
        else:
            content = [part for t, png in clip.frames for part in ({"type": "text", "text": f"t={t:.2f}s"}, _image(png))]
        return self._complete(content, prompt, max_tokens, logprobs)

    def _complete(self, content: list[dict], prompt: str, max_tokens: int, logprobs: bool) -> Answer:
        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}],
        }
        if logprobs:
            body.update(logprobs=True, top_logprobs=5)
        data = self._post(body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            top = None
            lp = (choice.get("logprobs") or {}).get("content") or []
            if lp:
                top = {t["token"]: float(t["logprob"]) for t in lp[0].get("top_logprobs", [])} or {lp[0]["token"]: float(lp[0]["logprob"])}
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise JudgeError(
                self.name,
                f"answered without the chat-completions fields ({type(exc).__name__}: {exc})",
                "check that the server speaks the OpenAI chat-completions API",
            ) from None
        answer = Answer(text, top, {k: int(v) for k, v in (data.get("usage") or {}).items() if isinstance(v, int)})
        self.usage.add(answer)
        return answer

    def _post(self, body: dict) -> dict:
        waited, last = 0.0, ""
        for attempt in range(self.max_retries + 1):
            delay = self.backoff * 2**attempt
            try:
                with self._slots:
                    resp = self._http.post("/chat/completions", json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}"
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()
                    except ValueError:
                        raise JudgeError(self.name, "answered with a body that is not JSON", "check the server") from None
                if resp.status_code == 429 or resp.status_code >= 500:
                    last = f"HTTP {resp.status_code}"
                    delay = _retry_after(resp.headers.get("Retry-After"), delay)
                else:
                    hint = (
                        "check the API key (settings judge.api_key)"
                        if resp.status_code in (401, 403)
                        else "check the model name and the request"
                    )
                    raise JudgeError(self.name, f"refused the request: HTTP {resp.status_code} {resp.text[:200]}", hint)
            if attempt == self.max_retries or waited + delay > self.max_wait:
                break
            self.usage.retries += 1
            time.sleep(delay)
            waited += delay
        raise JudgeUnavailable(
            self.name,
            f"did not answer after {self.usage.retries} retries ({last})",
            "check that the judge is up; the gate fails rather than promote without it",
        )
