"""Scoring with a VLM judge, cached, never counting a failure as a pass.

- prompt score (VQAScore-style): P(yes) to 'Does this image show "{prompt}"?' from the first answer
  token's log-probabilities (yes/no mass), else from the parsed answer.
- subject fidelity: P(yes) that the last image shows the same subject as the reference photos.
- prior leak: the same question on class images made without the identifier token: they should not
  show the subject (language drift), so lower is better.
- caption: a JSON caption with grounding boxes, kept for people to look at.
- OCR cross-check: the judge reads document pages (JSON {"text"}); its CER against the OCR model's
  output is a label-free quality signal for the OCR flow.

A JSON answer that does not parse, misses fields or refuses is asked once more with a stricter
prompt, then counted as a failure. Judgments are cached by (image hashes, prompt, judge, method
version), so a rerun costs no request.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from atelier.kernel.storage import write_text_atomic
from atelier.models.vlm.base import JudgeError

METHOD_VERSION = "1"
YES, NO = {"yes", "y", "是"}, {"no", "n", "否"}
REFUSAL = re.compile(r"\b(i can(no|')t|i am unable|i'm unable|sorry|as an ai)\b", re.I)


class Cache:
    def __init__(self, root: Path | None) -> None:
        self.root = Path(root) if root else None
        self.hits = 0

    def key(self, judge: str, method: str, prompt: str, images: list[bytes]) -> str:
        h = hashlib.sha256(json.dumps([METHOD_VERSION, judge, method, prompt, [hashlib.sha256(i).hexdigest() for i in images]]).encode())
        return h.hexdigest()

    def get(self, key: str) -> dict | None:
        if self.root is None or not (self.root / f"{key}.json").is_file():
            return None
        self.hits += 1
        return json.loads((self.root / f"{key}.json").read_text())

    def put(self, key: str, value: dict) -> None:
        if self.root is not None:
            write_text_atomic(self.root / f"{key}.json", json.dumps(value, sort_keys=True))


def p_yes(first_token_logprobs: dict[str, float] | None, text: str) -> float | None:
    """Yes-mass over yes+no mass of the first token; else the answer's first word; None if neither."""
    if first_token_logprobs:
        yes = sum(math.exp(v) for k, v in first_token_logprobs.items() if k.strip().lower().strip(".,!") in YES)
        no = sum(math.exp(v) for k, v in first_token_logprobs.items() if k.strip().lower().strip(".,!") in NO)
        if yes + no > 0:
            return yes / (yes + no)
    word = re.sub(r"[^\w]", "", (text.strip().split() or [""])[0]).lower()
    return 1.0 if word in YES else 0.0 if word in NO else None


@dataclass
class Scorer:
    judge: object  # HttpJudge | LocalJudge
    cache: Cache = field(default_factory=lambda: Cache(None))
    failures: list[dict] = field(default_factory=list)

    def yes_no(self, method: str, images: list[bytes], question: str, item: str, ask=None) -> dict:
        """`ask(question, max_tokens)`: how to put the question (default: with `images`); the cache key is
        `images` (for a clip: its content hash and sampling) with the method and question."""
        ask = ask or (lambda q, max_tokens: self.judge.ask(images, q, max_tokens=max_tokens))
        key = self.cache.key(self.judge.name, method, question, images)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        answer = ask(question + " Answer yes or no.", 4)
        score = p_yes(answer.first_token_logprobs, answer.text)
        if score is None:
            answer = ask(question + " Reply with exactly one word: yes or no.", 2)
            score = p_yes(answer.first_token_logprobs, answer.text)
        result = {"score": score, "answer": readable(answer.text), "from": "logprobs" if answer.first_token_logprobs else "text"}
        if score is None:
            self.failures.append({"item": item, "method": method, "answer": readable(answer.text)})
        else:
            self.cache.put(key, result)  # failures are not cached: a rerun asks again
        return result

    def prompt_score(self, image: bytes, prompt: str, item: str = "") -> dict:
        return self.yes_no("prompt", [image], f'Does this image show "{prompt}"?', item)

    def subject_fidelity(self, image: bytes, references: list[bytes], item: str = "") -> dict:
        n = len(references)
        return self.yes_no(
            "fidelity",
            references + [image],
            f"The first {n} images show one specific subject. "
            "Does the last image show that same subject (not just the same kind of thing)?",
            item,
        )

    def _ask_json(self, method: str, image: bytes, question: str, max_tokens: int, parse, item: str) -> tuple[dict | None, str]:
        """A JSON answer `parse`d to (dict, "") or (None, problem); asked once more with a stricter
        prompt, then counted as a failure. Cached when it succeeds."""
        key = self.cache.key(self.judge.name, method, question, [image])
        hit = self.cache.get(key)
        if hit is not None:
            return hit, ""
        for q in (question, question + " No prose, no code fences: the JSON object only."):
            answer = self.judge.ask([image], q, max_tokens=max_tokens, logprobs=False)
            parsed, problem = parse(answer.text)
            if parsed is not None:
                self.cache.put(key, parsed)
                return parsed, ""
        self.failures.append({"item": item, "method": method, "answer": readable(answer.text), "problem": problem})
        return None, problem

    def caption(self, image: bytes, item: str = "") -> dict:
        question = (
            'Describe the image. Answer only with JSON: {"caption": "<one sentence>", '
            '"objects": [{"label": "<name>", "box": [x0, y0, x1, y1]}]} with boxes in 0-1000 coordinates.'
        )
        parsed, problem = self._ask_json("caption", image, question, 256, parse_caption, item)
        return parsed if parsed is not None else {"caption": None, "objects": [], "problem": problem}

    def read_text(self, image: bytes, item: str = "") -> str | None:
        """The judge's reading of a document page (JSON {"text": ...}); None after two failed tries."""
        question = 'Read all the text in this document, line by line. Answer only with JSON: {"text": "<the lines, separated by \\n>"}.'
        parsed, _ = self._ask_json("read", image, question, 1024, _parse_text, item)
        return None if parsed is None else parsed["text"]


def _parse_text(text: str) -> tuple[dict | None, str]:
    obj, problem = _json_object(text)
    if obj is None:
        return None, problem
    return ({"text": obj["text"]}, "") if isinstance(obj.get("text"), str) else (None, "no text field")


def _json_object(text: str) -> tuple[dict | None, str]:
    if REFUSAL.search(text):
        return None, "refused"
    body = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        obj = json.loads(body)
    except ValueError:
        return None, "not JSON"
    return (obj, "") if isinstance(obj, dict) else (None, "not a JSON object")


def ocr_agreement(scorer: Scorer, pages: list[dict]) -> tuple[list[dict], dict]:
    """pages: {name, png, ocr_text, lang, label (optional)}. The judge reads each page; its CER against
    the OCR model's text is a quality signal that needs no labels. Where labels exist, the judge's
    own CER is reported beside it, so the signal can be trusted or not."""
    from atelier.models.ocr.metrics import cer_counts

    rows = []
    for p in pages:
        text = scorer.read_text(p["png"], p["name"])
        row = {"page": p["name"], "lang": p["lang"], "judge_text": text, "ocr_text": p["ocr_text"]}
        if text is not None:
            edits, n = cer_counts(p["ocr_text"], text, p["lang"])
            row["agreement_cer"] = edits / max(n, 1)
            if p.get("label") is not None:
                e2, n2 = cer_counts(text, p["label"], p["lang"])
                row["judge_cer"] = e2 / max(n2, 1)
        rows.append(row)

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return rows, {
        "agreement_cer": mean("agreement_cer"),
        "judge_cer": mean("judge_cer"),
        "pages": len(rows),
        "failures": sum(1 for r in rows if r["judge_text"] is None),
        "calibrated": bool(getattr(scorer.judge, "calibrated", False)),
    }


def readable(text: str, limit: int = 200) -> str:
    """An answer as a person can read it in a table: printable characters only (a small model's broken
    multi-byte tokens decode to U+FFFD, control bytes to nothing), or a note saying there were none."""
    kept = "".join(ch for ch in text if ch.isprintable() and ch != "\ufffd").strip()
    if not kept and text:
        return f"(no readable text: {len(text)} characters that do not decode)"
    return kept[:limit]


def parse_caption(text: str) -> tuple[dict | None, str]:
    obj, problem = _json_object(text)
    if obj is None:
        return None, problem
    if not isinstance(obj.get("caption"), str) or not obj["caption"].strip():
        return None, "no caption field"
    objects = [
        o
        for o in obj.get("objects", [])
        if isinstance(o, dict)
        and isinstance(o.get("label"), str)
        and isinstance(o.get("box"), list)
        and len(o["box"]) == 4
        and all(isinstance(v, (int, float)) for v in o["box"])
    ]
    return {"caption": obj["caption"].strip(), "objects": objects}, ""


def summarise(rows: list[dict], failures: int, calibrated: bool) -> dict:
    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    # every question asked, captions included (a failed caption counts as a failure: the rate is of all of them)
    asked = sum(1 for r in rows for k in ("prompt_score", "fidelity", "prior_leak", "caption") if k in r)
    return {
        "prompt_score": mean("prompt_score"),
        "fidelity": mean("fidelity"),
        "prior_leak": mean("prior_leak"),
        "failures": failures,
        "failure_rate": failures / max(1, asked),
        "images": len(rows),
        "calibrated": calibrated,
    }


def judge_images(
    scorer: Scorer,
    samples: list[tuple[str, bytes, str]],
    references: list[bytes],
    class_images: list[tuple[str, bytes]],
    captions: bool = True,
) -> tuple[list[dict], dict]:
    """samples: (name, png, prompt). Per-image rows (in input order) and a summary. Images are judged
    in parallel, up to the judge's `concurrency`. JudgeUnavailable propagates: the caller fails the
    gate with its reason."""
    from concurrent.futures import ThreadPoolExecutor

    def sample(item: tuple[str, bytes, str]) -> dict:
        name, png, prompt = item
        row = {"image": name, "kind": "sample", "prompt": prompt}
        s = scorer.prompt_score(png, prompt, name)
        row.update(prompt_score=s["score"], answer=s["answer"])
        if references:
            row["fidelity"] = scorer.subject_fidelity(png, references, name)["score"]
        if captions:
            c = scorer.caption(png, name)
            row.update(caption=c.get("caption"), objects=json.dumps(c.get("objects", [])))
        return row

    def prior(item: tuple[str, bytes]) -> dict:
        name, png = item
        return {"image": name, "kind": "class prior", "prior_leak": scorer.subject_fidelity(png, references, name)["score"]}

    with ThreadPoolExecutor(max(1, int(getattr(scorer.judge, "concurrency", 1)))) as pool:
        rows = list(pool.map(sample, samples)) + (list(pool.map(prior, class_images)) if references else [])
    return rows, summarise(rows, len(scorer.failures), bool(getattr(scorer.judge, "calibrated", False)))


__all__ = ["Cache", "JudgeError", "Scorer", "judge_images", "ocr_agreement", "p_yes", "parse_caption", "summarise"]
