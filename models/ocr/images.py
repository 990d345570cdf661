"""Loading document images for OCR. What cannot be read faithfully is a `BadDocument` that names the
file and the fix; what can is read faithfully:

- EXIF orientation applied; 16-bit and 32-bit grey scaled to 8 bits (a plain conversion clips them to
  white); CMYK and palette images converted; transparency laid on white paper (not black);
- empty files, non-images, truncated or corrupt images, directories, FIFOs and other special files,
  animations and multi-page files (one document per file: split them), and images over
  `MAX_PIXELS_OPEN` pixels (a decompression bomb is refused from its header, before decoding) are
  errors; pages over `MAX_PIXELS` are scaled down to it.
"""

from __future__ import annotations

import math
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from atelier.kernel.errors import AtelierError
from atelier.models.photos import to_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")  # what a folder is read for
MAX_PIXELS = 40_000_000  # larger pages are scaled down to this before OCR
MAX_PIXELS_OPEN = 150_000_000  # larger images are refused unopened (at 3 bytes a pixel, 450 MB decoded)
MAX_FILE_BYTES = 512 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = MAX_PIXELS_OPEN  # Pillow refuses (DecompressionBombError) at twice this, from the header


class BadDocument(AtelierError):
    pass


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BadDocument(str(path), "does not exist", "check the path") from None
    except OSError as exc:
        raise BadDocument(str(path), f"cannot be read ({exc.strerror or exc})", "check its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadDocument(str(path), "is a folder, not an image", "pass the folder itself to read every image in it, or name image files")
    if not stat.S_ISREG(st.st_mode):
        raise BadDocument(str(path), "is not a regular file (a pipe, socket or device)", "copy the image to a file and read that")
    if st.st_size == 0:
        raise BadDocument(str(path), "is empty (0 bytes)", "re-export or re-scan it")
    if st.st_size > MAX_FILE_BYTES:
        raise BadDocument(
            str(path), f"is {st.st_size / 2**20:.0f} MB, over the {MAX_FILE_BYTES // 2**20} MB a page may be", "split or downscale it first"
        )


MAX_ASPECT = {"page": 40.0, "line": 250.0}  # longer side over shorter: beyond it the detector and recogniser cannot work


def load_document(path: Path, max_pixels: int = MAX_PIXELS, kind: str = "page") -> np.ndarray:
    """RGB uint8 array of `path`, upright, at most `max_pixels` pixels. A page (or a line) far more elongated
    than any document is refused: the detector would be fed a sliver and the recogniser a line wider than
    its graph takes (ONNX Runtime failed in a MatMul on a 10000x10 image)."""
    path = Path(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS_OPEN:
                    raise BadDocument(
                        str(path),
                        f"is {im.width}x{im.height} pixels, over the {MAX_PIXELS_OPEN // 1_000_000} megapixels "
                        "Atelier opens (a decompression bomb, or a scan at a needless resolution)",
                        "downscale it to at most 600 dpi, or split it",
                    )
                frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    raise BadDocument(
                        str(path),
                        f"has {frames} frames (an animation or a multi-page file)",
                        "split it into one image per page, e.g. `convert in.tif page-%d.png`, and read those",
                    )
                im.load()
                img = _rgb_on_white(im)
    except BadDocument:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadDocument(str(path), f"is too large to open safely ({exc})", "downscale it to at most 600 dpi, or split it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        kind = (
            "is not an image Atelier can read"
            if isinstance(exc, UnidentifiedImageError)
            else f"is a damaged or truncated image ({exc.__class__.__name__}: {str(exc)[:120]})"
        )
        raise BadDocument(str(path), kind, "re-export it as PNG or JPEG, or remove it from the set") from None
    if img.width < 4 or img.height < 4:
        raise BadDocument(str(path), f"is {img.width}x{img.height} pixels, too small to hold text", "remove it from the set")
    aspect = max(img.width, img.height) / min(img.width, img.height)
    if aspect > MAX_ASPECT[kind]:
        raise BadDocument(
            str(path),
            f"is {img.width}x{img.height} pixels ({aspect:.0f}:1), too elongated to read as a {kind}",
            f"crop it into pieces under {MAX_ASPECT['page']:.0f}:1"
            + (f", or pass --lines if it is one line of text (up to {MAX_ASPECT['line']:.0f}:1)" if kind == "page" else ""),
        )
    if img.width * img.height > max_pixels:
        scale = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.LANCZOS)
    return np.asarray(img)


def _rgb_on_white(im: Image.Image) -> Image.Image:
    """8-bit RGB; transparent areas become white paper, not black."""
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if not has_alpha:
        return to_rgb(im)
    rgba = ImageOps.exif_transpose(im).convert("RGBA")
    paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(paper, rgba).convert("RGB")


def looks_like_image(path: Path) -> bool:
    """Whether a file found in a folder is meant to be read: an image suffix, or image content."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with Image.open(path):
            return True
    except Exception:  # noqa: BLE001 (anything Pillow cannot identify is not a document)
        return False
