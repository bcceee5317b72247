"""Read a shapes image back: which colours, shapes and positions it contains, and how well a
set of images matches its captions.

:func:`detect` works in four steps, all plain geometry (no learned model):

1. every pixel takes the nearest palette colour (shape colours and backgrounds), or none if
   it is farther than ``max_colour_distance`` from all of them (blended edge pixels);
2. the background is the most frequent background colour;
3. the pixels of each shape colour are split into 4-connected components; components smaller
   than ``min_area_fraction`` of the image, or filling less than 20% of their bounding box
   (thin fringes), are noise;
4. each component is classified by comparing its mask, resampled to its bounding box, with
   every shape's analytic mask on the same box (intersection over union, best wins), and
   placed in the slot whose centre is nearest to its bounding-box centre.

On rendered images (:func:`musefast.demo_data.shapes.render`) this is exact; on generated
images it tolerates colour noise, blur and ragged edges.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import permutations

import numpy as np

from musefast.demo_data.shapes import BACKGROUNDS, COLOURS, SHAPES, SLOT_CENTRES, ShapeSpec, parse_caption, shape_mask

_NAMES = list(COLOURS) + list(BACKGROUNDS)
_PALETTE = np.array([COLOURS[c] for c in COLOURS] + [BACKGROUNDS[b] for b in BACKGROUNDS], dtype=np.float32)
_NUM_SHAPE_COLOURS = len(COLOURS)


@dataclass(frozen=True)
class DetectedShape:
    """A shape found in an image: its attributes plus where and how sure.

    Attributes:
        colour, shape, slot: as in :class:`~musefast.demo_data.shapes.ShapeSpec`.
        bbox: (y0, x0, y1, x1) pixel bounds, end exclusive.
        area: pixels in the component.
        shape_iou: IoU with the best-matching shape template (1.0 = exact).
    """

    colour: str
    shape: str
    slot: str
    bbox: tuple[int, int, int, int]
    area: int
    shape_iou: float

    @property
    def spec(self) -> ShapeSpec:
        return ShapeSpec(self.colour, self.shape, self.slot)


@dataclass(frozen=True)
class Detection:
    """Everything :func:`detect` read from one image."""

    background: str | None
    shapes: tuple[DetectedShape, ...]

    @property
    def specs(self) -> tuple[ShapeSpec, ...]:
        return tuple(s.spec for s in self.shapes)


def _as_uint8_hwc(image) -> np.ndarray:
    """PIL image, numpy (H, W, 3) uint8 or float in [0, 1], torch (3, H, W) in [0, 1] -> float32 (H, W, 3) in 0..255."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):  # torch
        t = image.detach().cpu()
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"a tensor image must be (3, H, W) in [0, 1], got {tuple(t.shape)}")
        return t.permute(1, 2, 0).float().clamp(0, 1).numpy() * 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    return np.clip(arr.astype(np.float32), 0, 1) * 255.0


def label_pixels(image, *, max_colour_distance: float = 70.0) -> np.ndarray:
    """(H, W) int: index into COLOURS + BACKGROUNDS of the nearest palette colour, -1 when the
    pixel is farther than ``max_colour_distance`` (RGB, 0..255) from every palette entry."""
    rgb = _as_uint8_hwc(image)
    d2 = ((rgb[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    labels = d2.argmin(-1)
    labels[d2.min(-1) > max_colour_distance**2] = -1
    return labels


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool (H, W) mask -> list of (n, 2) arrays of (y, x)."""
    H, W = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pixels, dtype=np.int64))
    return out


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """A component's mask cropped to its bounding box (h, w) bool -> (shape name, IoU of the
    best template). Templates are the analytic shapes sampled at the crop's pixel centres, on
    the crop's box grown by 0, 1 or 2 pixels per axis: pointed tips thinner than a pixel
    centre vanish when a shape is drawn (a diamond loses a row or column at each tip), so its
    bounding box is smaller than the box it was drawn in."""
    h, w = mask.shape
    ys, xs = np.arange(h) + 0.5 - h / 2, np.arange(w) + 0.5 - w / 2
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        for grow_y in (0, 1, 2):
            for grow_x in (0, 1, 2):
                t = shape_mask(shape, xs[None, :] / ((w + grow_x) / 2), ys[:, None] / ((h + grow_y) / 2))
                union = np.logical_or(t, mask).sum()
                iou = float(np.logical_and(t, mask).sum() / union) if union else 0.0
                if iou > best_iou:
                    best, best_iou = shape, iou
    return best, best_iou


def nearest_slot(cx: float, cy: float) -> str:
    """Slot whose centre (fractions of the side) is nearest to (cx, cy) (fractions)."""
    return min(SLOT_CENTRES, key=lambda s: (SLOT_CENTRES[s][0] - cx) ** 2 + (SLOT_CENTRES[s][1] - cy) ** 2)


def detect(image, *, max_colour_distance: float = 70.0, min_area_fraction: float = 0.01) -> Detection:
    """Read an image (PIL, numpy (H, W, 3) uint8 or float in [0, 1], or a torch (3, H, W) in
    [0, 1]) -> :class:`Detection` with the shapes sorted by area, largest first."""
    labels = label_pixels(image, max_colour_distance=max_colour_distance)
    H, W = labels.shape
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(_NAMES))
    bg_counts = counts[_NUM_SHAPE_COLOURS:]
    background = _NAMES[_NUM_SHAPE_COLOURS + int(bg_counts.argmax())] if bg_counts.sum() else None
    min_area = max(4, int(round(min_area_fraction * H * W)))
    found = []
    for ci in range(_NUM_SHAPE_COLOURS):
        if counts[ci] < min_area:
            continue
        for pix in components(labels == ci):
            if len(pix) < min_area:
                continue
            y0, x0 = pix.min(0)
            y1, x1 = pix.max(0) + 1
            if len(pix) < 0.2 * (y1 - y0) * (x1 - x0):
                continue  # a thin fringe, not a shape
            crop = np.zeros((y1 - y0, x1 - x0), dtype=bool)
            crop[pix[:, 0] - y0, pix[:, 1] - x0] = True
            shape, iou = classify_shape(crop)
            slot = nearest_slot((x0 + x1) / 2 / W, (y0 + y1) / 2 / H)
            found.append(DetectedShape(_NAMES[ci], shape, slot, (int(y0), int(x0), int(y1), int(x1)), len(pix), iou))
    found.sort(key=lambda s: -s.area)
    return Detection(background, tuple(found))


def _match(expected: tuple[ShapeSpec, ...], found: tuple[ShapeSpec, ...]) -> list[tuple[ShapeSpec, ShapeSpec | None]]:
    """Pair each expected shape with a distinct found shape, maximising the number of agreeing
    attributes (colour, shape, slot); unpaired expected shapes get None."""
    padded = list(found) + [None] * len(expected)
    best, best_score = None, -1
    for perm in permutations(range(len(padded)), len(expected)):
        score = sum(_agreement(e, padded[j]) for e, j in zip(expected, perm))
        if score > best_score:
            best, best_score = perm, score
    return [(e, padded[j]) for e, j in zip(expected, best)]


def _agreement(e: ShapeSpec, f: ShapeSpec | None) -> int:
    if f is None:
        return 0
    return int(e.colour == f.colour) + int(e.shape == f.shape) + int(e.slot == f.slot)


def check(image, text: str, **detect_kw) -> dict:
    """One image against its caption -> per-attribute hits and the detection.

    Returns a dict: ``expected`` (n shapes), ``colour``/``shape``/``position`` (how many of the
    expected shapes have a matched detected shape with that attribute right), ``count_ok``
    (exactly as many shapes detected as asked), ``exact`` (count_ok and every attribute right),
    ``detected`` (list of (colour, shape, slot)).
    """
    expected = parse_caption(text)
    det = detect(image, **detect_kw)
    pairs = _match(expected, det.specs)
    hits = {k: sum(int(f is not None and getattr(e, a) == getattr(f, a)) for e, f in pairs)
            for k, a in (("colour", "colour"), ("shape", "shape"), ("position", "slot"))}
    count_ok = len(det.shapes) == len(expected)
    exact = count_ok and all(v == len(expected) for v in hits.values())
    return {"expected": len(expected), **hits, "count_ok": count_ok, "exact": exact,
            "detected": [(s.colour, s.shape, s.slot) for s in det.shapes], "background": det.background}


def score(images, captions, **detect_kw) -> dict:
    """Accuracy of images against their captions.

    ``colour``, ``shape``, ``position``: fraction of all requested shapes (a two-shape caption
    counts twice) whose matched detected shape has the right colour / shape / slot; shapes are
    matched one-to-one to maximise agreement, so a missing shape counts wrong on all three.
    ``count``: fraction of images with exactly the requested number of shapes; ``exact``:
    fraction of images entirely right. Also ``n_images`` and ``n_shapes``.
    """
    images, captions = list(images), list(captions)
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images for {len(captions)} captions")
    if not images:
        raise ValueError("score needs at least one image")
    results = [check(im, t, **detect_kw) for im, t in zip(images, captions)]
    n_shapes = sum(r["expected"] for r in results)
    out = {k: sum(r[k] for r in results) / n_shapes for k in ("colour", "shape", "position")}
    out["count"] = sum(r["count_ok"] for r in results) / len(results)
    out["exact"] = sum(r["exact"] for r in results) / len(results)
    out["n_images"], out["n_shapes"] = len(results), n_shapes
    return out
