"""Languages Atelier's OCR covers, their Tesseract packs, and script detection from text."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from atelier.kernel.errors import AtelierError


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-1, as written in labels.jsonl and on the command line
    name: str
    tesseract: str  # Debian tesseract-ocr-<pack> traineddata name
    script: str


LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in (
        Language("zh", "Chinese (simplified)", "chi_sim", "han"),
        Language("en", "English", "eng", "latin"),
        Language("fr", "French", "fra", "latin"),
        Language("es", "Spanish", "spa", "latin"),
        Language("de", "German", "deu", "latin"),
        Language("ru", "Russian", "rus", "cyrillic"),
        Language("ja", "Japanese", "jpn", "kana"),
        Language("ko", "Korean", "kor", "hangul"),
    )
}


NO_SPACES = {"zh", "ja"}  # written without spaces between words


class UnknownLanguage(AtelierError):
    pass


def language(code: str) -> Language:
    try:
        return LANGUAGES[code]
    except KeyError:
        raise UnknownLanguage(
            f"language {code!r}",
            "is not one Atelier's OCR covers",
            f"use one of {', '.join(LANGUAGES)} (or leave it out to let the router decide)",
        ) from None


def script_of_char(ch: str) -> str | None:
    if ch.isspace() or not ch.isprintable():
        return None
    cp = ord(ch)
    if 0x3040 <= cp <= 0x30FF or 0x31F0 <= cp <= 0x31FF:
        return "kana"
    if 0xAC00 <= cp <= 0xD7AF or 0x1100 <= cp <= 0x11FF or 0x3130 <= cp <= 0x318F:
        return "hangul"
    if 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF:
        return "han"
    if 0x0400 <= cp <= 0x04FF:
        return "cyrillic"
    if ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN"):
        return "latin"
    return None


def script_of(text: str) -> str | None:
    """The dominant script of `text`; any kana makes it Japanese (kanji alone reads as Han)."""
    counts: dict[str, int] = {}
    for ch in text:
        s = script_of_char(ch)
        if s:
            counts[s] = counts.get(s, 0) + 1
    if not counts:
        return None
    if counts.get("kana"):
        return "kana"
    return max(counts, key=counts.get)
