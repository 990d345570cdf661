"""Which of the eight languages a text line is in, with no hint: script first, then cues.

The first-pass recogniser (PP-OCRv6 small) reads Chinese, Japanese and Latin-script text and leaves
what it cannot read nearly blank: Hangul and Cyrillic lines come back with a few punctuation marks
and no letters. So a full reading settles the script by itself (kana: Japanese; Han alone: Chinese;
Latin: one of en/fr/es/de by the cues below). A reading with too few characters for the line's
length, or only Han characters read with little confidence (Hangul comes back as Han shapes at
0.2-0.85 where real Chinese and Japanese read at 0.95 and more), goes to the probes. Neither has
Hangul or Cyrillic, but both read Cyrillic as Latin look-alikes and Hangul as Han or nothing, so a
line full of Latin letters is Russian and anything else Korean. PP-OCRv6 tiny asks first (5x the
speed of v5): measured on 200 lines of each, it reads Russian lines at 1.23 Latin letters or more per
unit of width over height, Korean ones at 0.41 or less but one at 0.80, so between 0.5 and 1.1 it
passes the line to PP-OCRv5 (Russian 1.09-4.9, Korean 0-0.58 on 235 lines of each), which cuts at 0.8.

Latin languages: letters only one of them uses (ß ä ö ü: de; ñ ¿ ¡: es; ç è ê ë à â î ï ô û ù œ: fr;
á í ó ú, which fr does not use: es), its frequent short words, and letter sequences typical of its
spelling (sch, ung: de; qu, eau, oi: fr; ción: es; th, wh: en), and how its documents print figures
(€ is not English; $ and 1,234.56 are; +33 French, +34 Spanish, +49 German; 31.12.2026 German); no
cue at all is English ("HELLO WORLD 2026": its double l once made it Spanish).
"""

from __future__ import annotations

import re

from atelier.models.ocr.langs import script_of, script_of_char

SCRIPT_LANG = {"han": "zh", "kana": "ja", "hangul": "ko", "cyrillic": "ru"}

LETTER_CUES = {
    "de": "ßäöü",
    "es": "ñ¿¡áíóú",
    "fr": "çèêëàâîïôûùœ",
}
WORD_CUES = {
    "en": (
        "the and of to is in for with on that you your will be are this from by at have it our we not was were has had all can "
        "please an or as if new more before after each every thank hello world date item price amount station subtotal vat "
        "qty tel total morning year week day time"
    ).split(),
    "fr": (
        "le la les de des du et est un une pour que qui dans au aux vous nous pas sur ce il elle avec sont ne se en par plus sa son "
        "ses votre vos leur été être avant après chaque tous toutes très article qté prix montant gare tva tél"
    ).split(),
    "es": (
        "el la los las de del y que en un una por con para se su es al lo más como sus no está están fue ser muy antes después cada "
        "todos todas hay esta este pero fecha artículo cant precio importe estación iva"
    ).split(),
    "de": (
        "der die das und ist nicht ein eine zu den von mit sich des auf für im dem auch es an werden aus sie nach bei um wir ihr ihre "
        "sind wird wurde vor bis zum zur sehr jeden jede datum artikel menge preis betrag bahnhof summe zwischensumme mwst"
    ).split(),
}
# figures as each language's documents print them: currency, telephone country codes, dates
FIGURE_CUES = {
    "en": (r"\$\s?\d", r"\+1[\s(]", r"\b\d{1,2}/\d{1,2}/\d{4}\b(?!.*€)", r"\d,\d{3}\.\d{2}\b"),
    "fr": (r"\+33\s", r"\d \d{3},\d{2}"),
    "es": (r"\+34\s",),
    "de": (r"\+49\s", r"\b\d{2}\.\d{2}\.\d{4}\b"),
}
SPELLING_CUES = {  # (sequence, weight): common in one language's spelling, rare in the others'
    "en": (("th", 1), ("wh", 1), ("ing", 1), ("ould", 1), ("ee", 0.5), ("oo", 0.5), ("ck", 0.5)),
    "fr": (("qu", 1), ("eau", 1), ("oi", 0.5), ("ou", 0.5), ("ai", 0.5), ("eux", 1), ("aux", 1), ("ez", 0.5)),
    "es": (("ción", 1.5), ("ado", 0.5), ("ada", 0.5), ("rr", 0.5), ("ía", 1)),
    "de": (("sch", 1.5), ("ung", 1), ("ei", 0.5), ("ie", 0.5), ("cht", 1), ("tz", 1), ("keit", 1), ("lich", 1)),
}
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def letters(text: str) -> int:
    return sum(ch.isalpha() for ch in text)


HAN_CONFIDENT = 0.9
# characters read (not spaces) per unit of width over height below which a reading is blank, by its
# script; measured on 169 lines of each language over four sets, the first pass reads Latin lines at
# 1.6 or more, Chinese and Japanese ones at 1.1 or more; a Cyrillic line it half reads as Latin
# look-alikes ("отчёт этикетка" -> "OT TK") comes out near 0.6
MIN_CHARS_PER_ASPECT = {"latin": 1.2, "han": 0.6, "kana": 0.6}
MIN_HAN_PER_ASPECT = 0.3  # a Chinese line is mostly Han; Hangul comes back as a Han shape among figures


def is_blank(text: str, aspect: float, chars: list[tuple[str, float]] | None = None) -> bool:
    """A reading with far fewer characters than a line of this width over height holds in its script,
    no letters at all (digits and punctuation: the probes tell a line of figures from one of Hangul),
    or a few Han shapes, or Han shapes read without confidence (`chars`: each character with its
    confidence): the line's script may be one the recogniser does not have."""
    script = script_of(text)
    if script is None:
        return True
    count = sum(1 for ch in text if not ch.isspace())
    if count < MIN_CHARS_PER_ASPECT.get(script, 1.2) * max(aspect, 1.0):
        return True
    if script != "han":
        return False
    han = [c for ch, c in chars or [] if script_of_char(ch) == "han"]
    few = letters(text) < MIN_HAN_PER_ASPECT * max(aspect, 1.0)
    return few or (bool(han) and sum(han) / len(han) < HAN_CONFIDENT)


def latin_language(text: str) -> str:
    lower = text.lower()
    scores = {lang: 3 * sum(lower.count(ch) for ch in chars) for lang, chars in LETTER_CUES.items()}
    if any(ch in lower for ch in "áíóú") and not any(ch in lower for ch in LETTER_CUES["fr"]):
        scores["es"] += 3
    words = _WORD.findall(lower)
    for lang, cues in WORD_CUES.items():
        scores[lang] = scores.get(lang, 0) + sum(w in cues for w in words)
    if " l'" in f" {lower}" or " d'" in f" {lower}" or "qu'" in lower:
        scores["fr"] = scores.get("fr", 0) + 2
    for lang, cues in SPELLING_CUES.items():
        scores[lang] = scores.get(lang, 0) + 0.5 * sum(weight * lower.count(seq) for seq, weight in cues)
    for lang, patterns in FIGURE_CUES.items():
        scores[lang] = scores.get(lang, 0) + sum(bool(re.search(p, text)) for p in patterns)
    if "€" in text:  # euros: not an English document (this set of languages)
        scores["en"] = scores.get("en", 0) - 1
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] > 0 else "en"


def language_of_text(text: str) -> str | None:
    """The language a reading is written in, from its script (and cues for Latin), or None."""
    script = script_of(text)
    if script == "latin":
        return latin_language(text)
    return SCRIPT_LANG.get(script) if script else None


# per probe: (Korean at or under, Russian at or over) Latin letters per unit of width over height
PROBE_CUTS = {"ppocrv6t": (0.5, 1.1), "ppocrv5": (0.8, 0.8)}


NO_SCRIPT = ""  # the probe read figures and no letters either: a line of figures, in no language


def from_probe(text: str, aspect: float, cuts: tuple[float, float] = (0.8, 0.8)) -> str | None:
    """A probe's reading of a line the first pass left blank: a line of Latin look-alikes is Cyrillic,
    one without letters is figures (NO_SCRIPT); None when it falls between the probe's cuts (ask the
    next probe)."""
    script = script_of(text)
    digits = sum(ch.isdigit() for ch in text)
    if script is None:  # figures read alike by the probe are figures; nothing read at all settles nothing
        return NO_SCRIPT if digits else None
    if script == "latin" and digits >= 3 and digits > 2 * letters(text):  # "10,64 e": a price whose € the probe read as a letter
        return NO_SCRIPT
    if script in ("hangul", "cyrillic"):  # should a probe ever have these scripts
        return SCRIPT_LANG[script]
    latin = sum(1 for ch in text if script_of_char(ch) == "latin") / max(aspect, 1.0)
    korean, russian = cuts
    return "ru" if latin >= russian else "ko" if latin <= korean else None


def page_language(langs: list[tuple[str | None, int]]) -> str | None:
    """A page's language: the one most of its letters are in (`langs`: language and letters per line)."""
    weight: dict[str, int] = {}
    for lang, n in langs:
        if lang:
            weight[lang] = weight.get(lang, 0) + max(n, 1)
    return max(weight, key=lambda k: weight[k]) if weight else None


def compatible(line_lang: str | None, page_lang: str, probed: bool = False) -> bool:
    """Whether a line may take its page's language: a Han-only line on a Japanese page is Japanese,
    a Latin line on a French page French, a probed line (one the first pass read too little of: a
    short line, a faint one) the page's language; a line of another script keeps its own."""
    if line_lang is None or line_lang == page_lang or probed:
        return True
    latin = {"en", "fr", "es", "de"}
    return (line_lang in latin and page_lang in latin) or (line_lang == "zh" and page_lang == "ja")
