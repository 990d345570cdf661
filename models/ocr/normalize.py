"""Recognised text written the way its language is written.

- Chinese and Japanese: no spaces between CJK characters; punctuation next to CJK text is
  full-width (，。：；？！（）, and 、 for a Japanese comma); full-width Latin letters and digits
  are half-width; a Japanese "一" after katakana is the long-vowel mark "ー" (they look the same).
- Korean: words are spaced as written (Tesseract's line text keeps them; its word boxes split
  syllables, which is where the spaces between every syllable came from).
- Everywhere: ligatures (ﬁ ﬂ) spelled out, runs of spaces collapsed, no space before , . ; : in
  Latin and Cyrillic text.
"""

from __future__ import annotations

import re
import unicodedata

from atelier.models.ocr.langs import script_of_char

_FULL = {
    "zh": {",": "，", ".": "。", ":": "：", ";": "；", "?": "？", "!": "！", "(": "（", ")": "）"},
    "ja": {",": "、", ".": "。", ":": "：", ";": "；", "?": "？", "!": "！", "(": "（", ")": "）"},
}
_LIGATURES = {"ﬁ": "fi", "ﬂ": "fl", "ﬀ": "ff", "ﬃ": "ffi", "ﬄ": "ffl"}


def _cjk(ch: str) -> bool:
    return bool(ch) and script_of_char(ch) in ("han", "kana") or ch in "、。「」『』（）：；？！，ー々"


def _half_width_alnum(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", ch) if "\uff10" <= ch <= "\uff5a" and ch.isalnum() else ch for ch in text)


def _cjk_text(text: str, lang: str) -> str:
    chars = list(_half_width_alnum(text))
    letters = [ch for ch in chars if ch.isalpha()]
    mostly_cjk = bool(letters) and sum(_cjk(ch) for ch in letters) >= 0.5 * len(letters)
    out: list[str] = []
    for i, ch in enumerate(chars):
        prev = next((c for c in reversed(out) if not c.isspace()), "")
        nxt = next((c for c in chars[i + 1 :] if not c.isspace()), "")
        if ch.isspace() and (_cjk(prev) or _cjk(nxt)):
            continue  # no space next to CJK characters
        between_digits = prev.isdigit() and nxt.isdigit()  # 4,318.75 and 10:30 stay as they are
        if ch in _FULL[lang] and not between_digits and (_cjk(prev) or _cjk(nxt) or (mostly_cjk and ch not in ".,")):
            if ch != "." or not nxt or _cjk(nxt):
                out.append(_FULL[lang][ch])
                continue
        if lang == "ja" and ch == "一" and "\u30a1" <= prev <= "\u30ff":
            out.append("ー")
            continue
        out.append(ch)
    return "".join(out)


def normalize(text: str, lang: str | None) -> str:
    for lig, plain in _LIGATURES.items():
        text = text.replace(lig, plain)
    text = re.sub(r"[ \t\u3000]+", " ", text).strip()
    if lang in _FULL:
        return _cjk_text(text, lang)
    return re.sub(r" ([,.;:])(?=\s|$)", r"\1", text)
