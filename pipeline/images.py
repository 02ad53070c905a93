"""Decode one image safely: convert what can be converted to RGB, reject the rest with a reason.

``decode_and_crop(data, resolution, crop=…)`` → :class:`Decoded` with either a uint8 array
``(resolution, resolution, 3)`` or a reject reason. Never raises on bad input. Two center crops
(:data:`CROPS`): ``"adm"``, the official ENAT/ADM crop (``enat.vqgan.center_crop_arr``, ImageNet),
and ``"uvit"``, U-ViT's MS-COCO crop (:func:`uvit_center_crop`), the preprocessing behind the COCO
reference statistics ``fid_stats_mscoco256_val.npz`` (enat-facts §9–10).
Reasons (stable strings, recorded in rejects.parquet):

=====================  ===========================================================================
``empty``              zero bytes
``not-an-image``       PIL cannot identify the data
``truncated``          the header parses but the pixel data is cut short / corrupt
``tiny``               short side below ``min_side``
``decompression-bomb`` more than ``max_pixels`` pixels (checked from the header, before decoding)
``unsupported-mode``   a pixel mode with no safe RGB conversion (e.g. LAB, float)
=====================  ===========================================================================

Converted modes (counted, recorded with the sample): CMYK, L, 1, P, LA, PA, RGBA, I;16*, I, YCbCr.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from enat.vqgan import center_crop_arr

# Modes PIL converts to RGB without loss of meaning. Alpha is dropped, not composited.
# as official: dataset.py ImageDataset does pil_image.convert("RGB") for every mode.
_PLAIN_CONVERT = {"L", "1", "P", "PA", "LA", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "La"}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def uvit_center_crop(im: Image.Image, resolution: int) -> np.ndarray:
    """U-ViT's MS-COCO crop: RGB PIL image → uint8 ``(resolution, resolution, 3)``.

    Crop the centered square of the short side (offsets rounded down), then one Lanczos resize.
    """
    # as official: U-ViT datasets.py center_crop (used by MSCOCODatabase and its FID statistics)
    arr = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)  # (H, W, 3)
    side = min(arr.shape[:2])
    top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
    square = Image.fromarray(np.ascontiguousarray(arr[top:top + side, left:left + side]), "RGB")
    return np.asarray(square.resize((resolution, resolution), Image.LANCZOS), dtype=np.uint8)


# name → crop function (RGB PIL image, resolution) → uint8 (resolution, resolution, 3)
CROPS: dict[str, Callable[[Image.Image, int], np.ndarray]] = {"adm": center_crop_arr, "uvit": uvit_center_crop}


def resolve_crop(crop: str, source_kind: str) -> str:
    """``source.crop`` → ``"adm"`` or ``"uvit"``; ``"auto"`` picks U-ViT's crop for COCO, ADM's otherwise."""
    if crop == "auto":
        return "uvit" if source_kind == "coco" else "adm"
    if crop not in CROPS:
        raise ValueError(f"source.crop: unknown crop {crop!r}; known: auto, {', '.join(CROPS)}")
    return crop


@dataclass(frozen=True)
class Decoded:
    """Result of :func:`decode_and_crop`: ``array`` on success, else ``reason`` (+ ``detail``)."""

    array: Optional[np.ndarray]  # uint8 (resolution, resolution, 3)
    reason: Optional[str] = None  # reject reason, None on success
    detail: str = ""  # human-readable detail for the reject
    converted_from: Optional[str] = None  # original PIL mode when a conversion to RGB happened
    size: tuple[int, int] = (0, 0)  # original (width, height)

    @property
    def ok(self) -> bool:
        return self.array is not None


def to_rgb(im: Image.Image) -> tuple[Optional[Image.Image], Optional[str]]:
    """Loaded PIL image → (RGB image, None) or (None, why it cannot be converted safely)."""
    mode = im.mode
    if mode == "RGB":
        return im, None
    if mode in _SIXTEEN_BIT:
        # differs from official: PIL's convert("RGB") clips 16-bit values at 255 (a white image);
        # scale the 16-bit range down to 8 bits instead.
        arr = np.asarray(im).astype(np.int64)
        arr8 = np.clip(arr >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB"), None
    if mode in _PLAIN_CONVERT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Palette images with Transparency …"
            return im.convert("RGB"), None
    return None, f"mode {mode} has no safe RGB conversion"


def decode_and_crop(data: bytes, resolution: int, *, min_side: int = 8,
                    max_pixels: int = 2 * 89_478_485, crop: str = "adm") -> Decoded:
    """Image file bytes → center crop ``uint8 (resolution, resolution, 3)`` or a reject.

    ``crop``: a key of :data:`CROPS` (``"adm"``: the official ENAT crop; ``"uvit"``: U-ViT's COCO crop).

    Never raises for bad input data; the reject carries a stable ``reason`` (module docstring).
    """
    if not data:
        return Decoded(None, "empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Decoded(None, "decompression-bomb", str(e))
    except UnidentifiedImageError:
        return Decoded(None, "not-an-image", "PIL cannot identify the file")
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # broken or cut-short header
        reason = "truncated" if "truncat" in str(e).lower() or isinstance(e, EOFError) else "not-an-image"
        return Decoded(None, reason, f"{type(e).__name__}: {e}")
    w, h = im.size
    if w * h > max_pixels:
        return Decoded(None, "decompression-bomb", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}",
                       size=(w, h))
    if min(w, h) < min_side:
        return Decoded(None, "tiny", f"{w}x{h}: short side < min_side {min_side}", size=(w, h))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()  # ImageFile.LOAD_TRUNCATED_IMAGES stays False: a short file raises here
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        return Decoded(None, "truncated", f"{type(e).__name__}: {e}", size=(w, h))
    except Image.DecompressionBombError as e:
        return Decoded(None, "decompression-bomb", str(e), size=(w, h))
    crop_fn = CROPS[crop]
    original = im.mode
    rgb, why = to_rgb(im)
    if rgb is None:
        return Decoded(None, "unsupported-mode", why or original, size=(w, h))
    try:
        arr = crop_fn(rgb, resolution)
    except (OSError, ValueError) as e:
        return Decoded(None, "truncated", f"{type(e).__name__}: {e}", size=(w, h))
    return Decoded(arr, None, "", original if original != "RGB" else None, size=(w, h))
