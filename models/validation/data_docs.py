"""Great Expectations Data Docs that render offline.

GX's pages link Bootstrap, jQuery and Font Awesome from CDNs, so on a machine without internet (or
behind a proxy) the site is unstyled. `make_offline` copies those assets from wheels that ship them
(XStatic-*) into the site and points every page at the copies; the few CDN extras without a local
copy (the date picker, the dark theme, the table filters) are dropped, and bootstrap-table, which builds
the pages' tables from data in the page, is replaced by a small script of ours that draws the rows.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

ASSETS = "static/offline"
_WEB_ASSET = re.compile(r"https://great-expectations-web-assets\.[^\"' )]+")
_TAG = re.compile(r"""<(?:link|script)\b[^>]*?(?:href|src)=["'](https?://[^"']+)["'][^>]*>(?:\s*</script>)?""", re.I)


def _sources() -> dict[str, Path]:
    import xstatic.pkg.bootstrap as bootstrap
    import xstatic.pkg.font_awesome as font_awesome
    import xstatic.pkg.jquery as jquery

    return {
        "bootstrap.min.css": Path(bootstrap.BASE_DIR) / "css" / "bootstrap.min.css",
        "bootstrap.bundle.min.js": Path(bootstrap.BASE_DIR) / "js" / "bootstrap.bundle.min.js",  # Popper included
        "jquery.min.js": Path(jquery.BASE_DIR) / "jquery.min.js",
        "table-lite.js": Path(__file__).with_name("table_lite.js"),  # bootstrap-table has no wheel: ours draws the rows
        "fontawesome": Path(font_awesome.BASE_DIR),
    }


def _local(url: str) -> str | None:
    """The copy that replaces a CDN URL, or None to drop the tag."""
    name = url.rsplit("/", 1)[-1]
    if "bootstrap-table" in url:
        return "table-lite.js" if url.endswith("bootstrap-table.min.js") else None
    if "datepicker" in url or "bootstrap-dark" in url or "popper" in url:
        return None
    if url.endswith("bootstrap.min.css"):
        return "bootstrap.min.css"
    if url.endswith("bootstrap.min.js"):
        return "bootstrap.bundle.min.js"
    if name.startswith("jquery"):
        return "jquery.min.js"
    if "font-awesome" in url and name.endswith(".css"):
        return "fontawesome/css/all.min.css"
    return None


def make_offline(site_dir: Path, since: float | None = None) -> int:
    """Copy the assets into `site_dir` (once) and rewrite the CDN links of its pages (those written at
    or after `since`, a time.time(); all of them without it); returns how many pages changed. Safe to
    run again: rewritten pages have no CDN links left."""
    site_dir = Path(site_dir)
    target = site_dir / ASSETS
    if not (target / "table-lite.js").is_file():
        target.mkdir(parents=True, exist_ok=True)
        for name, src in _sources().items():
            if src.is_dir():
                for part in ("css", "webfonts"):
                    shutil.copytree(src / part, target / name / part, dirs_exist_ok=True)
            else:
                shutil.copyfile(src, target / name)
    changed = 0
    for page in site_dir.rglob("*.html"):
        if since is not None and page.stat().st_mtime < since - 1:  # written by an earlier build: already rewritten
            continue
        text = page.read_text(encoding="utf-8")
        if "https://" not in text:
            continue
        prefix = os.path.relpath(target, page.parent).replace(os.sep, "/")

        def swap(match: re.Match, prefix: str = prefix) -> str:
            local = _local(match.group(1))
            if local is None:
                return ""
            tag = match.group(0).replace(match.group(1), f"{prefix}/{local}")
            return re.sub(r"""\s(?:integrity|crossorigin)=["'][^"']*["']""", "", tag)

        new = _TAG.sub(swap, text)
        # GX's logo is fetched from its web-assets bucket with the project's id in the query: the copy it ships instead
        new = _WEB_ASSET.sub(f"{os.path.relpath(site_dir / 'static' / 'images', page.parent)}/logo-long.png", new)
        if new != text:
            page.write_text(new, encoding="utf-8")
            changed += 1
    return changed
