"""GLM-OCR (transformers' `GlmOcrForConditionalGeneration`) from a local weights directory.

The directory is what `save_pretrained` writes for the model, its tokenizer (with the chat template)
and its image processor (zai-org/GLM-OCR's layout). Nothing is downloaded: a directory that is
missing or incomplete is an error naming it. Runs on CUDA in bf16 when a GPU is present, else fp32
on the CPU.

The image placeholders are expanded here, as Glm46VProcessor does (one `<|image|>` per merged patch),
so that the Pillow image processor serves without torchvision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from atelier.errors import NotFound
from models.ocr.backends import Line, OCRError

PROMPT = "Text Recognition:"
REQUIRED = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


class GlmOcr:
    name = "glm"

    def __init__(self, weights: Path, device: str | None = None, max_new_tokens: int | None = None, batch_size: int = 4,
                 prompt: str = PROMPT) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        weights = Path(weights)
        missing = [f for f in REQUIRED if not (weights / f).is_file()]
        if missing:
            raise NotFound(str(weights), f"is not a GLM-OCR weights directory (no {', '.join(missing)})",
                           "point ocr.glm_weights at a local copy of the model saved with save_pretrained (model, tokenizer, image processor)")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(weights, local_files_only=True)
        self.tokenizer.padding_side = "left"
        self.images = AutoImageProcessor.from_pretrained(weights, local_files_only=True, backend="pil")
        self.model = AutoModelForImageTextToText.from_pretrained(weights, local_files_only=True, dtype=dtype).to(self.device).eval()
        if self.model.config.model_type != "glm_ocr":
            raise OCRError(str(weights), f"holds a {self.model.config.model_type} model, not glm_ocr", "point ocr.glm_weights at a GLM-OCR directory")
        self.image_token = "<|image|>"
        # the directory's generation_config may set it; a line or a page of text fits in 256 tokens
        self.max_new_tokens = max_new_tokens or self.model.generation_config.max_new_tokens or 256
        self.batch_size, self.prompt = batch_size, prompt

    def _inputs(self, images: list[np.ndarray]) -> dict:
        vision = self.images(images=[Image.fromarray(img).convert("RGB") for img in images], return_tensors="pt")
        merge = self.images.merge_size ** 2
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        template = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        texts = [template.replace(self.image_token, self.image_token * int(thw.prod() // merge), 1) for thw in vision["image_grid_thw"]]
        text = self.tokenizer(texts, return_tensors="pt", padding=True)
        return {**{k: v.to(self.device) for k, v in text.items()},
                "pixel_values": vision["pixel_values"].to(self.device, self.model.dtype),
                "image_grid_thw": vision["image_grid_thw"].to(self.device)}

    def read_lines(self, images: list[np.ndarray], lang: str | None = None) -> list[Line]:
        import torch

        out: list[Line] = []
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        for start in range(0, len(images), self.batch_size):
            batch = self._inputs(images[start:start + self.batch_size])
            with torch.inference_mode():
                gen = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          output_scores=True, return_dict_in_generate=True)
            new = gen.sequences[:, batch["input_ids"].shape[1]:]
            logp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in gen.scores], dim=1) if gen.scores else None
            for row in range(new.shape[0]):
                ids = new[row].tolist()
                stop = next((k for k, t in enumerate(ids) if t in eos), len(ids))
                text = self.tokenizer.decode(ids[:stop], skip_special_tokens=True).strip()
                if logp is not None and stop:
                    chosen = logp[row, torch.arange(stop), torch.tensor(ids[:stop])]
                    conf = float(torch.exp(chosen.mean()))
                else:
                    conf = 0.0
                out.append(Line(text, conf, None, self.name, lang))
        return out

    def read_page(self, image: np.ndarray, lang: str | None = None) -> list[Line]:
        """One generation over the page; its lines come back without boxes."""
        whole = self.read_lines([image], lang)[0]
        return [Line(t.strip(), whole.confidence, None, self.name, lang) for t in whole.text.splitlines() if t.strip()]
