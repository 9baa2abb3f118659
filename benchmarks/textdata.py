"""Inputs for the easyocr networks: text scenes for CRAFT, text-line crops for the CRNN recogniser.

Both are preprocessed exactly as easyocr 1.7.2 does before calling the network:

- CRAFT (``detection.test_net``): an RGB image, ``resize_aspect_ratio`` (no resize below ``canvas_size`` 2560 at
  ``mag_ratio`` 1; the image is pasted top-left on a zero canvas whose sides are rounded up to multiples of 32),
  then ``normalizeMeanVariance`` (ImageNet mean/std on the 0-255 scale), NCHW float32.
- CRNN (``utils.get_image_list`` + ``recognition.AlignCollate``): the grayscale crop (OpenCV's BGR2GRAY weights,
  the same as PIL's "L") is resized to height 64 keeping its aspect ratio (easyocr passes PIL's LANCZOS constant to
  ``cv2.resize``, which OpenCV reads as INTER_LINEAR: bilinear here too), resized again with bicubic to
  ``min(ceil(64 * ratio), W)`` x 64, scaled to [-1, 1] (``(x / 255 - 0.5) / 0.5``) and right-padded to width W by
  repeating its last column (``NormalizePAD``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from realdata import (
    TEXT_PHOTOS,
    background,
    degrade,
    ink_colour,
    photo,
    random_crop,
    random_font,
    random_text,
)
from scipy import ndimage

CRAFT_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0
CRAFT_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255.0
RECOGNIZER_HEIGHT = 64  # easyocr.config.imgH


@dataclass(frozen=True)
class TextSample:
    """One preprocessed input and what it shows: ``kind`` is rendered / scan / no-text; ``text`` when known."""

    array: np.ndarray
    kind: str
    text: str | None
    label: int | None = None


# -- CRAFT --------------------------------------------------------------------------------------------------------


def craft_preprocess(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """easyocr's detector input for an RGB uint8 image no larger than (height, width): (3, height, width) float32."""
    h, w = rgb.shape[:2]
    h32, w32 = -(-h // 32) * 32, -(-w // 32) * 32
    if (h32, w32) != (height, width):
        raise ValueError(f"a {h}x{w} image pads to {h32}x{w32} in easyocr, not {height}x{width}")
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    canvas[:h, :w] = rgb
    return np.ascontiguousarray(((canvas - CRAFT_MEAN) / CRAFT_STD).transpose(2, 0, 1))


def _bbox(font: ImageFont.FreeTypeFont, text: str) -> tuple[int, int, int, int]:
    """The ink box of ``text`` drawn at (0, 0): left, top, right, bottom in whole pixels."""
    left, top, right, bottom = font.getbbox(text)
    return int(left), int(top), int(right), int(bottom)


def _scene(rng: np.random.Generator, h: int, w: int) -> tuple[Image.Image, str]:
    """One or two lines of text on a photo, a flat colour or a gradient, sometimes on a sign; rotated, degraded."""
    img = Image.fromarray(background(rng, h, w))
    n_lines = 2 if h >= 48 and rng.random() < 0.4 else 1
    lines: list[tuple[str, ImageFont.FreeTypeFont, int, int, tuple[int, int, int, int]]] = []
    y = int(rng.integers(1, 6))
    for _ in range(n_lines):
        size = int(rng.integers(11, max(12, min(34, (h - y) // n_lines))))
        for _attempt in range(6):
            text, font = random_text(rng, 2), random_font(rng, size)
            box = _bbox(font, text)
            if box[2] - box[0] <= w - 4:
                break
            size = max(10, int(size * 0.85))
        else:
            continue
        x = int(rng.integers(0, max(1, w - (box[2] - box[0]) - 1)))
        lines.append((text, font, x, y, box))
        y += box[3] - box[1] + int(rng.integers(2, 8))
        if y >= h - 10:
            break
    if lines and rng.random() < 0.35:  # a sign or label behind the text
        pad = int(rng.integers(2, 8))
        x0 = min(x for _, _, x, _, _ in lines) - pad
        y0 = lines[0][3] - pad
        x1 = max(x + b[2] - b[0] for _, _, x, _, b in lines) + pad
        y1 = lines[-1][3] + lines[-1][4][3] - lines[-1][4][1] + pad
        ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    pixels = np.asarray(img)
    for text, font, x, y, (left, top, right, bottom) in lines:
        region = pixels[y : y + bottom - top + 1, x : x + right - left + 1].reshape(-1, 3)
        draw.text((x - left, y - top), text, font=font, fill=(*ink_colour(rng, region), 255))
    layer = layer.rotate(float(rng.normal(0, 3)), resample=Image.Resampling.BILINEAR, center=(w / 2, h / 2))
    img = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    return degrade(rng, img), " / ".join(text for text, *_ in lines)


def craft_sample(rng: np.random.Generator, height: int, width: int) -> TextSample:
    """A text scene (75%), a crop of a real photo of text (15%) or a text-free photo crop (10%), preprocessed.

    Image sizes vary (heights 40..height, widths width-31..width) so easyocr's zero padding to multiples of 32 varies.
    """
    h, w = int(rng.integers(40, height + 1)), int(rng.integers(width - 31, width + 1))
    kind = rng.random()
    if kind < 0.75:
        img, text = _scene(rng, h, w)
        return TextSample(craft_preprocess(np.asarray(img), height, width), "rendered", text)
    if kind < 0.9:
        name = TEXT_PHOTOS[int(rng.integers(len(TEXT_PHOTOS)))]
        crop = random_crop(rng, photo(name), h, w, (0.8, 1.6))
        scan = np.asarray(degrade(rng, Image.fromarray(crop)))
        return TextSample(craft_preprocess(scan, height, width), "scan", None)
    from realdata import BACKGROUNDS

    crop = random_crop(rng, photo(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]), h, w, (0.3, 1.0))
    return TextSample(craft_preprocess(crop, height, width), "no-text", None)


# -- CRNN recogniser ----------------------------------------------------------------------------------------------


def recognizer_preprocess(crop: Image.Image, width: int) -> np.ndarray:
    """easyocr's recogniser input for a grayscale text-line crop: (1, 64, width) float32 in [-1, 1]."""
    h = RECOGNIZER_HEIGHT
    ratio = crop.width / crop.height
    if ratio < 1.0:  # easyocr's vertical-text branch: resize the long side to 64 * ratio
        crop = crop.resize((h, int(h / ratio)), Image.Resampling.BILINEAR)
    else:
        crop = crop.resize((max(1, int(h * ratio)), h), Image.Resampling.BILINEAR)
    ratio = crop.width / crop.height
    resized_w = width if math.ceil(h * ratio) > width else math.ceil(h * ratio)
    arr = np.asarray(crop.resize((resized_w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    arr = (arr - 0.5) / 0.5
    out = np.empty((1, h, width), dtype=np.float32)
    out[0, :, :resized_w] = arr
    out[0, :, resized_w:] = arr[:, -1:]
    return out


def _rendered_line(rng: np.random.Generator, max_ratio: float) -> tuple[Image.Image, str]:
    """A rendered phrase cropped like a detector's word box (margin 0.1-0.25 of the text height), RGB.

    Phrases wider than ``max_ratio`` x their height are avoided (6 tries), as most crops fit the model's width.
    """
    size = int(rng.integers(16, 48))
    for _attempt in range(6):
        text, font = random_text(rng, 3), random_font(rng, size)
        left, top, right, bottom = _bbox(font, text)
        if (right - left) / max(1, bottom - top) <= max_ratio:
            break
    tw, th = max(1, right - left), max(1, bottom - top)
    pad = max(1, round(float(rng.uniform(0.1, 0.25)) * th))
    bg = background(rng, th + 2 * pad, tw + 2 * pad)
    img = Image.fromarray(bg)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=ink_colour(rng, bg.reshape(-1, 3)))
    angle = float(rng.normal(0, 1.0))
    if abs(angle) > 0.3:
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=tuple(int(v) for v in bg[0, 0]))
    return degrade(rng, img), text


@cache
def page_word_boxes() -> list[tuple[int, int, int, int]]:
    """Word boxes (x1, y1, x2, y2) on scikit-image's scanned page, from ink projections (lines, then word gaps)."""
    gray = photo("page")[:, :, 0].astype(np.float32)
    ink = gray < ndimage.uniform_filter(gray, 25) - 30
    # Ascenders and descenders touch the next line, so lines are the runs of rows with much ink, widened a little.
    rows = ink.sum(axis=1) > 12
    boxes: list[tuple[int, int, int, int]] = []
    for (ys,) in ndimage.find_objects(ndimage.label(rows)[0]):
        if ys.stop - ys.start < 6:  # a ruled line
            continue
        y0, y1 = max(0, ys.start - 3), min(ink.shape[0], ys.stop + 3)
        cols = ink[y0:y1].any(axis=0)
        gap = max(2, int(0.35 * (y1 - y0)))
        words = ndimage.binary_closing(cols, np.ones(gap))
        for (xs,) in ndimage.find_objects(ndimage.label(words)[0]):
            if xs.stop - xs.start >= 4:
                boxes.append((xs.start, y0, xs.stop, y1))
    return boxes


def _scanned_phrase(rng: np.random.Generator) -> Image.Image:
    """1-3 consecutive words of the scanned page, cropped with easyocr's 0.1 margin."""
    boxes = page_word_boxes()
    i = int(rng.integers(len(boxes)))
    j = i
    while j + 1 < len(boxes) and boxes[j + 1][1] == boxes[i][1] and j - i < int(rng.integers(0, 3)):
        j += 1
    x0, y0, x1, y1 = boxes[i][0], boxes[i][1], boxes[j][2], boxes[i][3]
    m = max(1, round(0.1 * (y1 - y0)))
    page = photo("page")
    crop = page[max(0, y0 - m) : y1 + m, max(0, x0 - m) : x1 + m]
    return Image.fromarray(crop)


def recognizer_sample(rng: np.random.Generator, width: int) -> TextSample:
    """A rendered phrase (85%, text known) or words of a real scanned page (15%), preprocessed for the CRNN."""
    if rng.random() < 0.85:
        crop, text = _rendered_line(rng, 0.9 * width / RECOGNIZER_HEIGHT)
        return TextSample(recognizer_preprocess(crop.convert("L"), width), "rendered", text)
    return TextSample(recognizer_preprocess(_scanned_phrase(rng).convert("L"), width), "scan", None)


def ctc_greedy(logits: np.ndarray, characters: str) -> str:
    """easyocr's greedy CTC decoding of one (T, classes) row: argmax per step, repeats merged, blanks (0) dropped."""
    best = logits.argmax(axis=-1)
    keep = (best != 0) & np.r_[True, best[1:] != best[:-1]]
    return "".join(characters[i - 1] for i in best[keep])


# -- PP-OCR text-direction classifier (rapidocr) -----------------------------------------------------------------


def direction_preprocess(crop: Image.Image, height: int, width: int) -> np.ndarray:
    """rapidocr's ``TextClassifier.resize_norm_img`` for an RGB crop: (3, height, width) float32, BGR like OpenCV.

    Resized to ``height`` keeping the aspect ratio (width capped at ``width``), scaled to [-1, 1], zero-padded on
    the right. rapidocr reads images with OpenCV, so channels are BGR.
    """
    ratio = crop.width / crop.height
    resized_w = width if math.ceil(height * ratio) > width else math.ceil(height * ratio)
    arr = np.asarray(crop.convert("RGB").resize((resized_w, height), Image.Resampling.BILINEAR), dtype=np.float32)
    arr = (arr[:, :, ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = arr
    return out


def direction_sample(rng: np.random.Generator, height: int, width: int) -> TextSample:
    """A text-line crop (85% rendered, 15% real scanned words), upright (label 0) or turned 180 degrees (label 1)."""
    if rng.random() < 0.85:
        crop, text = _rendered_line(rng, 0.9 * width / height)
        kind: str = "rendered"
        known: str | None = text
    else:
        crop, kind, known = _scanned_phrase(rng), "scan", None
    label = int(rng.random() < 0.5)
    if label:
        crop = crop.rotate(180)
    return TextSample(direction_preprocess(crop, height, width), kind, known, label)
