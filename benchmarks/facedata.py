"""Inputs for MTCNN's R-Net (24x24) and O-Net (48x48): the windows the real cascade hands them, plus real faces.

In facenet-pytorch's ``detect_face`` R-Net never sees a whole photo: it scores the windows P-Net proposes (after
per-scale and per-image NMS, box regression and squaring), and O-Net scores the windows R-Net kept. Those windows
are mostly non-faces, hard negatives and part-faces, with a few faces. This module runs that cascade, with the real
P-Net and R-Net weights and facenet-pytorch's thresholds (0.6, 0.7), minimum face 20 px, scale factor 0.709,
on bundled real photos, and cuts the windows the same way (``imresample``: area interpolation; then
``(x - 127.5) * 0.0078125``).

Labelled windows (for the evaluation sets) come from scikit-image's LFW subset: 100 real face crops and 100
non-face patches, 25x25 grayscale, replicated to three channels and area-resampled to the network's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from realdata import lfw_subset, photo, torch_threads
from realnets import PNet, RNet

MIN_FACE = 20
FACTOR = 0.709
THRESHOLDS = (0.6, 0.7)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression ("Union"), as torchvision's ``nms``: indices kept, best first."""
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        iou = inter / (area[i] + area[order[1:]] - inter)
        order = order[1:][iou <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """facenet-pytorch's ``rerec``: each box grown to a square around its centre."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2:4] = out[:, :2] + side[:, None]
    return out


def _regress(boxes: np.ndarray, offsets: np.ndarray, plus_one: bool) -> np.ndarray:
    out = boxes.copy()
    extra = 1.0 if plus_one else 0.0  # bbreg (after R-Net) measures w, h with +1; stage one does not
    w = boxes[:, 2] - boxes[:, 0] + extra
    h = boxes[:, 3] - boxes[:, 1] + extra
    out[:, 0:4] = boxes[:, 0:4] + offsets * np.stack([w, h, w, h], axis=1)
    return out


def crop_windows(image: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """facenet-pytorch's window cut: boxes truncated, clipped to the photo (1-based), area-resampled, normalised."""
    _, _, h, w = image.shape
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    x, y = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
    ex, ey = np.minimum(b[:, 2], w), np.minimum(b[:, 3], h)
    crops = [
        F.interpolate(image[:, :, y[k] - 1 : ey[k], x[k] - 1 : ex[k]], size=(size, size), mode="area")
        for k in range(len(b))
        if ey[k] > y[k] - 1 and ex[k] > x[k] - 1
    ]
    if not crops:
        return torch.empty(0, 3, size, size)
    return (torch.cat(crops) - 127.5) * 0.0078125


def pnet_boxes(image: torch.Tensor, pnet: PNet) -> np.ndarray:
    """Stage one of ``detect_face`` on one photo (1, 3, H, W), 0-255: squared candidate boxes (K, 5: box, score)."""
    _, _, h, w = image.shape
    m = 12.0 / MIN_FACE
    scale, minl = m, min(h, w) * m
    found: list[np.ndarray] = []
    while minl >= 12:
        im = F.interpolate(image, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
        reg, probs = pnet((im - 127.5) * 0.0078125)
        prob = probs[0, 1].numpy()
        ys, xs = np.nonzero(prob >= THRESHOLDS[0])
        if ys.size:
            q1 = np.floor((2 * np.stack([xs, ys], 1) + 1) / scale)
            q2 = np.floor((2 * np.stack([xs, ys], 1) + 12) / scale)
            cand = np.concatenate([q1, q2, prob[ys, xs][:, None], reg[0][:, ys, xs].numpy().T], axis=1)
            found.append(cand[_nms(cand[:, :4], cand[:, 4], 0.5)])
        scale, minl = scale * FACTOR, minl * FACTOR
    if not found:
        return np.empty((0, 5))
    boxes = np.concatenate(found)
    boxes = boxes[_nms(boxes[:, :4], boxes[:, 4], 0.7)]
    regressed = _regress(boxes[:, :4], boxes[:, 5:9], plus_one=False)
    return _square(np.concatenate([regressed, boxes[:, 4:5]], axis=1))


def rnet_boxes(image: torch.Tensor, boxes: np.ndarray, rnet: RNet) -> np.ndarray:
    """Stage two: the boxes R-Net keeps (score > 0.7), NMS 0.7, regressed and squared: O-Net's candidates."""
    windows = crop_windows(image, boxes, 24)
    if not len(windows):
        return np.empty((0, 5))
    offsets, probs = rnet(windows)
    score = probs[:, 1].numpy()
    keep = score > THRESHOLDS[1]
    kept = np.concatenate([boxes[keep, :4], score[keep, None]], axis=1)
    pick = _nms(kept[:, :4], kept[:, 4], 0.7)
    regressed = _regress(kept[pick], offsets.numpy()[keep][pick], plus_one=True)
    return _square(regressed)


def _as_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().unsqueeze(0)


def _augment(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """A different view of the same photo: mirrored, rescaled, brightness and contrast changed."""
    from PIL import Image

    img = rgb[:, ::-1] if rng.random() < 0.5 else rgb
    s = float(rng.uniform(0.6, 1.3))
    resized = Image.fromarray(np.ascontiguousarray(img)).resize(
        (max(48, int(img.shape[1] * s)), max(48, int(img.shape[0] * s))), Image.Resampling.BILINEAR
    )
    arr = np.asarray(resized, dtype=np.float32)
    arr = (arr - 128.0) * float(rng.uniform(0.75, 1.25)) + 128.0 + float(rng.uniform(-25, 25))
    return np.clip(arr, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class CascadeWindows:
    """Windows for one stage, cut from photos as the cascade does; ``sources`` counts windows per photo."""

    windows: np.ndarray  # (N, 3, size, size) float32
    sources: dict[str, int]


def cascade_windows(
    photos: Sequence[str], size: int, n: int, rng: np.random.Generator, pnet: PNet, rnet: RNet | None
) -> CascadeWindows:
    """``n`` windows the cascade would hand R-Net (size 24: P-Net's proposals) or O-Net (size 48: R-Net's survivors).

    Photos are visited round-robin, each visit an augmented view, until ``n`` windows are collected; each view
    contributes a random subset (at most 24) so no single photo dominates.
    """
    out: list[torch.Tensor] = []
    sources: dict[str, int] = {}
    total, visit = 0, 0
    with torch_threads(1), torch.no_grad():
        while total < n:
            if visit >= 40 * len(photos):
                raise RuntimeError(f"the cascade found only {total} of {n} windows of size {size} in {list(photos)}")
            name = photos[visit % len(photos)]
            visit += 1
            image = _as_tensor(_augment(rng, photo(name)))
            boxes = pnet_boxes(image, pnet)
            if rnet is not None and len(boxes):
                boxes = rnet_boxes(image, boxes, rnet)
            if not len(boxes):
                continue
            pick = rng.permutation(len(boxes))[: min(24, n - total)]
            windows = crop_windows(image, boxes[pick], size)
            out.append(windows)
            sources[name] = sources.get(name, 0) + len(windows)
            total += len(windows)
    return CascadeWindows(torch.cat(out).numpy().astype(np.float32), sources)


def lfw_windows(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's LFW subset as MTCNN windows: (200, 3, size, size) normalised, labels 1 = face, 0 = not."""
    faces, labels = lfw_subset()
    gray = torch.from_numpy(faces.astype(np.float32) * 255.0).unsqueeze(1)
    resized = F.interpolate(gray, size=(size, size), mode="area").repeat(1, 3, 1, 1)
    return ((resized - 127.5) * 0.0078125).numpy().astype(np.float32), labels
