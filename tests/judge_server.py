"""A local OpenAI-compatible chat-completions server for the judge tests: it serves the tiny local
GLM-4.1V (log-probabilities included) and plays scripted faults, one per request, in order:

    "429:<seconds>"  429 with Retry-After        "500"        an internal error
    "sleep:<s>"      answer after s seconds       "malformed"  200 without the chat-completions fields
    "refuse"         a refusal as the answer       "yes:<p>"    an answer whose first token has P(yes)=p
    "text:<t>"       the answer t, no logprobs
A request with a `video_url` part is recorded like any other (`bodies`); give it a scripted answer.
"""

from __future__ import annotations

import asyncio
import base64
import math
import socket
import threading
import time
from collections import deque

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def make_app(judge) -> FastAPI:
    app = FastAPI()
    app.state.faults = deque()
    app.state.seen = []  # (authorization header, number of images, prompt)
    app.state.bodies = []  # each request's JSON body, as sent (the video tests read its shape)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        content = body["messages"][0]["content"]
        images = [base64.b64decode(c["image_url"]["url"].split(",", 1)[1]) for c in content if c["type"] == "image_url"]
        prompt = [c["text"] for c in content if c["type"] == "text"][-1]  # (a clip's frames come after their times)
        app.state.seen.append((request.headers.get("authorization"), len(images), prompt))
        fault = app.state.faults.popleft() if app.state.faults else None
        if fault and fault.startswith("429"):
            return JSONResponse({"error": "rate limited"}, status_code=429, headers={"Retry-After": fault.split(":")[1]})
        if fault == "500":
            return JSONResponse({"error": "boom"}, status_code=500)
        if fault == "malformed":
            return JSONResponse({"id": "x", "object": "chat.completion"})
        if fault and fault.startswith("sleep"):
            await asyncio.sleep(float(fault.split(":")[1]))
        if fault and fault.startswith("yes:"):
            p = float(fault.split(":")[1])
            text, top = ("yes" if p >= 0.5 else "no"), {"yes": math.log(max(p, 1e-9)), "no": math.log(max(1 - p, 1e-9))}
        elif fault == "refuse":
            text, top = "I'm sorry, I can't help with that.", None
        elif fault and fault.startswith("text:"):
            text, top = fault[5:], None
        else:
            answer = judge.ask(images, prompt, max_tokens=min(int(body.get("max_tokens", 8)), 8))
            text, top = answer.text, answer.first_token_logprobs
        logprobs = None
        if body.get("logprobs") and top:
            first = max(top, key=top.get)
            logprobs = {
                "content": [{"token": first, "logprob": top[first], "top_logprobs": [{"token": k, "logprob": v} for k, v in top.items()]}]
            }
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10 + 64 * len(images), "completion_tokens": 3, "total_tokens": 13 + 64 * len(images)},
        }

    return app


class Server:
    """uvicorn in a thread on a free port; `url` is the OpenAI base URL (…/v1)."""

    def __init__(self, app: FastAPI) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
