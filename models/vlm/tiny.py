"""Tiny random-weight GLM-OCR and GLM-4.1V directories in the real models' layout (model, tokenizer
with chat template, image processor), built offline in about a second. Their readings and
judgments are noise: the embedded default's judge and the tests use them for the plumbing, never for
accuracy, and every report marks them uncalibrated."""

from __future__ import annotations

from pathlib import Path

from atelier.kernel.storage import atomic_dir

SPECIAL = [
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|user|>",
    "<|assistant|>",
    "<|image|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|video|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
]
CHAT = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|begin_of_image|><|image|><|end_of_image|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_glm_ocr(out: Path, max_new_tokens: int = 6) -> Path:
    from transformers import GlmOcrConfig, GlmOcrForConditionalGeneration

    return build_tiny_glm(out, GlmOcrConfig, GlmOcrForConditionalGeneration, max_new_tokens)


def build_tiny_glm4v(out: Path, max_new_tokens: int = 6) -> Path:
    """GLM-4.1V's class (model type glm4v), the local judge's."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    return build_tiny_glm(out, Glm4vConfig, Glm4vForConditionalGeneration, max_new_tokens)


def build_tiny_glm(out: Path, config_class, model_class, max_new_tokens: int) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["Text Recognition: hello world", "yes no Yes No", '{"caption": "a toy", "objects": []}'],
        trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT
    ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIAL}
    eos = ids["<|endoftext|>"]
    cfg = config_class(
        text_config=dict(
            vocab_size=len(fast),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            eos_token_id=eos,
            pad_token_id=eos,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_token_id=ids["<|video|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
    )
    torch.manual_seed(0)
    model = model_class(cfg).eval()
    model.generation_config.update(eos_token_id=eos, pad_token_id=eos, max_new_tokens=max_new_tokens)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    Glm46VImageProcessorPil(
        patch_size=14, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 64}
    ).save_pretrained(out)
    return Path(out)


def write_tiny_judge(out: Path) -> Path:
    """The embedded default's judge (GLM-4.1V class, random weights), written once."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    with atomic_dir(out) as tmp:
        build_tiny_glm4v(tmp)
    return out
