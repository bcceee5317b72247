"""Procedural "coloured shapes" scenes with captions: the training data of the demo model.

A *scene* is a flat background plus one or two flat-coloured shapes, each in a *slot*:

* one shape: ``left``, ``right``, ``top``, ``bottom`` or ``centre`` —
  "a red circle on the left", "a green triangle at the top", "a blue ring in the centre";
* two shapes side by side (slots ``left`` + ``right``) or stacked (``top`` + ``bottom``) —
  "a red circle on the left of a blue square" (or, the same scene, "a blue square on the
  right of a red circle"), "a yellow cross above a purple diamond".

Shapes are rendered without anti-aliasing (each pixel takes exactly one palette colour), so
:mod:`musefast.demo_data.checker` reads a rendered scene back exactly. Everything is a pure
function of a seed: :class:`ShapesDataset` item ``i`` of seed ``s`` is the same image and
caption on every machine.

Held-out combinations (for measuring generalisation to captions never seen in training):
a scene is held out when a fixed linear rule over its attribute indices hits 0 modulo 7
(:func:`is_held_out`). For one-shape scenes this holds out 30 of the 210 (colour, shape,
slot) triples while every (colour, shape), (colour, slot) and (shape, slot) pair keeps
training examples; about 1/7 of the two-shape scenes are held out the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np

# Well separated in RGB from each other and from every background (the checker assigns each
# pixel to the nearest palette entry).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (245, 220, 30),
    "green": (30, 160, 50),
    "cyan": (30, 200, 210),
    "blue": (30, 70, 220),
    "purple": (130, 50, 170),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
    "beige": (235, 220, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
SLOTS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
# Slot centres as fractions of the image side (x, y); y grows downwards.
SLOT_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5),
}
# Two-shape layouts: relation -> (slot of the first-named shape, slot of the second).
RELATIONS: dict[str, tuple[str, str]] = {
    "left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"), "below": ("bottom", "top"),
}
_SINGLE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                   "centre": "in the centre"}
_RELATION_PHRASES = {"left of": "on the left of", "right of": "on the right of", "above": "above", "below": "below"}
CROSS_HALF_WIDTH = 0.36  # arm half-thickness of a cross, as a fraction of its half side
RING_INNER = 0.5  # inner radius of a ring, as a fraction of its outer radius
HOLD_OUT_MODULUS = 7


@dataclass(frozen=True, order=True)
class ShapeSpec:
    """One shape of a scene: colour name, shape name and slot name."""

    colour: str
    shape: str
    slot: str

    def __post_init__(self):
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {sorted(COLOURS)}, got {self.colour!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.slot not in SLOTS:
            raise ValueError(f"slot must be one of {SLOTS}, got {self.slot!r}")


@dataclass(frozen=True)
class Scene:
    """The content of an image: shapes (in canonical slot order) and the background name.

    Two scenes with the same ``objects`` are the same caption combination whatever the
    background and the phrasing of the caption.
    """

    objects: tuple[ShapeSpec, ...]
    background: str = "white"

    def __post_init__(self):
        objects = tuple(sorted(self.objects, key=lambda o: SLOTS.index(o.slot)))
        object.__setattr__(self, "objects", objects)
        slots = [o.slot for o in objects]
        if len(objects) == 1:
            pass
        elif len(objects) == 2:
            if set(slots) not in ({"left", "right"}, {"top", "bottom"}):
                raise ValueError(f"two shapes must occupy left+right or top+bottom, got {slots}")
        else:
            raise ValueError(f"a scene has one or two shapes, got {len(objects)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {sorted(BACKGROUNDS)}, got {self.background!r}")

    @property
    def key(self) -> tuple[ShapeSpec, ...]:
        """The caption combination (background excluded)."""
        return self.objects


# -- captions ------------------------------------------------------------------------------

def caption(scene: Scene, variant: int = 0) -> str:
    """The caption of ``scene``. Two-shape scenes have two phrasings (``variant`` 0 or 1):
    "A on the left of B" / "B on the right of A", "A above B" / "B below A"."""
    objs = scene.objects
    if len(objs) == 1:
        o = objs[0]
        return f"{_article(o.colour)} {o.colour} {o.shape} {_SINGLE_PHRASES[o.slot]}"
    first, second = objs  # canonical order: left before right, top before bottom
    relation = "left of" if first.slot == "left" else "above"
    if variant % 2:
        first, second = second, first
        relation = {"left of": "right of", "above": "below"}[relation]
    return (f"{_article(first.colour)} {first.colour} {first.shape} {_RELATION_PHRASES[relation]} "
            f"{_article(second.colour)} {second.colour} {second.shape}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_OBJ = rf"an? ({_COLOUR_RE}) ({_SHAPE_RE})"
_SINGLE_RE = re.compile(rf"^{_OBJ} (on the left|on the right|at the top|at the bottom|in the centre|in the center)$")
_PAIR_RE = re.compile(rf"^{_OBJ} (on the left of|on the right of|to the left of|to the right of|left of|right of|above|below) {_OBJ}$")


def parse_caption(text: str) -> tuple[ShapeSpec, ...]:
    """Caption -> the shapes it asks for, in canonical slot order. ValueError if it does not
    follow the dataset's grammar (case and surrounding spaces/full stop are ignored)."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    t = " ".join(text.lower().strip().rstrip(".").split())
    m = _SINGLE_RE.match(t)
    if m:
        where = m.group(3).split()[-1]
        slot = "centre" if where == "center" else where
        return (ShapeSpec(m.group(1), m.group(2), slot),)
    m = _PAIR_RE.match(t)
    if m:
        rel = m.group(3)
        rel = "above" if rel == "above" else "below" if rel == "below" else ("left of" if "left" in rel else "right of")
        slot_a, slot_b = RELATIONS[rel]
        objs = (ShapeSpec(m.group(1), m.group(2), slot_a), ShapeSpec(m.group(4), m.group(5), slot_b))
        return tuple(sorted(objs, key=lambda o: SLOTS.index(o.slot)))
    raise ValueError(f"caption {text!r} does not follow the shapes grammar, e.g. 'a red circle on the left' "
                     "or 'a red circle on the left of a blue square'")


def caption_word_objects(text: str) -> list[ShapeSpec | None]:
    """Which shape each whitespace-separated word of ``text`` describes.

    One-shape captions: every word describes the one shape ("on the left" included). Two-shape
    captions: the first three words ("a red circle") describe the first-named shape, the last
    three the second, and the relation words in between ("on the left of") neither (None).
    Used to give every token of a caption its own training target (the demo text encoder)."""
    objects = parse_caption(text)
    words = text.split()
    if len(objects) == 1:
        return [objects[0]] * len(words)
    rel = " ".join(words[3:-3]).lower()
    # the relation decides which slot the first-named shape takes (the two shapes' slots differ)
    first_slot = RELATIONS["above" if rel == "above" else "below" if rel == "below"
                           else "left of" if "left" in rel else "right of"][0]
    a, b = sorted(objects, key=lambda o: o.slot != first_slot)
    return [a] * 3 + [None] * (len(words) - 6) + [b] * 3


def vocabulary() -> list[str]:
    """Every word the captions (and the parser's alternatives) use."""
    words = ["a", "an"] + list(COLOURS) + list(SHAPES)
    words += "on the left right of at top bottom in centre center above below to".split()
    return list(dict.fromkeys(words))


# -- held-out combinations -----------------------------------------------------------------

def _index(o: ShapeSpec) -> tuple[int, int, int]:
    return list(COLOURS).index(o.colour), SHAPES.index(o.shape), SLOTS.index(o.slot)


def is_held_out(objects: Scene | tuple[ShapeSpec, ...]) -> bool:
    """Whether a caption combination belongs to the held-out split (never trained on)."""
    objs = objects.objects if isinstance(objects, Scene) else tuple(sorted(objects, key=lambda o: SLOTS.index(o.slot)))
    if len(objs) == 1:
        c, s, p = _index(objs[0])
        return (c + 2 * s + 3 * p) % HOLD_OUT_MODULUS == 0
    (c1, s1, p1), (c2, s2, _) = _index(objs[0]), _index(objs[1])
    vertical = int(p1 == SLOTS.index("top"))
    return (c1 + 2 * s1 + 3 * c2 + 4 * s2 + 5 * vertical) % HOLD_OUT_MODULUS == 0


def all_combinations(num_objects: int | None = None) -> Iterator[tuple[ShapeSpec, ...]]:
    """Every caption combination (optionally only those with ``num_objects`` shapes)."""
    if num_objects in (None, 1):
        for c in COLOURS:
            for s in SHAPES:
                for p in SLOTS:
                    yield (ShapeSpec(c, s, p),)
    if num_objects in (None, 2):
        for pair in (("left", "right"), ("top", "bottom")):
            for c1 in COLOURS:
                for s1 in SHAPES:
                    for c2 in COLOURS:
                        for s2 in SHAPES:
                            yield ShapeSpec(c1, s1, pair[0]), ShapeSpec(c2, s2, pair[1])


SPLITS = ("train", "held_out", "all")


def sample_scene(rng: np.random.Generator, *, split: str = "train", two_object_prob: float = 0.5) -> Scene:
    """A random scene of ``split`` (``train`` excludes held-out combinations, ``held_out``
    has only them, ``all`` both)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    while True:
        background = backgrounds[rng.integers(len(backgrounds))]
        if rng.random() < two_object_prob:
            slots = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
            objs = tuple(ShapeSpec(colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))], p)
                         for p in slots)
        else:
            objs = (ShapeSpec(colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))],
                              SLOTS[rng.integers(len(SLOTS))]),)
        if split == "all" or is_held_out(objs) == (split == "held_out"):
            return Scene(objs, background)


# -- rendering -----------------------------------------------------------------------------

def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of ``shape`` in coordinates normalised to its box: u, v in [-1, 1] span the
    shape's bounding square (v grows downwards; triangles point up)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "square":
        return (au < 1) & (av < 1)
    if shape == "circle":
        return u * u + v * v < 1
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 < 1) & (r2 >= RING_INNER**2)
    if shape == "diamond":
        return au + av < 1
    if shape == "triangle":
        return (av < 1) & (au < (v + 1) / 2)
    if shape == "cross":
        w = CROSS_HALF_WIDTH
        return ((au < w) & (av < 1)) | ((av < w) & (au < 1))
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render(scene: Scene, *, size: int = 64, rng: np.random.Generator | None = None,
           size_range: tuple[float, float] = (0.28, 0.375), jitter: float = 0.03) -> np.ndarray:
    """Draw ``scene`` -> uint8 (size, size, 3).

    Each shape's side is drawn uniformly from ``size_range`` (fractions of the image side)
    and its centre is moved by up to ``jitter`` (fraction of the side) from the slot centre,
    both rounded to whole pixels; with ``rng=None`` shapes are drawn at the middle size,
    exactly on the slot centres. The defaults keep the two shapes of a pair in separate
    halves of the image.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    centres = np.arange(size) + 0.5  # pixel centres
    for obj in scene.objects:
        if rng is None:
            side = round(size * (size_range[0] + size_range[1]) / 2)
            dx = dy = 0
        else:
            lo, hi = round(size * size_range[0]), round(size * size_range[1])
            side = int(rng.integers(lo, hi + 1))
            j = round(size * jitter)
            dx, dy = (int(d) for d in rng.integers(-j, j + 1, size=2))
        fx, fy = SLOT_CENTRES[obj.slot]
        cx, cy = round(fx * size) + dx, round(fy * size) + dy
        u = (centres[None, :] - cx) / (side / 2)
        v = (centres[:, None] - cy) / (side / 2)
        image[shape_mask(obj.shape, u, v)] = COLOURS[obj.colour]
    return image


class ShapesDataset:
    """Deterministic stream of (image, caption, scene): item ``i`` depends only on
    (``seed``, ``i``) and the settings.

    Args:
        seed: dataset seed.
        split: ``train``, ``held_out`` or ``all`` (see :func:`is_held_out`).
        size: image side in pixels.
        two_object_prob: probability of a two-shape scene.
        size_range, jitter: passed to :func:`render`.
    """

    def __init__(self, seed: int = 0, *, split: str = "train", size: int = 64, two_object_prob: float = 0.5,
                 size_range: tuple[float, float] = (0.28, 0.375), jitter: float = 0.03):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.seed, self.split, self.size = int(seed), split, int(size)
        self.two_object_prob, self.size_range, self.jitter = two_object_prob, tuple(size_range), jitter

    def _rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        return np.random.default_rng([self.seed, int(index)])

    def scene(self, index: int) -> Scene:
        return sample_scene(self._rng(index), split=self.split, two_object_prob=self.two_object_prob)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, Scene]:
        rng = self._rng(index)
        scene = sample_scene(rng, split=self.split, two_object_prob=self.two_object_prob)
        text = caption(scene, variant=int(rng.integers(2)))
        image = render(scene, size=self.size, rng=rng, size_range=self.size_range, jitter=self.jitter)
        return image, text, scene

    def batch(self, start: int, count: int) -> tuple[np.ndarray, list[str], list[Scene]]:
        """Items start .. start+count-1 -> (uint8 (count, size, size, 3), captions, scenes)."""
        items = [self[i] for i in range(start, start + count)]
        return np.stack([it[0] for it in items]), [it[1] for it in items], [it[2] for it in items]

    def captions(self, start: int, count: int) -> list[str]:
        """Only the captions of items start .. start+count-1 (no rendering)."""
        out = []
        for i in range(start, start + count):
            rng = self._rng(i)
            scene = sample_scene(rng, split=self.split, two_object_prob=self.two_object_prob)
            out.append(caption(scene, variant=int(rng.integers(2))))
        return out


def to_tensor(images: np.ndarray):
    """uint8 (B, H, W, 3) -> float32 torch tensor (B, 3, H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
