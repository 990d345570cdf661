"""Training configuration. Defaults follow the DreamBooth paper and diffusers' train_dreambooth.py
for real Stable Diffusion 1.x/2.x models at 512 px; `configs/dreambooth/tiny.yaml` shrinks them for
the embedded CPU model. Unknown keys are an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atelier.kernel.errors import ConfigError, schema_problems, yaml_problem

Sampler = Literal["dpmsolver++", "pndm", "ddim", "euler", "ddpm"]
SAMPLER_NAMES = get_args(Sampler)  # sampling.SAMPLERS maps each to its diffusers scheduler (a test keeps them equal)
SEED_MAX = 2**32 - 1  # what every generator and library Atelier seeds takes
CLASS_IMAGES_MAX = 10_000  # class-prior images per set (the config's num_class_images, `atelier priors --count`)
STEPS_MAX = 1_000_000  # a step count beyond this is a typo, not a plan (800 is a typical subject)
TEMPLATE_FIELDS = ("identifier", "class_noun")


def template_problem(key: str, text: str) -> None:
    """A prompt template names only {identifier} and {class_noun}; a lone brace is written {{ or }}."""
    import string

    try:
        fields = [name for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise ValueError(f"{key} {text!r} is not a template ({exc}); write a literal brace as {{{{ or }}}}") from None
    unknown = sorted({f for f in fields if f not in TEMPLATE_FIELDS})
    if unknown:
        raise ValueError(
            f"{key} {text!r} names {', '.join('{' + f + '}' for f in unknown)}; a template may name {{identifier}} and {{class_noun}}"
        )


class _Strict(BaseModel):
    """Unknown keys are errors, and a number is a number: YAML's `true` is not 1 (pydantic would
    otherwise turn `max_train_steps: true` into a 1-step model) and a quoted "8" is not 8."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # nan and inf are never a setting

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data):
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                value = data.get(name)
                if field.annotation in (int, float) and (isinstance(value, bool) or (field.annotation is int and isinstance(value, str))):
                    raise ValueError(f"{name} must be a number, not {value!r}")
        return data


class SamplingConfig(_Strict):
    sampler: Sampler = "dpmsolver++"
    steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=1.0, le=50)
    batch_size: int = Field(4, ge=1, le=256)
    compile_mode: Literal["none", "default", "reduce-overhead", "max-autotune"] = Field(
        "none", description="CUDA only: torch.compile the UNet and VAE decoder; reduce-overhead adds CUDA graphs"
    )


class LoraConfig(_Strict):
    """Low-rank adapters (peft) instead of full fine-tuning: the base weights stay frozen (in the
    mixed-precision dtype), only the adapters train. The output is still a whole pipeline, with the
    adapters fused in, plus the adapter file alone under `lora/`."""

    rank: int = Field(4, ge=1, le=1024, description="adapter rank; lora_alpha is set to the rank (scale 1)")
    unet_target_modules: list[str] = ["to_k", "to_q", "to_v", "to_out.0"]
    text_encoder_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj"]


class TrainConfig(_Strict):
    # prompts: {identifier} and {class_noun} are filled in per subject
    identifier: str = Field("sks", description="rare token that names the subject")
    instance_prompt: str = "a photo of {identifier} {class_noun}"
    class_prompt: str = "a photo of {class_noun}"
    resolution: int = Field(512, ge=64, le=4096, multiple_of=8, description="pixels, a multiple of 8 (the VAE's factor)")
    center_crop: bool = True
    # prior preservation (paper section 3.3): class images from the frozen base model
    with_prior_preservation: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(200, ge=1, le=CLASS_IMAGES_MAX)
    class_prior_seed: int = Field(0, ge=0, le=SEED_MAX)
    # DPM-Solver++ reaches its quality in 20 steps (Lu et al. 2022); batch 16 at 512 px peaks at about 10 GiB
    class_sampling: SamplingConfig = SamplingConfig(steps=20, batch_size=16)
    # optimisation (diffusers example: lr 5e-6, constant schedule, 400-800 steps with priors)
    train_text_encoder: bool = True
    lora: LoraConfig | None = Field(None, description="train LoRA adapters (see configs/dreambooth/sd15-lora.yaml) instead of all weights")
    learning_rate: float = Field(5e-6, gt=0, le=1)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0, le=STEPS_MAX)
    max_train_steps: int = Field(800, ge=1, le=STEPS_MAX)
    train_batch_size: int = Field(1, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on CUDA (fp16 where the GPU has no bf16), none on CPU"
    )
    # speed levers that keep the training semantics (benchmarks/dreambooth_gpu.py measures them)
    fused_adam: bool = Field(True, description="torch's fused AdamW kernel (on CUDA and on the CPU)")
    channels_last: bool = Field(True, description="UNet in channels_last memory format on CUDA")
    cuda_graphs: bool = Field(
        True,
        description="on one CUDA device, capture the whole optimizer step as a CUDA graph after 3 steps "
        "(bf16 or fp32, no accumulation or gradient checkpointing): no compile, about 2.5x the eager steps/s",
    )
    compile_unet: bool = Field(
        False, description="torch.compile the UNet (and a trained text encoder) on CUDA; pays a compile on the first steps"
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode; reduce-overhead adds CUDA graphs (removes per-kernel launch cost)"
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0, le=10)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    # checkpoints and validation samples
    checkpointing_steps: int = Field(500, ge=1, le=STEPS_MAX)  # diffusers' default: at SD 1.5 each is 12 GB
    checkpoints_total_limit: int = Field(2, ge=1, le=1000)
    validation_steps: int = Field(200, ge=1, le=STEPS_MAX)
    validation_prompts: list[str] = ["a {identifier} {class_noun} in the jungle"]
    sampling: SamplingConfig = SamplingConfig()
    # final samples, the promotion gate's evidence
    # DreamBench-style novel contexts (background, accessory, style) for the judge's prompt and subject
    # scores; a prompt without {identifier} measures prior preservation (it should not show the subject)
    sample_prompts: list[str] = [
        "a photo of {identifier} {class_noun}",
        "a {identifier} {class_noun} on the beach",
        "a {identifier} {class_noun} in the snow",
        "a {identifier} {class_noun} on top of a wooden floor",
        "a {identifier} {class_noun} wearing a red hat",
        "a {identifier} {class_noun} with a city in the background",
        "a watercolor painting of a {identifier} {class_noun}",
        "a photo of {class_noun}",
    ]
    samples_per_prompt: int = Field(2, ge=1, le=100)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        templates = {"instance_prompt": [self.instance_prompt], "class_prompt": [self.class_prompt]}
        templates |= {"validation_prompts": self.validation_prompts, "sample_prompts": self.sample_prompts}
        for key, texts in templates.items():
            for text in texts:
                template_problem(key, text)
        if "{identifier}" not in self.instance_prompt:
            raise ValueError("instance_prompt must contain {identifier}")
        return self

    def fill(self, text: str, class_noun: str) -> str:
        return text.format(identifier=self.identifier, class_noun=class_noun)

    def resolved_precision(self, cuda: bool) -> str:
        if self.mixed_precision == "auto":
            if not cuda:
                return "no"
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return self.mixed_precision


def load_train_config(path: Path | None, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML config; errors name the file, the key and the fix."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(str(path), "no such config file", "pass an existing YAML file to --config")
        if path.stat().st_size > 1_000_000:
            raise ConfigError(str(path), "is over 1 MB: not a training config", "pass the YAML file (see configs/dreambooth/sd15.yaml)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except RecursionError:
            raise ConfigError(str(path), "is nested too deeply to be a training config", "write `key: value` lines") from None
        except UnicodeDecodeError:
            raise ConfigError(
                str(path), "is not UTF-8 text (a binary file?)", "pass a YAML file (see configs/dreambooth/sd15.yaml)"
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), f"is not valid YAML ({yaml_problem(exc)})", "fix the YAML syntax") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise ConfigError(str(path), "must be a mapping of named keys to values", "write `key: value` lines")
    data.update(overrides or {})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        said, fix = schema_problems(exc.errors())
        if "unknown keys" in fix:
            fix += " against configs/dreambooth/sd15.yaml"
        raise ConfigError(str(path or "config"), said, fix) from None
