"""Local GLM-family vision-language models through transformers (GLM-4.1V `glm4v`, GLM-4.5V
`glm4v_moe`, GLM-OCR `glm_ocr`) from a `save_pretrained` directory: tokenizer with its chat
template, image processor, model. Nothing is downloaded. CUDA in bf16 when present, else fp32.

Image placeholders are expanded here, as Glm46VProcessor does (one `<|image|>` per merged patch), so
the Pillow image processor serves without torchvision.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from atelier.kernel.errors import NotFound
from atelier.models.vlm.base import Answer, JudgeError, Usage

REQUIRED = ("config.json", "tokenizer_config.json", "preprocessor_config.json")
IMAGE_TOKEN = "<|image|>"


@dataclass
class Generated:
    text: str
    mean_logprob: float  # over the generated tokens up to the end token
    first_token_logprobs: dict[str, float]  # top 5 of the first generated token


def _pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    return Image.fromarray(np.asarray(image)).convert("RGB")


class LocalVLM:
    def __init__(self, weights: Path, model_types: tuple[str, ...], device: str | None = None) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        weights = Path(weights)
        missing = [f for f in REQUIRED if not (weights / f).is_file()]
        if missing:
            raise NotFound(
                str(weights),
                f"is not a model directory in save_pretrained layout (no {', '.join(missing)})",
                "point the setting at a local copy of the model with its tokenizer and image processor",
            )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(weights, local_files_only=True)
        self.tokenizer.padding_side = "left"
        self.images = AutoImageProcessor.from_pretrained(weights, local_files_only=True, backend="pil")
        self.model = AutoModelForImageTextToText.from_pretrained(weights, local_files_only=True, dtype=dtype).to(self.device).eval()
        if self.model.config.model_type not in model_types:
            raise JudgeError(
                str(weights),
                f"holds a {self.model.config.model_type} model, not {' or '.join(model_types)}",
                "point the setting at the right model directory",
            )
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def _inputs(self, items: list[list], prompt: str) -> dict:
        flat = [_pil(img) for imgs in items for img in imgs]
        vision = self.images(images=flat, return_tensors="pt")
        merge = self.images.merge_size**2
        counts = [int(thw.prod() // merge) for thw in vision["image_grid_thw"]]
        texts, k = [], 0
        for imgs in items:
            messages = [{"role": "user", "content": [{"type": "image"}] * len(imgs) + [{"type": "text", "text": prompt}]}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            pieces = text.split(IMAGE_TOKEN)
            text = pieces[0] + "".join(IMAGE_TOKEN * counts[k + j] + rest for j, rest in enumerate(pieces[1:]))
            k += len(imgs)
            texts.append(text)
        tok = self.tokenizer(texts, return_tensors="pt", padding=True)
        return {
            **{key: v.to(self.device) for key, v in tok.items()},
            "pixel_values": vision["pixel_values"].to(self.device, self.model.dtype),
            "image_grid_thw": vision["image_grid_thw"].to(self.device),
        }

    def generate(self, items: list[list], prompt: str, max_new_tokens: int) -> list[Generated]:
        """One generation per item (an item is a list of images), greedy, batched."""
        import torch

        batch = self._inputs(items, prompt)
        with torch.inference_mode():
            gen = self.model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        new = gen.sequences[:, batch["input_ids"].shape[1] :]
        logp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in gen.scores], dim=1)
        out = []
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            stop = next((k for k, t in enumerate(ids) if t in self.eos), len(ids))
            chosen = logp[row, torch.arange(stop), torch.tensor(ids[:stop], dtype=torch.long)] if stop else torch.zeros(1)
            top = torch.topk(logp[row, 0], 5)
            first = {self.tokenizer.decode([int(i)]).strip(): float(v) for v, i in zip(top.values, top.indices)}
            out.append(Generated(self.tokenizer.decode(ids[:stop], skip_special_tokens=True).strip(), float(chosen.mean()), first))
        return out


class LocalJudge:
    """A local GLM-4.1V / GLM-4.5V as a judge. `calibrated` is False unless the settings say the weights
    are a real model: the tiny random instance of the embedded default and the tests judges nothing."""

    def __init__(self, weights: Path, calibrated: bool = False) -> None:
        self.vlm = LocalVLM(weights, ("glm4v", "glm4v_moe", "glm46v"))
        self.calibrated = calibrated
        self.concurrency = 1  # one generate() at a time on this process's device
        self.usage = Usage()
        self.name = f"local {self.vlm.model.config.model_type} @ {weights}"

    def ask(self, images: list[bytes], prompt: str, max_tokens: int = 16, logprobs: bool = True) -> Answer:
        cap = self.vlm.model.generation_config.max_new_tokens  # a directory may cap answers (the tiny judge: 6 tokens)
        max_tokens = min(max_tokens, cap) if cap else max_tokens
        g = self.vlm.generate([list(images)], prompt, max_tokens)[0]
        answer = Answer(g.text, g.first_token_logprobs if logprobs else None, {"completion_tokens": max_tokens})
        self.usage.add(answer)
        return answer
