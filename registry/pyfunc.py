"""The fine-tuned pipeline as an MLflow pyfunc model: prompts and generation parameters in, PNGs out.

Input: a DataFrame with `prompt` and optionally `seed`, `steps`, `guidance_scale`, `height`,
`width`, `negative_prompt`. Output: a DataFrame with `prompt`, `seed` and `image_png_base64`.
Load it anywhere with plain `mlflow.pyfunc.load_model("models:/NAME@champion")`.

Registered as code (registry/pyfunc_code/dreambooth_model.py), never as a pickle; its settings are the
MLmodel's model_config, and on load it checks the pipeline's files against the hashes registered there.
"""

from __future__ import annotations

import base64
import io

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

DEFAULTS = {"seed": 0, "steps": 25, "guidance_scale": 7.5}

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("long", "seed", required=False),
            ColSpec("long", "steps", required=False),
            ColSpec("double", "guidance_scale", required=False),
            ColSpec("long", "height", required=False),
            ColSpec("long", "width", required=False),
            ColSpec("string", "negative_prompt", required=False),
        ]
    ),
    outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("string", "image_png_base64")]),
)


def _value(row: pd.Series, key: str, default):
    value = row.get(key, default)
    return default if value is None or (isinstance(value, float) and pd.isna(value)) else value


class DreamBoothModel(mlflow.pyfunc.PythonModel):
    # Input is checked against SIGNATURE when logged and in predict(); MLflow's type-hint wrapper
    # (and its warning) is not used.
    _skip_type_hint_validation = True

    def __init__(self, sampler: str = "dpmsolver++", default_steps: int = 25, default_guidance: float = 7.5) -> None:
        self.sampler = sampler
        self.defaults = {**DEFAULTS, "steps": default_steps, "guidance_scale": default_guidance}

    def load_context(self, context) -> None:
        from atelier.models.dreambooth.sampling import load_pipeline

        config = context.model_config or {}
        self.sampler = config.get("sampler", self.sampler)
        self.defaults = {
            **self.defaults,
            "steps": int(config.get("default_steps", self.defaults["steps"])),
            "guidance_scale": float(config.get("default_guidance", self.defaults["guidance_scale"])),
        }
        check_artifact_files(context.artifacts["pipeline"], config.get("pipeline_files"))
        self.pipe = load_pipeline(context.artifacts["pipeline"], self.sampler)

    def predict(self, context, model_input, params=None):
        from atelier.models.dreambooth.sampling import GenerationRequest, generate

        frame = pd.DataFrame(model_input)
        if "prompt" not in frame.columns or frame.empty:
            raise ValueError("model input needs a non-empty `prompt` column")
        requests = [
            GenerationRequest(
                prompt=str(row["prompt"]),
                seed=int(_value(row, "seed", self.defaults["seed"])),
                steps=int(_value(row, "steps", self.defaults["steps"])),
                guidance_scale=float(_value(row, "guidance_scale", self.defaults["guidance_scale"])),
                height=int(_value(row, "height", 0)) or None,
                width=int(_value(row, "width", 0)) or None,
                negative_prompt=_value(row, "negative_prompt", None),
            )
            for _, row in frame.iterrows()
        ]
        images = generate(self.pipe, requests)
        return pd.DataFrame(
            {
                "prompt": [r.prompt for r in requests],
                "seed": [r.seed for r in requests],
                "image_png_base64": [encode_png(img) for img in images],
            }
        )


def check_artifact_files(folder: str, expected: dict[str, str] | None) -> None:
    """Refuse weights that are not the registered ones (the model_config holds each file's sha256), before
    any of them is read: also when a customer loads the model with plain MLflow."""
    if expected is None:
        return
    from pathlib import Path

    from atelier.registry.model_files import check_files

    check_files(Path(folder), expected, f"pipeline files in {folder}")


def encode_png(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")
