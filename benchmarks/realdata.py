"""Sources of realistic inputs for benchmarks/realmodels.py, all offline: photos, faces, fonts and words in wheels.

Nothing is downloaded. Sources, all bundled in installed wheels:

- real photos: scikit-image's ``skimage/data`` (astronaut, camera, coffee, chelsea, rocket, motorcycle, page, text,
  textures...), scikit-learn's ``load_sample_images`` (china, flower) and matplotlib's ``grace_hopper.jpg``;
- real faces: scikit-image's ``lfw_subset.npy`` (100 grayscale 25x25 face crops from Labeled Faces in the Wild
  and 100 non-face patches, labelled);
- fonts: matplotlib's TrueType fonts (DejaVu Sans/Serif/Mono and their styles, STIX, Computer Modern);
- English words: scikit-learn's data-set descriptions (``sklearn/datasets/descr/*.rst``), plus generated prices,
  dates, codes and numbers.

The model-specific inputs are made in textdata.py (CRAFT, CRNN) and facedata.py (MTCNN).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageFont
from realnets import package_dir

# -- sources ----------------------------------------------------------------------------------------------------


def _skimage_data() -> Path:
    return package_dir("skimage") / "data"


@cache
def photo(name: str) -> np.ndarray:
    """A bundled photo as RGB uint8 (H, W, 3); grayscale photos are replicated to three channels."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"), dtype=np.uint8)
    if name == "grace_hopper":
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    else:
        matches = sorted(_skimage_data().glob(f"{name}.*"))
        if not matches:
            raise FileNotFoundError(f"no bundled photo '{name}' in {_skimage_data()}")
        path = matches[0]
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


# Photos without readable text, used as backgrounds and for text-free crops.
BACKGROUNDS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "motorcycle_left",
    "china",
    "flower",
    "brick",
    "grass",
    "gravel",
    "grace_hopper",
    "hubble_deep_field",
    "color",
)
TEXT_PHOTOS = ("page", "text")  # real text: a scanned book page, handwriting on a wall


@cache
def lfw_subset() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's LFW subset: (200, 25, 25) grayscale in [0, 1]; labels 1 = face (first 100), 0 = non-face."""
    faces = np.load(_skimage_data() / "lfw_subset.npy")
    labels = np.r_[np.ones(100, dtype=np.int64), np.zeros(100, dtype=np.int64)]
    return faces, labels


@cache
def fonts() -> tuple[Path, ...]:
    """matplotlib's text fonts (symbol-only and fallback fonts left out)."""
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    keep = re.compile(r"^(DejaVu(Sans|Serif|SansMono)(-\w+)?|STIXGeneral\w*|cm(r|ss|tt|b)10)\.ttf$")
    found = tuple(sorted(p for p in ttf.glob("*.ttf") if keep.match(p.name)))
    if not found:
        raise FileNotFoundError(f"no fonts in {ttf}")
    return found


@cache
def vocabulary() -> tuple[str, ...]:
    """English words (and numbers) from scikit-learn's bundled data-set descriptions."""
    import sklearn.datasets

    descr = Path(sklearn.datasets.__file__).parent / "descr"
    words: set[str] = set()
    for path in descr.glob("*.rst"):
        for token in re.findall(r"[A-Za-z][A-Za-z'-]{1,13}|\d[\d.,]{0,7}", path.read_text(encoding="utf-8")):
            words.add(token.strip("'-.,"))
    return tuple(sorted(w for w in words if len(w) >= 2))


def random_text(rng: np.random.Generator, max_words: int = 3) -> str:
    """A short phrase as text in the wild: words (any case), or a price, a date, a code, a number."""
    kind = rng.random()
    if kind < 0.7:
        vocab = vocabulary()
        words = [str(vocab[int(i)]) for i in rng.integers(0, len(vocab), int(rng.integers(1, max_words + 1)))]
        style = rng.random()
        text = " ".join(words)
        if style < 0.2:
            return text.upper()
        if style < 0.4:
            return text.title()
        return text
    if kind < 0.78:
        return f"{rng.choice(['€', '$', ''])}{rng.integers(0, 999)}.{rng.integers(0, 100):02d}"
    if kind < 0.86:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2031)}"
    if kind < 0.94:
        letters = "".join(chr(int(c)) for c in rng.integers(65, 91, int(rng.integers(2, 4))))
        return f"{letters}-{rng.integers(10, 99999)}"
    return str(rng.integers(0, 10 ** int(rng.integers(1, 8))))


# -- image helpers ----------------------------------------------------------------------------------------------


def random_crop(rng: np.random.Generator, img: np.ndarray, h: int, w: int, scale: tuple[float, float]) -> np.ndarray:
    """A random (h, w) window of ``img`` after rescaling it by a random factor in ``scale`` (at least covering)."""
    s = float(rng.uniform(*scale))
    s = max(s, h / img.shape[0], w / img.shape[1])
    size = (max(w, round(img.shape[1] * s)), max(h, round(img.shape[0] * s)))
    resized = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))
    y = int(rng.integers(0, resized.shape[0] - h + 1))
    x = int(rng.integers(0, resized.shape[1] - w + 1))
    return resized[y : y + h, x : x + w].copy()


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A real photo crop, a flat colour or a gradient, RGB uint8."""
    kind = rng.random()
    if kind < 0.5:
        name = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        return random_crop(rng, photo(name), h, w, (0.3, 1.2))
    base = rng.integers(0, 256, 3).astype(np.float32)
    if kind < 0.75:
        img = np.broadcast_to(base, (h, w, 3)).copy()
    else:
        other = rng.integers(0, 256, 3).astype(np.float32)
        t = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h, dtype=np.float32)
        ramp = base + (other - base) * t[:, None]
        img = np.broadcast_to(ramp[None] if len(t) == w else ramp[:, None], (h, w, 3)).copy()
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def ink_colour(rng: np.random.Generator, region: np.ndarray) -> tuple[int, int, int]:
    """A text colour that contrasts with the mean luminance of ``region`` (dark on light or light on dark)."""
    lum = float(np.mean(region @ np.array([0.299, 0.587, 0.114])))
    level = rng.integers(0, 70) if lum > 110 else rng.integers(185, 256)
    tint = rng.integers(-40, 41, 3)
    return tuple(int(v) for v in np.clip(level + tint, 0, 255))  # type: ignore[return-value]


def degrade(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Camera-like damage: blur, sensor noise, JPEG compression (each at a random strength, sometimes none)."""
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.1))))
    arr = np.asarray(img, dtype=np.float64)
    if rng.random() < 0.6:
        arr = arr + rng.normal(0, float(rng.uniform(1, 9)), arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), img.mode)
    if rng.random() < 0.6:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(35, 95)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert(img.mode)
    return img


def random_font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont:
    all_fonts = fonts()
    return ImageFont.truetype(str(all_fonts[int(rng.integers(len(all_fonts)))]), size)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block (data generation shares a 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
