"""What every judge backend returns, and the errors that name what went wrong."""

from __future__ import annotations

from dataclasses import dataclass, field

from atelier.kernel.errors import AtelierError


class JudgeError(AtelierError):
    """The judge answered with something unusable, or refused the request (a 4xx other than 429)."""


class JudgeUnavailable(JudgeError):
    """The judge could not be reached or kept failing after the retries."""


@dataclass
class Answer:
    text: str
    first_token_logprobs: dict[str, float] | None = None  # token -> log-probability, top-k of the first token
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens


@dataclass
class Usage:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: int = 0

    def add(self, answer: Answer) -> None:
        self.requests += 1
        self.prompt_tokens += int(answer.usage.get("prompt_tokens", 0))
        self.completion_tokens += int(answer.usage.get("completion_tokens", 0))

    def cost(self, usd_per_million_in: float, usd_per_million_out: float) -> float:
        return (self.prompt_tokens * usd_per_million_in + self.completion_tokens * usd_per_million_out) / 1e6
