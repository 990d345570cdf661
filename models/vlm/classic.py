"""The DreamBooth paper's classic metrics, from local weights when configured:

- CLIP-I: mean cosine similarity of CLIP image embeddings, generated images against reference photos;
- CLIP-T: mean cosine similarity of a generated image's CLIP embedding and its prompt's;
- DINO: mean cosine similarity of DINO ViT [CLS] embeddings, generated against reference photos.

`clip_weights` is a transformers CLIPModel directory with its tokenizer and image processor;
`dino_weights` a ViT (e.g. dino-vits16) directory with its image processor. Nothing is downloaded.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from atelier.kernel.errors import NotFound


def _images(pngs: list[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]


def _unit(x) -> np.ndarray:
    x = x.detach().float().cpu().numpy()
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def _check(path: Path, what: str) -> Path:
    if not (Path(path) / "config.json").is_file():
        raise NotFound(
            str(path), f"is not a {what} directory (no config.json)", f"point the setting at a local {what} saved with save_pretrained"
        )
    return Path(path)


class ClassicMetrics:
    def __init__(self, clip_weights: Path | None = None, dino_weights: Path | None = None) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.clip = self.dino = None
        if clip_weights:
            path = _check(clip_weights, "CLIP model")
            self.clip = CLIPModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
            self.clip_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.clip_img = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
        if dino_weights:
            path = _check(dino_weights, "DINO ViT")
            self.dino = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
            self.dino_img = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")

    def _clip_images(self, pngs: list[bytes]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pixels = self.clip_img(images=_images(pngs), return_tensors="pt")["pixel_values"].to(self.device)
            out = self.clip.get_image_features(pixel_values=pixels)
        return _unit(out if isinstance(out, torch.Tensor) else out.pooler_output)

    def _clip_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tok = self.clip_tok(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            out = self.clip.get_text_features(**tok)
        return _unit(out if isinstance(out, torch.Tensor) else out.pooler_output)

    def _dino(self, pngs: list[bytes]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pixels = self.dino_img(images=_images(pngs), return_tensors="pt")["pixel_values"].to(self.device)
            return _unit(self.dino(pixel_values=pixels).last_hidden_state[:, 0])

    def score(self, samples: list[tuple[bytes, str]], references: list[bytes]) -> dict[str, float]:
        """samples: (png, prompt without the identifier). Means over samples (and reference pairs)."""
        out: dict[str, float] = {}
        if not samples:
            return out
        pngs = [p for p, _ in samples]
        if self.clip is not None:
            gen = self._clip_images(pngs)
            out["clip_t"] = float(np.mean(np.sum(gen * self._clip_texts([t for _, t in samples]), axis=1)))
            if references:
                out["clip_i"] = float(np.mean(gen @ self._clip_images(references).T))
        if self.dino is not None and references:
            out["dino"] = float(np.mean(self._dino(pngs) @ self._dino(references).T))
        return out
