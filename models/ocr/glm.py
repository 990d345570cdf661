"""GLM-OCR (transformers' `GlmOcrForConditionalGeneration`) from a local weights directory.

The directory is what `save_pretrained` writes for the model, its tokenizer (with the chat template)
and its image processor (zai-org/GLM-OCR's layout). Nothing is downloaded: a directory that is
missing or incomplete is an error naming it. Runs on CUDA in bf16 when a GPU is present, else fp32
on the CPU.

Loading and generation are models/vlm/local.py's LocalVLM, shared with the local VLM judge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atelier.models.ocr.backends import Line
from atelier.models.vlm.local import LocalVLM

PROMPT = "Text Recognition:"


class GlmOcr:
    name = "glm"

    def __init__(
        self, weights: Path, device: str | None = None, max_new_tokens: int | None = None, batch_size: int = 4, prompt: str = PROMPT
    ) -> None:
        self.vlm = LocalVLM(weights, ("glm_ocr",), device)
        # the directory's generation_config may set it; a line or a page of text fits in 256 tokens
        self.max_new_tokens = max_new_tokens or self.vlm.model.generation_config.max_new_tokens or 256
        self.batch_size, self.prompt = batch_size, prompt

    def read_lines(self, images: list[np.ndarray], lang: str | None = None) -> list[Line]:
        out: list[Line] = []
        for start in range(0, len(images), self.batch_size):
            for g in self.vlm.generate([[img] for img in images[start : start + self.batch_size]], self.prompt, self.max_new_tokens):
                out.append(Line(g.text, float(np.exp(g.mean_logprob)), None, self.name, lang))
        return out

    def read_page(self, image: np.ndarray, lang: str | None = None) -> list[Line]:
        """One generation over the page; its lines come back without boxes."""
        whole = self.read_lines([image], lang)[0]
        return [Line(t.strip(), whole.confidence, None, self.name, lang) for t in whole.text.splitlines() if t.strip()]
